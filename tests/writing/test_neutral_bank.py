"""The neutral sentence bank shipped with the package: its size and provenance, and negatives that never
name the word."""

from __future__ import annotations

import re

import pytest

from steer_experts.errors import InvalidArgumentError
from steer_experts.words import word_forms
from steer_experts.writing import PROMPTS, load_neutral_bank, neutral_negatives
from steer_experts.writing.neutral_bank import TOPICS, bank_provenance


def _words(sentence: str) -> set[str]:
    """Every run of letters (apostrophes and hyphens split words), lower case."""
    return set(re.findall(r"[^\W\d_]+", sentence.lower()))


def test_the_bank_is_large_varied_and_says_how_it_was_written():
    bank = load_neutral_bank()
    provenance = bank_provenance()
    assert len(bank) >= 1900 and len(set(bank)) == len(bank)
    assert provenance["sentences"] == len(bank) and provenance["topics"] == list(TOPICS)
    assert provenance["prompts"] == list(PROMPTS["everyday"]) and provenance["model"] == "smollm2-135m"
    assert {"backend", "model_fingerprint", "settings", "kept_per_topic"} <= set(provenance)
    assert provenance["settings"]["seed"] == 0
    assert min(provenance["kept_per_topic"].values()) >= 20  # no topic dominates
    assert max(provenance["kept_per_topic"].values()) <= provenance["n_per_topic"]


@pytest.mark.parametrize("word", ["coffee", "train", "day", "rain", "child", "dog", "bake", "party", "ocean"])
def test_negatives_never_name_the_word_in_any_form(word):
    forms = {f for f in word_forms(word) if "'" not in f}
    bank = load_neutral_bank()
    naming = [s for s in bank if _words(s) & forms]
    negatives = neutral_negatives(word, len(bank))
    assert not [s for s in negatives if _words(s) & forms]
    assert len(negatives) == len(bank) - len(naming)  # and nothing else is removed
    if word != "ocean":
        assert naming  # these words do occur in the bank, so the check had something to remove


def test_negatives_are_seeded_draws():
    a, b = neutral_negatives("coffee", 50, seed=0), neutral_negatives("coffee", 50, seed=1)
    assert a == neutral_negatives("coffee", 50, seed=0) and a != b and len(set(a)) == 50
    with pytest.raises(InvalidArgumentError, match="empty"):
        neutral_negatives(" ", 5)
    with pytest.raises(InvalidArgumentError, match="at least 1"):
        neutral_negatives("coffee", 0)
