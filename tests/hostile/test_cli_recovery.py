"""Recoverable faults through the command line: a damaged cache is repaired with a one-line warning,
and the rerun writes the same expert set, byte for byte, as a clean run."""

from __future__ import annotations

import json

import pytest

from steer_experts.cli import main

from .disk import tree

ROWS = [{"concept": c, "text": f"{c.capitalize()} sentence {i}: {w}."} for c in ("football", "music", "ocean")
        for i, w in enumerate(["one", "two", "three", "four", "five"])]


@pytest.fixture
def setup(tiny_folder, tmp_path, monkeypatch):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.setenv("STEER_EXPERTS_CACHE", str(tmp_path / "cache"))
    return ["discover", "--model", str(tiny_folder), "--concepts", str(tmp_path / "c.jsonl"), "--n-negatives", "5"]


def _shards(tmp_path):
    return sorted((tmp_path / "cache" / "responses").rglob("shard-*.safetensors"))


@pytest.mark.parametrize("fault", ["overwritten shard bytes", "truncated manifest"])
def test_damaged_cache_is_repaired_and_the_expert_set_equals_a_clean_run(setup, tmp_path, capsys, fault):
    assert main(setup + ["--out", str(tmp_path / "clean")]) == 0
    if fault == "overwritten shard bytes":
        shard = _shards(tmp_path)[0]
        data = bytearray(shard.read_bytes())
        data[-32:] = bytes(32)
        shard.write_bytes(bytes(data))
    else:
        manifest = next((tmp_path / "cache" / "responses").rglob("manifest.json"))
        manifest.write_text(manifest.read_text()[:40])
    capsys.readouterr()
    assert main(setup + ["--out", str(tmp_path / "rerun")]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("steer-experts discover: warning: ")]
    assert len(warning) == 1 and ("does not match its checksum" in warning[0] or "is corrupt" in warning[0])
    clean, rerun = tree(tmp_path / "clean"), tree(tmp_path / "rerun")
    assert rerun["expert_set.safetensors"] == clean["expert_set.safetensors"]
    assert rerun["expert_set.json"] == clean["expert_set.json"]


def test_discover_refuses_a_foreign_out_before_loading(setup, tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("steer_experts.models.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    before = tree(tiny_folder)
    assert main(setup + ["--out", str(tiny_folder)]) == 2
    assert capsys.readouterr().err.startswith(f"steer-experts discover: error: Refusing to write the expert set into "
                                              f"{tiny_folder}: it already holds files steer_experts did not write")
    assert tree(tiny_folder) == before
    assert not (tmp_path / "cache").exists()
