"""Model loading, fingerprints and unit location."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from steer_experts.models import LoadedModel, ModelNotFoundError, load_model, model_fingerprint
from steer_experts.units import UnsupportedArchitectureError, locate_units

from ..conftest import tiny_config


def _reference_neurons(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The MLP neuron activations recomputed by hand from the MLP's input ``x``."""
    t = model.config.model_type
    if t in ("llama", "qwen2", "gemma3_text"):
        mlp = model.model.layers[layer].mlp
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    if t == "gpt2":
        mlp = model.transformer.h[layer].mlp
        return mlp.act(mlp.c_fc(x))
    if t == "gpt_neox":
        mlp = model.gpt_neox.layers[layer].mlp
        return mlp.act(mlp.dense_h_to_4h(x))
    raise AssertionError(t)


def test_located_sites_hold_the_true_neurons(tiny_model):
    """The input of each located module equals act(gate(x)) * up(x) (or act(fc(x))) recomputed from the MLP input."""
    model = tiny_model.model
    sites = locate_units(model)
    assert len(sites) == model.config.num_hidden_layers
    mlps = [model.get_submodule(s.module_path.rsplit(".", 1)[0]) for s in sites]
    seen_in, seen_site = {}, {}
    handles = [m.register_forward_hook(lambda mod, a, o, i=i: seen_in.__setitem__(i, a[0])) for i, m in enumerate(mlps)]
    handles += [model.get_submodule(s.module_path).register_forward_hook(
        lambda mod, a, o, i=i: seen_site.__setitem__(i, a[0])) for i, s in enumerate(sites)]
    ids = tiny_model.tokenizer(["Kick-off is at three o'clock."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(ids)
        for i, site in enumerate(sites):
            expected = _reference_neurons(model, i, seen_in[i])
            assert seen_site[i].shape[-1] == site.width == expected.shape[-1]
            torch.testing.assert_close(seen_site[i], expected, rtol=1e-5, atol=1e-6)
    for h in handles:
        h.remove()


def test_pyvene_component_path_syntax():
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 64))
    assert locate_units(model)[1].pyvene_component == "model.layers[1].mlp.down_proj.input"


def test_unsupported_architecture_says_how_to_add_it():
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 64))
    model.config.model_type = "made_up"
    with pytest.raises(UnsupportedArchitectureError, match="MLP_DOWN_PROJ"):
        locate_units(model)


def test_unknown_unit_kind():
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 64))
    with pytest.raises(ValueError, match="Unknown unit kind 'attention'"):
        locate_units(model, "attention")


def test_fingerprint_tracks_weights_not_dtype(tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)))
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(model.to(torch.bfloat16))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert model_fingerprint(model) != fp


def test_embedded_model_is_the_real_smollm2(smollm2):
    sites = locate_units(smollm2.model)
    assert (len(sites), sites[0].width, sum(s.width for s in sites)) == (30, 1536, 46080)
    assert isinstance(smollm2, LoadedModel) and len(smollm2.fingerprint) == 32


def test_second_load_uses_the_safetensors_cache(smollm2, monkeypatch):
    """Once dequantised, SmolLM2 loads from the safetensors folder in the cache: the GGUF file is not
    read again, and the weights loaded are the ones that folder holds."""
    import steer_experts.models as models

    read = []
    for auto in ("AutoModelForCausalLM", "AutoTokenizer"):
        cls = getattr(models, auto)
        original = cls.from_pretrained.__func__

        def spy(cls, path, *args, original=original, **kwargs):
            read.append((str(path), kwargs.get("gguf_file")))
            return original(cls, path, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    again = load_model("smollm2-135m")
    cached = str(models.cache_root() / "models" / "smollm2-135m")
    assert read and all(gguf is None for _, gguf in read), read  # no dequantisation
    assert {path for path, _ in read} == {cached}
    assert (models.cache_root() / "models" / "smollm2-135m" / "model.safetensors").is_file()
    assert again.fingerprint == smollm2.fingerprint


def test_local_folder_roundtrip(tiny_model, tmp_path):
    tiny_model.model.save_pretrained(tmp_path)
    tiny_model.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.fingerprint == tiny_model.fingerprint


def test_auto_device_lets_accelerate_place_the_layers(tiny_model, tmp_path, monkeypatch):
    """--device auto: loaded with device_map="auto" (without GPUs every layer lands on the CPU, so the
    multi-device dispatch itself is untested here), it collects the same responses as the model saved."""
    from steer_experts import models
    from steer_experts.responses import collect_responses

    tiny_model.model.save_pretrained(tmp_path / "model")
    tiny_model.tokenizer.save_pretrained(tmp_path / "model")
    placements = []
    real = models.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: placements.append(kw.get("device_map")) or real(*a, **kw))
    loaded = load_model(str(tmp_path / "model"), device="auto")
    assert placements == ["auto"]
    assert loaded.device == torch.device("cpu") and loaded.fingerprint == tiny_model.fingerprint
    sentences = ["The cat sat on the mat.", "A football match.", "Rain all day long in the hills."]
    # Separate caches: the two share a fingerprint, so one cache would hand the first run's responses back.
    want = collect_responses(tiny_model, sentences, cache_dir=tmp_path / "plain", progress=False).to_numpy()
    got = collect_responses(loaded, sentences, cache_dir=tmp_path / "auto", progress=False).to_numpy()
    assert np.array_equal(got, want) and np.abs(want).max() > 0


@pytest.mark.parametrize("name", ["no-such-model", "someone/some-model"])
def test_unknown_or_offline_names_list_what_is_available(name):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        load_model(name)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
