"""Integration: real SmolLM2, real OneSec football, all 46,080 MLP neurons; contrastive discovery on the examples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from steer_experts.concepts import ConceptSet
from steer_experts.discovery import discover
from steer_experts.responses import collect_responses

from ..helpers import EXAMPLES

pytestmark = pytest.mark.integration


def test_football_has_a_near_perfect_expert(football_experts):
    top = football_experts.select("football", k=10)
    # An independent plain-hook probe found AP 0.989 (layer 0, neuron 450).
    assert top.ap[0] >= 0.95
    assert football_experts.n_units == 46080


def test_experts_fire_more_on_positives(football_experts):
    top = football_experts.select("football", k=50)
    assert np.all(top.on_p50 > top.off_mean)


def test_expertise_equals_sklearn_on_real_responses(football_experts, smollm2, onesec, response_cache):
    concepts = onesec.subset(["football"])
    responses = collect_responses(smollm2, concepts.sentences, cache_dir=response_cache, progress=False)
    z = responses.to_numpy()
    pos, neg = concepts.positive_indices(0), concepts.negative_indices(0)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    units = np.r_[football_experts.select("football", k=20).units,
                  np.random.default_rng(0).choice(z.shape[1], 30, replace=False)]
    for u in units:
        scores = np.r_[z[pos, u], z[neg, u]]
        assert football_experts.expertise.ap[0, u] == pytest.approx(average_precision_score(y, scores), abs=1e-9)
        assert football_experts.expertise.auroc[0, u] == pytest.approx(roc_auc_score(y, scores), abs=1e-9)
        assert football_experts.expertise.on_p50[0, u] == pytest.approx(np.median(z[pos, u]), rel=1e-6)
        assert football_experts.expertise.off_mean[0, u] == pytest.approx(np.mean(z[neg, u]), rel=1e-5, abs=1e-6)


def test_discover_contrast_scores_against_the_other_concepts_positives(smollm2, response_cache):
    concepts = ConceptSet.load(EXAMPLES).with_sampled_negatives(seed=0).subset(["music", "cooking"])
    contrasted = discover(smollm2, concepts, negatives="contrast", cache_dir=str(response_cache), progress=False)
    assert contrasted.concepts == ["music", "cooking"]
    music, cooking = concepts["music"], concepts["cooking"]
    # music's negatives: its own sampled negatives plus cooking's positives (some already among them)
    negatives = list(dict.fromkeys(music.negatives + cooking.positives))
    sentences = list(music.positives) + negatives
    responses = {}
    for name in ("music", "cooking"):  # each concept's cached responses, by sentence
        part = concepts.subset([name]).sentences
        matrix = collect_responses(smollm2, part, cache_dir=response_cache, progress=False).to_numpy()
        responses.update({s: matrix[i] for i, s in enumerate(part)})
    labels = np.r_[np.ones(len(music.positives)), np.zeros(len(negatives))]
    rng = np.random.default_rng(0)
    units = np.r_[contrasted.select("music", k=5).units, rng.choice(contrasted.n_units, 5, replace=False)]
    for u in units:
        expected = average_precision_score(labels, [responses[s][u] for s in sentences])
        assert contrasted.expertise.ap[0, u] == pytest.approx(expected, abs=1e-9)
    assert int(contrasted.expertise.n_negatives[0]) == len(negatives)
