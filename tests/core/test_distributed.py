"""Discovery split over processes (gloo on CPU) against one process: the same bytes, resumable."""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import steer_experts.responses as responses_module
from steer_experts.cli import main
from steer_experts.concepts import ConceptRows
from steer_experts.distributed import Team, TeamFailedError, local_device, spawn_team, team
from steer_experts.errors import InvalidArgumentError
from steer_experts.expertise import (Expertise, _column_source, _DeviceScorer, _Plan, _evaluation_sets, _score_range,
                                     _threaded_scorer, compute_expertise)
from steer_experts.models import CACHE_ENV

from ..conftest import tiny_config
from ..helpers import EXAMPLES

N_SHARDS = 5  # 40 sentences, shards of 8


@pytest.fixture(scope="module")
def tiny_folder(tokenizer, tmp_path_factory):
    """A tiny random llama saved with SmolLM2's tokenizer; 3 layers of 49 neurons, so that 147 units
    split unevenly (73 + 74) between two processes."""
    config = tiny_config("llama", len(tokenizer))
    config.num_hidden_layers, config.intermediate_size = 3, 49
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def concepts_file(tmp_path_factory):
    """Two example concepts of 20 positives each; each samples the other's as negatives: 40 sentences."""
    rows = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    kept = [r for name in ("football", "music") for r in [r for r in rows if r["concept"] == name][:20]]
    path = tmp_path_factory.mktemp("concepts") / "concepts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return path


def _argv(model: Path, concepts: Path, out: Path, *extra: str) -> list[str]:
    return ["--threads", "1", "discover", "--model", str(model), "--concepts", str(concepts), "--out", str(out),
            "--batch-size", "4", "--shard-size", "8", "--top", "1", *extra]


@pytest.fixture(scope="module")
def lone_run(tiny_folder, concepts_file, tmp_path_factory, one_torch_thread):
    """`discover` in this process alone: (its saved expert set folder, its cache root)."""
    root = tmp_path_factory.mktemp("lone")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root / "cache"))
        assert main(_argv(tiny_folder, concepts_file, root / "experts")) == 0
    return root / "experts", root / "cache"


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path, with its bytes; but temporary files, which a
    process stopped in the middle of an atomic write leaves behind and nothing reads."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.match(".*.tmp")}


def _manifest(cache: Path) -> dict:
    (path,) = cache.rglob(responses_module.MANIFEST)
    return json.loads(path.read_text())


def _logged_member(argv: list[str], log: str, die_after_first_shard: bool) -> None:
    """One process of a test team: `discover` as the CLI runs it, logging each shard it stores to
    ``log``/<rank>; with ``die_after_first_shard``, rank 1 crashes right after storing its first."""
    rank = os.environ["RANK"]
    store = responses_module._store_shard

    def logged_store(folder, i, tensors):
        store(folder, i, tensors)
        with open(Path(log) / rank, "a") as f:
            f.write(f"{i}\n")
        if die_after_first_shard and rank == "1":
            os._exit(3)

    responses_module._store_shard = logged_store
    sys.exit(main(argv))


def _stored(log: Path) -> dict[int, list[int]]:
    """The shards each rank stored, by rank, in order."""
    return {int(p.name): [int(x) for x in p.read_text().split()] for p in log.iterdir()}


def test_two_processes_write_the_bytes_one_process_writes(lone_run, tiny_folder, concepts_file, tmp_path,
                                                          monkeypatch):
    lone_experts, lone_cache = lone_run
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "log").mkdir()
    spawn_team(2, _logged_member, _argv(tiny_folder, concepts_file, tmp_path / "experts"), str(tmp_path / "log"), False)

    # each shard was computed once, by the process the snake deals it to
    assert _stored(tmp_path / "log") == {0: [0, 3, 4], 1: [1, 2]}
    assert len(_manifest(lone_cache)["shards"]) == N_SHARDS
    assert _files(tmp_path / "experts") == _files(lone_experts)
    assert _files(tmp_path / "cache") == _files(lone_cache)


def test_a_run_that_lost_a_process_resumes_to_the_same_bytes(lone_run, tiny_folder, concepts_file, tmp_path,
                                                             monkeypatch):
    lone_experts, lone_cache = lone_run
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "log").mkdir()
    argv = _argv(tiny_folder, concepts_file, tmp_path / "experts")
    with pytest.raises(TeamFailedError, match="Process 1 of 2 ended with exit code 3"):
        spawn_team(2, _logged_member, argv, str(tmp_path / "log"), True)
    assert _stored(tmp_path / "log")[1] == [1]
    finished = _manifest(tmp_path / "cache")["checksums"]
    assert "1" in finished and "2" not in finished
    assert not (tmp_path / "experts" / "expert_set.json").exists()

    # the command line's own workers finish the job
    assert main([*argv, "--workers", "2"]) == 0
    assert _files(tmp_path / "experts") == _files(lone_experts)
    assert _files(tmp_path / "cache") == _files(lone_cache)


