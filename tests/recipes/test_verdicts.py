"""The recipes' headline verdicts follow from their numbers (no model: samples written to order).

causal_validation's ablation verdict is YES when, at some k and silencing, the 95% bootstrap interval
of p(control ablated) - p(experts ablated) lies above 0, REVERSED when one lies below 0. Each case
below is built so that only one reading of that rule fits, and the gap is checked against the
proportions of mentions counted here.
"""

from __future__ import annotations

from argparse import Namespace

import pytest

from ..helpers import recipe

MENTION, OTHER = "We watched football all day.", "The sky was blue and calm."


def _cells(mentions: dict[tuple[str, int], int], n: int = 20):
    """Samples and summary rows of football's ablation cells; ``mentions[(condition, k)]`` of ``n``
    samples name the concept, the base cell half of them."""
    rows, table = [], []
    cells = [("base", "none", 0)] + [(c, "zero", k) for (c, k) in mentions]
    for condition, value, k in cells:
        hits = n // 2 if condition == "base" else mentions[(condition, k)]
        rows += [dict(concept="football", condition=condition, value=value, k=k, text=MENTION if i < hits else OTHER)
                 for i in range(n)]
        table.append(dict(concept="football", condition=condition, value=value, k=k, p_concept=hits / n, p_next=0.0))
    return rows, table


@pytest.mark.parametrize("experts_k3, random_k3, experts_k10, random_k10, supported, reversed_, first_k, lowered", [
    (10, 10, 0, 20, True, False, 10, True),    # silencing 10 experts removes the concept, 10 random units do not
    (20, 0, 10, 10, False, True, None, False),  # silencing 3 experts raises it: reversed, never shown
    (10, 10, 10, 10, False, False, None, False),  # no difference: not shown either way
    (0, 20, 20, 0, True, True, 3, True),       # one k each way: both flags, the first YES at k = 3
    (9, 11, 11, 9, False, False, None, False),  # gaps of +-0.1 on 20 samples: intervals hold 0, nothing shown
    (5, 0, 10, 10, False, True, None, False),  # below the base (0.5 -> 0.25) but the interval holds 0 at n = 20
])
def test_ablation_verdict_follows_the_gap_intervals(experts_k3, random_k3, experts_k10, random_k10, supported,
                                                    reversed_, first_k, lowered):
    cv = recipe("causal_validation", prefix="verdict")
    rows, table = _cells({("experts", 3): experts_k3, ("random", 3): random_k3,
                          ("experts", 10): experts_k10, ("random", 10): random_k10})
    verdict = cv.ablation_verdict(rows, table, "football", "random",
                                  Namespace(values=["zero"], ks=[3, 10], seed=0, n_boot=200))
    assert verdict["control"] == "random"
    assert (verdict["supported"], verdict["reversed"], verdict["lowered"]) == (supported, reversed_, lowered)
    assert (verdict["first"] or {}).get("k") == first_k
    counts = {3: (experts_k3, random_k3), 10: (experts_k10, random_k10)}
    for c in verdict["comparisons"]:
        experts, control = counts[c["k"]]
        assert c["gap"] == pytest.approx((control - experts) / 20)
        assert (c["p_experts"], c["p_control"], c["p_base"]) == (experts / 20, control / 20, 0.5)
        assert c["gap_low"] <= c["gap"] <= c["gap_high"]
        assert c["drop"] == pytest.approx(0.5 - experts / 20)
        assert c["drop_low"] <= c["drop"] <= c["drop_high"]
