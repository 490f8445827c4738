"""Concept similarity from experts (ExpertLens) and its alignment with human ratings.

Two concepts are similar when their experts overlap:

* **Jaccard at tau**: |E_a & E_b| / |E_a | E_b| with E_c = {units with AP > tau}.
  Undefined (NaN) when either set is empty.
* **AP cosine**: cosine of the full AP vectors (one value per unit), optionally
  mean-centred per unit across concepts, which removes what every concept shares
  (units that fire on any sentence get AP near the positive rate for all).

Human alignment is Spearman's rho between a similarity and word-pair ratings
(MEN: ``word1 word2 score``), over the pairs whose two words are both concepts,
with a bootstrap confidence interval over pairs.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.stats import rankdata, spearmanr

from .atomic import atomic_write
from .experts import ExpertSet


# --------------------------------------------------------------------------- similarity matrices


@dataclass
class SimilarityMatrix:
    """A symmetric (C, C) similarity between concepts; NaN where undefined.

    Attributes:
        concepts: row/column names.
        values: float64 (C, C) matrix.
        method: how it was computed, e.g. ``"jaccard tau=0.5"``.
    """

    concepts: list[str]
    values: np.ndarray
    method: str

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.shape != (len(self.concepts), len(self.concepts)):
            raise ValueError(f"{self.method}: values have shape {self.values.shape}, "
                             f"expected ({len(self.concepts)}, {len(self.concepts)}) for the concepts given.")

    def index(self, concept: str) -> int:
        """Row of ``concept``; KeyError listing the concepts if absent."""
        try:
            return self.concepts.index(concept)
        except ValueError:
            raise KeyError(f"{concept!r} is not a concept of this matrix; concepts: {self.concepts}") from None

    def pair(self, a: str, b: str) -> float:
        """Similarity of concepts ``a`` and ``b``."""
        return float(self.values[self.index(a), self.index(b)])

    def nearest(self, concept: str, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most similar other concepts, best first (undefined similarities skipped)."""
        row = self.values[self.index(concept)]
        order = [j for j in np.argsort(-np.nan_to_num(row, nan=-np.inf), kind="stable")
                 if self.concepts[j] != concept and not np.isnan(row[j])]
        return [(self.concepts[j], float(row[j])) for j in order[:k]]

    def nearest_table(self, k: int = 5) -> list[dict]:
        """One row per concept: ``{"concept", "neighbours": [(name, value), ...]}``."""
        return [{"concept": c, "neighbours": self.nearest(c, k)} for c in self.concepts]

    def subset(self, names: Sequence[str]) -> "SimilarityMatrix":
        """The sub-matrix over ``names``, in that order."""
        rows = [self.index(n) for n in names]
        return SimilarityMatrix(list(names), self.values[np.ix_(rows, rows)], self.method)

    def upper_triangle(self) -> np.ndarray:
        """Values of the distinct pairs (i < j), row-major."""
        i, j = np.triu_indices(len(self.concepts), k=1)
        return self.values[i, j]

    def to_csv(self, path: str | Path) -> Path:
        """Write the matrix as CSV (header row and first column are the concepts), atomically."""
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow([self.method, *self.concepts])
                for name, row in zip(self.concepts, self.values):
                    w.writerow([name, *("" if np.isnan(v) else f"{v:.6g}" for v in row)])
        return atomic_write(path, write)

    @classmethod
    def from_csv(cls, path: str | Path) -> "SimilarityMatrix":
        """Read a matrix written by :meth:`to_csv` (empty cells are NaN)."""
        with Path(path).open(newline="") as f:
            rows = list(csv.reader(f))
        if not rows or rows[0][1:] != [r[0] for r in rows[1:]]:
            raise ValueError(f"{path} is not a similarity matrix CSV: the header must list the row names in order.")
        values = [[float(v) if v else np.nan for v in r[1:]] for r in rows[1:]]
        return cls(rows[0][1:], np.array(values, dtype=np.float64).reshape(len(rows) - 1, len(rows) - 1), rows[0][0])


