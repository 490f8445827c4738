"""DiffMean: residual means against hidden states, the addition against a plain hook, save/load;
its neuron-basis form (unit shifts, ``mode="add"``) against plain hooks too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steer_experts.concepts import Concept
from steer_experts.diffmean import (
    ResidualMeans, aligned_scores, residual_means, steer_diffmean, unit_alignment, unit_shifts,
)
from steer_experts.experts import ModelMismatchError
from steer_experts.models import LoadedModel
from steer_experts.units import locate_residual_stream
from steer_experts.steering import SteeredModel, steer

from .test_interventions import prompt_ids, synthetic_experts, tiny_llama  # noqa: F401 (a fixture)

CONCEPT = Concept("football", ("The striker scored a goal.", "Fans filled the stadium", "A penalty kick"),
                  ("The cat slept.", "Rain fell on the quiet town all night long", "Tea"))


def _hidden_state_means(loaded, concept):
    """Independent: transformers' own hidden states, one sentence at a time, no padding."""
    sums, counts, norms = None, [0, 0], []
    for side, sentences in enumerate((concept.positives, concept.negatives)):
        for sentence in sentences:
            enc = loaded.tokenizer(sentence, return_tensors="pt")
            with torch.no_grad():
                states = loaded.model(**enc, output_hidden_states=True).hidden_states[1:]
            keep = ~torch.isin(enc["input_ids"][0], torch.tensor(loaded.tokenizer.all_special_ids))
            layer_tokens = torch.stack([h[0, keep] for h in states]).double()  # (layers, tokens, hidden)
            if sums is None:
                sums = np.zeros((2,) + (layer_tokens.shape[0], layer_tokens.shape[2]))
            sums[side] += layer_tokens.sum(dim=1).numpy()
            counts[side] += int(keep.sum())
            norms.append(layer_tokens.norm(dim=2))
    return sums[0] / counts[0], sums[1] / counts[1], torch.cat(norms, dim=1).float().median(dim=1).values.numpy()


