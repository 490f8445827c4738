"""Concept similarity from experts (ExpertLens), and how alike two similarity structures are.

Two concepts are similar when their experts overlap:

* **Jaccard at tau**: |E_a & E_b| / |E_a | E_b| with E_c = {units with AP > tau}.
  Undefined (NaN) when either set is empty.
* **Jaccard of the top k**: the same overlap with E_c = the k units of highest AP
  (``ExpertSet.select(c, k=k)``): every concept has experts, whatever its positive rate.
* **AP cosine**: cosine of the full AP vectors (one value per unit), optionally
  mean-centred per unit across concepts, which removes what every concept shares
  (units that fire on any sentence get AP near the positive rate for all).
* **AP profiles** (:func:`ap_profile_similarity`): Pearson's r (row-centred cosine) or
  Spearman's rho of two AP vectors, or the cosine of their lift over chance.

Two similarity structures (two models, two halves of the data) agree when their
values on the distinct pairs correlate: :func:`matrix_agreement`, with a Mantel
permutation p-value. Alignment with human ratings is in :mod:`.ratings`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.stats import rankdata, spearmanr

from ..atomic import atomic_write
from ..evaluation.statistics import json_fields
from ..experts import ExpertSet


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


def top_k_jaccard_similarity(experts: ExpertSet | tuple[np.ndarray, Sequence[str]], k: int) -> SimilarityMatrix:
    """Jaccard overlap of every pair of concepts' top-k expert sets (the k units of highest AP, ties to
    the lower unit index, as :meth:`ExpertSet.select` breaks them): |E_a & E_b| / |E_a | E_b|, never undefined."""
    ap, concepts = _ap_and_concepts(experts)
    if not 1 <= k <= ap.shape[1]:
        raise ValueError(f"k must be in [1, {ap.shape[1]}] (the units); got {k}.")
    masks = np.zeros(ap.shape)
    np.put_along_axis(masks, np.argsort(-ap, axis=1, kind="stable")[:, :k], 1.0, axis=1)
    inter = masks @ masks.T
    return SimilarityMatrix(concepts, inter / (2 * k - inter), f"jaccard top k={k}")


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


PROFILE_METHODS = ("pearson", "spearman", "lift")


def ap_profile_similarity(experts: ExpertSet | tuple[np.ndarray, Sequence[str]], method: str) -> SimilarityMatrix:
    """Similarity of two concepts' AP profiles (one AP per unit), compared whole:

    * ``"pearson"``: Pearson's r of the two AP vectors, i.e. the cosine of each vector minus its own
      mean over the units (row-centred, where ``ap_cosine_similarity(centred=True)`` centres columns);
    * ``"spearman"``: Spearman's rho, Pearson's r of the vectors' ranks (ties share their mean rank);
    * ``"lift"``: the cosine of ``(AP - r_c) / (1 - r_c)``, with ``r_c`` concept c's positive rate,
      the AP a unit that ranks at random gets: units at chance count 0 for every concept, however
      many positives it has. Needs an :class:`ExpertSet` (for the positive rates).
    """
    if method not in PROFILE_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {PROFILE_METHODS}.")
    ap, concepts = _ap_and_concepts(experts)
    if method == "lift":
        if not isinstance(experts, ExpertSet):
            raise ValueError("The lift needs each concept's positive rate: pass an ExpertSet, not (ap, names).")
        e = experts.expertise
        rate = (e.n_positives / (e.n_positives + e.n_negatives)).astype(np.float64)[:, None]
        return SimilarityMatrix(concepts, cosine_matrix((ap - rate) / (1.0 - rate)), "ap lift cosine")
    if method == "spearman":
        ap = rankdata(ap, axis=1)
    return SimilarityMatrix(concepts, cosine_matrix(ap - ap.mean(axis=1, keepdims=True)), f"ap {method}")


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
        """JSON-ready fields (NaN as None)."""
        return json_fields(self)


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
