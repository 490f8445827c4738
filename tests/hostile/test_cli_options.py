"""Hostile command lines: every bad option is one line ``steer-experts <command>: error: ...`` with exit
code 2, reported before any model is loaded, and nothing is written."""

from __future__ import annotations

import json

import pytest
import torch

from steer_experts.cli import main

from .disk import tree

CONCEPTS = [{"concept": "football", "text": "A goal was scored."}, {"concept": "music", "text": "A song played."}]


@pytest.fixture
def workdir(tmp_path, monkeypatch, saved_experts):
    """A folder with a concept file and a copy of a saved expert set; loading a model fails the test."""
    import shutil

    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CONCEPTS))
    shutil.copytree(saved_experts, tmp_path / "experts")
    shutil.copytree(saved_experts, tmp_path / "broken")
    (tmp_path / "broken" / "expert_set.safetensors").write_bytes(b"garbage" * 10)
    monkeypatch.setattr("steer_experts.models.load_model",
                        lambda *a, **k: pytest.fail("a model was loaded before the options were checked"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(argv, capsys):
    """(exit code, stderr) of ``steer-experts argv``, whether argparse or our handler reports the error."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


DISCOVER = ["discover", "--concepts", "c.jsonl", "--out", "out"]
GENERATE = ["generate", "--experts", "experts", "--concept", "football"]

# (argv, command, the message after "error: ", as a substring)
CASES = {
    "discover --top -1": (DISCOVER + ["--top", "-1"], "discover", "argument --top: must be at least 0, got -1"),
    "discover --n-negatives -1": (DISCOVER + ["--n-negatives", "-1"], "discover", "argument --n-negatives: must be at least 1, got -1"),
    "discover --n-negatives 0": (DISCOVER + ["--n-negatives", "0"], "discover", "argument --n-negatives: must be at least 1, got 0"),
    "discover --batch-size 0": (DISCOVER + ["--batch-size", "0"], "discover", "argument --batch-size: must be at least 1, got 0"),
    "discover --max-length 0": (DISCOVER + ["--max-length", "0"], "discover", "argument --max-length: must be at least 1, got 0"),
    "discover --max-length abc": (DISCOVER + ["--max-length", "abc"], "discover", "argument --max-length: not an integer: 'abc'"),
    "discover --seed -3": (DISCOVER + ["--seed", "-3"], "discover", "argument --seed: must be at least 0, got -3"),
    "discover --dtype float33": (DISCOVER + ["--dtype", "float33"], "discover", "argument --dtype: invalid choice: 'float33'"),
    "discover --pooling median": (DISCOVER + ["--pooling", "median"], "discover", "argument --pooling: invalid choice: 'median'"),
    "discover --device banana": (DISCOVER + ["--device", "banana"], "discover", "Unknown device 'banana'"),
    "discover --device auto --workers 2": (DISCOVER + ["--device", "auto", "--workers", "2"], "discover", "--device auto spreads one model over every GPU, so several processes"),
    "discover --out empty": (["discover", "--concepts", "c.jsonl", "--out", ""], "discover", "argument --out: must not be empty"),
    "discover --out is a file": (["discover", "--concepts", "c.jsonl", "--out", "c.jsonl"], "discover", "c.jsonl: it is a file, not a folder"),
    "discover --out below a file": (["discover", "--concepts", "c.jsonl", "--out", "c.jsonl/sub"], "discover", "c.jsonl is a file, not a folder"),
    "discover --out holds other files": (["discover", "--concepts", "c.jsonl", "--out", "."], "discover", "already holds files steer_experts did not write (broken, c.jsonl, experts)"),
    "discover --concepts missing": (["discover", "--concepts", "none.jsonl", "--out", "out"], "discover", "No concept file or folder at none.jsonl"),
    "generate empty prompt": (GENERATE + [""], "generate", "argument prompt: must not be empty"),
    "generate blank prompt": (GENERATE + ["   "], "generate", "argument prompt: must not be empty"),
    "generate --dtype float33": (GENERATE + ["--dtype", "float33", "Hi"], "generate", "argument --dtype: invalid choice: 'float33'"),
    "generate --device banana": (GENERATE + ["--device", "banana", "Hi"], "generate", "Unknown device 'banana'"),
    "generate --max-new-tokens 0": (GENERATE + ["--max-new-tokens", "0", "Hi"], "generate", "argument --max-new-tokens: must be at least 1"),
    "generate --temperature 0": (GENERATE + ["--temperature", "0", "Hi"], "generate", "argument --temperature: must be greater than 0"),
    "generate --temperature nan": (GENERATE + ["--temperature", "nan", "Hi"], "generate", "argument --temperature: must be a finite number"),
    "generate --tau 1.5": (GENERATE + ["--tau", "1.5", "Hi"], "generate", "argument --tau: must be in [0, 1)"),
    "generate --tau nan": (GENERATE + ["--tau", "nan", "Hi"], "generate", "argument --tau: must be a finite number"),
    "generate --alpha -1": (GENERATE + ["--alpha", "-1", "Hi"], "generate", "argument --alpha: must be at least 0"),
    "generate --alpha inf": (GENERATE + ["--alpha", "inf", "Hi"], "generate", "argument --alpha: must be a finite number"),
    "generate --k -1": (GENERATE + ["--k", "-1", "Hi"], "generate", "argument --k: must be at least 0"),
    "generate --top-k -2": (GENERATE + ["--top-k", "-2", "Hi"], "generate", "argument --top-k: must be at least 0"),
    "generate an unknown concept": (["generate", "--experts", "experts", "--concept", "rugby", "Hi"], "generate", "Concept 'rugby' is unknown"),
    "generate with a missing expert set": (["generate", "--experts", "none/x/y", "--concept", "football", "Hi"], "generate", "No expert set folder at 'none/x/y'"),
    "generate with a corrupt expert set": (GENERATE + ["--experts", "broken", "Hi"], "generate", "broken is not a valid expert set"),
    "label --neuron without --layer": (["label", "--experts", "experts", "--neuron", "3"], "label", "--layer and --neuron go together"),
    "label --layer without --neuron": (["label", "--experts", "experts", "--layer", "0"], "label", "--layer and --neuron go together"),
    "label --tau 1": (["label", "--experts", "experts", "--tau", "1"], "label", "argument --tau: must be in [0, 1)"),
    "label --tau nan": (["label", "--experts", "experts", "--tau", "nan"], "label", "argument --tau: must be a finite number"),
    "label --tau -0.1": (["label", "--experts", "experts", "--tau", "-0.1"], "label", "argument --tau: must be in [0, 1)"),
    "label a neuron that does not exist": (["label", "--experts", "experts", "--layer", "9", "--neuron", "0"], "label", "No unit at layer 9, neuron 0"),
    "label a neuron beyond the layer": (["label", "--experts", "experts", "--layer", "0", "--neuron", "48"], "label", "No unit at layer 0, neuron 48"),
    "label --experts missing": (["label", "--experts", "nothing/here/x"], "label", "No expert set folder at 'nothing/here/x'"),
    "label --experts a hub id offline": (["label", "--experts", "nothing/here"], "label", "'nothing/here' is not a local folder, and HF_HUB_OFFLINE is set"),
    "label --experts not a save": (["label", "--experts", "."], "label", "is not a saved expert set: missing"),
    "audit --tau 2": (["audit", "--experts", "experts", "--pair", "football,woman", "--tau", "2"], "audit", "argument --tau: must be in [0, 1)"),
    "audit one concept": (["audit", "--experts", "experts", "--pair", "football"], "audit", "Each audited pair needs two concepts; got ['football']"),
    "audit three concepts": (["audit", "--experts", "experts", "--pair", "football,woman,man"], "audit", "Each audited pair needs two concepts"),
    "audit unknown concept": (["audit", "--experts", "experts", "--pair", "football,rugby"], "audit", "Concept 'rugby' is unknown. Known concepts: ['football', 'woman']"),
    "audit --top -1": (["audit", "--experts", "experts", "--pair", "football,woman", "--top", "-1"], "audit", "argument --top: must be at least 0"),
    "search unknown concept": (["search", "--experts", "experts", "rugby"], "search", "Concept 'rugby' is unknown"),
    "search empty concept": (["search", "--experts", "experts", ""], "search", "argument concept: must not be empty"),
    "search --k 0": (["search", "--experts", "experts", "football", "--k", "0"], "search", "argument --k: must be at least 1"),
    "search --tau nan": (["search", "--experts", "experts", "football", "--tau", "nan"], "search", "argument --tau: must be a finite number"),
    "push a folder that is no save": (["push", "--experts", ".", "--repo", "user/x"], "push", "holds neither a saved expert set nor a steered model"),
    "push offline": (["push", "--experts", "experts", "--repo", "user/x"], "push", "HF_HUB_OFFLINE is set"),
    "--threads 0": (["--threads", "0", "search", "--experts", "experts", "football"], None, "argument --threads: must be at least 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_option_is_one_line_exit_2_and_writes_nothing(workdir, capsys, case):
    argv, command, message = CASES[case]
    before = tree(workdir)
    code, err = run(argv, capsys)
    assert code == 2
    prefix = f"steer-experts {command}: error: " if command else "steer-experts: error: "
    line = next(line for line in err.splitlines() if line.startswith(prefix))
    assert message in line, err
    assert "Traceback" not in err
    assert tree(workdir) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["discover", "generate"])
def test_cuda_without_cuda_is_refused_before_loading(workdir, capsys, command):
    argv = (DISCOVER if command == "discover" else GENERATE) + ["--device", "cuda"] + ([] if command == "discover" else ["Hi"])
    before = tree(workdir)
    code, err = run(argv, capsys)
    assert code == 2 and err.startswith(f"steer-experts {command}: error: Device 'cuda' asked for, but torch sees no CUDA GPU")
    assert tree(workdir) == before


def test_debug_shows_the_traceback(workdir, capsys):
    from steer_experts.errors import UnknownConceptError

    with pytest.raises(UnknownConceptError, match="rugby"):
        main(["--debug", "search", "--experts", "experts", "rugby"])


def test_valid_label_after_the_checks_still_works(workdir, capsys):
    from steer_experts.experts import ExpertSet

    experts = ExpertSet.from_pretrained(workdir / "experts")
    assert main(["label", "--experts", "experts", "--layer", "1", "--neuron", "5", "--tau", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("L1/5: ") and all(name in out for name, _ in experts.label(1, 5, tau=0.0))
