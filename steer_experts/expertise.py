"""Stage 4: expertise of every unit for every concept.

The expertise of unit m for concept c is the average precision (AP) of the
unit's raw response as a score for "the sentence is a positive of c", exactly as
``sklearn.metrics.average_precision_score`` computes it (tied scores form one
threshold). AUROC (``roc_auc_score``, ties counted half) and response
statistics of the positives (median, mean, 90th percentile) and negatives
(mean) are kept next to it.

How it is fast. Per unit, all sentences are sorted once (one int64 sort of
response bits and sentence index). That gives every sentence two integer ranks,
``ge`` and ``gt``: how many sentences respond >= / > it (tied sentences share
both). With TP(i) / FP(i) the positives / negatives of c responding >= s_i and
FP_above(i) those responding > s_i:

    AP    = mean over positives i of TP(i) / (TP(i) + FP(i))
    AUROC = sum over positives of (2 n_neg - FP(i) - FP_above(i)) / (2 P n_neg)

Then one more sort per unit, of small integer keys ``(concept, rank, code)``
for all concepts at once, yields every count:

* negatives = all other sentences ("rest" concepts): one key per positive at
  its ge. Sorted, TP(i) is where the run of keys equal to i's ends, FP = ge - TP,
  and the AUROC reduces to the positives' rank sum, sum(ge + gt).
* a listed subset of negatives: keys A_i = (ge_i, 1) and B_i = (gt_i, 2) per
  positive, N_j = (ge_j, 0) per negative. Sorted, TP + FP(i) is the number of
  non-A keys of c before A_i (a position minus a constant), FP(i) the N keys
  before A_i and FP_above(i) the N keys before B_i.

Everything is integer-exact up to one float64 division per positive. Work
streams in blocks of ``block_units`` columns; inside a block, chunks of units
small enough to stay in cache are scored on ``threads`` threads at once (numpy
releases the GIL in these loops). Every number depends only on its own unit's
column, so block and chunk sizes and thread counts never change a result.

That is also what lets several processes of one run (see
:mod:`~steer_experts.distributed`) split the units: each scores a fixed range of
columns, from the range's first column on, and all gather the ranges. No number
mixes units: sorts, ranks and counts are per unit row, and the float sums
(``reduceat`` over a row's segments, ``sum`` along a row) run inside one row, so
where a block or range starts changes no bit (``tests/core/test_distributed.py``
checks it across numpy's 8192-element buffer).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
from tqdm.auto import tqdm

from .distributed import team
from .errors import InvalidArgumentError

# Each chunk's working arrays stay near this many elements, to stay in cache.
_CHUNK_ELEMENTS = 1 << 17
# Which int32 half of an int64 holds its high / low bits.
_HIGH, _LOW = (1, 0) if sys.byteorder == "little" else (0, 1)


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

    ``device`` None scores with numpy on the CPU, as above (the fastest there).
    A torch device (``"cuda"``, ``"cuda:1"``, or ``"cpu"``) scores each block
    there with torch instead, in chunks of units sized to the device's free
    memory (see :class:`_DeviceScorer`). Its AP and AUROC stay within 1e-12 of
    the numpy path's (the float64 sums run in another order), its percentiles
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
    GPU when it is one, else None (numpy on the CPU, the faster path there)."""
    return model_device if getattr(model_device, "type", None) == "cuda" else None


def _score_range(read_columns, score_block, plan: _Plan, n_rows: int, units: range, block_units: int,
                 progress: bool) -> dict[str, np.ndarray]:
    """Score ``units`` (a range of columns) in blocks of ``block_units`` from its start, each block by
    ``score_block(block, out)``, which fills ``out``'s (C, b) views; each stat as a (C, len(units)) array."""
    scores = _empty_scores(len(plan.names), len(units))
    with tqdm(total=len(units), desc="expertise", unit="unit", disable=not progress) as bar:
        for start in range(units.start, units.stop, block_units):
            stop = min(start + block_units, units.stop)
            block = _read_block(read_columns, start, stop, n_rows)
            score_block(block, {name: values[:, start - units.start : stop - units.start]
                                for name, values in scores.items()})
            bar.update(stop - start)
    return scores


