"""SemanticLens-style queries answered with expert scores.

* **label**: a neuron's label is the set of concepts it is expert for (AP > tau).
* **search**: a concept word gives its experts.
* **audit**: for concept pairs declared unrelated, list the experts they share;
  a shared expert is a neuron that mixes two things that should be apart.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..errors import InvalidArgumentError
from ..experts import ExpertSet, check_tau
from .similarity import jaccard_similarity, shared_experts


def label_neurons(expert_set: ExpertSet, tau: float = 0.5, max_concepts: int | None = None) -> list[dict]:
    """Label every neuron that is expert for at least one concept.

    Returns rows ``{"layer", "neuron", "concepts": [(concept, ap), ...]}`` (concepts
    best first, at most ``max_concepts``), ordered by layer then neuron.
    """
    check_tau(tau)
    ap = expert_set.expertise.ap
    names = expert_set.concepts
    rows = []
    for unit in np.flatnonzero((ap > tau).any(axis=0)):
        column = ap[:, unit]
        order = [c for c in np.argsort(-column, kind="stable") if column[c] > tau][:max_concepts]
        rows.append({"layer": int(expert_set.layer[unit]), "neuron": int(expert_set.neuron[unit]),
                     "concepts": [(names[c], float(column[c])) for c in order]})
    return rows


def search_experts(expert_set: ExpertSet, query: str, *, k: int | None = 10, tau: float | None = None) -> list[dict]:
    """The experts of the concept ``query`` names (exact name, or the word of a sense-keyed name).

    Give ``k`` (best k units) or ``tau`` (every unit with AP > tau; takes precedence).
    Returns rows ``{"rank", "layer", "neuron", "ap", "auroc", "on_p50", "off_mean"}``.

    Raises:
        KeyError: no concept matches ``query``; the message lists the concepts.
    """
    if tau is not None:
        return expert_set.select(query, tau=tau).table()
    if k is None:
        raise InvalidArgumentError("Give k or tau.")
    return expert_set.experts_of(query, k)


def audit_unrelated(expert_set: ExpertSet, pairs: Iterable[Sequence[str]], tau: float = 0.5) -> list[dict]:
    """For each pair of concepts declared unrelated, the experts they share and their Jaccard overlap.

    Returns rows ``{"concept_a", "concept_b", "jaccard", "shared": [{"layer", "neuron",
    "ap_a", "ap_b"}, ...]}``, the pairs with most shared experts first. ``jaccard`` is
    None when either concept has no experts at ``tau``.
    """
    check_tau(tau)
    pairs = [list(p) for p in pairs]
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(c, str) and c.strip() for c in pair):
            raise InvalidArgumentError(f"Each audited pair needs two concepts; got {pair}.")
    jaccard = jaccard_similarity(expert_set, tau)
    rows = []
    for pair in pairs:
        a, b = (expert_set.concepts[expert_set.concept_index(c)] for c in pair)
        value = jaccard.pair(a, b)
        rows.append({"concept_a": a, "concept_b": b, "jaccard": None if np.isnan(value) else value,
                     "shared": shared_experts(expert_set, a, b, tau)})
    return sorted(rows, key=lambda r: -len(r["shared"]))
