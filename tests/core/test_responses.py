"""Response collection: pooling against an independent reference, truncation, cache and resume."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

import steer_experts.responses as responses_module
from steer_experts.errors import CorruptFileError, InvalidArgumentError
from steer_experts.models import CACHE_ENV, LoadedModel
from steer_experts.responses import (
    CacheRepairWarning, Responses, collect_responses, response_cache_folder, token_responses,
)
from steer_experts.units import locate_units

from .test_models import _reference_neurons

SENTENCES = [
    "The goalkeeper saved a penalty.",
    "Rain fell on the quiet village all night long while everyone slept.",
    "Music.",
    "She baked bread, then walked to the harbour to watch the fishing boats come in.",
    "A dog barked.",
]

# The frame a CacheRepairWarning must point at: this file's calling line. Under mutation testing, mutmut's
# trampoline stands between the caller and every mutated function, so it is the nearest outside frame there.
CALLER_FILE = sys.modules["mutmut.mutation.trampoline"].__file__ if "mutmut.mutation.trampoline" in sys.modules \
    else __file__


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


@pytest.mark.parametrize("kept", [
    [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]],  # right padding: kept by all in [0, 3)
    [[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1]],  # and a BOS
    [[0, 1, 0, 1, 1], [0, 1, 1, 1, 0], [0, 1, 1, 1, 1]],  # a special token inside a sentence
    [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 0]],  # no token kept by every sentence
])
def test_max_pooling_equals_masking_every_left_out_token(kept):
    """The max-pooling hook takes a plain max over the tokens every sentence keeps and masks only the
    others; it equals masking all left-out tokens with -inf, bit for bit."""
    mask = torch.tensor(kept, dtype=torch.bool)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    pooler = responses_module._Pooler(torch.nn.Module(), [], "max")
    pooler.set_mask(mask)
    pooler.out = torch.empty(3, 8)
    pooler._hook(0, 8)(None, (x,))
    assert torch.equal(pooler.out, x.masked_fill(~mask[..., None], float("-inf")).amax(dim=1))


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


# The cache tests below need one architecture, not five: they run on the tiny llama whose tokenizer adds BOS.


def test_cache_folder_names_are_stable(tiny_bos_model, tmp_path, monkeypatch):
    """The folder is <cache>/responses/<last 60 file-safe characters of the name>-<16 fingerprint digits>/
    <work>/<16 hex digits>: any change to these names orphans every cache users already computed."""
    name = "org/" + "m" * 70 + "-v1.5 (q8)"
    model = LoadedModel(tiny_bos_model.model, tiny_bos_model.tokenizer, name, tiny_bos_model.fingerprint)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    folder = response_cache_folder(model, SENTENCES, "mlp", "max", 128)
    model_part, work, sentences_hash = folder.relative_to(tmp_path / "responses").parts
    assert model_part == "m" * 50 + "-v1.5__q8_-" + model.fingerprint[:16]
    assert work == f"mlp-max-len128-float32-v{responses_module.CACHE_VERSION}"
    assert re.fullmatch("[0-9a-f]{16}", sentences_hash)


def test_truncation_counts_the_bos_token(tiny_bos_model, tmp_path):
    """A sentence of exactly max_length tokens, BOS included, is not truncated; with one token less it is."""
    n = len(tiny_bos_model.tokenizer("Music.")["input_ids"])
    assert n >= 3  # BOS and two tokens: cut by one, a word is left to pool
    kw = dict(cache_dir=tmp_path, progress=False)
    assert collect_responses(tiny_bos_model, ["Music."], max_length=n, **kw).truncated == 0
    assert collect_responses(tiny_bos_model, ["Music."], max_length=n - 1, **kw).truncated == 1


def test_the_plan_batches_sentences_by_length(tiny_bos_model, tmp_path):
    """The manifest's plan orders sentences by token count, so each batch pads little."""
    lengths = [len(ids) for ids in tiny_bos_model.tokenizer(SENTENCES)["input_ids"]]
    assert lengths != sorted(lengths)  # in the given order the plan would not be sorted
    r = collect_responses(tiny_bos_model, SENTENCES, batch_size=2, shard_size=2, cache_dir=tmp_path, progress=False)
    plan = json.loads((r.folder / "manifest.json").read_text())["shards"]
    order = [i for shard in plan for batch in shard for i in batch]
    assert sorted(order) == list(range(len(SENTENCES)))
    assert [lengths[i] for i in order] == sorted(lengths)


