"""Stage 4: expertise of every unit for every concept.

The expertise of unit m for concept c is the average precision (AP) of the
unit's raw response as a score for "the sentence is a positive of c", exactly as
``sklearn.metrics.average_precision_score`` computes it (tied scores form one
threshold). AUROC (``roc_auc_score``, ties counted half) and response
statistics of the positives (median, mean, 90th percentile) and negatives
(mean) are kept next to it.

How it is fast. Per unit, compiled kernels (numba) count, from the highest
response down, the positives and negatives of each concept, one tie group at a
time, around numpy's vectorised sort. For positives responding s, TP and FP
count the positives and negatives responding >= s, and FP_above the negatives
responding > s:

    AP    = mean over positives i of TP(i) / (TP(i) + FP(i))
    AUROC = sum over positives of (2 n_neg - FP(i) - FP_above(i)) / (2 P n_neg)

Two kernels count them, and the plan picks the one its concepts' sizes make
cheaper (:func:`_walk_is_cheaper`); both add the same terms in the same order,
so the choice never changes a bit.

- The **merge** sorts the responses of each concept's positives and of its
  listed negatives, and merges the two. It costs a sort and a step per listed row:
  the choice for a few concepts (one concept against the rest of 1,700
  sentences: 1.5x faster than the walk).
- The **walk** sorts all the unit's sentences once and steps down them; each
  sentence knows the concepts it is a positive of and the listed concepts it is
  a negative of. It costs a sort and a step per sentence, then a step per
  (sentence, concept listing it): the choice for many concepts that share
  sentences (100 concepts of 1,100 rows over 5,050 sentences: 1.6x faster).

Concepts whose negatives are all other sentences ("rest" concepts) list no
negatives: their FP is the sentences counted minus TP. Both kernels meet each
concept's positives in order, which gives the median and 90th percentile, and
sum the means in float64.

Everything is integer-exact up to one float64 division per positive. Work
streams in blocks of ``block_units`` columns; inside a block, chunks of units
small enough to stay in cache are scored on ``threads`` threads at once (the
kernels and numpy's sort release the GIL). Every number depends only on its
own unit's column, so block and chunk sizes and thread counts never change a
result.

That is also what lets several processes of one run (see
:mod:`~steer_experts.distributed`) split the units: each scores a fixed range of
columns, from the range's first column on, and all gather the ranges. No number
mixes units: the sort, counts and float sums run within one unit's column, so
where a block or range starts changes no bit (``tests/core/test_distributed.py``
checks it).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numba
import numpy as np
from tqdm.auto import tqdm

from .distributed import team
from .errors import InvalidArgumentError

# Each chunk's working arrays stay near this many elements (2 MiB of float32, a core's L2 cache here): 15%
# faster than a quarter of it for 20 concepts of 1,250 listed rows, whose chunks then read whole cache
# lines of the block.
_CHUNK_ELEMENTS = 1 << 19
# A sort item of the walk holds its sentence in the low 32 bits, under the response's sort key.
_SENTENCE_BITS = np.uint64(32)
_SENTENCE_MASK = np.uint64(0xFFFFFFFF)


class LabelledRows(Protocol):
    """What :func:`compute_expertise` needs from a set of concepts: names and, per concept, the rows of
    its positives and negatives in the response matrix (a ``ConceptSet`` or a ``ConceptRows``)."""

    @property
    def names(self) -> list[str]: ...

    def positive_indices(self, i: int) -> np.ndarray: ...

    def negative_indices(self, i: int) -> np.ndarray: ...


@dataclass
class Expertise:
    """Per-concept, per-unit expertise scores and response statistics.

    Rows follow ``concepts``; columns are units, in the order of the responses.
    ``ap`` and ``auroc`` are float64 in [0, 1]; the ``on_*`` / ``off_mean``
    statistics are float32 in the units' activation scale.
    """

    concepts: list[str]
    ap: np.ndarray
    auroc: np.ndarray
    on_p50: np.ndarray
    on_mean: np.ndarray
    on_p90: np.ndarray
    off_mean: np.ndarray
    n_positives: np.ndarray
    n_negatives: np.ndarray

    STATS: ClassVar[tuple[str, ...]] = ("ap", "auroc", "on_p50", "on_mean", "on_p90", "off_mean")

    def index(self, concept: str) -> int:
        """Return the row of ``concept``; KeyError listing the known concepts if absent."""
        try:
            return self.concepts.index(concept)
        except ValueError:
            raise KeyError(
                f"unknown concept {concept!r}; known concepts: {', '.join(self.concepts)}"
            ) from None

    def subset(self, concepts: list[str]) -> Expertise:
        """Return a new Expertise holding only ``concepts``, in the given order."""
        rows = [self.index(c) for c in concepts]
        return Expertise(
            concepts=list(concepts),
            **{s: getattr(self, s)[rows] for s in self.STATS},
            n_positives=self.n_positives[rows],
            n_negatives=self.n_negatives[rows],
        )


def compute_expertise(
    responses, concepts: LabelledRows, *, block_units: int = 2048, threads: int | None = None,
    device=None, progress: bool = True,
) -> Expertise:
    """Score every unit as a detector of every concept.

    ``responses`` is an (N sentences, U units) float array, or an object with
    ``.shape == (N, U)`` and ``.columns(start, stop) -> (N, stop - start)``
    float32 array, read ``block_units`` columns at a time (so it may live on
    disk). Responses are scored as float32. ``concepts`` gives ``.names`` and,
    per concept i, row indices ``.positive_indices(i)`` and
    ``.negative_indices(i)`` (disjoint). ``threads`` scoring threads run at
    once (default: one per CPU this process may run on).

    ``device`` None scores with the compiled kernels on the CPU, as above (the fastest there).
    A torch device (``"cuda"``, ``"cuda:1"``, or ``"cpu"``) scores each block
    there with torch instead, in chunks of units sized to the device's free
    memory (see :class:`_DeviceScorer`). Its AP and AUROC stay within 1e-12 of
    the kernel's (the float64 sums run in another order), its percentiles
    are equal bit for bit, and its means within float32 rounding.

    Returns an :class:`Expertise` whose ``ap`` / ``auroc`` equal sklearn's
    ``average_precision_score`` / ``roc_auc_score`` per unit and concept, whose
    ``on_p50`` / ``on_p90`` equal ``np.median`` / ``np.percentile(..., 90)`` of
    the positives' responses bit for bit, and whose ``on_mean`` / ``off_mean``
    are the positives' / negatives' mean response, summed in float64.
    Raises ValueError on a concept without positives or negatives, on bad
    indices, or on NaN responses.

    With several processes (see :mod:`~steer_experts.distributed`) this is a
    collective: each scores one contiguous range of units, and every process
    returns the whole :class:`Expertise`, equal bit for bit to one process's.
    """
    if block_units < 1:
        raise ValueError(f"block_units must be >= 1, got {block_units}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for one per usable CPU), got {threads}")
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    (n_rows, n_units), read_columns = _column_source(responses)
    plan = _Plan(_evaluation_sets(concepts, n_rows), n_rows)
    scorer = _threaded_scorer(plan, threads) if device is None else nullcontext(_DeviceScorer(plan, device))
    members = team()
    units = range(n_units * members.rank // members.size, n_units * (members.rank + 1) // members.size)
    with scorer as score_block:
        scores = _score_range(read_columns, score_block, plan, n_rows, units, block_units, progress and members.lead)
    if members.size > 1:
        scores = {name: np.concatenate(members.gather(values), axis=1) for name, values in scores.items()}
    return Expertise(
        concepts=plan.names,
        **scores,
        n_positives=plan.n_pos.copy(),
        n_negatives=plan.n_neg.copy(),
    )


def scoring_device(model_device):
    """Where to score expertise for responses of a model on ``model_device`` (a torch device): on that
    GPU when it is one, else None (the compiled kernels on the CPU, the faster path there)."""
    return model_device if getattr(model_device, "type", None) == "cuda" else None


def _score_range(read_columns, score_block, plan: _Plan, n_rows: int, units: range, block_units: int,
                 progress: bool) -> dict[str, np.ndarray]:
    """Score ``units`` (a range of columns) in blocks of ``block_units`` from its start, each block by
    ``score_block(block, out)``, which fills ``out``'s (C, b) views; each stat as a (C, len(units)) array.
    The next block is read while one is scored."""
    scores = _empty_scores(len(plan.names), len(units))
    spans = [(start, min(start + block_units, units.stop)) for start in range(units.start, units.stop, block_units)]
    with tqdm(total=len(units), desc="expertise", unit="unit", disable=not progress) as bar, \
            ThreadPoolExecutor(1, thread_name_prefix="expertise-reading") as reader:
        def read(span: int):
            return reader.submit(_read_block, read_columns, *spans[span], n_rows) if span < len(spans) else None

        pending = read(0)
        for span, (start, stop) in enumerate(spans):
            block = pending.result()
            pending = read(span + 1)
            score_block(block, {name: values[:, start - units.start : stop - units.start]
                                for name, values in scores.items()})
            bar.update(stop - start)
    return scores


@contextmanager
def _threaded_scorer(plan: _Plan, threads: int):
    """A block scorer that splits the block into chunks small enough to stay in cache, scored by the
    compiled kernels on ``threads`` threads at once."""
    chunk = max(1, _CHUNK_ELEMENTS // plan.unit_elements)

    def score_block(block: np.ndarray, out: dict[str, np.ndarray]) -> None:
        def score_span(lo: int, hi: int) -> None:
            for name, values in _score_units(block[:, lo:hi], plan).items():
                out[name][:, lo:hi] = values

        spans = [(lo, min(lo + chunk, block.shape[1])) for lo in range(0, block.shape[1], chunk)]
        list(pool.map(lambda span: score_span(*span), spans))  # re-raises errors

    with ThreadPoolExecutor(threads, thread_name_prefix="expertise-scoring") as pool:
        yield score_block


def _empty_scores(n_concepts: int, n_units: int) -> dict[str, np.ndarray]:
    """Uninitialised (C, U) arrays for every statistic, in its Expertise dtype."""
    return {
        s: np.empty((n_concepts, n_units), np.float64 if s in ("ap", "auroc") else np.float32)
        for s in Expertise.STATS
    }


# --------------------------------------------------------------------------- inputs


@dataclass
class _EvaluationSet:
    """One concept's evaluation rows, checked."""

    name: str
    positives: np.ndarray  # int64 row indices
    negatives: np.ndarray  # int64 row indices


