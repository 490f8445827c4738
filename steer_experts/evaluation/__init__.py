"""Stage 5: measure steered generations.

The metrics of self-conditioning (Suau et al. 2022):

* **p(concept)** -- :func:`concept_rate`, the share of continuations that
  contain the concept word or one of its inflections (:func:`concept_words`).
* **Perplexity** -- :func:`perplexity`, of the generations under a causal LM
  (a different model than the steered one, and the steered model itself).
* **Diversity** -- :func:`self_bleu` (n = 3, 4; lower is more diverse) and
  :func:`distinct_n` (higher is more diverse).
* **Uncertainty** -- :func:`bootstrap_interval`, a percentile bootstrap interval
  for any statistic; on a 0/1 vector it is the interval of a rate.

All functions are pure: they take texts (and a model for perplexity) and return
numbers. The same metrics are shipped as ``evaluate`` modules; load them with
``evaluate.load(metric_path("self_bleu"))``.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

# ----------------------------------------------------------------- concept words

# Irregular plurals of common concept nouns; anything else goes through `extra`.
IRREGULAR_PLURALS: dict[str, str] = {
    "man": "men",
    "woman": "women",
    "child": "children",
    "person": "people",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "mouse": "mice",
}

_VOWELS = frozenset("aeiou")


def _plurals(word: str) -> list[str]:
    """Plural forms of one lower-case English noun (several where spelling varies)."""
    if word in IRREGULAR_PLURALS:
        return [IRREGULAR_PLURALS[word]]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return [word + "es"]
    if len(word) > 1 and word.endswith("y") and word[-2] not in _VOWELS:
        return [word[:-1] + "ies"]
    if word.endswith("o"):
        # "potatoes" but "photos": keep both, a wrong spelling never matches real text.
        return [word + "s", word + "es"]
    return [word + "s"]


def concept_words(concept: str, extra: Iterable[str] = ()) -> list[str]:
    """Return the concept word and its simple English inflections, lower case.

    Includes the word itself, its plural (-s, -es, consonant+y -> -ies, and the
    irregulars in :data:`IRREGULAR_PLURALS` such as man -> men, woman -> women),
    and the possessives of both (``man's``, ``men's``, ``footballs'``). For a
    multi-word concept only the last word is inflected ("ice cream" -> "ice
    creams"). ``extra`` forms (e.g. ``"footballer"``) are added verbatim, lower
    cased. Derived words are *not* generated: "footballer" is a different word
    from "football" and counts only if passed in ``extra``.
    """
    base = " ".join(concept.split()).lower()
    if not base:
        raise ValueError("concept is empty; pass the concept word, e.g. concept_words('football').")
    head, _, last = base.rpartition(" ")
    prefix = head + " " if head else ""
    forms = [base]
    for plural in _plurals(last):
        forms.append(prefix + plural)
    possessives = [f + ("'" if f.endswith("s") and f != base else "'s") for f in forms]
    words = forms + possessives + [" ".join(e.split()).lower() for e in extra]
    return list(dict.fromkeys(w for w in words if w))


@functools.lru_cache(maxsize=64)
def _concept_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first so the alternation prefers "football's" over "football";
    # (?<!\w)/(?!\w) instead of \b so words ending in an apostrophe still match.
    alternatives = sorted({w.lower() for w in words}, key=len, reverse=True)
    body = "|".join(r"\s+".join(re.escape(part) for part in w.split()) for w in alternatives)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)


def _word_tuple(words: Iterable[str]) -> tuple[str, ...]:
    if isinstance(words, str):
        raise TypeError(f"words must be a list of words, not the string {words!r}; use concept_words({words!r}).")
    cleaned = tuple(" ".join(w.split()) for w in words)
    cleaned = tuple(w for w in cleaned if w)
    if not cleaned:
        raise ValueError("words is empty; pass e.g. concept_words('football').")
    return cleaned


def contains_concept(text: str, words: Iterable[str]) -> bool:
    """Whether ``text`` contains any of ``words`` as a whole word, case-insensitive.

    Whole word means not preceded or followed by a letter, digit or underscore:
    "Football's" and "football-mad" match "football"; "footballer" does not.
    """
    return _concept_pattern(_word_tuple(words)).search(text) is not None


def concept_presence(texts: Sequence[str], words: Iterable[str]) -> np.ndarray:
    """Return a boolean array: for each text, whether it contains the concept (see :func:`contains_concept`)."""
    texts = _nonempty_texts(texts, "concept_presence")
    pattern = _concept_pattern(_word_tuple(words))
    return np.array([pattern.search(t) is not None for t in texts], dtype=bool)


def concept_rate(texts: Sequence[str], words: Iterable[str]) -> float:
    """Return p(concept): the share of ``texts`` that contain the concept, in [0, 1].

    For its 95% interval use ``bootstrap_interval(concept_presence(texts, words))``.
    """
    return float(concept_presence(texts, words).mean())


def _nonempty_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{what} takes a list of texts, not a single string; wrap it in a list.")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{what} got an empty list of texts; generate at least one continuation first.")
    return texts


# ----------------------------------------------------------------- diversity

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
    references = _nonempty_texts(references, "bleu references")
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
    texts = _nonempty_texts(texts, "self_bleu")
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
    texts = _nonempty_texts(texts, "distinct_n")
    grams = [g for t in texts for g in _ngrams(list(tokenize(t)), n)]
    if not grams:
        raise ValueError(f"distinct_n: no text has {n} tokens, so there is no {n}-gram to count.")
    return len(set(grams)) / len(grams)


# ----------------------------------------------------------------- uncertainty


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values``.

    Resamples ``values`` with replacement ``n_resamples`` times and returns
    ``(estimate, low, high)``: the statistic on the full sample and the
    (1 - confidence)/2 and (1 + confidence)/2 quantiles of the resampled
    statistics. On a 0/1 vector with ``np.mean`` this is the interval of a rate.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1:
        raise ValueError(f"bootstrap_interval takes a 1-D vector of values, got shape {data.shape}.")
    if data.size == 0:
        raise ValueError("bootstrap_interval got no values; it needs at least one observation.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1 (e.g. 0.95), got {confidence}.")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}.")
    rng = np.random.default_rng(seed)
    resampled = np.array(
        [statistic(data[rng.integers(0, data.size, size=data.size)]) for _ in range(n_resamples)],
        dtype=np.float64,
    )
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return float(statistic(data)), float(low), float(high)


# ----------------------------------------------------------------- perplexity


def _start_token_id(tokenizer) -> int:
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        "the tokenizer has neither a BOS nor an EOS token to start each sequence with; "
        "pass add_start_token=False (the first token of each text is then context, not scored)."
    )


def perplexity(
    texts: Sequence[str],
    model: torch.nn.Module,
    tokenizer,
    *,
    prompts: Sequence[str] | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    add_start_token: bool = True,
    progress: bool = True,
) -> np.ndarray:
    """Per-text perplexity of ``texts`` under a causal LM: exp(mean token NLL in nats).

    Each sequence is ``[start] + prompt tokens + text tokens``; only the text
    tokens are scored, so with ``prompts`` (one per text) this is the perplexity
    of a continuation given its prompt. Prompt and text are tokenised apart, as
    generated continuations are. The start token is the tokenizer's BOS (EOS if
    it has none, as for GPT-2) and lets the first text token be scored; with
    ``add_start_token=False`` and no prompt, the first text token is context only.

    ``model`` is any module whose call ``model(input_ids=..., attention_mask=...)``
    returns an object with ``.logits`` (a Hugging Face causal LM, with hooks if
    steered). Batches are right-padded with attention masks and sorted by
    length; no gradients are kept and the model is put in eval mode for the
    call. Returns a float64 array in the order of ``texts``; a text with no
    scored token (empty) gets NaN.
    """
    texts = _nonempty_texts(texts, "perplexity")
    if prompts is not None:
        prompts = list(prompts)
        if len(prompts) != len(texts):
            raise ValueError(f"perplexity got {len(prompts)} prompts for {len(texts)} texts; pass one prompt per text.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device

    start = [_start_token_id(tokenizer)] if add_start_token else []
    text_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else [[] for _ in texts]
    sequences = [start + list(p) + list(t) for p, t in zip(prompt_ids, text_ids)]
    # Position of the first scored token: it needs at least one token before it.
    first_scored = [max(1, len(start) + len(p)) for p in prompt_ids]

    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(len(s) for s in sequences)
    if max_positions is not None and longest > max_positions:
        raise ValueError(
            f"a prompt + text is {longest} tokens, more than the model's {max_positions} positions; shorten the texts."
        )
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    result = np.full(len(texts), np.nan, dtype=np.float64)
    order = sorted(range(len(texts)), key=lambda i: -len(sequences[i]))
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
                _score_batch(model, [sequences[i] for i in batch], [first_scored[i] for i in batch],
                             pad_id, device, result, batch)
    finally:
        model.train(was_training)
    return result


def _score_batch(
    model: torch.nn.Module,
    sequences: list[list[int]],
    first_scored: list[int],
    pad_id: int,
    device: torch.device,
    result: np.ndarray,
    positions: list[int],
) -> None:
    """Write the perplexity of each sequence of one batch into ``result[positions]``."""
    width = max(len(s) for s in sequences)
    if width < 2:  # nothing to predict in this batch
        return
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    scored = torch.zeros((len(sequences), width - 1), dtype=torch.bool)  # scored[:, t] <=> token t+1 is scored
    for row, (seq, first) in enumerate(zip(sequences, first_scored)):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        scored[row, first - 1 : len(seq) - 1] = True
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:].to(device), reduction="none"
    ).to(torch.float64).cpu()
    n_scored = scored.sum(dim=1)
    mean_nll = (nll * scored).sum(dim=1) / n_scored.clamp(min=1)
    for row, pos in enumerate(positions):
        if n_scored[row] > 0:
            result[pos] = math.exp(float(mean_nll[row]))


# ----------------------------------------------------------------- evaluate modules

_METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def metric_path(name: str) -> str:
    """Path of a shipped ``evaluate`` metric script, for ``evaluate.load(metric_path(name))``.

    Names: ``"concept_presence"``, ``"concept_score"`` and ``"self_bleu"``. Loading works offline
    (``HF_HUB_OFFLINE=1``, ``HF_EVALUATE_OFFLINE=1``); the script imports
    ``steer_experts.evaluation``, so the package must be importable.
    """
    script = _METRICS_DIR / name / f"{name}.py"
    if not script.is_file():
        available = sorted(p.name for p in _METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"no shipped metric named {name!r}; available: {available}.")
    return str(script)
