"""Stages 3-5 end to end: find the experts of a set of concepts.

:func:`discover` collects unit responses (stage 3, cached), scores expertise
(stage 4) and returns an :class:`~steer_experts.experts.ExpertSet` (stage 5).
What a concept is scored against is ``negatives``:

* ``"sampled"`` -- one pass over all concepts; a concept without negatives gets
  them sampled from the other concepts' positives.
* ``"per_concept"`` -- one concept at a time against its own negatives, as in the
  paper; each concept's responses are cached under its own sentences, so runs
  asking for different groups of concepts share the cache.
* ``"contrast"`` -- each concept against its own negatives *and the other concepts'
  positives*: for concepts that share a theme (man and woman: 40% of OneSec's
  "man" positives mention women), it keeps the units that tell them apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .concepts import ConceptSet
from .errors import InvalidArgumentError
from .experts import ExpertSet
from .models import LoadedModel
from .responses import collect_responses

NEGATIVES = ("sampled", "per_concept", "contrast")


def discover(model: LoadedModel, concepts: ConceptSet, *, negatives: str = "sampled", unit_kind: str = "mlp",
             pooling: str = "max", max_length: int = 128, batch_size: int = 32, n_negatives: int = 1000,
             seed: int = 0, cache_dir: str | Path | None = None, progress: bool = True) -> ExpertSet:
    """Find the experts of every concept: collect responses, score expertise, return an :class:`ExpertSet`.

    Concepts without negatives first get ``n_negatives`` sampled (with ``seed``) from the
    other concepts' positives; ``negatives`` then says what each is scored against (see the
    module docstring). Responses are cached (see
    :func:`~steer_experts.responses.collect_responses` for the other arguments).
    """
    if negatives not in NEGATIVES:
        raise InvalidArgumentError(f"negatives must be one of {NEGATIVES}; got {negatives!r}.")
    concepts = concepts.with_sampled_negatives(n_negatives, seed)
    collect = dict(unit_kind=unit_kind, pooling=pooling, max_length=max_length, batch_size=batch_size,
                   cache_dir=cache_dir, progress=progress)
    if negatives == "per_concept":
        parts = [_discover_together(model, concepts.subset([name]), seed, collect) for name in concepts.names]
        return ExpertSet.concat(parts, {"discovered": "each concept against its own negatives"})
    if negatives == "contrast":
        return _discover_contrast(model, concepts, collect)
    return _discover_together(model, concepts, seed, collect)


def _discover_together(model: LoadedModel, concepts: ConceptSet, seed: int, collect: dict) -> ExpertSet:
    """Every concept of ``concepts`` (all with negatives) scored on one response matrix."""
    responses = collect_responses(model, concepts.sentences, **collect)
    metadata = {"pooling": collect["pooling"], "max_length": collect["max_length"],
                "n_sentences": responses.n_sentences, "truncated_sentences": responses.truncated,
                "negative_sampling_seed": seed, "duplicates_dropped": concepts.report.duplicates_dropped}
    return ExpertSet.from_responses(responses, concepts, model, unit_kind=collect["unit_kind"], metadata=metadata,
                                    progress=collect["progress"])


def _discover_contrast(model: LoadedModel, concepts: ConceptSet, collect: dict) -> ExpertSet:
    """Each concept against its negatives and the others' positives, from the per-concept response caches."""
    sentences: list[str] = []
    blocks = []
    for name in concepts.names:
        part = concepts.subset([name]).sentences
        responses = collect_responses(model, part, **collect)
        seen = set(sentences)
        new = [i for i, s in enumerate(part) if s not in seen]
        blocks.append(responses.to_numpy()[new])
        sentences += [part[i] for i in new]
    metadata = {"negatives": "own negatives + the other concepts' positives", "n_sentences": len(sentences)}
    return ExpertSet.from_responses(np.concatenate(blocks), concepts.contrasted().rows(sentences), model,
                                    unit_kind=collect["unit_kind"], metadata=metadata, progress=collect["progress"])