def _column_source(responses):
    """Return (N, U) and a reader ``(start, stop) -> (N, stop - start) array`` for the responses."""
    if hasattr(responses, "columns"):
        shape, read = tuple(responses.shape), responses.columns
    else:
        array = np.asarray(responses)
        shape, read = array.shape, lambda start, stop: array[:, start:stop]
    if len(shape) != 2:
        raise ValueError(f"responses must be 2-D (sentences, units), got shape {shape}")
    return (int(shape[0]), int(shape[1])), read


def _read_block(read_columns, start: int, stop: int, n_rows: int) -> np.ndarray:
    """Read units [start, stop) as an (N, B) float32 array, checked for shape and NaN."""
    columns = np.asarray(read_columns(start, stop), dtype=np.float32)
    if columns.shape != (n_rows, stop - start):
        raise ValueError(
            f"responses.columns({start}, {stop}) returned shape {columns.shape}, "
            f"expected {(n_rows, stop - start)}"
        )
    nan_units = np.flatnonzero(np.isnan(columns).any(axis=0))
    if nan_units.size:
        raise ValueError(
            f"responses contain NaN in {nan_units.size} units, e.g. unit {start + nan_units[0]}; "
            "recompute or drop those units before scoring expertise"
        )
    return columns


def _evaluation_sets(concepts: LabelledRows, n_rows: int) -> list[_EvaluationSet]:
    """Check every concept's index sets against ``n_rows`` sentences."""
    names = list(concepts.names)
    if not names:
        raise ValueError("no concepts given; expertise needs at least one concept")
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"concept names must be unique; repeated: {repeated}")
    sets = []
    for i, name in enumerate(names):
        rows = {}
        for kind, fetch in (("positive", concepts.positive_indices), ("negative", concepts.negative_indices)):
            idx = np.asarray(fetch(i))
            if idx.size == 0:
                raise ValueError(
                    f"concept {name!r} has no {kind} sentences; AP needs both positives and negatives"
                )
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise ValueError(f"concept {name!r}: {kind} indices must be a 1-D integer array")
            if idx.min() < 0 or idx.max() >= n_rows:
                raise ValueError(
                    f"concept {name!r}: {kind} indices must lie in [0, {n_rows}), "
                    f"got range [{idx.min()}, {idx.max()}]"
                )
            if np.unique(idx).size != idx.size:
                raise ValueError(f"concept {name!r}: {kind} indices contain duplicates")
            rows[kind] = idx.astype(np.int64)
        overlap = np.intersect1d(rows["positive"], rows["negative"])
        if overlap.size:
            raise ValueError(
                f"concept {name!r}: {overlap.size} sentences are both positive and negative "
                f"(e.g. row {overlap[0]})"
            )
        sets.append(_EvaluationSet(name, rows["positive"], rows["negative"]))
    return sets


