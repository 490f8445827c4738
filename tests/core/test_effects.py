"""What an expert writes: the final norm against the model's own logits, word effects against full
logits, promoting scores, and -- on the real model -- that silencing the promoting experts lowers
the concept word while silencing all experts raises it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steer_experts.effects import promoting_scores, word_effects, first_token_ids
from steer_experts.units import final_norm, locate_units, write_columns

from ..conftest import ONESEC, needs_data
from .test_interventions import synthetic_experts

WORDS = ["football", "goal"]


def test_the_final_norm_is_what_the_lm_head_reads(tiny_model):
    """The LM head applied to final_norm(last block's output) gives the model's own logits."""
    model = tiny_model.model
    enc = tiny_model.tokenizer(["The striker scored a goal"], return_tensors="pt")
    last_block = model.get_submodule(locate_units(model)[-1].module_path.rsplit(".", 2)[0])
    kept = {}
    handle = last_block.register_forward_hook(lambda _m, _a, o: kept.update(h=o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            logits = model(**enc).logits
            rebuilt = model.get_output_embeddings()(final_norm(model)(kept["h"]))
    finally:
        handle.remove()
    torch.testing.assert_close(rebuilt, logits, rtol=1e-5, atol=1e-5)


def test_word_effects_equal_the_full_logits_of_each_write(tiny_model):
    experts = synthetic_experts(tiny_model)
    effects = word_effects(tiny_model, experts, WORDS)
    ids = first_token_ids(tiny_model.tokenizer, WORDS)
    model = tiny_model.model
    expected = []
    with torch.no_grad():
        head, norm = model.get_output_embeddings(), final_norm(model)
        for site in experts.sites:
            columns = write_columns(model, site).float()
            logits = head(norm(columns)).double() - head(norm(torch.zeros_like(columns[:1]))).double()
            expected.append((logits[:, ids].mean(1) - logits.mean(1)).numpy())
    np.testing.assert_allclose(effects, np.concatenate(expected), rtol=1e-4, atol=1e-6)
    assert effects.shape == (experts.n_units,) and (effects > 0).any() and (effects < 0).any()


def test_first_token_ids_take_each_form_after_a_space_and_capitalised(tokenizer):
    ids = first_token_ids(tokenizer, ["football"])
    assert ids == list(dict.fromkeys([tokenizer(" football", add_special_tokens=False)["input_ids"][0],
                                      tokenizer(" Football", add_special_tokens=False)["input_ids"][0]]))
    assert len(ids) == 2


def test_promoting_scores_keep_the_ap_of_units_that_raise_the_word(tiny_model):
    experts = synthetic_experts(tiny_model)
    scores = promoting_scores(tiny_model, experts, "football", WORDS)
    effects = word_effects(tiny_model, experts, WORDS)
    ap = experts.expertise.ap[experts.concept_index("football")]
    np.testing.assert_array_equal(scores, np.where(effects > 0, ap, 0.0))
    default = promoting_scores(tiny_model, experts, "football")  # the word and its plural
    np.testing.assert_array_equal(default > 0, word_effects(tiny_model, experts, ["football", "footballs"]) > 0)


def test_an_architecture_without_a_final_norm_entry_is_refused_clearly(tiny_model, monkeypatch):
    from steer_experts import units

    monkeypatch.delitem(units.FINAL_NORM, tiny_model.model.config.model_type)
    with pytest.raises(units.UnsupportedArchitectureError, match="FINAL_NORM"):
        final_norm(tiny_model.model)


def test_word_effects_refuse_no_words(tiny_model):
    with pytest.raises(ValueError, match="words is empty"):
        word_effects(tiny_model, synthetic_experts(tiny_model), [])


@needs_data(ONESEC)
def test_silencing_the_promoting_football_experts_lowers_the_word_and_silencing_all_raises_it(
        smollm2, football_experts):
    """The direction of both effects on the real model: the next-word probability of " football"
    after inviting prompts, with the experts zeroed through steer()."""
    from steer_experts.evaluation import SteeredScorer, distinct_forms, next_word_probability
    from steer_experts.evaluation.prompts import inviting_prompts
    from steer_experts.steering import steer

    concept = football_experts.concepts[0]
    prompts = list(inviting_prompts(concept))

    def p_next(steered):
        return float(np.mean([next_word_probability(SteeredScorer(steered), smollm2.tokenizer, [p], distinct_forms(
            smollm2.tokenizer, p, ["football", "Football"])).sum() for p in prompts]))

    base = p_next(steer(smollm2, football_experts, concept, k=0))
    every = p_next(steer(smollm2, football_experts, concept, k=100, mode="ablate"))
    promoting = p_next(steer(smollm2, football_experts, concept, k=100, mode="ablate",
                             scores=promoting_scores(smollm2, football_experts, concept)))
    assert promoting < base < every