def _ap_and_concepts(experts: ExpertSet | tuple[np.ndarray, Sequence[str]]) -> tuple[np.ndarray, list[str]]:
    if isinstance(experts, ExpertSet):
        return experts.expertise.ap, experts.concepts
    ap, concepts = experts
    ap = np.asarray(ap, dtype=np.float64)
    if ap.ndim != 2 or ap.shape[0] != len(concepts):
        raise ValueError(f"AP must be (concepts, units); got shape {ap.shape} for {len(concepts)} concepts.")
    return ap, list(concepts)


def expert_masks(experts: ExpertSet | tuple[np.ndarray, Sequence[str]], tau: float) -> np.ndarray:
    """Boolean (C, U): unit u is an expert of concept c (AP > tau)."""
    ap, _ = _ap_and_concepts(experts)
    return ap > tau


def jaccard_similarity(experts: ExpertSet | tuple[np.ndarray, Sequence[str]], tau: float) -> SimilarityMatrix:
    """Jaccard overlap of the expert sets {AP > tau} of every pair of concepts.

    ``experts`` is an :class:`ExpertSet` or a pair ``(ap (C, U), concept names)``.
    A pair is NaN (undefined) when either concept has no experts at ``tau``: a
    concept without experts has no representation to compare, and scoring it 0
    against everything would rank it by accident.
    """
    ap, concepts = _ap_and_concepts(experts)
    masks = (ap > tau).astype(np.float64)
    inter = masks @ masks.T
    sizes = masks.sum(axis=1)
    union = sizes[:, None] + sizes[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where((sizes[:, None] > 0) & (sizes[None, :] > 0), inter / union, np.nan)
    return SimilarityMatrix(concepts, values, f"jaccard tau={tau:g}")


def ap_cosine_similarity(experts: ExpertSet | tuple[np.ndarray, Sequence[str]],
                         centred: bool = False) -> SimilarityMatrix:
    """Cosine similarity of the concepts' full AP vectors.

    With ``centred=True`` each unit's mean AP over the concepts is subtracted first,
    so what all concepts share does not count as similarity. A zero vector gives NaN.
    """
    ap, concepts = _ap_and_concepts(experts)
    if centred:
        ap = ap - ap.mean(axis=0, keepdims=True)
    return SimilarityMatrix(concepts, cosine_matrix(ap), "ap cosine centred" if centred else "ap cosine")


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """(C, C) cosine similarity of the rows of ``vectors``; NaN where a row is zero."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = vectors / norms[:, None]
    return np.clip(unit @ unit.T, -1.0, 1.0)


def relative_taus(expert_set: ExpertSet, multiples: Sequence[float]) -> dict[float, float]:
    """Thresholds set relative to chance: tau = r + m (1 - r) for each multiple m.

    r is the mean positive rate P / (P + N) over concepts, the AP of a unit that
    knows nothing. m = 0 is chance, m = 1 is a perfect detector. The paper's
    tau = 0.5 at about 400 positives / 1000 negatives (r = 0.29) is m = 0.3.
    Returns ``{m: tau}``.
    """
    e = expert_set.expertise
    rate = float(np.mean(e.n_positives / (e.n_positives + e.n_negatives)))
    return {float(m): rate + float(m) * (1.0 - rate) for m in multiples}


def experts_per_concept(experts: ExpertSet | tuple[np.ndarray, Sequence[str]], tau: float) -> np.ndarray:
    """Number of experts (AP > tau) of each concept, int64 (C,)."""
    return expert_masks(experts, tau).sum(axis=1)


def shared_experts(expert_set: ExpertSet, a: str, b: str, tau: float = 0.5) -> list[dict]:
    """Units that are experts (AP > tau) of both ``a`` and ``b``.

    Returns rows ``{"layer", "neuron", "ap_a", "ap_b"}``, highest min(ap_a, ap_b) first.
    """
    ia, ib = expert_set.concept_index(a), expert_set.concept_index(b)
    ap = expert_set.expertise.ap
    both = np.flatnonzero((ap[ia] > tau) & (ap[ib] > tau))
    both = both[np.argsort(-np.minimum(ap[ia, both], ap[ib, both]), kind="stable")]
    return [{"layer": int(expert_set.layer[u]), "neuron": int(expert_set.neuron[u]),
             "ap_a": float(ap[ia, u]), "ap_b": float(ap[ib, u])} for u in both]


# --------------------------------------------------------------------------- human ratings


@dataclass
class WordPairRatings:
    """Human similarity ratings of word pairs, aligned arrays (one entry per pair).

    ``scores`` are in the data set's own scale (MEN: 0-50).
    """

    word1: list[str]
    word2: list[str]
    scores: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def words(self) -> list[str]:
        """Every distinct word, in first-seen order."""
        return list(dict.fromkeys(w for pair in zip(self.word1, self.word2) for w in pair))

    def pairs_within(self, words: Sequence[str]) -> np.ndarray:
        """Indices of the pairs whose two words are both in ``words``."""
        known = set(words)
        return np.array([i for i, (a, b) in enumerate(zip(self.word1, self.word2)) if a in known and b in known],
                        dtype=np.int64)


def _strip_pos(word: str) -> str:
    # MEN's lemma form tags words as "sun-n"; the natural form has none.
    return word[:-2] if len(word) > 2 and word[-2] == "-" and word[-1] in "nvja" else word


def load_men(path: str | Path) -> WordPairRatings:
    """Load MEN (``word1 word2 score`` per line, space-separated, optional header line).

    Part-of-speech tags (``sun-n``) are stripped, so both MEN forms load the same words.
    """
    return load_ratings(path, delimiter=" ", word1_column=0, word2_column=1, score_column=2, strip_pos=True)


def load_ratings(path: str | Path, *, delimiter: str | None = None, word1_column: int | str = 0,
                 word2_column: int | str = 1, score_column: int | str = 2, strip_pos: bool = False,
                 lowercase: bool = True) -> WordPairRatings:
    """Load word-pair ratings from a TSV/CSV/space-separated file.

    Args:
        path: the file.
        delimiter: field separator; ``None`` picks tab for .tsv, comma for .csv, else whitespace.
        word1_column, word2_column, score_column: column positions (int) or header names (str).
            With names the first line is the header; with positions a first line whose
            score field is not a number is taken as a header and skipped.
        strip_pos: remove part-of-speech suffixes like ``-n``.
        lowercase: lower-case the words.

    Raises:
        ValueError: a row lacks a column or has a non-numeric score (message gives the line).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No ratings file at {path}. Pass the path of a word-pair ratings file.")
    if delimiter is None:
        delimiter = {".tsv": "\t", ".csv": ","}.get(path.suffix.lower())
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if delimiter is None or delimiter == " ":
        rows = [line.split() for line in lines]
    else:
        rows = list(csv.reader(lines, delimiter=delimiter))
    columns = (word1_column, word2_column, score_column)
    named = [isinstance(c, str) for c in columns]
    if any(named):
        if not all(named):
            raise ValueError("Give all three columns as header names or all as positions, not a mix.")
        header = [h.strip() for h in rows[0]]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: header {header} lacks column(s) {missing}.")
        columns = tuple(header.index(c) for c in columns)
        rows, first_line = rows[1:], 2
    else:
        first_line = 1
        if rows and not _is_number(rows[0][columns[2]] if len(rows[0]) > columns[2] else ""):
            rows, first_line = rows[1:], 2
    w1, w2, scores = [], [], []
    for n, row in enumerate(rows, first_line):
        if len(row) <= max(columns):
            raise ValueError(f"{path}:{n}: expected at least {max(columns) + 1} fields, got {row}.")
        a, b, s = (row[c].strip() for c in columns)
        if not _is_number(s):
            raise ValueError(f"{path}:{n}: score {s!r} is not a number.")
        if lowercase:
            a, b = a.lower(), b.lower()
        if strip_pos:
            a, b = _strip_pos(a), _strip_pos(b)
        w1.append(a)
        w2.append(b)
        scores.append(float(s))
    if not scores:
        raise ValueError(f"{path} has no rating rows.")
    return WordPairRatings(w1, w2, np.array(scores, dtype=np.float64), str(path))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def greedy_word_choice(ratings: WordPairRatings, n_words: int) -> list[str]:
    """Choose ``n_words`` words, one at a time, each adding the most pairs whose two words are chosen.

    Ties (including the first pick, which covers nothing yet) go to the word in
    the most pairs overall, then to the alphabetically first. Returns the words
    in the order chosen.
    """
    neighbours: dict[str, set[str]] = {}
    for a, b in zip(ratings.word1, ratings.word2):
        if a != b:
            neighbours.setdefault(a, set()).add(b)
            neighbours.setdefault(b, set()).add(a)
    if n_words > len(neighbours):
        raise ValueError(f"Asked for {n_words} words but the ratings have only {len(neighbours)}.")
    degree = {w: len(n) for w, n in neighbours.items()}
    gain = dict.fromkeys(neighbours, 0)  # pairs a word would add: its neighbours already chosen
    chosen: list[str] = []
    for _ in range(n_words):
        best = min(gain, key=lambda w: (-gain[w], -degree[w], w))
        chosen.append(best)
        del gain[best]
        for other in neighbours[best]:
            if other in gain:
                gain[other] += 1
    return chosen


# --------------------------------------------------------------------------- correlation


@dataclass
class Correlation:
    """Spearman's rho with a bootstrap confidence interval.

    ``low``/``high`` bound the ``confidence`` percentile interval over ``n_boot``
    resamples of the pairs; all NaN when rho is undefined (fewer than 3 pairs or
    a constant input). ``n_pairs`` counts the pairs used (NaN similarities dropped).
    """

    rho: float
    low: float
    high: float
    n_pairs: int
    p_value: float
    confidence: float = 0.95
    n_boot: int = 1000

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in self.__dict__.items()}


