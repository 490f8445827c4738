"""The steer-experts command line, on the real SmolLM2 and the example concepts."""

from __future__ import annotations

import pytest

from steer_experts.cli import main
from steer_experts.experts import ExpertSet

from .test_interventions import tiny_llama  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def example_dir(smollm2, tmp_path_factory):
    """`steer-experts discover` on examples/concepts.jsonl; returns the output folder."""
    out = tmp_path_factory.mktemp("example")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEER_EXPERTS_CACHE", str(out / "cache"))
        mp.setattr("steer_experts.models.load_model", lambda *a, **k: smollm2)
        assert main(["discover", "--concepts", "examples/concepts.jsonl", "--out", str(out / "experts")]) == 0
    return out / "experts"


@pytest.mark.integration
def test_discover_writes_experts_figure_and_summary(example_dir, smollm2, capsys):
    expert_set = ExpertSet.from_pretrained(example_dir, model=smollm2)
    assert expert_set.concepts == ["football", "music", "cooking", "ocean"]
    assert (example_dir / "ap_by_layer.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["search", "--experts", str(example_dir), "music", "--k", "3"]) == 0
    printed = capsys.readouterr().out
    for row in expert_set.experts_of("music", 3):
        assert f"{row['layer']:>5} {row['neuron']:>6} {row['ap']:>7.4f}" in printed


@pytest.mark.integration
def test_label_and_audit(example_dir, capsys):
    expert_set = ExpertSet.from_pretrained(example_dir)
    best = expert_set.experts_of("cooking", 1)[0]
    assert main(["label", "--experts", str(example_dir), "--layer", str(best["layer"]),
                 "--neuron", str(best["neuron"])]) == 0
    assert f"cooking ({best['ap']:.3f})" in capsys.readouterr().out
    assert main(["audit", "--experts", str(example_dir), "--pair", "football,cooking", "--tau", "0.5"]) == 0
    shared = set(expert_set.select("football", tau=0.5).units) & set(expert_set.select("cooking", tau=0.5).units)
    assert f"{len(shared)} shared experts" in capsys.readouterr().out


@pytest.mark.integration
def test_generate_prints_both_continuations(example_dir, smollm2, capsys, monkeypatch):
    monkeypatch.setattr("steer_experts.models.load_model", lambda *a, **k: smollm2)
    assert main(["generate", "--experts", str(example_dir), "--concept", "football", "--k", "20",
                 "--max-new-tokens", "6", "--greedy", "The weather today"]) == 0
    printed = capsys.readouterr().out
    assert "unsteered" in printed and "steered toward football" in printed and "20 units" in printed


def test_bad_concepts_fail_before_anything_is_written(tmp_path, capsys):
    assert main(["discover", "--concepts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert "No concept file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_push_needs_a_saved_folder(tmp_path, capsys):
    assert main(["push", "--experts", str(tmp_path), "--repo", "user/name"]) == 2
    assert "neither a saved expert set nor a steered model" in capsys.readouterr().err


@pytest.mark.integration
def test_threads_option_sets_torch_threads_and_rejects_zero(example_dir, capsys):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["--threads", "1", "search", "--experts", str(example_dir), "music", "--k", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as exit_info:
        main(["--threads", "0", "search", "--experts", str(example_dir), "music"])
    assert exit_info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


@pytest.mark.integration
def test_generate_with_variants_baselines_and_a_stored_operating_point(example_dir, smollm2, capsys, monkeypatch,
                                                                        tmp_path):
    import shutil

    from steer_experts.experts import operating_point_key

    monkeypatch.setattr("steer_experts.models.load_model", lambda *a, **k: smollm2)
    common = ["--experts", str(example_dir), "--concept", "football", "--max-new-tokens", "5", "--greedy"]
    assert main(["generate", *common, "--k", "20", "--mode", "clamp", "--from-layer", "2", "Hello"]) == 0
    printed = capsys.readouterr().out
    assert "mode=clamp" in printed and "20 units" in printed
    assert main(["generate", *common, "--method", "prompt", "Hello"]) == 0
    assert "Write a few sentences about football." in capsys.readouterr().out
    assert main(["generate", *common, "--method", "diffmean", "Hello"]) == 2
    assert "pass --concepts FILE" in capsys.readouterr().err
    assert main(["generate", *common, "--method", "diffmean", "--concepts", "examples/concepts.jsonl",
                 "--layer", "20", "--factor", "0.3", "Hello"]) == 0
    assert "DiffMean football at layer 20" in capsys.readouterr().out
    assert main(["generate", *common, "--mode", "add", "Hello"]) == 2
    assert "--mode add needs the concept's sentences" in capsys.readouterr().err
    assert main(["generate", *common, "--mode", "add", "--k", "30", "--alpha", "4", "--concepts",
                 "examples/concepts.jsonl", "Hello"]) == 0
    assert "mode=add" in capsys.readouterr().out
    assert main(["generate", *common, "--k", "20", "--promoting", "Hello"]) == 0
    from steer_experts.effects import promoting_scores
    from steer_experts.steering import steer

    experts = ExpertSet.from_pretrained(example_dir)
    promoting = steer(smollm2, experts, "football", k=20, scores=promoting_scores(smollm2, experts, "football"))
    plain = steer(smollm2, experts, "football", k=20).plan
    assert set(zip(promoting.plan.layer, promoting.plan.neuron)) != set(zip(plain.layer, plain.neuron))
    expected = promoting.complete(["Hello"], max_new_tokens=5, do_sample=False, seed=0)[0]
    assert _printed_columns(capsys.readouterr().out)[1] == " ".join(expected.split())

    # --auto uses the point kept with the expert set, and needs no concept data then
    folder = shutil.copytree(example_dir, tmp_path / "experts")
    expert_set = ExpertSet.from_pretrained(folder)
    expert_set.metadata["operating_points"] = {operating_point_key("football", 2.0): {"k": 7, "alpha": 0.5}}
    expert_set.save_pretrained(folder)
    assert main(["generate", "--experts", str(folder), "--concept", "football", "--max-new-tokens", "5",
                 "--greedy", "--auto", "Hello"]) == 0
    assert "7 units" in capsys.readouterr().out
    assert main(["generate", "--experts", str(folder), "--concept", "football", "--auto",
                 "--max-perplexity-ratio", "3", "Hello"]) == 2
    assert "pass --concepts FILE" in capsys.readouterr().err


def _printed_columns(printed: str) -> tuple[str, str]:
    """The two columns of `generate`'s side-by-side table, each joined back into one text."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("unsteered")) + 2  # heading, rule
    rows = [line.split(" | ", 1) for line in lines[start:] if " | " in line]
    return tuple(" ".join(part.strip() for part in column if part.strip()) for column in zip(*rows))


def test_generate_prints_the_unsteered_and_the_steered_text_in_their_columns(tiny_llama, tmp_path, capsys,
                                                                             monkeypatch):
    """The left column is the plain model's greedy continuation, the right one the continuation with the
    top-k experts set to on_p50, each generated here by plain transformers (hooks for the steered one)."""
    import textwrap

    import numpy as np
    import torch

    from .test_interventions import synthetic_experts
    from .test_steering import lerp_reference_hooks

    experts = synthetic_experts(tiny_llama)
    experts.save_pretrained(tmp_path / "experts")
    monkeypatch.setattr("steer_experts.models.load_model", lambda *a, **k: tiny_llama)
    prompt = "The weather today"
    assert main(["generate", "--experts", str(tmp_path / "experts"), "--concept", "football", "--k", "40",
                 "--max-new-tokens", "8", "--greedy", prompt]) == 0
    left, right = _printed_columns(capsys.readouterr().out)

    tok = tiny_llama.tokenizer
    ids = tok(prompt, return_tensors="pt")["input_ids"]

    def continuation():
        out = tiny_llama.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                        do_sample=False, pad_token_id=tok.pad_token_id)
        return " ".join(textwrap.wrap(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip(), 48))

    plain = continuation()
    top = np.argsort(-experts.expertise.ap[0], kind="stable")[:40]
    handles = lerp_reference_hooks(tiny_llama.model, top, np.ones(40), experts.expertise.on_p50[0, top])
    try:
        steered = continuation()
    finally:
        for h in handles:
            h.remove()
    assert plain != steered  # else the columns could be swapped unseen
    assert (left, right) == (plain, steered)


@pytest.mark.integration
def test_steer_toward_a_word_with_no_data(smollm2, tmp_path, capsys, monkeypatch):
    """`steer` on a word in no data file writes its positives, takes negatives from the bank, discovers,
    prints both continuations and saves the steered model; a second run reuses the cached expert set
    (neither writing nor discovery runs) and prints the same text."""
    from steer_experts import discovery
    from steer_experts.steering import SteeredModel

    monkeypatch.setenv("STEER_EXPERTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("steer_experts.models.load_model", lambda *a, **k: smollm2)
    command = ["steer", "Yesterday I saw", "--concept", "lantern", "--n-positives", "30", "--n-negatives", "60",
               "--max-new-tokens", "12"]
    assert main(command + ["--save", str(tmp_path / "steered")]) == 0
    first = capsys.readouterr()
    assert "experts of 'lantern': 30 sentences written by ctranslate2-int8-chunks24 vs 60 from the neutral sentence bank" \
        in first.err
    assert "unsteered" in first.out and "steered toward lantern" in first.out
    saved = SteeredModel.from_pretrained(tmp_path / "steered", smollm2)
    assert saved.spec.concepts == {"lantern": 1.0}

    monkeypatch.setattr(discovery, "write_concepts", lambda *a, **k: pytest.fail("wrote again"))
    monkeypatch.setattr(discovery, "discover", lambda *a, **k: pytest.fail("discovered again"))
    assert main(command) == 0
    again = capsys.readouterr()
    assert again.out == first.out.split("\nWrote ")[0]


def test_steer_refuses_a_word_it_cannot_use(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["steer", "Hello", "--concept", " "])
    assert exit_info.value.code == 2 and "must not be empty" in capsys.readouterr().err
    assert main(["steer", "Hello", "--concept", "1984"]) == 2  # before any model loads: no fixture needed
    assert "The concept word '1984' has no letter" in capsys.readouterr().err
