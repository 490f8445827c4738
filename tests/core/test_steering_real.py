"""Causal smoke test: real SmolLM2, real OneSec football experts, seeded samples from neutral prompts."""

from __future__ import annotations

import pytest

from steer_experts.evaluation import concept_rate
from steer_experts.steering import steer

pytestmark = pytest.mark.integration

NEUTRAL_PROMPTS = [
    "Let me tell you about my weekend.",
    "Here is a short story.",
    "The best thing about today is",
    "My friend and I decided to",
    "I have been thinking about",
    "Yesterday afternoon,",
    "The news this morning was",
    "Something I learned recently:",
]
# Steering moves text to teams, matches and cups well before the word "football" itself
# appears (METHOD.md), so the smoke test counts the topic's words, not one word.
FOOTBALL_WORDS = ["football", "footballs", "soccer", "goal", "goals", "match", "matches", "team", "teams", "league",
                  "club", "clubs", "stadium", "cup", "striker", "midfielder", "goalkeeper", "referee", "fans"]
SAMPLING = dict(max_new_tokens=25, do_sample=True, temperature=1.0, top_k=10, batch_size=8)


def _rate(steered, seed_base=0):
    texts = []
    for repeat in range(5):  # 8 prompts x 5 seeds = 40 samples
        texts += steered.complete(NEUTRAL_PROMPTS, seed=seed_base + repeat, **SAMPLING)
    return concept_rate(texts, FOOTBALL_WORDS)


def test_football_experts_induce_football(smollm2, football_experts):
    experts = _rate(steer(smollm2, football_experts, "football", k=300))
    unsteered = _rate(steer(smollm2, football_experts, "football", k=0))
    random_units = _rate(steer(smollm2, football_experts, "football", k=300, control="random", seed=0))
    assert experts > unsteered
    assert experts > random_units
    assert experts >= 0.2, (experts, unsteered, random_units)
