"""Response collection: pooling against an independent reference, truncation, cache and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import steer_experts.responses as responses_module
from steer_experts.responses import collect_responses, response_cache_folder

from .test_models import _reference_neurons

SENTENCES = [
    "The goalkeeper saved a penalty.",
    "Rain fell on the quiet village all night long while everyone slept.",
    "Music.",
    "She baked bread, then walked to the harbour to watch the fishing boats come in.",
    "A dog barked.",
]


def _reference(loaded, sentences, pooling, max_length=128, special_ids=None):
    """Pool each layer's neurons sentence by sentence (no batching, no padding) from a plain MLP-input hook,
    leaving out ``special_ids`` (default: the tokenizer's special tokens)."""
    model, tok = loaded.model, loaded.tokenizer
    special_ids = tok.all_special_ids if special_ids is None else list(special_ids)
    layers = model.config.num_hidden_layers
    mlps = [model.get_submodule(p) for p in _mlp_paths(model)]
    rows = []
    for s in sentences:
        ids = tok(s, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        keep = ~torch.isin(ids[0], torch.tensor(special_ids, dtype=torch.long))
        seen = {}
        handles = [m.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__(i, a[0])) for i, m in enumerate(mlps)]
        with torch.no_grad():
            model(ids)
            per_layer = [_reference_neurons(model, i, seen[i])[0][keep] for i in range(layers)]
        for h in handles:
            h.remove()
        pool = (lambda a: a.max(0).values) if pooling == "max" else (lambda a: a.mean(0))
        rows.append(torch.cat([pool(a) for a in per_layer]).numpy())
    return np.stack(rows)


def _mlp_paths(model):
    from steer_experts.units import locate_units

    return [s.module_path.rsplit(".", 1)[0] for s in locate_units(model)]


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_pooled_responses_match_reference(tiny_model, pooling, tmp_path):
    got = collect_responses(tiny_model, SENTENCES, pooling=pooling, batch_size=2, cache_dir=tmp_path,
                            progress=False).to_numpy()
    expected = _reference(tiny_model, SENTENCES, pooling)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_the_bos_token_is_not_pooled(tiny_bos_model, pooling, tmp_path):
    """With a tokenizer that adds BOS, responses pool the sentence's own tokens only: the BOS position
    (sentence-independent) would otherwise set a floor under every max and weigh in every mean."""
    got = collect_responses(tiny_bos_model, SENTENCES, pooling=pooling, batch_size=2, cache_dir=tmp_path,
                            progress=False).to_numpy()
    np.testing.assert_allclose(got, _reference(tiny_bos_model, SENTENCES, pooling), rtol=1e-4, atol=1e-5)
    # The reference with BOS pooled differs, so the comparison above can see a pooled BOS.
    with_bos = _reference(tiny_bos_model, SENTENCES, pooling, special_ids=())
    assert not np.allclose(got, with_bos, rtol=1e-4, atol=1e-5)


def test_truncation_is_counted_and_applied(tiny_model, tmp_path):
    lengths = [len(x) for x in tiny_model.tokenizer(SENTENCES)["input_ids"]]
    r = collect_responses(tiny_model, SENTENCES, max_length=6, cache_dir=tmp_path, progress=False)
    assert r.truncated == sum(n > 6 for n in lengths) > 0
    np.testing.assert_allclose(r.to_numpy(), _reference(tiny_model, SENTENCES, "max", 6), rtol=1e-4, atol=1e-5)


def test_columns_stream_the_same_matrix(tiny_model, tmp_path):
    r = collect_responses(tiny_model, SENTENCES, batch_size=2, shard_size=2, cache_dir=tmp_path, progress=False)
    full = r.to_numpy()
    assert len(list(r.folder.glob("shard-*.safetensors"))) == 3
    assert np.array_equal(np.hstack([r.columns(a, min(a + 7, r.n_units)) for a in range(0, r.n_units, 7)]), full)


def test_cache_key_names_the_work(tiny_model, tmp_path):
    base = response_cache_folder(tiny_model, SENTENCES, "mlp", "max", 128, tmp_path)
    assert base.relative_to(tmp_path).parts[1] == f"mlp-max-len128-float32-v{responses_module.CACHE_VERSION}"
    others = {
        response_cache_folder(tiny_model, SENTENCES[:-1], "mlp", "max", 128, tmp_path),
        response_cache_folder(tiny_model, SENTENCES, "mlp", "mean", 128, tmp_path),
        response_cache_folder(tiny_model, SENTENCES, "mlp", "max", 64, tmp_path),
    }
    assert base not in others and len(others) == 3


def test_second_call_reads_the_cache(tiny_model, tmp_path, monkeypatch):
    first = collect_responses(tiny_model, SENTENCES, cache_dir=tmp_path, progress=False).to_numpy()
    monkeypatch.setattr(responses_module, "decoder_stack", lambda m: pytest.fail("ran the model again"))
    assert np.array_equal(collect_responses(tiny_model, SENTENCES, cache_dir=tmp_path, progress=False).to_numpy(), first)


def test_killed_run_resumes_bit_identically(smollm2, tmp_path, monkeypatch):
    """A run killed after its first shard resumes, and ends bit-identical to an uninterrupted run."""
    sentences = SENTENCES * 1 + [s.upper() for s in SENTENCES] + [s.lower() + " Indeed." for s in SENTENCES]
    kw = dict(batch_size=2, shard_size=4, progress=False)
    uninterrupted = collect_responses(smollm2, sentences, cache_dir=tmp_path / "a", **kw).to_numpy()

    real_save = responses_module.save_file
    calls = []

    def save_then_die(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # the kill lands while the second shard is being written
            raise KeyboardInterrupt
        real_save(tensors, path)

    monkeypatch.setattr(responses_module, "save_file", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        collect_responses(smollm2, sentences, cache_dir=tmp_path / "b", **kw)
    folder = response_cache_folder(smollm2, sentences, "mlp", "max", 128, tmp_path / "b")
    assert [p.name for p in sorted(folder.iterdir()) if p.name != ".lock"] == ["manifest.json", "shard-00000.safetensors"]
    monkeypatch.setattr(responses_module, "save_file", real_save)
    resumed = collect_responses(smollm2, sentences, cache_dir=tmp_path / "b", batch_size=7, progress=False)
    assert np.array_equal(resumed.to_numpy(), uninterrupted)


@pytest.mark.parametrize("sentences, message", [
    ([], "No sentences"),
    (["A cat.", "A cat."], "distinct"),
    (["A cat.", " "], "non-empty"),
])
def test_bad_sentences_write_nothing(tiny_model, tmp_path, sentences, message):
    with pytest.raises(ValueError, match=message):
        collect_responses(tiny_model, sentences, cache_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_bad_pooling_writes_nothing(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="pooling must be one of"):
        collect_responses(tiny_model, SENTENCES, pooling="median", cache_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_only_special_tokens(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="only special tokens"):
        collect_responses(tiny_model, [tiny_model.tokenizer.eos_token], cache_dir=tmp_path, progress=False)