# --------------------------------------------------------------------------- scoring plan


class _Plan:
    """Everything about the concepts that does not depend on the responses.

    ``positive_rows`` (C, P_max) lists each concept's positives and
    ``negative_rows`` (L, N_max) the negatives of the L concepts that list them,
    both padded with -1; ``negative_slot`` (C,) is a concept's row there, or -1
    for a concept whose negatives are all other sentences (a "rest" concept,
    whose negatives need no list). ``rest_rows`` / ``listed_rows`` say which
    concepts are which. ``walks`` says which CPU kernel scores; the walk reads,
    per sentence, the concepts it is a positive of (``positive_of``) and the
    listed concepts it is a negative of (``negative_of``).
    """

    def __init__(self, sets: list[_EvaluationSet], n_rows: int):
        self.names = [s.name for s in sets]
        self.n_rows = n_rows
        self.n_pos = np.array([len(s.positives) for s in sets], np.int64)
        self.n_neg = np.array([len(s.negatives) for s in sets], np.int64)
        rest = self.n_pos + self.n_neg == n_rows
        self.rest_rows = np.flatnonzero(rest)
        self.listed_rows = np.flatnonzero(~rest)
        self.negative_slot = np.full(len(sets), -1, np.int64)
        self.negative_slot[self.listed_rows] = np.arange(len(self.listed_rows))
        self.quantile_places, self.odd_count, self.p90_gamma = _quantile_places(self.n_pos)
        self.positive_rows = _padded_rows([s.positives for s in sets])
        self.negative_rows = _padded_rows([sets[c].negatives for c in self.listed_rows])
        # The walk's sort items hold a sentence in 32 bits.
        self.walks = n_rows < 2**32 and _walk_is_cheaper(n_rows, self.n_pos, self.n_neg, rest)
        if self.walks:
            self.listed = ~rest
            self.positive_of = _memberships([s.positives for s in sets], n_rows)
            self.negative_of = _memberships([sets[c].negatives if listed else np.zeros(0, np.int64)
                                             for c, listed in enumerate(self.listed)], n_rows)
        # What scoring one unit holds, in 4-byte elements: its column, and the walk's sort items
        # (8 bytes a sentence) or the merge's positives and listed negatives.
        self.unit_elements = 3 * n_rows if self.walks else n_rows + self.positive_rows.size + self.negative_rows.size