def test_reading_the_cache(tiny_bos_model, tmp_path):
    """Responses are float32; a Responses made by hand (no plan, so n_shards is None) reads every shard file
    in the folder; a deleted shard is an error that counts the missing rows and says what to do."""
    r = collect_responses(tiny_bos_model, SENTENCES, batch_size=2, shard_size=2, cache_dir=tmp_path, progress=False)
    full = r.to_numpy()
    assert full.dtype == np.float32 and r.columns(2, 5).dtype == np.float32
    assert np.array_equal(Responses(r.folder, r.sites, len(SENTENCES), r.truncated).to_numpy(), full)
    plan = json.loads((r.folder / "manifest.json").read_text())["shards"]
    assert len(plan[0][0]) == 2  # so the message below counts 2 missing rows, not the 3 still there
    (r.folder / "shard-00000.safetensors").unlink()
    with pytest.raises(CorruptFileError) as error:
        r.columns(0, 4)
    assert str(error.value) == (f"The response cache {r.folder} lacks 2 sentences' rows (a shard was deleted?). "
                                "Run collect_responses again to fill it.")


def _edit_manifest(change):
    def edit(text):
        manifest = json.loads(text)
        change(manifest)
        return json.dumps(manifest)
    return edit


def _drop_a_row(manifest):
    manifest["shards"][1][0] = manifest["shards"][1][0][:1]  # every batch still has a row


