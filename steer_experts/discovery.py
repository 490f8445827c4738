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

:func:`held_out_expertise` asks whether experts are found reliably: chosen on one
half of a concept's sentences, do they keep their AP on the other half?

:func:`discover_word` needs no data at all: the model writes the word's positives
(:mod:`~steer_experts.writing`), the neutral sentence bank gives its negatives, and the
expert set is cached, so asking again for the same word costs a load.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .atomic import file_safe
from .concepts import Concept, ConceptSet
from .errors import InvalidArgumentError
from .expertise import compute_expertise, scoring_device
from .experts import CONFIG_NAME, ExpertSet
from .models import LoadedModel, cache_root
from .responses import collect_responses
from .writing import ChatSampler, WritingSettings, chat_sampler, neutral_negatives, write_concepts
from .writing.neutral_bank import bank_provenance

NEGATIVES = ("sampled", "per_concept", "contrast")


def discover(model: LoadedModel, concepts: ConceptSet, *, negatives: str = "sampled", unit_kind: str = "mlp",
             pooling: str = "max", max_length: int = 128, batch_size: int = 32, shard_size: int = 512,
             n_negatives: int = 1000, seed: int = 0, cache_dir: str | Path | None = None,
             progress: bool = True) -> ExpertSet:
    """Find the experts of every concept: collect responses, score expertise, return an :class:`ExpertSet`.

    Concepts without negatives first get ``n_negatives`` sampled (with ``seed``) from the
    other concepts' positives; ``negatives`` then says what each is scored against (see the
    module docstring). Responses are cached (see
    :func:`~steer_experts.responses.collect_responses` for the other arguments).

    Under torchrun (or ``steer-experts discover --workers N``) every process calls it alike:
    they share the response shards and the units (:mod:`~steer_experts.distributed`), and each
    returns the same expert set, bit for bit the one a lone process finds; save it from one.
    """
    if negatives not in NEGATIVES:
        raise InvalidArgumentError(f"negatives must be one of {NEGATIVES}; got {negatives!r}.")
    concepts = concepts.with_sampled_negatives(n_negatives, seed)
    collect = dict(unit_kind=unit_kind, pooling=pooling, max_length=max_length, batch_size=batch_size,
                   shard_size=shard_size, cache_dir=cache_dir, progress=progress)
    if negatives == "per_concept":
        parts = [_discover_together(model, concepts.subset([name]), seed, collect) for name in concepts.names]
        return ExpertSet.concat(parts, {"discovered": "each concept against its own negatives"})
    if negatives == "contrast":
        return _discover_contrast(model, concepts, collect)
    return _discover_together(model, concepts, seed, collect)


class WordNotUsableError(InvalidArgumentError):
    """Raised when the writer cannot write enough sentences naming a word within its rounds."""


def check_concept_word(word: str) -> str:
    """``word`` with its white space folded, lower case; :class:`InvalidArgumentError` if it has no letter."""
    cleaned = " ".join(word.split()).lower()
    if not re.search(r"[^\W\d_]", cleaned):
        raise InvalidArgumentError(f"The concept word {cleaned!r} has no letter; give a word such as 'ocean'.")
    return cleaned


