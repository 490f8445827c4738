"""The steering-frontier recipe end to end at CI size, on the real SmolLM2 and the example concepts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from steer_experts.concepts import ConceptSet
from steer_experts.evaluation import concept_presence, concept_words
from steer_experts.evaluation.concept_score import ConceptClassifier
from steer_experts.steering import SteeredModel

from ..helpers import EXAMPLES, is_png, read_csv, recipe
from .test_steering_recipes import example_experts, no_generation  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration

GRID = {"experts": [{"k": 3, "alpha": 1.0}, {"k": 30, "alpha": 1.0},
                    {"per_layer": 1, "alpha": 0.5, "value": "on_p90", "positions": "generated"}], "experts_late": [{"k": 3}],
        "experts_clamp": [{"k": 3}], "experts_aligned": [{"k": 3}], "experts_promoting": [{"k": 3}], "experts_add": [{"k": 30, "alpha": 4.0}],
        "random": [{"k": 3}],
        "diffmean": [{"layer": 15, "factor": 0.2}, {"layer": 25, "factor": 0.8}]}


def token_weighted_ppl(rows, scorer):
    """exp(total NLL / total tokens) of the rows' texts, from each text's perplexity and length."""
    n = np.array([len(scorer.tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in rows])
    return float(np.exp(np.sum(np.log([r["ppl"] for r in rows]) * n) / n.sum()))


def test_steering_frontier(example_experts, smollm2, tmp_path, monkeypatch):
    frontier = recipe("steering_frontier")
    out = tmp_path / "frontier"
    argv = ["--out", str(out), "--experts", str(example_experts), "--concepts", str(EXAMPLES), "--concept", "football",
            "--n-prompts", "4", "--samples-per-prompt", "2", "--max-new-tokens", "5", "--scorer", "smollm2-135m",
            "--n-boot", "100", "--grid", json.dumps(GRID)]
    summary = frontier.main(argv)

    dev = [r for r in read_csv(out / "frontier.csv") if r["half"] == "dev"]
    assert sorted(r["method"] for r in dev) == sorted([m for m, settings in GRID.items() for _ in settings] + ["prompt"])
    assert summary["classifier_accuracy"]["football"] >= 0.5
    football = ConceptSet.load(EXAMPLES).with_sampled_negatives(seed=0)["football"]
    classifier = ConceptClassifier.fit(football, seed=0)
    halves = frontier.split_prompts(frontier.parse_args(argv))
    assert set(halves["dev"]).isdisjoint(halves["test"]) and len(halves["dev"]) == len(halves["test"]) == 2
    for row in summary["dev"]:
        setting = json.loads(row["setting"])
        cell = [json.loads(line) for line in (out / "cells" / f"{frontier.cell_name('football', 'dev', row['method'], setting)}.jsonl").read_text().splitlines()]
        texts = [c["text"] for c in cell]
        assert {c["prompt"] for c in cell} == set(halves["dev"]) and len(cell) == 4
        # independent recomputation of the point estimates (all prompts have the same number of samples)
        assert row["concept_score"] == pytest.approx(classifier.probabilities(texts).mean(), abs=1e-9)
        assert row["p_word"] == pytest.approx(concept_presence(texts, concept_words("football")).mean())
        base = [json.loads(line) for line in (out / "cells" / f"{frontier.cell_name('football', 'dev', 'base', {})}.jsonl").read_text().splitlines()]
        assert row["ppl_ratio"] == pytest.approx(token_weighted_ppl(cell, smollm2) / token_weighted_ppl(base, smollm2))
        for name in ("concept_score", "ppl_ratio", "p_word"):
            assert row[f"{name}_low"] <= row[name] + 1e-12 and row[name] <= row[f"{name}_high"] + 1e-12

    # each method's test point is its best dev cell within the budget, and nothing else is reported
    for budget in (1.5, 2.0):
        for method in GRID.keys() | {"prompt"}:
            mine = [r for r in summary["dev"] if r["method"] == method and r["ppl_ratio"] <= budget]
            tested = [r for r in summary["test"] if r["method"] == method and r["budget"] == budget]
            if mine:
                best = max(mine, key=lambda r: (r["concept_score"], -r["ppl_ratio"]))
                assert [t["setting"] for t in tested] == [best["setting"]]
            else:
                assert not tested
        assert sum(bool(r.get("best_variant")) for r in summary["test"] if r["budget"] == budget) <= 1
    assert "| method |" in (out / "report.md").read_text() and is_png(out / "frontier_football.png")

    # a grid setting is steer()'s own arguments: here one unit per layer, moved half way to its on_p90
    from steer_experts.experts import ExpertSet

    expert_set = ExpertSet.from_pretrained(example_experts)
    steering = frontier.Steering(SimpleNamespace(get=lambda _=None: smollm2), expert_set, None, out)
    built = steering.build("football", "experts", GRID["experts"][2])
    plan = built.plan
    assert plan.layer.tolist() == list(range(len(expert_set.sites))) and built.positions == "generated"
    on_p90 = expert_set.expertise.on_p90[expert_set.concept_index("football")]
    offsets = np.cumsum([0] + [site.width for site in expert_set.sites])[plan.layer]
    np.testing.assert_array_equal(plan.target, on_p90[offsets + plan.neuron])
    assert np.all(plan.weight == 0.5)

    monkeypatch.setattr(SteeredModel, "complete", no_generation)
    again = frontier.main(argv)  # resumes: every cell is on disk
    assert [r["concept_score"] for r in again["dev"]] == [r["concept_score"] for r in summary["dev"]]


@pytest.mark.parametrize("grid", ['{"experts": [{"k": 3, "per_layer": 1}]}', '{"experts": [{"alpha": 1.0}]}',
                                  '{"experts": [{"k": 3, "mode": "add"}]}', '{"diffmean": [{"layer": 3}]}',
                                  '{"prompt": [{"k": 3}]}', '{"expert": [{"k": 3}]}', '{"experts": {"k": 3}}'])
def test_a_grid_setting_that_does_not_fit_its_method_is_refused(grid, tmp_path, capsys):
    with pytest.raises(SystemExit):
        recipe("steering_frontier").parse_args(["--out", str(tmp_path / "out"), "--grid", grid])
    assert "--grid" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