def test_residual_means_equal_hidden_states(tiny_model):
    means = residual_means(tiny_model, CONCEPT, batch_size=2, progress=False)
    pos, neg, norm = _hidden_state_means(tiny_model, CONCEPT)
    # the last hidden state is after the final norm in transformers: compare the blocks before it
    np.testing.assert_allclose(means.positive_mean[:-1], pos[:-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(means.negative_mean[:-1], neg[:-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(means.token_norm[:-1], norm[:-1], rtol=1e-4)
    assert means.n_positive_tokens == sum(len(tiny_model.tokenizer(s)["input_ids"]) for s in CONCEPT.positives)
    direction = means.direction(0)
    assert np.isclose(np.linalg.norm(direction), 1.0)
    assert np.allclose(direction * np.linalg.norm(pos[0] - neg[0]), pos[0] - neg[0], atol=1e-5)


def test_addition_equals_plain_hook(tiny_model):
    means = residual_means(tiny_model, CONCEPT, progress=False)
    steered = steer_diffmean(tiny_model, means, layer=1, factor=0.5)
    vector = torch.from_numpy((0.5 * means.token_norm[1] * means.direction(1)).astype(np.float32))
    site = locate_residual_stream(tiny_model.model)[1]

    def add(_module, _args, output):
        if isinstance(output, tuple):
            return (output[0] + vector,) + tuple(output[1:])
        return output + vector

    ids = prompt_ids(tiny_model, batch=2, length=4)
    for seed, sampling in ((0, {"do_sample": False}), (2, {"do_sample": True, "top_k": 10})):
        handle = tiny_model.model.get_submodule(site.module_path).register_forward_hook(add)
        try:
            torch.manual_seed(seed)
            want = tiny_model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                             pad_token_id=tiny_model.tokenizer.pad_token_id, **sampling)
        finally:
            handle.remove()
        assert torch.equal(steered.generate(ids, seed=seed, max_new_tokens=6, **sampling), want)
    with torch.no_grad():  # the addition must act, or the equality proves nothing
        assert not torch.allclose(steered(input_ids=ids).logits, tiny_model.model(ids).logits)


def test_save_load_generates_the_same_tokens(tiny_llama, tmp_path):
    means = residual_means(tiny_llama, CONCEPT, progress=False)
    means.save(tmp_path / "means.safetensors")
    again = ResidualMeans.load(tmp_path / "means.safetensors")
    assert np.array_equal(again.positive_mean, means.positive_mean) and again.concept == "football"
    steered = steer_diffmean(tiny_llama, again, layer=0, factor=2.0)
    folder = steered.save_pretrained(tmp_path / "steered")
    reloaded = SteeredModel.from_pretrained(folder, tiny_llama)
    assert type(reloaded).__name__ == "DiffMeanSteeredModel" and reloaded.layer == 0 and reloaded.factor == 2.0
    prompts = ["Hello there", "A cat sat"]
    want = steered.complete(prompts, max_new_tokens=8, do_sample=True, top_k=10, seed=3)
    assert reloaded.complete(prompts, max_new_tokens=8, do_sample=True, top_k=10, seed=3) == want
    plain = steer_diffmean(tiny_llama, again, layer=0, factor=0.0)
    assert plain.complete(prompts, max_new_tokens=8, do_sample=True, top_k=10, seed=3) != want
    assert "DiffMean" in (folder / "README.md").read_text()


def test_refuses_other_model_and_bad_layer(tiny_llama):
    means = residual_means(tiny_llama, CONCEPT, progress=False)
    other = LoadedModel(tiny_llama.model, tiny_llama.tokenizer, "impostor", "1" * 32)
    with pytest.raises(ModelMismatchError, match="impostor"):
        steer_diffmean(other, means, 0, 1.0)
    with pytest.raises(ValueError, match="layer must be in"):
        steer_diffmean(tiny_llama, means, 7, 1.0)
    with pytest.raises(ValueError, match="no negatives"):
        residual_means(tiny_llama, Concept("x", ("a b",), ()), progress=False)


def test_alignment_is_the_cosine_of_down_proj_columns(tiny_model):
    means = residual_means(tiny_model, CONCEPT, progress=False)
    experts = synthetic_experts(tiny_model)
    alignment = unit_alignment(tiny_model, experts, means)
    assert alignment.shape == (experts.n_units,) and np.all(np.abs(alignment) <= 1 + 1e-9)
    site = experts.sites[1]
    module = tiny_model.model.get_submodule(site.module_path)
    weight = module.weight.detach().double()
    column = (weight[:, 3] if isinstance(module, torch.nn.Linear) else weight[3]).numpy()
    d = means.positive_mean[1] - means.negative_mean[1]
    want = column @ d / np.linalg.norm(column) / np.linalg.norm(d)
    assert np.isclose(alignment[experts.unit_index(1, 3)], want)
    scores = aligned_scores(tiny_model, experts, means)
    c = experts.concept_index("football")
    rises = experts.expertise.on_p50[c] > experts.expertise.off_mean[c]
    assert np.all(scores >= 0) and np.all((scores > 0) == (rises & (alignment > 0)))
    assert 0 < (scores > 0).sum() < experts.n_units


def _neuron_token_means(loaded, sites, sentences):
    """Mean down-projection input over every non-special token, one unpadded sentence at a time."""
    sums, count = [0.0] * len(sites), 0
    special = set(loaded.tokenizer.all_special_ids)
    for sentence in sentences:
        ids = loaded.tokenizer(sentence, return_tensors="pt")["input_ids"]
        keep = torch.tensor([i not in special for i in ids[0].tolist()])
        seen = {}
        handles = [loaded.model.get_submodule(s.module_path).register_forward_pre_hook(
            lambda _m, args, i=i: seen.__setitem__(i, args[0][0])) for i, s in enumerate(sites)]
        try:
            with torch.no_grad():
                loaded.model(ids)
        finally:
            for h in handles:
                h.remove()
        sums = [acc + seen[i][keep].double().sum(0) for i, acc in enumerate(sums)]
        count += int(keep.sum())
    return torch.cat([x / count for x in sums]).numpy()


def test_unit_shifts_equal_per_sentence_neuron_means(tiny_model):
    experts = synthetic_experts(tiny_model)
    want = (_neuron_token_means(tiny_model, experts.sites, CONCEPT.positives)
            - _neuron_token_means(tiny_model, experts.sites, CONCEPT.negatives))
    got = unit_shifts(tiny_model, experts, CONCEPT, batch_size=2, progress=False)
    assert got.shape == (experts.n_units,) and np.abs(want).max() > 1e-4
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_add_mode_equals_plain_hook(tiny_model):
    experts = synthetic_experts(tiny_model)
    shifts = unit_shifts(tiny_model, experts, CONCEPT, progress=False)
    steered = steer(tiny_model, experts, "football", k=25, alpha=40.0, mode="add", shifts=shifts)
    selection = experts.select("football", k=25)
    handles = []
    for site in experts.sites:
        rows = selection.layer == site.layer
        delta = torch.zeros(site.width)
        delta[torch.as_tensor(selection.neuron[rows])] = torch.as_tensor(
            40.0 * shifts[selection.units[rows]], dtype=torch.float32)
        handles.append((site.module_path, lambda _m, args, d=delta: (args[0] + d,) + tuple(args[1:])))
    ids = prompt_ids(tiny_model, batch=2, length=4)
    for seed, sampling in ((0, {"do_sample": False}), (3, {"do_sample": True, "top_k": 10})):
        live = [tiny_model.model.get_submodule(path).register_forward_pre_hook(hook) for path, hook in handles]
        try:
            torch.manual_seed(seed)
            want = tiny_model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                             pad_token_id=tiny_model.tokenizer.pad_token_id, **sampling)
        finally:
            for h in live:
                h.remove()
        assert torch.equal(steered.generate(ids, seed=seed, max_new_tokens=6, **sampling), want)
    with torch.no_grad():  # the shift must act, or the equality proves nothing
        assert not torch.allclose(steered(input_ids=ids).logits, tiny_model.model(ids).logits)


def test_add_mode_needs_one_shift_per_unit(tiny_llama):
    experts = synthetic_experts(tiny_llama)
    with pytest.raises(ValueError, match="mode='add' .* takes shifts"):
        steer(tiny_llama, experts, "football", k=3, mode="add")
    with pytest.raises(ValueError, match="one per unit"):
        steer(tiny_llama, experts, "football", k=3, mode="add", shifts=np.ones(5))
    with pytest.raises(ValueError, match="mode='add' .* takes shifts"):
        steer(tiny_llama, experts, "football", k=3, shifts=np.ones(experts.n_units))
    with pytest.raises(ValueError, match="mode='add' .* takes shifts"):
        steer(tiny_llama, experts, {"football": -1}, k=3, suppress="add")


def test_suppress_add_subtracts_the_shift(tiny_llama):
    experts = synthetic_experts(tiny_llama)
    shifts = np.random.default_rng(0).normal(size=experts.n_units)
    down = steer(tiny_llama, experts, {"football": -2.0}, k=7, alpha=1.5, suppress="add", shifts=shifts)
    selection = experts.select("football", k=7)
    order = np.lexsort((selection.neuron, selection.layer))  # the plan is sorted by (layer, neuron)
    np.testing.assert_allclose(down.plan.target, -shifts[selection.units[order]].astype(np.float32))
    assert set(down.plan.weight.tolist()) == {3.0} and set(down.plan.bound.tolist()) == {2.0}
