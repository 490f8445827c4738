"""Hostile response caches: a damaged shard or manifest is detected (checksums, plan checks), repaired
with a warning, and the rerun's responses and cache files equal a clean run's."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from steer_experts.errors import CorruptFileError
from steer_experts.models import LoadedModel
from steer_experts.responses import CACHE_VERSION, CacheRepairWarning, collect_responses, response_cache_folder

from .disk import tree

SENTENCES = [
    "The goalkeeper saved a penalty.", "Rain fell on the quiet village.", "Music.", "She baked bread at dawn.",
    "A dog barked twice.", "The striker scored in the last minute.", "Clouds gathered over the sea.", "He sang.",
]
KW = dict(batch_size=2, shard_size=2, progress=False)


@pytest.fixture(scope="module")
def clean(tiny, tmp_path_factory):
    """A clean run: (responses, the cache folder)."""
    cache = tmp_path_factory.mktemp("clean")
    r = collect_responses(tiny, SENTENCES, cache_dir=cache, **KW)
    return r.to_numpy(), r.folder


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder, manifest):
    (folder / "manifest.json").write_text(json.dumps(manifest))


def damage(folder, case):
    shard = folder / "shard-00001.safetensors"
    if case == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif case == "garbage shard":
        shard.write_bytes(b"\x13\x37" * 500)
    elif case == "empty shard":
        shard.write_bytes(b"")
    elif case == "overwritten tensor bytes":  # same size, header intact: safetensors reads it without complaint
        data = bytearray(shard.read_bytes())
        data[-64:] = bytes(64)
        shard.write_bytes(bytes(data))
    elif case == "one flipped bit":
        data = bytearray(shard.read_bytes())
        data[-5] ^= 1
        shard.write_bytes(bytes(data))
    elif case == "shard replaced by another shard":
        shutil.copy(folder / "shard-00000.safetensors", shard)
    elif case == "truncated manifest":
        text = (folder / "manifest.json").read_text()
        (folder / "manifest.json").write_text(text[: len(text) // 2])
    elif case == "garbage manifest":
        (folder / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    elif case == "empty manifest":
        (folder / "manifest.json").write_bytes(b"")
    elif case == "manifest is a list":
        (folder / "manifest.json").write_text("[]")
    elif case == "manifest missing a row":
        m = _manifest(folder)
        m["shards"][1][0] = m["shards"][1][0][:-1]
        _write_manifest(folder, m)
    elif case == "manifest repeating a row":
        m = _manifest(folder)
        m["shards"][1][0][0] = m["shards"][0][0][0]
        _write_manifest(folder, m)
    elif case == "manifest row out of range":
        m = _manifest(folder)
        m["shards"][1][0][0] = 999
        _write_manifest(folder, m)
    elif case == "manifest of another model":
        m = _manifest(folder)
        m["fingerprint"] = "0" * 32
        _write_manifest(folder, m)
    elif case == "manifest of other sites":
        m = _manifest(folder)
        m["sites"][0]["width"] += 1
        _write_manifest(folder, m)
    elif case == "manifest without checksums":
        m = _manifest(folder)
        del m["checksums"]
        _write_manifest(folder, m)
    elif case == "manifest plan not numbers":
        m = _manifest(folder)
        m["shards"] = "all of them"
        _write_manifest(folder, m)
    elif case == "wrong checksum in manifest":
        m = _manifest(folder)
        m["checksums"]["1"] = "0" * 64
        _write_manifest(folder, m)
    elif case == "deleted shard":
        shard.unlink()
    elif case == "deleted manifest":
        (folder / "manifest.json").unlink()
    elif case == "stray temporary file":
        (folder / ".shard-00001.safetensors.123.tmp").write_bytes(b"half a shard")
    else:
        raise AssertionError(case)


CORRUPT = ["truncated shard", "garbage shard", "empty shard", "overwritten tensor bytes", "one flipped bit",
           "shard replaced by another shard", "truncated manifest", "garbage manifest", "empty manifest",
           "manifest is a list", "manifest missing a row", "manifest repeating a row", "manifest row out of range",
           "manifest of another model", "manifest of other sites", "manifest without checksums",
           "manifest plan not numbers", "wrong checksum in manifest"]
LOST = ["deleted shard", "deleted manifest"]


@pytest.mark.parametrize("case", CORRUPT + LOST)
def test_damaged_cache_is_repaired_to_a_clean_run(tiny, clean, tmp_path, case):
    expected, clean_folder = clean
    first = collect_responses(tiny, SENTENCES, cache_dir=tmp_path, **KW)
    damage(first.folder, case)
    if case in CORRUPT:
        with pytest.warns(CacheRepairWarning, match="shard-00001.*checksum|manifest.*corrupt"):
            again = collect_responses(tiny, SENTENCES, cache_dir=tmp_path, **KW)
    else:
        again = collect_responses(tiny, SENTENCES, cache_dir=tmp_path, **KW)
    assert np.array_equal(again.to_numpy(), expected)
    shards = {k: v for k, v in tree(again.folder).items() if k != "manifest.json"}
    assert shards == {k: v for k, v in tree(clean_folder).items() if k != "manifest.json"}
    assert _manifest(again.folder) == _manifest(clean_folder)


def test_stray_temporary_file_is_ignored(tiny, clean, tmp_path):
    first = collect_responses(tiny, SENTENCES, cache_dir=tmp_path, **KW)
    damage(first.folder, "stray temporary file")
    before = tree(first.folder)
    assert np.array_equal(collect_responses(tiny, SENTENCES, cache_dir=tmp_path, **KW).to_numpy(), clean[0])
    assert tree(first.folder) == before


def test_shard_deleted_after_collection_is_an_error_not_garbage(tiny, tmp_path):
    r = collect_responses(tiny, SENTENCES, cache_dir=tmp_path, **KW)
    (r.folder / "shard-00002.safetensors").unlink()
    before = tree(tmp_path)
    with pytest.raises(CorruptFileError, match="lacks 2 sentences' rows"):
        r.to_numpy()
    assert tree(tmp_path) == before


def test_other_dtype_never_reuses_the_cache(tiny, clean, tmp_path):
    """bfloat16 weights share the fingerprint (it rounds to bfloat16) but not the responses."""
    collect_responses(tiny, SENTENCES, cache_dir=tmp_path, **KW)
    bf16 = LoadedModel(copy.deepcopy(tiny.model).to(torch.bfloat16), tiny.tokenizer, tiny.name, tiny.fingerprint)
    assert bf16.fingerprint == tiny.fingerprint
    folder_32 = response_cache_folder(tiny, SENTENCES, "mlp", "max", 128, tmp_path)
    folder_16 = response_cache_folder(bf16, SENTENCES, "mlp", "max", 128, tmp_path)
    assert folder_16 != folder_32 and folder_16.parent.name == f"mlp-max-len128-bfloat16-v{CACHE_VERSION}"
    got = collect_responses(bf16, SENTENCES, cache_dir=tmp_path, **KW).to_numpy()
    alone = collect_responses(bf16, SENTENCES, cache_dir=tmp_path / "alone", **KW).to_numpy()
    assert np.array_equal(got, alone) and not np.array_equal(got, clean[0])


@pytest.mark.parametrize("option, value", [("max_length", 0), ("batch_size", -1), ("shard_size", 0),
                                           ("batch_size", 2.5), ("max_length", True), ("pooling", "median"),
                                           ("unit_kind", "attention")])
def test_bad_collection_option_writes_nothing(tiny, tmp_path, option, value):
    from steer_experts.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=f"{option}|pooling must be one of|Unknown unit kind"):
        collect_responses(tiny, SENTENCES, cache_dir=tmp_path, progress=False, **{option: value})
    assert tree(tmp_path) == {}


def test_plan_replaced_while_a_run_writes_stops_that_run(tiny, clean, tmp_path, monkeypatch):
    """A run whose manifest is replaced (another run repaired the cache with its own plan) must not
    record its shards under the new plan; the next run still equals a clean one."""
    import steer_experts.responses as responses

    real_stack = responses.decoder_stack
    calls = []

    def stack_that_replans(model):
        stack = real_stack(model)

        def forward(**inputs):
            calls.append(1)
            if len(calls) == 3:  # two shards stored; now another run re-plans with a batch size of 3
                folder = response_cache_folder(tiny, SENTENCES, "mlp", "max", 128, tmp_path)
                with responses._locked(folder):
                    m = _manifest(folder)
                    m["shards"], _ = responses._plan(tiny, SENTENCES, 128, 3, 3)
                    m["checksums"] = {}
                    _write_manifest(folder, m)
            return stack(**inputs)
        return forward

    monkeypatch.setattr(responses, "decoder_stack", stack_that_replans)
    with pytest.raises(CorruptFileError, match="changed while this run was writing"):
        collect_responses(tiny, SENTENCES, cache_dir=tmp_path, **KW)
    monkeypatch.setattr(responses, "decoder_stack", real_stack)
    again = collect_responses(tiny, SENTENCES, cache_dir=tmp_path, batch_size=3, shard_size=3, progress=False)
    alone = collect_responses(tiny, SENTENCES, cache_dir=tmp_path / "alone", batch_size=3, shard_size=3,
                              progress=False)
    assert np.array_equal(again.to_numpy(), alone.to_numpy())
    assert np.allclose(again.to_numpy(), clean[0], atol=1e-5)


def test_shard_files_beyond_the_plan_are_never_read(tiny, clean, tmp_path):
    r = collect_responses(tiny, SENTENCES, cache_dir=tmp_path, **KW)
    from safetensors.numpy import load_file, save_file

    stray = load_file(str(r.folder / "shard-00000.safetensors"))
    stray["responses"] = np.zeros_like(stray["responses"])  # read after shard 0, it would zero its rows
    save_file(stray, str(r.folder / "shard-00009.safetensors"))
    assert np.array_equal(collect_responses(tiny, SENTENCES, cache_dir=tmp_path, **KW).to_numpy(), clean[0])
