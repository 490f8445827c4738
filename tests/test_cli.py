"""The steer-experts command line."""

from __future__ import annotations

import pytest

from steer_experts.cli import main
from steer_experts.experts import ExpertSet


@pytest.mark.integration
def test_discover_on_the_example_concepts(smollm2, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STEER_EXPERTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("steer_experts.models.load_model", lambda *a, **k: smollm2)
    assert main(["discover", "--concepts", "examples/concepts.jsonl", "--out", str(tmp_path / "out")]) == 0
    expert_set = ExpertSet.from_pretrained(tmp_path / "out", model=smollm2)
    assert expert_set.concepts == ["football", "music", "cooking", "ocean"]
    assert (tmp_path / "out" / "ap_by_layer.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    for concept in expert_set.concepts:
        best = expert_set.experts_of(concept, 1)[0]
        assert f"{best['layer']:>5} {best['neuron']:>6} {best['ap']:>7.4f}" in printed


def test_bad_concepts_fail_before_anything_is_written(tmp_path, capsys):
    assert main(["discover", "--concepts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert "No concept file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