@pytest.mark.parametrize("device", [None, "cpu"], ids=["kernel", "torch"])
@pytest.mark.parametrize("start, stop", [(0, 13), (1, 12), (5, 6), (3, 13), (0, 0)])
def test_a_range_of_units_scores_as_in_the_whole(start, stop, device):
    """What each process scores: units start:stop, in blocks from start, equal bit for bit to the
    same columns scored in one pass, over 9,000 sentences, by the CPU kernel and by torch on a device."""
    rng = np.random.default_rng(0)
    n = 9000
    x = rng.standard_normal((n, 13)).astype(np.float32) * 100
    x[:, 4] = np.round(x[:, 4])  # ties
    listed = rng.permutation(n)
    # one concept against every other sentence, one against a listed subset: the two ways of scoring
    concepts = ConceptRows(names=["rest", "listed"], positives=[np.arange(0, 3000), listed[:700]],
                           negatives=[np.arange(3000, n), listed[700:5700]])
    whole = compute_expertise(x, concepts, device=device, progress=False)
    (n_rows, _), read = _column_source(x)
    plan = _Plan(_evaluation_sets(concepts, n_rows), n_rows)
    with _threaded_scorer(plan, 2) if device is None else nullcontext(_DeviceScorer(plan, device)) as score_block:
        part = _score_range(read, score_block, plan, n_rows, range(start, stop), 4, progress=False)
    for name in Expertise.STATS:
        assert np.array_equal(part[name], getattr(whole, name)[:, start:stop]), name


def test_one_process_is_a_team_of_one_that_never_touches_torch_distributed(monkeypatch):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.distributed, "init_process_group", None)  # called, it would raise
    alone = team()
    assert alone == Team(0, 1) and alone.lead
    alone.barrier()
    array = np.arange(6.0).reshape(2, 3)
    assert alone.gather(array)[0] is array


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "need 0 <= RANK < WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT unset"),
])
def test_bad_launch_settings_are_named(env, message, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InvalidArgumentError, match=message):
        team()


def test_workers_refuse_to_start_inside_a_team(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InvalidArgumentError, match="already one of several"):
        spawn_team(2, print)


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("n_shards", [1, 4, 5, 17])
def test_every_shard_is_dealt_to_exactly_one_process(n_shards, size):
    dealt = [responses_module._dealt_shards(n_shards, rank, size) for rank in range(size)]
    assert sorted(i for shards in dealt for i in shards) == list(range(n_shards))
    assert dealt[0] == [i for i in range(n_shards) if i % (2 * size) in (0, 2 * size - 1)]


def test_workers_share_the_threads_and_fail_before_starting(concepts_file, tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr("steer_experts.distributed.spawn_team", lambda n, fn, args: started.append((n, args)))
    argv = ["discover", "--concepts", str(concepts_file), "--out", str(tmp_path / "experts"), "--workers", "3"]
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "7", *argv]) == 0  # (this process takes --threads too)
    finally:
        torch.set_num_threads(before)
    assert main(argv) == 0
    (n, total), (_, default) = started
    assert (n, total.workers, total.threads) == (3, 1, 2)
    assert default.threads == max(1, torch.get_num_threads() // 3)

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["discover", "--concepts", str(concepts_file), "--out", str(tmp_path / "taken"), "--workers", "2"]) == 2
    assert len(started) == 2 and "Refusing to write" in capsys.readouterr().err


def test_each_process_of_a_team_gets_its_own_device(monkeypatch):
    """Under torchrun, a plain "cuda" is the process's own GPU; "auto" (one model spread over every GPU)
    cannot be shared and is refused."""
    assert [local_device(d) for d in ("cuda", "auto", "cpu")] == ["cuda", "auto", "cpu"]  # one process
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert [local_device(d) for d in ("cuda", "cuda:0", "cpu")] == ["cuda:3", "cuda:0", "cpu"]
    assert local_device("cuda", processes=1) == "cuda"
    with pytest.raises(InvalidArgumentError, match="--device auto spreads one model over every GPU"):
        local_device("auto")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(InvalidArgumentError, match="--device auto spreads one model over every GPU"):
        local_device("auto", processes=2)
