"""Experts from a word alone: written positives, neutral-bank negatives, a cache keyed by every setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import steer_experts.discovery as discovery_module
from steer_experts.discovery import WordNotUsableError, discover_word, discover_words
from steer_experts.errors import InvalidArgumentError
from steer_experts.models import CACHE_ENV, LoadedModel, cache_root
from steer_experts.words import mention_pattern
from steer_experts.writing import WritingSettings

from ..conftest import tiny_config


class NamingSampler:
    """Writes seeded sentences that name the prompt's quoted word (or, with ``names=False``, never do)."""

    name = "naming"

    def __init__(self, names: bool = True):
        self.names, self.calls = names, 0

    def sample(self, messages, seed, sampling):
        self.calls += 1
        rng = np.random.default_rng(seed)
        answers = []
        for m in messages:
            word = m.split('"')[1] if self.names else "thing"
            a, b = rng.integers(0, 1000, 2)
            answers.append(f"1. The {word} stood {a} metres from the old gate.\n2. I saw {b} of them near the {word}.")
        return answers, 20 * len(messages)


@pytest.fixture(scope="module")
def tiny_instruct(tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), dtype=torch.float32).eval()
    return LoadedModel.from_hf(model, tokenizer, name="tiny-instruct")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    return tmp_path


SMALL = dict(n_positives=12, n_negatives=20, min_positives=6, writing=WritingSettings(batch_size=4, max_rounds=4),
             progress=False)


def test_a_word_gives_an_expert_set_that_is_cached(tiny_instruct, cache, monkeypatch):
    sampler = NamingSampler()
    first = discover_word(tiny_instruct, "  Lantern ", sampler=sampler, **SMALL)
    assert first.concepts == ["lantern"]
    assert (int(first.expertise.n_positives[0]), int(first.expertise.n_negatives[0])) == (12, 20)
    assert first.metadata["writing_backend"] == "naming" and first.metadata["negatives"] == "neutral sentence bank"
    calls = sampler.calls
    monkeypatch.setattr(discovery_module, "discover", lambda *a, **k: pytest.fail("the cache was not used"))
    again = discover_word(tiny_instruct, "lantern", sampler=sampler, **SMALL)
    assert sampler.calls == calls
    assert np.array_equal(again.expertise.ap, first.expertise.ap)


def test_the_cache_key_changes_with_the_word_and_every_setting(tiny_instruct, cache):
    variants = [
        dict(), dict(word="candle"), dict(n_positives=10), dict(n_negatives=25), dict(min_positives=7),
        dict(writing=WritingSettings(batch_size=4, max_rounds=5)),
        dict(writing=WritingSettings(batch_size=4, max_rounds=4, temperature=0.8)),
        dict(pooling="mean"), dict(max_length=64), dict(seed=1),
    ]
    folders = []
    for change in variants:
        settings = {**SMALL, **change}
        word = settings.pop("word", "lantern")
        discover_word(tiny_instruct, word, sampler=NamingSampler(), **settings)
        folders.append(set((cache_root() / "word_experts").iterdir()))
    sizes = [len(f) for f in folders]
    # min_positives only decides whether to fail, so it shares the cache; every other setting has its own.
    assert sizes == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9]


def test_negatives_come_from_the_bank_and_never_name_the_word(tiny_instruct, cache, monkeypatch):
    seen = {}
    real = discovery_module.discover

    def spy(model, concepts, **kw):
        seen["concept"] = concepts.concepts[0]
        return real(model, concepts, **kw)

    monkeypatch.setattr(discovery_module, "discover", spy)
    discover_word(tiny_instruct, "coffee", sampler=NamingSampler(), **SMALL)
    concept = seen["concept"]
    assert all(mention_pattern("coffee").search(s) for s in concept.positives)
    assert len(concept.negatives) == 20 and not any("coffee" in s.lower() for s in concept.negatives)


def test_words_that_cannot_be_used_fail_clearly(tiny_instruct, cache):
    for word in ("", "   ", "123", "--"):
        with pytest.raises(InvalidArgumentError, match="has no letter"):
            discover_word(tiny_instruct, word, sampler=NamingSampler(), **SMALL)
    sampler = NamingSampler(names=False)
    with pytest.raises(WordNotUsableError, match=r"kept only 0 sentences naming 'zyxq' in 4 rounds \(need 6\)"):
        discover_word(tiny_instruct, "zyxq", sampler=sampler, **SMALL)
    assert sampler.calls == 4 and not (cache_root() / "word_experts").exists()


def test_discover_words_joins_the_words(tiny_instruct, cache):
    both = discover_words(tiny_instruct, ["lantern", "candle"], sampler=NamingSampler(), **SMALL)
    assert both.concepts == ["lantern", "candle"]
    one = discover_word(tiny_instruct, "candle", sampler=NamingSampler(), **SMALL)
    assert np.array_equal(both.expertise.ap[1], one.expertise.ap[0])