@contextmanager
def _threaded_scorer(plan: _Plan, threads: int):
    """A block scorer that splits the block into chunks small enough to stay in cache, scored with numpy
    on ``threads`` threads at once."""
    chunk = max(1, _CHUNK_ELEMENTS // max(plan.n_rows, plan.entries_per_unit))

    def score_block(block: np.ndarray, out: dict[str, np.ndarray]) -> None:
        def score_span(lo: int, hi: int) -> None:
            for name, values in _score_units(block[:, lo:hi], plan).items():
                out[name][:, lo:hi] = values

        spans = [(lo, min(lo + chunk, block.shape[1])) for lo in range(0, block.shape[1], chunk)]
        list(pool.map(lambda span: score_span(*span), spans))  # re-raises errors

    with ThreadPoolExecutor(threads) as pool:
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

    Concepts whose negatives are all other sentences ("rest" concepts) and
    concepts with a listed subset of negatives are scored by different entry
    sorts; ``rest_rows`` / ``listed_rows`` say which output rows each fills.
    """

    def __init__(self, sets: list[_EvaluationSet], n_rows: int):
        if n_rows >= 2**28:
            raise ValueError(f"at most 2**28 sentences are supported, got {n_rows}")
        self.names = [s.name for s in sets]
        self.n_rows = n_rows
        self.n_pos = np.array([len(s.positives) for s in sets], np.int64)
        self.n_neg = np.array([len(s.negatives) for s in sets], np.int64)
        rest = self.n_pos + self.n_neg == n_rows
        self.rest_rows = np.flatnonzero(rest)
        self.listed_rows = np.flatnonzero(~rest)
        self.rest = _RestConcepts([sets[i] for i in self.rest_rows], n_rows) if rest.any() else None
        self.listed = _ListedConcepts([sets[i] for i in self.listed_rows], n_rows) if not rest.all() else None
        self.entries_per_unit = sum(g.n_entries for g in (self.rest, self.listed) if g is not None)
        # Rows of the responses, for the means.
        self.positives = np.concatenate([s.positives for s in sets])
        self.pos_start = _starts(self.n_pos)
        listed_negatives = [sets[i].negatives for i in self.listed_rows]
        self.listed_negatives = np.concatenate(listed_negatives) if listed_negatives else None
        self.listed_neg_start = _starts(self.n_neg[self.listed_rows])


def _starts(sizes: np.ndarray) -> np.ndarray:
    """Start offsets of consecutive segments of the given sizes."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def _key_dtype(n_concepts: int, n_rows: int):
    """Smallest int type that holds keys ``4 * ((N + 1) * concept + rank) + code``."""
    return np.int32 if 4 * (n_rows + 1) * n_concepts < 2**31 else np.int64


class _RestConcepts:
    """Concepts whose negatives are every sentence that is not a positive.

    One entry per positive, key ``4 * ((N + 1) * c + ge)``: sorted, each
    concept's positives lie in a fixed column range by ascending ge. Then
    TP(i) = positives with ge <= ge_i (its tie group's end in that range) and
    FP(i) = ge_i - TP(i); the AUROC needs only sum(ge + gt) over positives.
    """

    def __init__(self, sets: list[_EvaluationSet], n_rows: int):
        self.n_pos = np.array([len(s.positives) for s in sets], np.int64)
        self.positives = np.concatenate([s.positives for s in sets])
        self.pos_start = _starts(self.n_pos)
        self.quantile_columns, self.odd_count, self.p90_gamma = _quantile_columns(self.n_pos, self.pos_start)
        self.n_entries = len(self.positives)
        concept_of = np.repeat(np.arange(len(sets)), self.n_pos)
        self.offsets = (4 * (n_rows + 1) * concept_of).astype(_key_dtype(len(sets), n_rows))
        self.pos_start_of_column = self.pos_start[concept_of]
        n = n_rows
        self.twice_u_base = 2 * self.n_pos * n - self.n_pos**2
        self.twice_pairs = 2.0 * self.n_pos * (n - self.n_pos)

    def score(self, ranks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Return each concept's positives' ge, ascending (b, sum P), and AP and AUROC, (C_rest, b)."""
        # (4 gt, 4 ge) of every positive, fetched as one int64 each.
        pairs = ranks.view(np.int64).take(self.positives, axis=1).view(np.int32)
        keys = pairs[:, 1::2] + self.offsets
        keys.sort(axis=1)
        ge = (keys - self.offsets) >> 2
        # Positives scoring >= positive i: up to where the next run of equal keys starts.
        tp = _next_run_start(keys)
        tp -= self.pos_start_of_column
        ap = np.add.reduceat(tp / ge, self.pos_start, axis=1).T / self.n_pos[:, None]
        rank_sum = np.add.reduceat(ge, self.pos_start, axis=1, dtype=np.int64)
        rank_sum += np.add.reduceat(pairs[:, ::2], self.pos_start, axis=1, dtype=np.int64) >> 2
        # Mid-rank (ascending, 1-based) of positive i is N - (ge + gt - 1) / 2.
        twice_u = self.twice_u_base[:, None] - rank_sum.T
        return ge, {"ap": ap, "auroc": twice_u / self.twice_pairs[:, None]}


def _next_run_start(keys: np.ndarray) -> np.ndarray:
    """For (b, W) rows sorted ascending: per element, the in-row index where the next larger key starts."""
    n_units, width = keys.shape
    flat = keys.ravel()
    # Flags of where runs of equal keys start, plus one past the end so that
    # the last run has an end too.
    run_starts = np.empty(flat.size + 1, bool)
    np.not_equal(flat[1:], flat[:-1], out=run_starts[1:-1])
    run_starts[: flat.size : width] = True
    run_starts[-1] = True
    bounds = np.flatnonzero(run_starts)
    # (int32 cumsum: numpy's int64 cumsum of booleans is many times slower.)
    run = np.cumsum(run_starts[:-1], dtype=np.int32)
    next_start = bounds.take(run).reshape(n_units, width)
    next_start -= np.arange(0, flat.size, width)[:, None]
    return next_start


class _ListedConcepts:
    """Concepts with a listed subset of negatives.

    Entries, key ``4 * ((N + 1) * c + rank) + code``: per positive i an "A"
    entry (rank ge_i, code 1) and a "B" entry (rank gt_i, code 2), per negative
    j an entry (rank ge_j, code 0). Sorted, the entries of concept c before A_i
    are its A entries of lower ordinal, its B entries with gt < ge_i (the
    positives scoring >= s_i: TP) and its negatives with ge <= ge_i (FP); the
    negatives before B_i are those with ge <= gt_i, i.e. scoring > s_i.

    Each concept's entries fill a block of ``width`` = max over concepts of
    2 P + N_neg columns, the rest of the block padded with the key
    ``4 * ((N + 1) * c + N) + 3``, after all of c's keys and before the next
    concept's. A unit's row then sorts as C short rows, one per concept: at 100
    concepts of 1,100 entries that sort took 2.5x less time than the whole row's.
    """

    def __init__(self, sets: list[_EvaluationSet], n_rows: int):
        n = n_rows
        self.n_pos = np.array([len(s.positives) for s in sets], np.int64)
        self.n_neg = np.array([len(s.negatives) for s in sets], np.int64)
        key_dtype = _key_dtype(len(sets), n)
        self.width = int(np.max(2 * self.n_pos + self.n_neg))
        columns, offsets, pads = [], [], []
        for c, s in enumerate(sets):
            base = 4 * (n + 1) * c
            n_pad = self.width - 2 * len(s.positives) - len(s.negatives)
            columns += [2 * s.positives + 1, 2 * s.positives, 2 * s.negatives + 1, np.zeros(n_pad, np.int64)]
            offsets += [np.full(len(s.positives), base + 1), np.full(len(s.positives), base + 2)]
            offsets += [np.full(len(s.negatives), base), np.zeros(n_pad, np.int64)]
            pads.append(np.full(n_pad, base + 4 * n + 3))
        self.columns = np.concatenate(columns)
        self.offsets = np.concatenate(offsets).astype(key_dtype)
        self.pad_keys = np.concatenate(pads).astype(key_dtype)
        self.pad_at = np.flatnonzero(np.concatenate([np.arange(self.width) >= 2 * p + q
                                                     for p, q in zip(self.n_pos, self.n_neg)]))
        self.n_entries = len(self.columns)
        self.pos_start = _starts(self.n_pos)
        self.quantile_columns, self.odd_count, self.p90_gamma = _quantile_columns(self.n_pos, self.pos_start)
        concept_of = np.repeat(np.arange(len(sets)), self.n_pos)  # per A (and B) ordinal
        self.neg_before = _starts(self.n_neg)[concept_of]
        self.a_offset = (4 * (n + 1) * concept_of + 1).astype(key_dtype)
        # Before the A entry with ordinal j (over all concepts) of concept c come
        # the c * width entries of earlier concepts' blocks, c's j - pos_start[c]
        # earlier A entries, and then only TP + FP others.
        self.a_before = np.arange(len(concept_of)) + self.width * concept_of - self.pos_start[concept_of]
        self.twice_pairs = 2.0 * self.n_pos * self.n_neg

    def score(self, ranks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Return each concept's positives' ge, ascending (b, sum P), and AP and AUROC, (C_listed, b)."""
        n_units = ranks.shape[0]
        keys = ranks.take(self.columns, axis=1).astype(self.offsets.dtype, copy=False)
        keys += self.offsets
        keys[:, self.pad_at] = self.pad_keys
        keys.reshape(-1, self.width).sort(axis=1)
        width = keys.shape[1]
        code = keys & 3
        at_a = np.flatnonzero(code == 1)
        at_b = np.flatnonzero(code == 2)
        ge = (keys.ravel().take(at_a).reshape(n_units, -1) - self.a_offset) >> 2
        tp_fp = at_a.reshape(n_units, -1) - np.arange(0, n_units * width, width)[:, None] - self.a_before
        negatives_seen = np.cumsum(code == 0, axis=1, dtype=np.int32).ravel()
        fp = negatives_seen.take(at_a).reshape(n_units, -1) - self.neg_before
        fp_above = negatives_seen.take(at_b).reshape(n_units, -1) - self.neg_before
        precision = (tp_fp - fp) / tp_fp
        ap = np.add.reduceat(precision, self.pos_start, axis=1).T / self.n_pos[:, None]
        # Each positive beats the negatives below it and ties half of those level with it.
        fp_sum = np.add.reduceat(fp + fp_above, self.pos_start, axis=1, dtype=np.int64).T
        twice_u = 2 * self.n_pos[:, None] * self.n_neg[:, None] - fp_sum
        return ge, {"ap": ap, "auroc": twice_u / self.twice_pairs[:, None]}


# --------------------------------------------------------------------------- scoring


def _score_units(columns: np.ndarray, plan: _Plan) -> dict[str, np.ndarray]:
    """Score the units of an (N, b) float32 column slice; returns each stat as a (C, b) array."""
    # One row per unit; adding +0.0 turns -0.0 into +0.0, which sklearn ties with it.
    x = np.add(columns.T, np.float32(0.0), dtype=np.float32, order="C")
    n_units = x.shape[0]
    order, ranks = _rank_sentences(x)

    out = _empty_scores(len(plan.names), n_units)
    for rows, group in ((plan.rest_rows, plan.rest), (plan.listed_rows, plan.listed)):
        if group is not None:
            ge, scores = group.score(ranks)
            out["ap"][rows] = scores["ap"]
            out["auroc"][rows] = scores["auroc"]
            out["on_p50"][rows], out["on_p90"][rows] = _positive_percentiles(x, order, ge, group)

    on_sum = np.add.reduceat(x.take(plan.positives, axis=1), plan.pos_start, axis=1, dtype=np.float64).T
    off_sum = x.sum(axis=1, dtype=np.float64) - on_sum
    if plan.listed_negatives is not None:
        off_sum[plan.listed_rows] = np.add.reduceat(
            x.take(plan.listed_negatives, axis=1), plan.listed_neg_start, axis=1, dtype=np.float64
        ).T
    out["on_mean"][:] = on_sum / plan.n_pos[:, None]
    out["off_mean"][:] = off_sum / plan.n_neg[:, None]
    return out


def _rank_sentences(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row of ``x`` (b units, N sentences) once, descending.

    Returns ``order`` (b, N) int64: flat indices into ``x``, from each unit's
    highest response down; and ``ranks`` (b, 2N) int32 with ``4 * gt`` of
    sentence s in column 2s and ``4 * ge`` in column 2s + 1, where ge / gt
    count the sentences whose response is >= / > that of s (ties share both).
    """
    n_units, n = x.shape
    bits = x.view(np.int32)
    # int64 sort keys: high half the response as an int in descending order
    # (flipping the magnitude bits of negatives makes int order float order),
    # low half the response's flat index in x.
    packed = np.empty((n_units, n), np.int64)
    halves = packed.view(np.int32).reshape(n_units, n, 2)
    np.invert(bits ^ ((bits >> 31) & 0x7FFFFFFF), out=halves[..., _HIGH])
    halves[..., _LOW] = np.arange(n_units * n, dtype=np.int32).reshape(n_units, n)
    packed.sort(axis=1)
    order = packed & 0xFFFFFFFF
    key = halves[..., _HIGH]

    group_starts = np.empty((n_units, n), bool)
    group_starts[:, 0] = True
    np.not_equal(key[:, 1:], key[:, :-1], out=group_starts[:, 1:])
    group_starts = group_starts.ravel()
    starts = np.flatnonzero(group_starts)
    # Per tie group (after a dummy row 0): 4 * its flat start and 4 * the next
    # group's start, which for a row's last group is the next row's start.
    bounds = np.zeros((starts.size + 1, 2), np.int32)
    bounds[1:, 0] = 4 * starts
    bounds[1:-1, 1] = bounds[2:, 0]
    bounds[-1, 1] = 4 * n_units * n
    # (int32 cumsum: numpy's int64 cumsum of booleans is many times slower.)
    group = np.cumsum(group_starts, dtype=np.int32)
    pairs = bounds.view(np.int64).ravel().take(group)
    row_start = np.arange(0, 4 * n_units * n, 4 * n, dtype=np.int32)[:, None]
    pairs.view(np.int32).reshape(n_units, 2 * n)[:] -= row_start
    ranks = np.empty(n_units * n, np.int64)
    ranks[order.ravel()] = pairs
    return order, ranks.view(np.int32).reshape(n_units, 2 * n)


def _positive_percentiles(x, order, ge, group) -> tuple[np.ndarray, np.ndarray]:
    """``np.median`` and ``np.percentile(..., 90)`` of each concept's positives; (C_group, b) float32 each.

    ``ge`` holds each concept's positives' ge, ascending, in columns from
    ``group.pos_start[c]`` on: its positives from the highest response down.
    ``order`` at ``ge - 1`` is where that response sits in ``x`` (ties share it).
    The arithmetic follows numpy's step by step, so results match it bit for bit.
    """
    where = np.take_along_axis(order, ge.take(group.quantile_columns, axis=1) - 1, axis=1)
    mid_lo, mid_hi, p90_lo, p90_hi = x.ravel().take(where).reshape(len(ge), 4, -1).transpose(1, 2, 0)
    median = np.where(group.odd_count[:, None], mid_lo, (mid_lo + mid_hi) / np.float32(2))
    # numpy interpolates from the nearer end, which keeps the result inside
    # [lo, hi], in float32 with the weight rounded to float32.
    gamma = group.p90_gamma[:, None]
    step = p90_hi - p90_lo
    from_hi = p90_hi - step * (1 - gamma).astype(np.float32)
    from_lo = p90_lo + step * gamma.astype(np.float32)
    return median, np.where(gamma >= 0.5, from_hi, from_lo)


def _quantile_columns(n_pos: np.ndarray, pos_start: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where ``np.median`` and ``np.percentile(..., 90)`` read each concept's positives.

    Returns ``columns`` (4 * C,): per concept the lower and upper middle value
    and the two values the 90th percentile interpolates, as columns of an array
    holding each concept's positives from the highest response down from
    ``pos_start[c]``; ``odd_count`` (C,) bool; and ``p90_gamma`` (C,) float64,
    the interpolation weight as numpy computes it.
    """
    virtual = (n_pos - 1) * (90 / 100)
    below = np.floor(virtual)
    p90_lo = below.astype(np.int64)  # floor(0.9 (n - 1)) <= n - 1: always a column of the concept
    p90_hi = np.minimum(p90_lo + 1, n_pos - 1)
    last = pos_start + n_pos - 1  # column of each concept's smallest positive
    ascending = np.stack([(n_pos - 1) // 2, n_pos // 2, p90_lo, p90_hi])
    return (last - ascending).ravel(), n_pos % 2 == 1, virtual - below


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
                "(cpu or cuda); pass device=None to score with numpy on the CPU."
            )
        self.plan = plan

        def padded(rows: np.ndarray, sizes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            valid = np.arange(sizes.max()) < sizes[:, None]
            index = np.zeros(valid.shape, np.int64)
            index[valid] = rows  # row-major: concept by concept, as ``rows`` is laid out
            return torch.from_numpy(index).to(self.device), torch.from_numpy(valid).to(self.device)

        self.pos_index, self.pos_valid = padded(plan.positives, plan.n_pos)
        self.n_pos = torch.from_numpy(plan.n_pos).to(self.device)
        self.n_neg = torch.from_numpy(plan.n_neg).to(self.device)
        self.rest_rows = torch.from_numpy(plan.rest_rows).to(self.device)
        self.listed_rows = torch.from_numpy(plan.listed_rows).to(self.device)
        if plan.listed_negatives is not None:
            self.neg_index, self.neg_valid = padded(plan.listed_negatives, plan.n_neg[plan.listed_rows])
        columns, odd_count, p90_gamma = _quantile_columns(plan.n_pos, np.zeros_like(plan.n_pos))
        # Columns of each concept's positives sorted from the highest response down.
        self.quantile_columns = torch.from_numpy(columns.reshape(4, -1).T.copy()).to(self.device)
        self.odd_count = torch.from_numpy(odd_count).to(self.device)
        self.p90_gamma = torch.from_numpy(p90_gamma).to(self.device)
        n_listed_negatives = 0 if plan.listed_negatives is None else self.neg_index.numel()
        self.bytes_per_unit = 48 * plan.n_rows + 80 * self.pos_index.numel() + 24 * n_listed_negatives

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
