"""How concepts organise in expert space: categories, clusters, the layers their experts sit in, and
what a similarity's stability rests on (views of the data by group, the positive-count confound)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform
from scipy.stats import spearmanr

from ..concepts import ConceptRows, builtin_concept_sets, builtin_rows
from ..experts import ExpertSet
from .similarity import SimilarityMatrix, ap_cosine_similarity, jaccard_similarity, relative_taus


def read_categories(path: str | Path) -> dict[str, str]:
    """``{concept: category}`` from a two-column CSV/TSV (a header line ``concept,category`` is skipped)."""
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r and r[0].strip()]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["concept", "category"]:
        rows = rows[1:]
    bad = [r for r in rows if len(r) < 2]
    if bad:
        raise ValueError(f"{path}: every line needs 'concept{delimiter}category'; got {bad[0]}.")
    return {r[0].strip(): r[1].strip() for r in rows}


def similarity_by_name(expert_set: ExpertSet, method: str) -> SimilarityMatrix:
    """``"ap-cosine"``, ``"ap-cosine-centred"``, ``"jaccard:<tau>"`` or ``"jaccard-relative:<m>"``."""
    if method == "ap-cosine":
        return ap_cosine_similarity(expert_set)
    if method == "ap-cosine-centred":
        return ap_cosine_similarity(expert_set, centred=True)
    kind, _, value = method.partition(":")
    if kind == "jaccard":
        return jaccard_similarity(expert_set, float(value))
    if kind == "jaccard-relative":
        tau = relative_taus(expert_set, [float(value)])[float(value)]
        sim = jaccard_similarity(expert_set, tau)
        sim.method = f"jaccard m={value} (tau={tau:.3f})"
        return sim
    raise ValueError(f"Unknown method {method!r}; use ap-cosine, ap-cosine-centred, jaccard:<tau> or "
                     "jaccard-relative:<m>.")


def cluster(sim: SimilarityMatrix) -> np.ndarray:
    """Average-linkage tree of the concepts with distance 1 - similarity (undefined pairs at the largest distance)."""
    values = np.nan_to_num(sim.values, nan=np.nanmin(sim.values) if np.isfinite(sim.values).any() else 0.0)
    distance = np.max(values) - values  # 1 - s for a similarity whose maximum (the diagonal) is 1
    np.fill_diagonal(distance, 0.0)
    distance = (distance + distance.T) / 2
    return linkage(squareform(distance, checks=False), method="average")


def layer_distribution(expert_set: ExpertSet, taus: dict[str, float]) -> dict[str, list[float]]:
    """For each threshold, the share of all experts (summed over concepts) in each layer; empty if none."""
    n_layers = len(expert_set.sites)
    out = {}
    for label, tau in taus.items():
        counts = np.zeros(n_layers)
        for c in range(len(expert_set.concepts)):
            counts += np.bincount(expert_set.layer[expert_set.expertise.ap[c] > tau], minlength=n_layers)
        out[label] = (counts / counts.sum()).tolist() if counts.sum() else []
    return out


def view_of(groups: dict[str, list[str]], row_of: dict[str, int], n_negatives: int, seed: int) -> ConceptRows:
    """Each concept's positives are its group; its negatives up to ``n_negatives`` of the other groups' (seeded)."""
    names = [n for n, g in groups.items() if g]
    rng = np.random.default_rng(seed)
    positives, negatives = [], []
    for name in names:
        own = np.array(sorted({row_of[s] for s in groups[name]}), dtype=np.int64)
        others = np.array(sorted({row_of[s] for n in names if n != name for s in groups[n]} - set(own.tolist())),
                          dtype=np.int64)
        if len(others) > n_negatives:
            others = np.sort(rng.choice(others, size=n_negatives, replace=False))
        positives.append(own)
        negatives.append(others)
    return ConceptRows(names, positives, negatives)


def size_confound(sim: SimilarityMatrix, n_positives: dict[str, int]) -> float | None:
    """Spearman rho between a similarity and log P_a + log P_b (P: positives) over the distinct pairs.

    High values mean the similarity mostly tracks how many positives the two
    concepts have (AP's chance level is the positive rate), not what they are;
    such a similarity looks stable whenever the counts are.
    """
    i, j = np.triu_indices(len(sim.concepts), k=1)
    size = np.log([n_positives[c] for c in sim.concepts])
    values = sim.values[i, j]
    ok = ~np.isnan(values)
    sizes = (size[i] + size[j])[ok]
    if ok.sum() < 3 or np.ptp(values[ok]) == 0 or np.ptp(sizes) == 0:
        return None  # equal counts everywhere: nothing to confound with
    return float(spearmanr(values[ok], sizes).statistic)


def styles_of(source: str | Path) -> dict[str, dict[str, list[str]]]:
    """``{style: {concept: [positive sentences]}}`` from JSONL concept files that carry a style column,
    or from a built-in concept set's name (as :meth:`~steer_experts.concepts.ConceptSet.load` takes it)."""
    folder = Path(source)
    if not folder.exists() and str(source) in builtin_concept_sets():
        rows = builtin_rows(str(source))
    else:
        files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else [folder] if folder.suffix == ".jsonl" else []
        rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    out: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        if "style" in row and str(row.get("label", 1)) in ("1", "positive"):
            out.setdefault(row["style"], {}).setdefault(row["concept"], []).append(row["text"])
    return out