def discover_word(model: LoadedModel, word: str, *, n_positives: int = 100, n_negatives: int = 400,
                  min_positives: int = 25, writing: WritingSettings | None = None, sampler: ChatSampler | None = None,
                  pooling: str = "max", max_length: int = 128, batch_size: int = 32, seed: int = 0,
                  progress: bool = True) -> ExpertSet:
    """The experts of the concept named by ``word``, from no data: ``n_positives`` sentences the model
    writes about the word (``writing``: prompts, rounds, backend; ``sampler`` replaces the backend's)
    against ``n_negatives`` sentences of the neutral bank that never mention it.

    The expert set is cached under ``<cache>/word_experts/``, keyed by the model's fingerprint, the
    word and every setting (the writing backend that runs included); the written sentences under
    ``<cache>/word_concepts/``, where an interrupted writing run resumes.

    Raises:
        InvalidArgumentError: an empty word, or one with no letter.
        WordNotUsableError: fewer than ``min_positives`` sentences naming the word after the writer's
            ``max_rounds`` rounds.
    """
    word = check_concept_word(word)
    if not 1 <= min_positives <= n_positives or n_negatives < 1:
        raise InvalidArgumentError("Need 1 <= min_positives <= n_positives and n_negatives >= 1; got "
                                   f"{min_positives}, {n_positives} and {n_negatives}.")
    settings = replace(writing or WritingSettings(), n_positives=n_positives)
    sampler = sampler or chat_sampler(model, settings.backend)
    writing_key = {"model": model.fingerprint, **settings.generation_key(), "backend": sampler.name}
    bank = bank_provenance()
    key = {**writing_key, "word": word, "n_positives": n_positives, "max_rounds": settings.max_rounds,
           "n_negatives": n_negatives, "bank": [bank["model_fingerprint"], bank["sentences"]], "pooling": pooling,
           "max_length": max_length, "seed": seed}
    folder = cache_root() / "word_experts" / f"{file_safe(word, last=40)}-{_digest(key)}"
    if (folder / CONFIG_NAME).exists():
        return ExpertSet.from_pretrained(folder, model)
    writing_folder = cache_root() / "word_concepts" / f"{file_safe(model.name, keep='-_.', last=40)}-{_digest(writing_key)}"
    written = write_concepts(model, [word], writing_folder, settings, progress=progress, sampler=sampler).words[0]
    positives = tuple(k["text"] for k in written.kept[:n_positives])
    if len(positives) < min_positives:
        raise WordNotUsableError(
            f"The writer kept only {len(positives)} sentences naming {word!r} in {written.rounds} rounds "
            f"(need {min_positives}): {written.counts['no_mention']} of {written.counts['generated']} candidate "
            "sentences did not name it. Check the spelling, use a more common word, or give your own sentences "
            "(a concept file, with `steer --concepts` or discover()).")
    concepts = ConceptSet([Concept(word, positives, tuple(neutral_negatives(word, n_negatives, seed)))])
    expert_set = discover(model, concepts, pooling=pooling, max_length=max_length, batch_size=batch_size,
                          seed=seed, progress=progress)
    expert_set.metadata.update(word=word, positives="written by the model", negatives="neutral sentence bank",
                               writing_backend=sampler.name, writing_rounds=written.rounds)
    return ExpertSet.from_pretrained(expert_set.save_pretrained(folder), model)


def discover_words(model: LoadedModel, words: Sequence[str], **settings) -> ExpertSet:
    """One expert set over several words, each found (and cached) by :func:`discover_word` with ``settings``."""
    return ExpertSet.concat([discover_word(model, w, **settings) for w in words],
                            {"discovered": "each word from written positives against the neutral bank"})


def _digest(key: dict) -> str:
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()


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


def held_out_expertise(model: LoadedModel, concepts: ConceptSet, ks: Sequence[int], *, fraction: float = 0.5,
                       seed: int = 0, cache_dir: str | Path | None = None) -> list[dict]:
    """Per concept (with negatives) and k: the top-k experts chosen on a ``fraction`` of its sentences
    (``ConceptSet.split``) and their AP on the rest, from the concept's cached responses.

    Each row holds the mean AP on the choosing and held-out halves and their drop, the held-out
    minimum, the held-out half's own top-k AP (the best possible there), chance (the held-out
    positive rate), the share of above-chance AP kept, the overlap of the two top-k sets and the
    halves' sizes (sentences).
    """
    table = []
    for name in concepts.names:
        whole = concepts.subset([name])  # the sentences discovery saw, so the responses come from the cache
        responses = collect_responses(model, whole.sentences, cache_dir=cache_dir)
        first, second = whole.split(fraction, seed=seed)
        # as discover scores (ExpertSet.from_responses)
        where = dict(threads=torch.get_num_threads(), device=scoring_device(model.device), progress=False)
        ap_a = compute_expertise(responses, first.rows(whole.sentences), **where).ap[0]
        held = compute_expertise(responses, second.rows(whole.sentences), **where)
        ap_b = held.ap[0]
        chance = float(held.n_positives[0] / (held.n_positives[0] + held.n_negatives[0]))
        order_a, order_b = np.argsort(-ap_a, kind="stable"), np.argsort(-ap_b, kind="stable")
        for k in ks:
            top_a, top_b = order_a[:k], order_b[:k]
            a, b = float(ap_a[top_a].mean()), float(ap_b[top_a].mean())
            kept = (b - chance) / (a - chance) if a > chance else float("nan")
            table.append(dict(concept=name, k=k, ap_choosing=a, ap_held_out=b, ap_drop=a - b,
                              ap_held_out_min=float(ap_b[top_a].min()), ap_held_out_own_topk=float(ap_b[top_b].mean()),
                              chance=chance, kept_above_chance=kept,
                              overlap=len(np.intersect1d(top_a, top_b)) / k,
                              n_choosing=len(first.concepts[0].positives) + len(first.concepts[0].negatives),
                              n_held_out=len(second.concepts[0].positives) + len(second.concepts[0].negatives)))
    return table