def spearman_with_ci(x: Sequence[float], y: Sequence[float], *, n_boot: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> Correlation:
    """Spearman's rho of ``x`` and ``y`` (pairs with a NaN dropped) and its percentile bootstrap CI.

    Each resample draws the pairs with replacement; resamples in which either side
    is constant are skipped. ``seed`` fixes the resamples.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D and of equal length; got {x.shape} and {y.shape}.")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = len(x)
    nan = float("nan")
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(nan, nan, nan, n, nan, confidence, n_boot)
    result = spearmanr(x, y)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    boots = _spearman_rows(x[draws], y[draws])
    boots = boots[~np.isnan(boots)]  # resamples where one side came out constant
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(boots, [tail, 100.0 - tail]) if len(boots) else (nan, nan)
    return Correlation(float(result.statistic), float(low), float(high), n, float(result.pvalue), confidence, n_boot)


@dataclass
class CorrelationDifference:
    """rho(a) - rho(b) against the same ratings, with a paired bootstrap CI over the shared pairs."""

    difference: float
    low: float
    high: float
    n_pairs: int
    confidence: float = 0.95

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in self.__dict__.items()}


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of x with the same row of y (NaN where a row is constant)."""
    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(axis=1) / denominator, np.nan)


def spearman_difference(a: Sequence[float], b: Sequence[float], y: Sequence[float], *, n_boot: int = 1000,
                        confidence: float = 0.95, seed: int = 0) -> CorrelationDifference:
    """rho(a, y) - rho(b, y) over the pairs where a, b and y are all defined; paired bootstrap CI.

    Each resample draws the same pairs for both, so the interval reflects the
    difference, not two independent uncertainties.
    """
    a, b, y = (np.asarray(v, dtype=np.float64) for v in (a, b, y))
    keep = ~(np.isnan(a) | np.isnan(b) | np.isnan(y))
    a, b, y = a[keep], b[keep], y[keep]
    n, nan = len(y), float("nan")
    if n < 3 or min(np.ptp(a), np.ptp(b), np.ptp(y)) == 0:
        return CorrelationDifference(nan, nan, nan, n, confidence)
    point = float(spearmanr(a, y).statistic - spearmanr(b, y).statistic)
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boots = _spearman_rows(a[draws], y[draws]) - _spearman_rows(b[draws], y[draws])
    boots = boots[~np.isnan(boots)]
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(boots, [tail, 100.0 - tail]) if len(boots) else (nan, nan)
    return CorrelationDifference(point, float(low), float(high), n, confidence)