MANIFEST_DAMAGE = {
    "truncated": (lambda text: text[: len(text) // 2], "it is not valid JSON (truncated?)"),
    "a list": (lambda text: "[]", "it is not a JSON object"),
    "other settings": (_edit_manifest(lambda m: m.update(fingerprint="0" * 32, pooling="mean")),
                       "it was written for other settings (fingerprint, pooling)"),
    "no checksums": (_edit_manifest(lambda m: m.pop("checksums")), "fields are missing"),
    "plan of words": (_edit_manifest(lambda m: m.update(shards="all of them")),
                      "its plan is not lists of sentence indices"),
    "plan missing a row": (_edit_manifest(_drop_a_row), "its plan does not cover every sentence exactly once"),
}


@pytest.mark.parametrize("case", MANIFEST_DAMAGE)
def test_damaged_manifest_warns_why_and_is_recomputed(tiny_bos_model, tmp_path, case):
    """A manifest that cannot be trusted gives one CacheRepairWarning saying what is wrong with it, and the
    folder is recomputed to the same responses."""
    damage, why = MANIFEST_DAMAGE[case]
    kw = dict(batch_size=2, shard_size=2, cache_dir=tmp_path, progress=False)
    first = collect_responses(tiny_bos_model, SENTENCES, **kw)
    path = first.folder / "manifest.json"
    path.write_text(damage(path.read_text()))
    with pytest.warns(CacheRepairWarning) as record:
        again = collect_responses(tiny_bos_model, SENTENCES, **kw).to_numpy()
    assert [str(w.message) for w in record if w.category is CacheRepairWarning] == [
        f"Response cache manifest {path} is corrupt ({why}); recomputing this cache folder."]
    assert [w.filename for w in record if w.category is CacheRepairWarning] == [CALLER_FILE]  # the caller's line
    assert np.array_equal(again, first.to_numpy())


def test_resume_recomputes_only_missing_and_damaged_shards(tiny_bos_model, tmp_path, monkeypatch):
    """With shard 0 deleted and a bit of shard 1 flipped, a rerun warns about shard 1 alone, recomputes
    shards 0 and 1 and keeps shard 2 (after a missing shard, the others are still checked)."""
    kw = dict(batch_size=2, shard_size=2, cache_dir=tmp_path, progress=False)
    first = collect_responses(tiny_bos_model, SENTENCES, **kw).to_numpy()
    folder = response_cache_folder(tiny_bos_model, SENTENCES, "mlp", "max", 128, tmp_path)
    (folder / "shard-00000.safetensors").unlink()
    damaged = folder / "shard-00001.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 1
    damaged.write_bytes(bytes(data))
    real_store, stored = responses_module._store_shard, []
    monkeypatch.setattr(responses_module, "_store_shard", lambda f, i, t: (stored.append(i), real_store(f, i, t)))
    with pytest.warns(CacheRepairWarning) as record:
        again = collect_responses(tiny_bos_model, SENTENCES, **kw).to_numpy()
    assert [str(w.message) for w in record if w.category is CacheRepairWarning] == [
        f"Response cache shard {damaged} does not match its checksum (truncated or overwritten); recomputing it."]
    assert [w.filename for w in record if w.category is CacheRepairWarning] == [CALLER_FILE]
    assert stored == [0, 1]
    assert np.array_equal(again, first)


def test_plan_shrunk_by_another_run_stops_this_one(tiny_bos_model, tmp_path, monkeypatch):
    """When another run replaces the plan by one with fewer shards, storing a shard beyond them stops this run
    with a CorruptFileError that says to run again."""
    folder = response_cache_folder(tiny_bos_model, SENTENCES, "mlp", "max", 128, tmp_path)
    real_stack, calls = responses_module.decoder_stack, []

    def stack_then_replan(model):
        stack = real_stack(model)

        def forward(**inputs):
            calls.append(1)
            if len(calls) == 2:  # shard 0 is stored; the other run's plan has one shard, so ours is now shard 1 of 1
                manifest = json.loads((folder / "manifest.json").read_text())
                manifest.update(shards=[[list(range(len(SENTENCES)))]], checksums={})
                (folder / "manifest.json").write_text(json.dumps(manifest))
            return stack(**inputs)
        return forward

    monkeypatch.setattr(responses_module, "decoder_stack", stack_then_replan)
    with pytest.raises(CorruptFileError) as error:
        collect_responses(tiny_bos_model, SENTENCES, batch_size=1, shard_size=1, cache_dir=tmp_path, progress=False)
    assert str(error.value) == (f"The plan of the response cache {folder} changed while this run was writing it "
                                "(another run repaired the cache). Run again: finished shards are kept.")


def test_token_responses_drop_special_tokens_and_pool_to_the_cached_response(tiny_bos_model, tmp_path):
    sentences = ["A dog ran home.", "Rain again today, and more rain tomorrow."]
    n_units = sum(s.width for s in locate_units(tiny_bos_model.model))
    units = [n_units - 1, 3, n_units // 2]  # last layer first: the columns follow the order asked
    out = token_responses(tiny_bos_model, sentences, units)
    for sentence, result in zip(sentences, out):
        ids = tiny_bos_model.tokenizer(sentence)["input_ids"]
        assert ids[0] == tiny_bos_model.tokenizer.bos_token_id
        assert len(result["tokens"]) == len(ids) - 1 and "".join(result["tokens"]) == sentence
        assert result["values"].shape == (len(ids) - 1, 3)
    pooled = collect_responses(tiny_bos_model, sentences, cache_dir=tmp_path, progress=False).take(units)
    np.testing.assert_allclose(pooled, np.stack([r["values"].max(axis=0) for r in out]), atol=1e-5)
    with pytest.raises(InvalidArgumentError, match=rf"indices in \[0, {n_units}\)"):
        token_responses(tiny_bos_model, sentences, [n_units])


def test_take_reads_any_units_in_any_order_as_columns_does(tiny_model, tmp_path):
    sentences = [f"Sentence number {i} is here." for i in range(40)]
    responses = collect_responses(tiny_model, sentences, batch_size=4, shard_size=8, cache_dir=tmp_path,
                                  progress=False)
    whole = responses.to_numpy()
    units = [responses.n_units - 1, 0, 7, 7, responses.n_units // 2]
    np.testing.assert_array_equal(responses.take(units), whole[:, units])
    np.testing.assert_array_equal(responses.columns(3, 9), whole[:, 3:9])


def test_the_manifest_lists_shards_by_index_whatever_order_they_finish_in(tmp_path):
    """Processes finish their shards in any order; the manifest lists the checksums by shard index,
    numerically (2 before 10), so that it holds the bytes a lone run writes."""
    from steer_experts.integrity import file_checksum

    n = 12
    (tmp_path / responses_module.MANIFEST).write_text(json.dumps({"shards": [[[i]] for i in range(n)],
                                                                  "checksums": {}}))
    for i in (5, 11, 0, 10, 2, 1, 3, 4, 6, 7, 8, 9):
        responses_module._store_shard(tmp_path, i, {"rows": np.array([i]), "responses": np.full((1, 2), i, np.float32)})
    checksums = json.loads((tmp_path / responses_module.MANIFEST).read_text())["checksums"]
    assert list(checksums) == [str(i) for i in range(n)]
    assert all(checksums[str(i)] == file_checksum(responses_module._shard_path(tmp_path, i)) for i in range(n))


def test_responses_do_not_depend_on_the_side_the_tokenizer_pads(tiny_model, tmp_path, monkeypatch):
    """A tokenizer that pads on the left (as many chat models' do) gives the responses one that pads on the
    right gives: batches are padded on the right, so a sentence sits at the same positions in any batch."""
    units = [0, 5, 40]
    want = collect_responses(tiny_model, SENTENCES, batch_size=3, cache_dir=tmp_path / "right",
                             progress=False).to_numpy()
    want_tokens = token_responses(tiny_model, SENTENCES, units)
    monkeypatch.setattr(tiny_model.tokenizer, "padding_side", "left")
    got = collect_responses(tiny_model, SENTENCES, batch_size=3, cache_dir=tmp_path / "left",
                            progress=False).to_numpy()
    assert np.array_equal(got, want)
    for got_row, want_row in zip(token_responses(tiny_model, SENTENCES, units), want_tokens):
        assert got_row["tokens"] == want_row["tokens"]
        assert np.array_equal(got_row["values"], want_row["values"])


def test_collection_shows_one_bar_of_the_sentences_it_computes_and_stores_float32(tiny_bos_model, tmp_path,
                                                                                  capsys):
    """By default collection shows one "responses" bar counting sentences up to those it has to compute
    (a rerun after losing a shard counts only that shard's); progress=False shows none. Shards hold float32."""
    from safetensors.numpy import load_file

    kw = dict(batch_size=2, shard_size=3, cache_dir=tmp_path)
    n = len(SENTENCES)
    cached = collect_responses(tiny_bos_model, SENTENCES, **kw)
    shown = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert shown[-1].startswith("responses: 100%|") and f"| {n}/{n} [" in shown[-1], shown
    assert shown[-1].endswith("sent/s]"), shown
    shard = sorted(cached.folder.glob("shard-*.safetensors"))[-1]
    assert load_file(shard)["responses"].dtype == np.float32
    lost = len(load_file(shard)["rows"])
    shard.unlink()
    collect_responses(tiny_bos_model, SENTENCES, **kw)
    shown = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert f"| {lost}/{lost} [" in shown[-1], shown
    shard.unlink()
    collect_responses(tiny_bos_model, SENTENCES, **kw, progress=False)
    assert capsys.readouterr().err == ""
