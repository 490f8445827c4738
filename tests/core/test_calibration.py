"""The automatic operating point: the choice follows its own measurements, is kept, and is used."""

from __future__ import annotations

import pytest

from steer_experts.calibration import calibrate
from steer_experts.evaluation.concept_score import ConceptClassifier
from steer_experts.experts import ExpertSet
from steer_experts.steering import steer

from ..evaluation.test_concept_score import CONCEPT
from .test_interventions import synthetic_experts, tiny_llama  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def classifier():
    return ConceptClassifier.fit(CONCEPT)


def test_calibrate_chooses_within_budget_and_keeps_the_choice(tiny_llama, classifier, tmp_path):
    experts = synthetic_experts(tiny_llama)
    point = calibrate(tiny_llama, experts, "football", classifier, ks=(3, 30), alphas=(0.5, 1.0),
                      prompts=("Hello there", "A cat sat"), samples_per_prompt=2, max_new_tokens=5,
                      max_perplexity_ratio=1.5)
    assert len(point.cells) == 4
    within = [c for c in point.cells if c["ppl_ratio"] <= 1.5]
    if within:
        assert point.within_budget
        assert point.concept_score == max(c["concept_score"] for c in within)
    else:
        assert not point.within_budget and point.ppl_ratio == min(c["ppl_ratio"] for c in point.cells)
    assert (point.k, point.alpha) in {(c["k"], c["alpha"]) for c in point.cells}

    saved = ExpertSet.from_pretrained(experts.save_pretrained(tmp_path / "experts"))
    stored = saved.operating_point("football", 1.5)
    assert (stored["k"], stored["alpha"]) == (point.k, point.alpha)
    auto = steer(tiny_llama, saved, "football", k="auto", max_perplexity_ratio=1.5)
    assert (auto.spec.k, auto.spec.alpha) == (point.k, point.alpha)
    with pytest.raises(KeyError, match="calibrate"):
        steer(tiny_llama, saved, "football", k="auto")  # no point for the default budget of 2
    with pytest.raises(ValueError, match="> 1"):
        calibrate(tiny_llama, experts, "football", classifier, max_perplexity_ratio=1.0)
