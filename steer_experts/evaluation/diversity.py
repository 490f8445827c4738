"""Diversity of generated texts: BLEU, Self-BLEU (lower is more diverse) and distinct-n (higher is more diverse)."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Sequence

import numpy as np


def nonempty_texts(texts: Sequence[str], what: str) -> list[str]:
    """``texts`` as a list; refuses a bare string or an empty list, naming ``what`` (the caller) in the error."""
    if isinstance(texts, str):
        raise TypeError(f"{what} takes a list of texts, not a single string; wrap it in a list.")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{what} got an empty list of texts; generate at least one continuation first.")
    return texts


_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize_words(text: str) -> list[str]:
    """Split ``text`` into lower-case word and punctuation tokens (the default for BLEU and distinct-n)."""
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


# NLTK SmoothingFunction().method1: a zero n-gram match count becomes epsilon.
SMOOTHING_EPSILON = 0.1


def _bleu_from_counts(
    matches: Sequence[int], totals: Sequence[int], hyp_len: int, ref_len: int
) -> float:
    """Sentence BLEU from clipped match counts and n-gram totals per order 1..n."""
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    n = len(matches)
    log_precision = 0.0
    for m, t in zip(matches, totals):
        # An order the hypothesis is too short for has total 0; NLTK divides by max(1, total).
        denominator = max(1, t)
        log_precision += math.log((m if m > 0 else SMOOTHING_EPSILON) / denominator) / n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def _closest_length(hyp_len: int, ref_lens: np.ndarray) -> int:
    # Closest reference length; ties go to the shorter reference (as in NLTK).
    distance = np.abs(ref_lens - hyp_len)
    return int(ref_lens[distance == distance.min()].min())


def bleu(
    hypothesis: str,
    references: Sequence[str],
    n: int = 4,
    tokenize: Callable[[str], Sequence[str]] = tokenize_words,
) -> float:
    """Sentence BLEU of ``hypothesis`` against ``references``, in [0, 1].

    Uniform weights 1/n over n-gram orders 1..n, clipped n-gram counts, brevity
    penalty against the closest reference length (ties -> shorter), and
    smoothing "method1" of NLTK / Chen & Cherry (2014): a zero match count for
    an order becomes ``SMOOTHING_EPSILON`` = 0.1. As in NLTK, a hypothesis with
    no unigram match (or no token) scores 0. This is the BLEU of Self-BLEU in
    Texygen (Zhu et al. 2018).
    """
    _check_order(n)
    references = nonempty_texts(references, "bleu references")
    hyp = list(tokenize(hypothesis))
    refs = [list(tokenize(r)) for r in references]
    matches, totals = [], []
    for k in range(1, n + 1):
        hyp_counts = Counter(_ngrams(hyp, k))
        ref_max: Counter = Counter()
        for ref in refs:
            ref_max |= Counter(_ngrams(ref, k))
        matches.append(sum(min(c, ref_max[g]) for g, c in hyp_counts.items()))
        totals.append(sum(hyp_counts.values()))
    ref_len = _closest_length(len(hyp), np.array([len(r) for r in refs]))
    return _bleu_from_counts(matches, totals, len(hyp), ref_len)


def _check_order(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n-gram order must be a positive integer, got {n!r}.")


class _NgramIndex:
    """For each n-gram, the texts that hold it and how often, with the top two counts cached."""

    def __init__(self, counts: list[Counter]):
        self.postings: dict[tuple[str, ...], list[tuple[int, int]]] = {}
        self.top: dict[tuple[str, ...], tuple[int, int, int]] = {}  # (best count, its text, runner-up count)
        for i, counter in enumerate(counts):
            for gram, c in counter.items():
                self.postings.setdefault(gram, []).append((i, c))
                best, best_i, second = self.top.get(gram, (0, -1, 0))
                if c > best:
                    self.top[gram] = (c, i, best)
                else:
                    self.top[gram] = (best, best_i, max(second, c))

    def max_reference_count(self, gram: tuple[str, ...], hypothesis: int, is_ref: np.ndarray | None) -> int:
        """Highest count of ``gram`` over the references: all texts but ``hypothesis``, or those flagged in ``is_ref``."""
        if is_ref is None:
            best, best_i, second = self.top.get(gram, (0, -1, 0))
            return second if best_i == hypothesis else best
        return max((c for j, c in self.postings.get(gram, ()) if is_ref[j]), default=0)


def self_bleu(
    texts: Sequence[str],
    n: int = 4,
    seed: int = 0,
    max_refs: int | None = None,
    tokenize: Callable[[str], Sequence[str]] = tokenize_words,
) -> float:
    """Self-BLEU of a set of texts, in [0, 1]; higher means less diverse.

    The mean over texts of :func:`bleu` of each text against all the other
    texts as references (Zhu et al. 2018). ``max_refs`` caps the references of
    each text to a random subset of that size (drawn with ``seed``) to bound the
    O(N^2) cost on large sets. Compute it per prompt when the texts come from
    several prompts, so that shared prompts do not count as repetition.
    """
    _check_order(n)
    texts = nonempty_texts(texts, "self_bleu")
    if len(texts) < 2:
        raise ValueError("self_bleu needs at least 2 texts: each text is scored against the others.")
    if max_refs is not None and max_refs < 1:
        raise ValueError(f"max_refs must be at least 1 (or None for all other texts), got {max_refs}.")
    tokens = [list(tokenize(t)) for t in texts]
    lengths = np.array([len(t) for t in tokens])
    counts = [[Counter(_ngrams(t, k)) for t in tokens] for k in range(1, n + 1)]
    indexes = [_NgramIndex(c) for c in counts]
    n_texts = len(texts)
    subsample = max_refs is not None and max_refs < n_texts - 1
    rng = np.random.default_rng(seed)

    scores = np.empty(n_texts)
    for i in range(n_texts):
        is_ref = None
        if subsample:
            is_ref = np.zeros(n_texts, dtype=bool)
            is_ref[rng.choice(np.delete(np.arange(n_texts), i), size=max_refs, replace=False)] = True
        matches, totals = [], []
        for k in range(n):
            hyp_counts = counts[k][i]
            matches.append(sum(min(c, indexes[k].max_reference_count(g, i, is_ref)) for g, c in hyp_counts.items()))
            totals.append(sum(hyp_counts.values()))
        ref_lens = lengths[is_ref] if is_ref is not None else np.delete(lengths, i)
        ref_len = _closest_length(int(lengths[i]), ref_lens)
        scores[i] = _bleu_from_counts(matches, totals, int(lengths[i]), ref_len)
    return float(scores.mean())


def distinct_n(
    texts: Sequence[str], n: int, tokenize: Callable[[str], Sequence[str]] = tokenize_words
) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams over all texts, in (0, 1].

    N-grams do not cross text boundaries. Higher means more diverse.
    """
    _check_order(n)
    texts = nonempty_texts(texts, "distinct_n")
    grams = [g for t in texts for g in _ngrams(list(tokenize(t)), n)]
    if not grams:
        raise ValueError(f"distinct_n: no text has {n} tokens, so there is no {n}-gram to count.")
    return len(set(grams)) / len(grams)


def diversity_by_prompt(texts: Sequence[str], prompt_ids: Sequence, self_bleu_orders: Sequence[int] = (3, 4),
                        distinct_orders: Sequence[int] = (1, 2, 3)) -> dict[str, float]:
    """Diversity of one set of generations: ``self_bleu<n>`` averaged over the prompts (texts of one
    prompt against each other; prompts with one text are left out) and ``distinct<n>`` over all texts.
    A measure with nothing to measure (no prompt with two texts, no text with n tokens) is NaN, not 0."""
    by_prompt: dict = {}
    for prompt, text in zip(prompt_ids, texts):
        by_prompt.setdefault(prompt, []).append(text)
    out = {}
    for n in self_bleu_orders:
        scores = [self_bleu(t, n=n) for t in by_prompt.values() if len(t) > 1]
        out[f"self_bleu{n}"] = float(np.mean(scores)) if scores else float("nan")
    for n in distinct_orders:
        try:
            out[f"distinct{n}"] = distinct_n(texts, n)
        except ValueError:  # no text has n tokens: diversity is undefined, not zero
            out[f"distinct{n}"] = float("nan")
    return out