def rated_pair_values(similarity: SimilarityMatrix, ratings: WordPairRatings) -> tuple[np.ndarray, np.ndarray]:
    """For the rated pairs whose two words are concepts: (similarities, human scores), NaN kept."""
    pairs = ratings.pairs_within(similarity.concepts)
    sim = np.array([similarity.pair(ratings.word1[i], ratings.word2[i]) for i in pairs], dtype=np.float64)
    return sim, ratings.scores[pairs]


def human_alignment(similarity: SimilarityMatrix, ratings: WordPairRatings, *, n_boot: int = 1000,
                    seed: int = 0) -> Correlation:
    """Spearman's rho between ``similarity`` and the ratings of the pairs whose two words are concepts.

    Pairs where the similarity is undefined (NaN) are dropped and not counted in ``n_pairs``.
    """
    sim, scores = rated_pair_values(similarity, ratings)
    return spearman_with_ci(sim, scores, n_boot=n_boot, seed=seed)


def agreement_ceiling(path: str | Path) -> float:
    """The human ceiling from MEN's ``agreement-score.txt``: the value of ``correlation(men, ...)=0.84``."""
    text = Path(path).read_text()
    for line in text.splitlines():
        if line.replace(" ", "").startswith("correlation(men") and "=" in line:
            return float(line.rsplit("=", 1)[1])
    raise ValueError(f"{path} has no line 'correlation(men, ...)=<value>'; pass the ceiling as a number instead.")


