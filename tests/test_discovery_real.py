"""Integration: real SmolLM2, real OneSec football, all 46,080 MLP neurons."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from steer_experts.responses import collect_responses

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