def _walk_is_cheaper(n_rows: int, n_pos: np.ndarray, n_neg: np.ndarray, rest: np.ndarray) -> bool:
    """Whether walking each unit's sentences once for all concepts should cost less than merging each
    concept's own sorted responses, from the nanoseconds per sentence and per listed row measured on
    5,050 float32 responses (2 cores, AVX-512): the walk pays a sort and a step per sentence and a step
    per (sentence, concept listing it); the merge a sort and a step per listed row, and a rest concept
    a step per sentence. One concept of 1,700 sentences merges 1.5x faster; 100 concepts of 1,100
    listed rows over 5,050 sentences walk 1.6x faster."""
    steps = n_pos + np.where(rest, 0, n_neg)
    walk = 18 * n_rows + 2.2 * steps.sum()
    merge = 4 * steps[~rest].sum() + (n_rows + n_pos[rest]).sum() + (2 * n_rows if rest.any() else 0)
    return bool(walk < merge)


def _padded_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Stack row lists of different lengths as an int64 (len(rows), longest) array padded with -1."""
    padded = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, np.int64)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    return padded


def _memberships(rows: list[np.ndarray], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Invert per-concept row lists: returns ``(start, concept)`` such that the concepts listing sentence s
    are ``concept[start[s]:start[s + 1]]`` (int64 (N + 1,), int32)."""
    sentence = np.concatenate([np.asarray(r, np.int64) for r in rows])
    concept = np.repeat(np.arange(len(rows), dtype=np.int32), [len(r) for r in rows])
    by_sentence = np.argsort(sentence, kind="stable")
    start = np.concatenate([[0], np.cumsum(np.bincount(sentence, minlength=n_rows))]).astype(np.int64)
    return start, concept[by_sentence]


# --------------------------------------------------------------------------- scoring


def _score_units(columns: np.ndarray, plan: _Plan) -> dict[str, np.ndarray]:
    """Score the units of an (N, b) float32 column slice; returns each stat as a (C, b) array."""
    out = _empty_scores(len(plan.names), columns.shape[1])
    quantiles = np.empty((4, *out["ap"].shape), np.float32)
    rows = np.empty((columns.shape[1], plan.n_rows), np.float32)
    _transpose(columns, rows)
    scores = (out["ap"], out["auroc"], quantiles, out["on_mean"], out["off_mean"])
    # numpy's sort is vectorised (AVX-512 where the CPU has it) and releases the GIL: on 1,700 responses
    # it took a quarter of the time of a compiled radix sort.
    if plan.walks:
        items = np.empty(rows.shape, np.uint64)
        _sort_items(rows, items)
        items.sort(axis=-1)
        _walk_units(rows, items, *plan.positive_of, *plan.negative_of, plan.listed, plan.n_pos, plan.n_neg,
                    plan.quantile_places, *scores)
    else:
        positives = _gathered(rows, plan.positive_rows)
        negatives = _gathered(rows, plan.negative_rows)
        if len(plan.rest_rows):
            rows.sort(axis=-1)
        _merge_concepts(rows, positives, negatives, plan.negative_slot, plan.n_pos, plan.n_neg,
                        plan.quantile_places, *scores)
    out["on_p50"][:], out["on_p90"][:] = _positive_percentiles(*quantiles, plan)
    return out