# --------------------------------------------------------------------------- comparing two similarity structures


@dataclass
class MatrixAgreement:
    """How alike two similarity matrices over the same concepts are.

    ``rho`` is Spearman's rho between their values on the distinct pairs (both
    defined); ``p_value`` is a Mantel permutation test (concept labels of one
    matrix shuffled ``n_perm`` times; pairs are not independent, so scipy's
    p-value would be too small).
    """

    rho: float
    p_value: float
    n_pairs: int
    n_perm: int

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in self.__dict__.items()}


def matrix_agreement(a: SimilarityMatrix, b: SimilarityMatrix, *, n_perm: int = 1000, seed: int = 0) -> MatrixAgreement:
    """Spearman's rho between two similarity matrices' distinct pairs, with a Mantel permutation p-value.

    Raises:
        ValueError: the matrices are not over the same concepts in the same order.
    """
    if a.concepts != b.concepts:
        raise ValueError("Both matrices must list the same concepts in the same order; use the same concept set.")
    i, j = np.triu_indices(len(a.concepts), k=1)
    x, y = a.values[i, j], b.values[i, j]
    keep = ~(np.isnan(x) | np.isnan(y))
    n = int(keep.sum())
    if n < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return MatrixAgreement(float("nan"), float("nan"), n, n_perm)
    rho = float(spearmanr(x[keep], y[keep]).statistic)
    rng = np.random.default_rng(seed)
    as_high = 0
    for _ in range(n_perm):
        p = rng.permutation(len(a.concepts))
        yp = b.values[p][:, p][i, j]
        ok = ~(np.isnan(x) | np.isnan(yp))
        if ok.sum() >= 3 and np.ptp(yp[ok]) > 0:
            as_high += spearmanr(x[ok], yp[ok]).statistic >= rho
    return MatrixAgreement(rho, (as_high + 1) / (n_perm + 1), n, n_perm)
