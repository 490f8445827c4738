"""Human word-pair ratings (MEN and any TSV/CSV) and the alignment of a concept similarity with them.

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

from ..evaluation.statistics import Correlation, spearman_difference, spearman_with_ci
from .similarity import SimilarityMatrix



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

    def subset(self, pairs: Sequence[int]) -> "WordPairRatings":
        """The ratings of the pairs at indices ``pairs``, in that order."""
        pairs = np.asarray(pairs, dtype=np.int64)
        return WordPairRatings([self.word1[i] for i in pairs], [self.word2[i] for i in pairs], self.scores[pairs],
                               self.source)

    def split(self, fraction: float = 0.5, *, seed: int = 0, strata: int = 5) -> tuple["WordPairRatings", "WordPairRatings"]:
        """Two disjoint parts of the pairs, (dev, test), each holding about ``fraction`` and 1 - ``fraction``
        of every rating band: the pairs are cut into ``strata`` bands by score quantile, and each band is
        shuffled with ``seed`` and split. Choose methods on dev, report them on test."""
        if not 0 < fraction < 1 or strata < 1:
            raise ValueError(f"Need 0 < fraction < 1 and strata >= 1; got {fraction} and {strata}.")
        order = np.argsort(self.scores, kind="stable")
        rng = np.random.default_rng(seed)
        dev, test = [], []
        for band in np.array_split(order, strata):
            band = rng.permutation(band)
            cut = int(round(fraction * len(band)))
            dev += band[:cut].tolist()
            test += band[cut:].tolist()
        return self.subset(sorted(dev)), self.subset(sorted(test))

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
        if rows and not _parses_as_number(rows[0][columns[2]] if len(rows[0]) > columns[2] else ""):
            rows, first_line = rows[1:], 2
    w1, w2, scores = [], [], []
    for n, row in enumerate(rows, first_line):
        if len(row) <= max(columns):
            raise ValueError(f"{path}:{n}: expected at least {max(columns) + 1} fields, got {row}.")
        a, b, s = (row[c].strip() for c in columns)
        if not _parses_as_number(s):
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


def _parses_as_number(text: str) -> bool:
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


def compare_with_baselines(expert: dict, baselines: list[dict], matrices: dict[str, SimilarityMatrix],
                           ratings: WordPairRatings, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Does ``expert`` beat every baseline at matching ``ratings``? Rows ``{"method", "rho"}`` name the
    similarities in ``matrices``; the answer rests on paired bootstrap differences of Spearman's rho over
    the shared pairs (one 95% interval per baseline), with the best baseline named."""
    expert_values, scores = rated_pair_values(matrices[expert["method"]], ratings)
    differences, beats_all = [], bool(baselines)
    for b in baselines:
        values, _ = rated_pair_values(matrices[b["method"]], ratings)
        d = spearman_difference(expert_values, values, scores, n_boot=n_boot, seed=seed).to_dict()
        differences.append({"baseline": b["method"], **d})
        beats_all &= d["low"] is not None and d["low"] > 0
    best = max(baselines, key=lambda r: r["rho"]) if baselines else {"method": "none", "rho": float("nan")}
    answer = ("yes: above every baseline, paired 95% CI excludes 0" if beats_all else
              "above every baseline in point estimate, not resolved for all" if expert["rho"] > best["rho"] else "no")
    return {"expert": expert["method"], "expert_rho": expert["rho"], "best_baseline": best["method"],
            "best_baseline_rho": best["rho"], "differences": differences, "beats_every_baseline": beats_all,
            "answer": answer}
