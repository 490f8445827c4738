"""The neutral sentence bank: everyday sentences on varied topics, the default negatives of any word.

The bank ships with the package (``neutral_bank.json.gz``). It was written once by
:class:`~.writer.ConceptWriter` in the "everyday" style over :data:`TOPICS`
(``recipes/write_neutral_bank.py``), and the file records how: model, backend, prompts,
settings, seed and counts per topic. A word's negatives are the bank's sentences that do not
mention the word in any form (:func:`~steer_experts.words.word_forms`, also inside hyphenated
compounds), sampled with a seed.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError
from ..words import word_forms

BANK_FILE = Path(__file__).with_name("neutral_bank.json.gz")

# Everyday life, broadly: no topic dominates, and none is a likely steering target on its own.
TOPICS = (
    "cooking dinner", "the morning commute", "grocery shopping", "doing laundry", "a rainy afternoon",
    "a birthday party", "paying bills", "a visit to the dentist", "gardening", "cleaning the kitchen",
    "a job interview", "a phone call with a friend", "waiting for a bus", "a trip to the library",
    "moving to a new flat", "learning to drive", "a school exam", "a team meeting at work", "a holiday by train",
    "fixing a bicycle", "baking bread", "a walk in the park", "buying new shoes", "a wedding", "a power cut",
    "a sore throat", "writing a letter", "a museum visit", "painting a room", "a neighbour's dog",
    "a noisy restaurant", "a hotel stay", "an early flight", "a board game night", "a farmers' market",
    "a broken washing machine", "a snowy morning", "knitting a scarf", "a music lesson", "a hospital visit",
    "the first day at a new school", "a camping trip", "an online order", "a bank appointment", "a picnic",
    "a traffic jam", "a cup of coffee", "a lost wallet", "a family dinner", "reading a novel",
    "a football match on television", "a hot summer day", "a new phone", "recycling", "a yoga class",
    "a haircut", "a child's homework", "a quiz show", "an old photograph", "a city tour",
    "a late train", "a garage sale", "making tea", "a science fair", "a thunderstorm", "a tax form",
    "a concert ticket", "a flat tyre", "a sleepless night", "a cooking class", "a charity run",
    "a new recipe", "a job promotion", "a quiet Sunday", "a dinner invitation", "a broken window",
    "an art class", "a long queue", "a farm visit", "a village fair",
)


@functools.cache
def _bank() -> dict:
    with gzip.open(BANK_FILE, "rt", encoding="utf-8") as f:
        return json.load(f)


def load_neutral_bank() -> list[str]:
    """Every sentence of the bank, in file order."""
    return [row["text"] for row in _bank()["sentences"]]


def bank_provenance() -> dict:
    """How the bank was written: model, backend, settings, prompts, seed, counts per topic."""
    return _bank()["provenance"]


def neutral_negatives(word: str, n: int, seed: int = 0) -> list[str]:
    """``n`` bank sentences that never mention ``word`` (or its plural and inflections), drawn with ``seed``
    (all of them, shuffled, if fewer are left).

    Raises:
        InvalidArgumentError: an empty word, or ``n`` < 1.
    """
    if not word.strip():
        raise InvalidArgumentError("The word is empty; give the word the negatives must not mention.")
    if n < 1:
        raise InvalidArgumentError(f"n must be at least 1, got {n}.")
    forms = sorted(word_forms(word.strip()), key=len, reverse=True)
    # Stricter than a positive's mention: a hyphen is a boundary too, as "coffee-shop" names coffee.
    naming = re.compile(r"(?<![^\W_])(?:" + "|".join(map(re.escape, forms)) + r")(?![^\W_])", re.IGNORECASE)
    clean = [s for s in load_neutral_bank() if not naming.search(s)]
    order = np.random.default_rng(seed).permutation(len(clean))[:n]
    return [clean[i] for i in order]