def _gathered(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The responses of ``rows`` (b, N) at each row of ``table`` (K, M), -1 padded, each sorted ascending:
    (b, K, M) float32, the padding +inf, so that it sorts last."""
    out = np.empty((rows.shape[0], *table.shape), np.float32)
    _gather(rows, table, out)
    out.sort(axis=-1)
    return out


@numba.njit(nogil=True, cache=True)
def _transpose(columns, rows):  # pragma: no cover - compiled
    """Copy the (N, b) ``columns`` to ``rows`` (b, N), one unit a row."""
    n, n_units = columns.shape
    for i in range(n):  # along the columns' rows, which are contiguous
        for u in range(n_units):
            # Adding +0.0 turns -0.0 into +0.0, which sklearn ties with it.
            rows[u, i] = columns[i, u] + np.float32(0.0)


@numba.njit(nogil=True, cache=True)
def _gather(rows, table, out):  # pragma: no cover - compiled
    """Fill ``out[u, k, m]`` with ``rows[u, table[k, m]]``, or +inf where the table holds -1."""
    for u in range(rows.shape[0]):
        for k in range(table.shape[0]):
            for m in range(table.shape[1]):
                s = table[k, m]
                out[u, k, m] = rows[u, s] if s >= 0 else np.inf


@numba.njit(nogil=True, cache=True)
def _sort_items(rows, items):  # pragma: no cover - compiled
    """Fill ``items`` (b, N) uint64 with, per response, its sentence in the low 32 bits under a key in the
    high 32 that orders responses from the highest down and that tied responses share: sorted ascending,
    the items list the sentences from the highest response down, ties by sentence."""
    bits = rows.view(np.uint32)
    for u in range(rows.shape[0]):
        for s in range(rows.shape[1]):
            b = bits[u, s]
            # Flipping a negative's magnitude bits makes unsigned order float order; inverting makes it descending.
            key = ~(~b if b >> 31 else b | np.uint32(0x80000000))
            items[u, s] = (np.uint64(key) << _SENTENCE_BITS) | np.uint64(s)


@numba.njit(nogil=True, cache=True, inline="always")
def _meet_sentence(s, value, untied, start, positive_start, positive_of, negative_start, negative_of, listed,
                   first_positive, highest_first, pos_seen, neg_seen, on_sum, off_sum, precision_sum,
                   fp_sum):  # pragma: no cover - compiled
    """Count sentence ``s``, responding ``value``, as a negative of every concept that lists it and a positive
    of every concept it is a positive of, recording that response. A sentence no other ties (``untied``, at
    place ``start`` of the walk) also adds its AP and AUROC terms: no positive ties it, so FP_above = FP,
    and a sentence is never a negative of a concept it is a positive of. A tie group adds them once all
    its sentences are counted."""
    for m in range(negative_start[s], negative_start[s + 1]):
        c = negative_of[m]
        neg_seen[c] += 1
        off_sum[c] += value
    for m in range(positive_start[s], positive_start[s + 1]):
        c = positive_of[m]
        place = pos_seen[c]
        highest_first[first_positive[c] + place] = value
        pos_seen[c] = place + 1
        on_sum[c] += value
        if untied:
            fp = neg_seen[c] if listed[c] else start - place
            precision_sum[c] += (place + 1) / (place + 1 + fp)
            fp_sum[c] += 2 * fp


@numba.njit(nogil=True, cache=True)
def _walk_units(rows, items, positive_start, positive_of, negative_start, negative_of, listed, n_pos, n_neg,
                quantile_places, ap, auroc, quantiles, on_mean, off_mean):  # pragma: no cover - compiled
    """Score each unit (a row of ``rows``, (b, N) float32, whose sentences ``items`` lists from the highest
    response down, see :func:`_sort_items`) by walking them, one tie group at a time, counting per concept
    the positives (TP) and negatives (FP) seen.
    Fills ``ap`` / ``auroc`` (C, b), ``quantiles`` (4, C, b), the positives' responses at
    ``quantile_places``, and the means ``on_mean`` / ``off_mean`` (C, b), summed in float64.

    A positive i in a tie group counts, before the group, the negatives scoring > s_i (FP_above(i)) and,
    after it, TP(i) and FP(i), those scoring >= s_i. A "rest" concept's FP is the sentences seen minus
    its TP. Then AP = mean of TP / (TP + FP) and AUROC = 1 - sum(FP + FP_above) / (2 P N_neg).
    """
    n_units, n = rows.shape
    n_concepts = n_pos.shape[0]
    pos_seen = np.zeros(n_concepts, np.int64)
    # Each concept's positives' responses as the walk meets them, from the highest down.
    first_positive = np.zeros(n_concepts, np.int64)
    first_positive[1:] = np.cumsum(n_pos)[:-1]
    highest_first = np.empty(n_pos.sum(), np.float32)
    neg_seen = np.zeros(n_concepts, np.int64)
    fp_sum = np.zeros(n_concepts, np.int64)
    precision_sum = np.zeros(n_concepts, np.float64)
    on_sum = np.zeros(n_concepts, np.float64)
    off_sum = np.zeros(n_concepts, np.float64)
    for u in range(n_units):
        row = rows[u]
        order = items[u]
        pos_seen[:] = 0
        neg_seen[:] = 0
        fp_sum[:] = 0
        precision_sum[:] = 0.0
        on_sum[:] = 0.0
        off_sum[:] = 0.0
        total = 0.0
        start = 0
        while start < n:
            stop = start + 1
            while stop < n and order[stop] >> _SENTENCE_BITS == order[start] >> _SENTENCE_BITS:
                stop += 1
            untied = stop == start + 1
            if untied:  # most responses: one pass, 25% faster on continuous responses
                s = np.int64(order[start] & _SENTENCE_MASK)
                total += row[s]
                _meet_sentence(s, row[s], True, start, positive_start, positive_of, negative_start, negative_of,
                               listed, first_positive, highest_first, pos_seen, neg_seen, on_sum, off_sum,
                               precision_sum, fp_sum)
                start = stop
                continue
            for k in range(start, stop):
                s = np.int64(order[k] & _SENTENCE_MASK)
                for m in range(positive_start[s], positive_start[s + 1]):
                    c = positive_of[m]
                    fp_sum[c] += neg_seen[c] if listed[c] else start - pos_seen[c]
            for k in range(start, stop):
                s = np.int64(order[k] & _SENTENCE_MASK)
                total += row[s]
                _meet_sentence(s, row[s], False, start, positive_start, positive_of, negative_start, negative_of,
                               listed, first_positive, highest_first, pos_seen, neg_seen, on_sum, off_sum,
                               precision_sum, fp_sum)
            for k in range(start, stop):
                s = np.int64(order[k] & _SENTENCE_MASK)
                for m in range(positive_start[s], positive_start[s + 1]):
                    c = positive_of[m]
                    tp = pos_seen[c]
                    fp = neg_seen[c] if listed[c] else stop - tp
                    precision_sum[c] += tp / (tp + fp)
                    fp_sum[c] += fp
            start = stop
        for c in range(n_concepts):
            for q in range(4):
                quantiles[q, c, u] = highest_first[first_positive[c] + quantile_places[c, q]]
            ap[c, u] = precision_sum[c] / n_pos[c]
            pairs = 2 * n_pos[c] * n_neg[c]
            auroc[c, u] = (pairs - fp_sum[c]) / pairs
            on_mean[c, u] = on_sum[c] / n_pos[c]
            off_mean[c, u] = (off_sum[c] if listed[c] else total - on_sum[c]) / n_neg[c]


@numba.njit(nogil=True, cache=True)
def _merge_concepts(rows, positives, negatives, negative_slot, n_pos, n_neg, quantile_places, ap, auroc,
                    quantiles, on_mean, off_mean):  # pragma: no cover - compiled
    """Score each unit u for each concept c by merging, from the highest response down, the concept's
    sorted positives (``positives[u, c]``) with its sorted negatives (``negatives[u, negative_slot[c]]``)
    or, for a rest concept, with all sorted responses (``rows[u]``), one tie group of positives at a time.
    Fills ``ap`` / ``auroc`` (C, b), ``quantiles`` (4, C, b), the positives' responses at
    ``quantile_places``, and the means ``on_mean`` / ``off_mean`` (C, b), summed in float64.

    For a group of positives responding s, FP_above counts the negatives responding > s, and TP and FP
    the positives and negatives responding >= s (a rest concept's negatives are the sentences counted
    minus its positives). AP = mean of TP / (TP + FP), AUROC = 1 - sum(FP + FP_above) / (2 P N_neg).
    """
    n_units, n = rows.shape
    for u in range(n_units):
        for c in range(n_pos.shape[0]):
            p = n_pos[c]
            slot = negative_slot[c]
            listed = slot >= 0
            high = positives[u, c]
            others = negatives[u, slot] if listed else rows[u]
            m = n_neg[c] if listed else n
            i = p - 1  # the next positive and the next other sentence, walking down
            j = m - 1
            tp = 0
            precision_sum = 0.0
            fp_sum = 0
            on_sum = 0.0
            off_sum = 0.0
            while i >= 0:
                value = high[i]
                while j >= 0 and others[j] > value:
                    off_sum += others[j]
                    j -= 1
                fp_above = m - 1 - j if listed else m - 1 - j - tp
                top = i
                while i >= 0 and high[i] == value:
                    on_sum += value
                    i -= 1
                while j >= 0 and others[j] == value:
                    off_sum += others[j]
                    j -= 1
                tp = p - 1 - i
                fp = m - 1 - j if listed else m - 1 - j - tp
                precision = tp / (tp + fp)
                for _ in range(top - i):
                    precision_sum += precision
                fp_sum += (top - i) * (fp + fp_above)
            while j >= 0:
                off_sum += others[j]
                j -= 1
            for q in range(4):
                quantiles[q, c, u] = high[p - 1 - quantile_places[c, q]]
            ap[c, u] = precision_sum / p
            pairs = 2 * p * n_neg[c]
            auroc[c, u] = (pairs - fp_sum) / pairs
            on_mean[c, u] = on_sum / p
            # A rest concept's off_sum ran over every sentence, its positives too.
            off_mean[c, u] = (off_sum if listed else off_sum - on_sum) / n_neg[c]


def _positive_percentiles(mid_lo, mid_hi, p90_lo, p90_hi, plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
    """``np.median`` and ``np.percentile(..., 90)`` of each concept's positives; (C, b) float32 each, from
    the positives' responses at the places numpy reads (see :func:`_quantile_places`), each (C, b).
    The arithmetic follows numpy's step by step, so results match it bit for bit.
    """
    median = np.where(plan.odd_count[:, None], mid_lo, (mid_lo + mid_hi) / np.float32(2))
    # numpy interpolates from the nearer end, which keeps the result inside
    # [lo, hi], in float32 with the weight rounded to float32.
    gamma = plan.p90_gamma[:, None]
    step = p90_hi - p90_lo
    from_hi = p90_hi - step * (1 - gamma).astype(np.float32)
    from_lo = p90_lo + step * gamma.astype(np.float32)
    return median, np.where(gamma >= 0.5, from_hi, from_lo)


def _quantile_places(n_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where ``np.median`` and ``np.percentile(..., 90)`` read each concept's positives.

    Returns ``places`` (C, 4) int64: per concept the lower and upper middle
    value and the two values the 90th percentile interpolates, as 0-based
    places among its positives from the highest response down; ``odd_count``
    (C,) bool; and ``p90_gamma`` (C,) float64, the interpolation weight as
    numpy computes it.
    """
    virtual = (n_pos - 1) * (90 / 100)
    below = np.floor(virtual)
    p90_lo = below.astype(np.int64)  # floor(0.9 (n - 1)) <= n - 1: always a place of the concept
    p90_hi = np.minimum(p90_lo + 1, n_pos - 1)
    ascending = np.stack([(n_pos - 1) // 2, n_pos // 2, p90_lo, p90_hi], axis=1)
    return n_pos[:, None] - 1 - ascending, n_pos % 2 == 1, virtual - below


# --------------------------------------------------------------------------- on a torch device


class _DeviceScorer:
    """The same statistics, computed with torch on ``device`` (a GPU; the CPU too, for tests).

    Each concept's positives (and listed negatives) are padded to the longest
    concept's count, so that a chunk of b units is a few dense (b, C, P)
    tensors: ge / gt of every sentence come from one sort and two
    ``searchsorted`` calls, and TP(i), FP(i) and FP_above(i) from
    ``searchsorted`` in the concept's sorted ge values (positives with
    ge_j <= ge_i score >= s_i; negatives with ge_j <= gt_i score > s_i).
    Padding holds the rank N + 1, above every real one, so it never counts.
    A chunk holds as many units as fit in a quarter of the device's free
    memory (256 MiB on the CPU).
    """

    def __init__(self, plan: _Plan, device):
        import torch

        from .models import check_device

        self.device = check_device(device)
        if isinstance(self.device, str) or self.device.type == "mps":
            raise InvalidArgumentError(
                f"Expertise cannot be scored on {str(device)!r}: it needs one device with float64 "
                "(cpu or cuda); pass device=None to score on the CPU."
            )
        self.plan = plan

        def padded(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.from_numpy(np.maximum(rows, 0)).to(self.device),
                    torch.from_numpy(rows >= 0).to(self.device))

        self.pos_index, self.pos_valid = padded(plan.positive_rows)
        self.n_pos = torch.from_numpy(plan.n_pos).to(self.device)
        self.n_neg = torch.from_numpy(plan.n_neg).to(self.device)
        self.rest_rows = torch.from_numpy(plan.rest_rows).to(self.device)
        self.listed_rows = torch.from_numpy(plan.listed_rows).to(self.device)
        self.neg_index, self.neg_valid = padded(plan.negative_rows)
        # Columns of each concept's positives sorted from the highest response down.
        self.quantile_columns = torch.from_numpy(plan.quantile_places).to(self.device)
        self.odd_count = torch.from_numpy(plan.odd_count).to(self.device)
        self.p90_gamma = torch.from_numpy(plan.p90_gamma).to(self.device)
        self.bytes_per_unit = 48 * plan.n_rows + 80 * self.pos_index.numel() + 24 * self.neg_index.numel()

    def chunk_units(self) -> int:
        """How many units one chunk scores: those whose work fits a quarter of the free memory."""
        import torch

        if self.device.type == "cuda":
            budget = torch.cuda.mem_get_info(self.device)[0] // 4
        else:
            budget = 256 << 20
        return max(1, budget // self.bytes_per_unit)

    def __call__(self, block: np.ndarray, out: dict[str, np.ndarray]) -> None:
        chunk = self.chunk_units()
        for lo in range(0, block.shape[1], chunk):
            hi = min(lo + chunk, block.shape[1])
            for name, values in self.score(block[:, lo:hi]).items():
                out[name][:, lo:hi] = values

    def score(self, columns: np.ndarray) -> dict[str, np.ndarray]:
        """Score the units of an (N, b) float32 column slice; returns each stat as a (C, b) array."""
        import torch

        n = self.plan.n_rows
        # One row per unit; adding +0.0 turns -0.0 into +0.0, which sklearn ties with it.
        x = torch.from_numpy(np.ascontiguousarray(columns.T)).to(self.device) + 0.0
        values, order = torch.sort(x, dim=1, descending=True, stable=True)
        ascending = -values
        ranks = {}
        for name, right in (("ge", True), ("gt", False)):
            sorted_rank = torch.searchsorted(ascending, ascending, right=right)
            ranks[name] = torch.empty_like(sorted_rank).scatter_(1, order, sorted_rank)
        invalid = ~self.pos_valid
        ge = ranks["ge"][:, self.pos_index].masked_fill_(invalid, n + 1)  # (b, C, P)
        gt = ranks["gt"][:, self.pos_index]
        tp = torch.searchsorted(ge.sort(dim=-1).values, ge, right=True)
        n_pos, n_neg = self.n_pos.double(), self.n_neg.double()
        out = {}

        rest, listed = self.rest_rows, self.listed_rows
        ap = torch.empty(x.shape[0], len(self.plan.names), dtype=torch.float64, device=self.device)
        auroc = torch.empty_like(ap)
        if len(rest):
            precision = (tp[:, rest].double() / ge[:, rest]).masked_fill_(invalid[rest], 0)
            ap[:, rest] = precision.sum(-1) / n_pos[rest]
            rank_sum = (ge[:, rest] + gt[:, rest]).masked_fill_(invalid[rest], 0).sum(-1)
            p = self.n_pos[rest]
            auroc[:, rest] = (2 * p * n - p * p - rank_sum) / (2 * n_pos[rest] * (n - p))
        if len(listed):
            negative_ge = ranks["ge"][:, self.neg_index].masked_fill_(~self.neg_valid, n + 1)
            negative_ge = negative_ge.sort(dim=-1).values
            fp = torch.searchsorted(negative_ge, ge[:, listed], right=True)
            fp_above = torch.searchsorted(negative_ge, gt[:, listed], right=True)
            tp_l = tp[:, listed]
            precision = (tp_l.double() / (tp_l + fp)).masked_fill_(invalid[listed], 0)
            ap[:, listed] = precision.sum(-1) / n_pos[listed]
            fp_sum = (fp + fp_above).masked_fill_(invalid[listed], 0).sum(-1)
            p, q = self.n_pos[listed], self.n_neg[listed]
            auroc[:, listed] = (2 * p * q - fp_sum) / (2 * n_pos[listed] * q)
        out["ap"], out["auroc"] = ap, auroc

        positives = x[:, self.pos_index]  # (b, C, P)
        highest_first = positives.masked_fill(invalid, -torch.inf).sort(dim=-1, descending=True).values
        where = self.quantile_columns.expand(x.shape[0], -1, -1)
        mid_lo, mid_hi, p90_lo, p90_hi = torch.gather(highest_first, 2, where).unbind(-1)
        # numpy's arithmetic, step by step (see _positive_percentiles).
        out["on_p50"] = torch.where(self.odd_count, mid_lo, (mid_lo + mid_hi) / 2)
        step = p90_hi - p90_lo
        from_hi = p90_hi - step * (1 - self.p90_gamma).float()
        from_lo = p90_lo + step * self.p90_gamma.float()
        out["on_p90"] = torch.where(self.p90_gamma >= 0.5, from_hi, from_lo)

        on_sum = positives.double().masked_fill_(invalid, 0).sum(-1)
        off_sum = x.double().sum(dim=1, keepdim=True) - on_sum
        if len(listed):
            negatives = x[:, self.neg_index].double().masked_fill_(~self.neg_valid, 0)
            off_sum[:, listed] = negatives.sum(-1)
        out["on_mean"] = (on_sum / n_pos).float()
        out["off_mean"] = (off_sum / n_neg).float()
        return {name: values.T.cpu().numpy() for name, values in out.items()}
