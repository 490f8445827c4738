"""Choosing how hard to steer: an operating point from a quick frontier on held-out prompts.

How many experts (k) and how strongly (alpha) to steer depends on the model and
the concept: on SmolLM2 football steers at k = 30 while Gemma-3-270M collapses
into "team team team" at k = 50. :func:`calibrate` samples a small grid of
(k, alpha) on neutral prompts of its own, scores each cell with a concept
classifier and with perplexity, and keeps the highest concept score whose
perplexity stays within ``max_perplexity_ratio`` times the unsteered one.

Perplexity here is the base model's own, unsteered, of the continuation given
its prompt: the one scorer certainly at hand. (The steering-frontier recipe
scores with a different model.) The choice is stored in the expert set's
metadata, so it is saved with it; ``ExpertSet.operating_point`` reads it back and
``steer(..., k="auto")`` steers with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .errors import InvalidArgumentError
from .evaluation import perplexity
from .evaluation.concept_score import ConceptClassifier
from .experts import ExpertSet, operating_point_key
from .models import LoadedModel
from .steering import steer

# Neutral openings of its own, apart from the recipes' evaluation prompts.
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "I want to tell you about",
    "The weekend started when",
    "Here is something I learned:",
    "It was late in the afternoon and",
    "My friend called me to say",
    "The news this morning",
    "There was once a place where",
    "What I remember most is",
)


@dataclass(frozen=True)
class OperatingPoint:
    """A chosen (k, alpha) for one concept, with what it measured on the calibration prompts.

    ``concept_score`` is the classifier's mean probability in [0, 1]; ``ppl_ratio`` the mean
    perplexity over the unsteered one; ``within_budget`` False means no cell met the budget
    and the gentlest cell was kept. ``cells`` lists every (k, alpha, concept_score, ppl_ratio) tried.
    """

    concept: str
    k: int
    alpha: float
    concept_score: float
    ppl_ratio: float
    max_perplexity_ratio: float
    within_budget: bool
    cells: tuple[dict, ...]


def calibrate(model: LoadedModel, experts: ExpertSet, concept: str, classifier: ConceptClassifier, *,
              max_perplexity_ratio: float = 2.0, ks: Sequence[int] = (10, 30, 100, 300),
              alphas: Sequence[float] = (0.5, 1.0), prompts: Sequence[str] = CALIBRATION_PROMPTS,
              samples_per_prompt: int = 3, max_new_tokens: int = 30, seed: int = 0) -> OperatingPoint:
    """Sample every (k, alpha) on ``prompts`` (T = 1, top-k 10), choose the operating point and
    store it in ``experts.metadata["operating_points"]`` (save the set to keep it).

    Returns the :class:`OperatingPoint`. Raises ValueError for a budget <= 1 or an empty grid.
    """
    if not max_perplexity_ratio > 1:
        raise InvalidArgumentError(f"max_perplexity_ratio must be > 1 (a multiple of the unsteered perplexity); "
                         f"got {max_perplexity_ratio!r}.")
    if not ks or not alphas or not prompts or samples_per_prompt < 1:
        raise InvalidArgumentError("calibrate needs at least one k, one alpha, one prompt and one sample per prompt.")
    name = experts.concepts[experts.concept_index(concept)]
    asked = [p for p in prompts for _ in range(samples_per_prompt)]

    def measure(k: int, alpha: float) -> tuple[float, float]:
        steered = steer(model, experts, name, k=k, alpha=alpha)
        texts = steered.complete(asked, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=10,
                                 seed=seed, batch_size=len(asked))
        ppl = perplexity(texts, model.model, model.tokenizer, prompts=asked, batch_size=len(asked), progress=False)
        return classifier.score(texts), float(np.nanmean(ppl))

    _, base_ppl = measure(0, 1.0)
    cells = []
    for k in sorted(ks):
        for alpha in sorted(alphas):
            score, ppl = measure(k, alpha)
            cells.append({"k": int(k), "alpha": float(alpha), "concept_score": score, "ppl_ratio": ppl / base_ppl})
    within = [c for c in cells if c["ppl_ratio"] <= max_perplexity_ratio]
    best = (max(within, key=lambda c: (c["concept_score"], -c["ppl_ratio"])) if within
            else min(cells, key=lambda c: c["ppl_ratio"]))
    point = OperatingPoint(name, best["k"], best["alpha"], best["concept_score"], best["ppl_ratio"],
                           float(max_perplexity_ratio), bool(within), tuple(cells))
    experts.metadata.setdefault("operating_points", {})[operating_point_key(name, max_perplexity_ratio)] = \
        asdict(point)
    return point
