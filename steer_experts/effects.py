"""What an expert does to the next word: its direct effect on the concept word's logit.

Experts are found by what they *read* (their response on positives vs negatives);
this module asks what they *write*. A unit's write is its down-projection column;
read alone through the final norm and the unembedding, it raises some next-word
logits and lowers others. :func:`word_effects` gives, per unit, how much it raises
the concept word above the vocabulary's mean logit.

Why it matters: on SmolLM2 about half of the top football experts (most of those in
the last third of the layers) *lower* the word "football" -- they respond in
football text, and what they predict is something other than the word itself.
Silencing every expert therefore raises p("football") (the causal-validation
recipe's REVERSED verdict). Silencing only the experts that promote the word
(:func:`promoting_scores`, ranked by AP) lowers it.
"""

from __future__ import annotations

import numpy as np
import torch

from .experts import ExpertSet
from .models import LoadedModel
from .units import final_norm, write_columns
from .words import concept_forms


def first_token_ids(tokenizer, words) -> list[int]:
    """The first token of each word as it follows a space, and of its capitalised form (unique, in order)."""
    forms = [f for w in words for f in (w, w.capitalize())]
    ids = [tokenizer(" " + f, add_special_tokens=False)["input_ids"][0] for f in forms]
    return list(dict.fromkeys(int(i) for i in ids))


@torch.no_grad()
def word_effects(model: LoadedModel, experts: ExpertSet, words) -> np.ndarray:
    """Per unit of ``experts`` (float64, logits): the direct effect of its write on ``words``.

    The unit's down-projection column goes through the final norm and the
    unembedding alone (norm(column) - norm(0), so a LayerNorm's bias cancels); the
    effect is the mean logit of the words' first tokens (:func:`first_token_ids`)
    minus the mean logit over the vocabulary. Its sign says whether raising the unit
    promotes the words; its size is per normalised write, comparable across units of
    one model. Paths through later layers are not counted.
    """
    experts.check_model(model)
    ids = first_token_ids(model.tokenizer, words)
    if not ids:
        raise ValueError("words is empty; pass the concept word and its forms, e.g. concept_forms('football').")
    norm = final_norm(model.model)
    unembedding = model.model.get_output_embeddings().weight.detach()
    readout = (unembedding[ids].double().mean(0) - unembedding.double().mean(0)).to(model.device)
    dtype = unembedding.dtype
    effects = []
    for site in experts.sites:
        columns = write_columns(model.model, site).to(model.device, dtype)
        written = norm(columns) - norm(torch.zeros_like(columns[:1]))
        effects.append((written.double() @ readout).cpu().numpy())
    return np.concatenate(effects)


def promoting_scores(model: LoadedModel, experts: ExpertSet, concept: str, words=None) -> np.ndarray:
    """Per unit (float64, in [0, 1]): its AP for ``concept`` where its write promotes the concept's
    words (:func:`word_effects` > 0), else 0.

    ``words`` default to the concept word and its plural. Pass the result to
    ``steer(..., scores=...)`` to take the top-k experts among the units that promote the word.
    """
    if words is None:
        words = concept_forms(concept)
    ap = experts.expertise.ap[experts.concept_index(concept)].astype(np.float64)
    return np.where(word_effects(model, experts, words) > 0, ap, 0.0)
