"""Hostile saved expert sets and steered models: a save never overwrites a file it did not write, and a
load verifies the save (shared save id, content hash, ranges, widths, spec) instead of trusting it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from steer_experts.atomic import OutputFolderError
from steer_experts.errors import CorruptFileError
from steer_experts.experts import ExpertSet, ModelMismatchError
from steer_experts.hub import HubUnavailableError, SavedFolderNotFoundError
from steer_experts.integrity import STAMP_KEY, header_metadata, stamp
from steer_experts.models import LoadedModel, load_model
from steer_experts.steering import SteeredModel, steer

from .conftest import random_experts
from .disk import tree


def restamp(folder, json_name, weights_name, edit_config=None, edit_arrays=None):
    """Rewrite a save with ``edit_*`` applied and a *valid* stamp: only the content checks can catch it."""
    config = json.loads((folder / json_name).read_text())
    arrays = load_file(str(folder / weights_name))
    if edit_config:
        edit_config(config)
    if edit_arrays:
        edit_arrays(arrays)
    config.pop(STAMP_KEY, None)
    config[STAMP_KEY] = stamp(arrays, config)
    save_file(arrays, str(folder / weights_name), metadata=header_metadata(config[STAMP_KEY]))
    (folder / json_name).write_text(json.dumps(config))


def set_key(key, value):
    def edit(d):
        d[key] = value
    return edit


def scale(name, factor=None, value=None, index=(0, 0)):
    def edit(arrays):
        a = arrays[name].copy()
        a[index] = value if value is not None else a[index] * factor
        arrays[name] = a
    return edit


# ----------------------------------------------------------------------------- expert sets

def damage_experts(folder, other, case):
    weights, config = folder / "expert_set.safetensors", folder / "expert_set.json"
    if case == "garbage safetensors":
        weights.write_bytes(b"not safetensors" * 20)
    elif case == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "empty safetensors":
        weights.write_bytes(b"")
    elif case == "overwritten tensor bytes":
        data = bytearray(weights.read_bytes())
        data[-256:] = bytes(256)
        weights.write_bytes(bytes(data))
    elif case == "truncated JSON":
        config.write_text(config.read_text()[:100])
    elif case == "JSON not UTF-8":
        config.write_bytes(b"\xff\xfe{}")
    elif case == "JSON is a list":
        config.write_text("[]")
    elif case == "JSON from another save":
        shutil.copy(other / "expert_set.json", config)
    elif case == "safetensors from another save":
        shutil.copy(other / "expert_set.safetensors", weights)
    elif case == "stamp removed":
        c = json.loads(config.read_text()); del c[STAMP_KEY]; config.write_text(json.dumps(c))
    elif case == "content hash edited":
        c = json.loads(config.read_text()); c[STAMP_KEY]["content_hash"] = "0" * 64; config.write_text(json.dumps(c))
    elif case == "metadata edited":
        c = json.loads(config.read_text()); c["metadata"]["pooling"] = "mean"; config.write_text(json.dumps(c))
    elif case == "format version 1":
        restamp(folder, "expert_set.json", "expert_set.safetensors", set_key("format_version", 1))
    elif case == "AP above 1":
        restamp(folder, "expert_set.json", "expert_set.safetensors", edit_arrays=scale("ap", value=1.5))
    elif case == "AUROC below 0":
        restamp(folder, "expert_set.json", "expert_set.safetensors", edit_arrays=scale("auroc", value=-0.2))
    elif case == "AP is NaN":
        restamp(folder, "expert_set.json", "expert_set.safetensors", edit_arrays=scale("ap", value=np.nan))
    elif case == "on_p50 is infinite":
        restamp(folder, "expert_set.json", "expert_set.safetensors", edit_arrays=scale("on_p50", value=np.inf))
    elif case == "off_mean is NaN":
        restamp(folder, "expert_set.json", "expert_set.safetensors", edit_arrays=scale("off_mean", value=np.nan))
    elif case == "site width changed":
        restamp(folder, "expert_set.json", "expert_set.safetensors",
                lambda c: c["sites"][0].__setitem__("width", c["sites"][0]["width"] - 1))
    elif case == "site width zero":
        restamp(folder, "expert_set.json", "expert_set.safetensors", lambda c: c["sites"][0].__setitem__("width", 0))
    elif case == "concept name not a string":
        restamp(folder, "expert_set.json", "expert_set.safetensors", lambda c: c["concepts"].__setitem__(0, 7))
    elif case == "extra concept name":
        restamp(folder, "expert_set.json", "expert_set.safetensors", lambda c: c["concepts"].append("man"))
    elif case == "no positives":
        restamp(folder, "expert_set.json", "expert_set.safetensors", edit_arrays=scale("n_positives", value=0, index=0))
    elif case == "counts of the wrong length":
        restamp(folder, "expert_set.json", "expert_set.safetensors",
                edit_arrays=lambda a: a.__setitem__("n_negatives", np.array([5], dtype=np.int64)))
    elif case == "missing statistic":
        restamp(folder, "expert_set.json", "expert_set.safetensors", edit_arrays=lambda a: a.pop("auroc"))
    else:
        raise AssertionError(case)


EXPERT_CASES = {
    "garbage safetensors": "not a readable safetensors file",
    "truncated safetensors": "not a readable safetensors file",
    "empty safetensors": "not a readable safetensors file",
    "overwritten tensor bytes": "content hash mismatch",
    "truncated JSON": "JSONDecodeError",
    "JSON not UTF-8": "UnicodeDecodeError",
    "JSON is a list": "format_version None, expected 2",
    "JSON from another save": "come from different saves",
    "safetensors from another save": "come from different saves",
    "stamp removed": "no integrity stamp",
    "content hash edited": "content hash mismatch",
    "metadata edited": "its JSON changed after it was saved",
    "format version 1": "format_version 1, expected 2",
    "AUROC below 0": "auroc has values outside",
    "AP is NaN": "ap has values outside",
    "on_p50 is infinite": "on_p50 holds non-finite",
    "off_mean is NaN": "off_mean holds non-finite",
    "site width changed": "statistic shapes",
    "site width zero": "positive integer width",
    "concept name not a string": "concept names must be strings",
    "extra concept name": "statistic shapes",
    "no positives": "at least one positive",
    "counts of the wrong length": "n_positives / n_negatives do not match",
    "missing statistic": "KeyError: 'auroc'",
}


@pytest.fixture(scope="module")
def other_experts(tiny, tmp_path_factory):
    return random_experts(tiny, seed=1).save_pretrained(tmp_path_factory.mktemp("other") / "set")


@pytest.mark.parametrize("case", list(EXPERT_CASES))
def test_damaged_expert_set_is_refused(tiny, saved_experts, other_experts, tmp_path, case):
    folder = tmp_path / "set"
    shutil.copytree(saved_experts, folder)
    damage_experts(folder, other_experts, case)
    before = tree(tmp_path)
    with pytest.raises(CorruptFileError, match=EXPERT_CASES[case]) as info:
        ExpertSet.from_pretrained(folder, model=tiny)
    assert "is not a valid expert set" in str(info.value)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("missing", ["expert_set.json", "expert_set.safetensors"])
def test_expert_set_with_a_missing_file(saved_experts, tmp_path, missing):
    shutil.copytree(saved_experts, tmp_path / "set")
    (tmp_path / "set" / missing).unlink()
    before = tree(tmp_path)
    with pytest.raises(SavedFolderNotFoundError, match=f"missing \\['{missing}'\\]"):
        ExpertSet.from_pretrained(tmp_path / "set")
    assert tree(tmp_path) == before


def test_expert_set_of_another_model(tiny, saved_experts):
    other = LoadedModel(tiny.model, tiny.tokenizer, "impostor", "1" * 32)
    with pytest.raises(ModelMismatchError, match="model given is 'impostor'"):
        ExpertSet.from_pretrained(saved_experts, model=other)


def test_expert_set_whose_widths_do_not_fit_the_model(tiny, tokenizer, saved_experts):
    """A model claiming the same fingerprint but with other MLP widths is refused, not indexed past its end."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..conftest import tiny_config

    config = tiny_config("llama", len(tokenizer))
    config.intermediate_size = 40
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    liar = LoadedModel(model, tokenizer, tiny.name, tiny.fingerprint)
    with pytest.raises(ModelMismatchError, match="are not the mlp units of 'tiny-llama' \\(2 layers, 80 units\\)"):
        ExpertSet.from_pretrained(saved_experts, model=liar)


def test_saving_into_a_model_folder_is_refused(tiny, tiny_folder):
    before = tree(tiny_folder)
    with pytest.raises(OutputFolderError, match="already holds files steer_experts did not write .*config.json"):
        random_experts(tiny).save_pretrained(tiny_folder)
    assert tree(tiny_folder) == before


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_saving_onto_a_file_is_refused(tiny, tmp_path, where):
    (tmp_path / "f").write_text("user data")
    before = tree(tmp_path)
    target = tmp_path / "f" if where == "a file" else tmp_path / "f" / "set"
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        random_experts(tiny).save_pretrained(target)
    assert tree(tmp_path) == before


def test_overwrite_writes_ours_and_keeps_the_users_files(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    experts = random_experts(tiny)
    with pytest.raises(OutputFolderError, match="notes.txt"):
        experts.save_pretrained(tmp_path)
    assert tree(tmp_path) == {"notes.txt": tree(tmp_path)["notes.txt"]}
    experts.save_pretrained(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert np.array_equal(ExpertSet.from_pretrained(tmp_path, model=tiny).expertise.ap, experts.expertise.ap)


def test_saving_again_into_our_own_folder_gives_the_same_bytes(tiny, tmp_path):
    experts = random_experts(tiny)
    experts.save_pretrained(tmp_path / "set")
    first = tree(tmp_path)
    experts.save_pretrained(tmp_path / "set")
    assert tree(tmp_path) == first


def test_push_offline_writes_nothing(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE is set"):
        random_experts(tiny).push_to_hub("user/x")
    assert tree(tmp_path) == {}


# ----------------------------------------------------------------------------- steered models

@pytest.fixture(scope="module")
def steered(tiny):
    return steer(tiny, random_experts(tiny), "football", k=10)


@pytest.fixture(scope="module")
def saved_steered(steered, tmp_path_factory):
    return steered.save_pretrained(tmp_path_factory.mktemp("steered") / "s")


def damage_steered(folder, other, case):
    weights, config = folder / "steering.safetensors", folder / "steering.json"
    if case == "garbage safetensors":
        weights.write_bytes(b"\x00" * 40)
    elif case == "overwritten tensor bytes":
        data = bytearray(weights.read_bytes())
        data[-16:] = bytes(16)
        weights.write_bytes(bytes(data))
    elif case == "JSON from another save":
        shutil.copy(other / "steering.json", config)
    elif case == "stamp removed":
        c = json.loads(config.read_text()); del c[STAMP_KEY]; config.write_text(json.dumps(c))
    elif case == "truncated JSON":
        config.write_text(config.read_text()[:50])
    elif case == "alpha edited":
        c = json.loads(config.read_text()); c["spec"]["alpha"] = 5.0; config.write_text(json.dumps(c))
    elif case == "spec k below the units":
        restamp(folder, "steering.json", "steering.safetensors", lambda c: c["spec"].__setitem__("k", 3))
    elif case == "spec of another concept":
        restamp(folder, "steering.json", "steering.safetensors", lambda c: c["spec"].__setitem__("concepts", {"woman": 1.0}))
    elif case == "spec tau above the units' AP":
        restamp(folder, "steering.json", "steering.safetensors",
                lambda c: c["spec"].update(k=None, tau=0.99))
    elif case == "NaN weight":
        restamp(folder, "steering.json", "steering.safetensors", edit_arrays=scale("weight", value=np.nan, index=0))
    else:
        raise AssertionError(case)


STEERED_CASES = {
    "garbage safetensors": "not a readable safetensors file",
    "overwritten tensor bytes": "content hash mismatch",
    "JSON from another save": "come from different saves",
    "stamp removed": "no integrity stamp",
    "truncated JSON": "JSONDecodeError",
    "alpha edited": "its JSON changed after it was saved",
    "spec k below the units": "spec asks for k=3",
    "spec of another concept": "are not the spec's",
    "spec tau above the units' AP": "AP <= tau=0.99",
    "NaN weight": "weight holds non-finite",
}


@pytest.fixture(scope="module")
def other_steered(tiny, tmp_path_factory):
    return steer(tiny, random_experts(tiny), "football", k=12).save_pretrained(tmp_path_factory.mktemp("o") / "s")


@pytest.mark.parametrize("case", list(STEERED_CASES))
def test_damaged_steered_model_is_refused(tiny, saved_steered, other_steered, tmp_path, case):
    folder = tmp_path / "s"
    shutil.copytree(saved_steered, folder)
    damage_steered(folder, other_steered, case)
    before = tree(tmp_path)
    with pytest.raises(CorruptFileError, match=STEERED_CASES[case]):
        SteeredModel.from_pretrained(folder, tiny)
    assert tree(tmp_path) == before


def test_saving_a_steered_model_into_a_model_folder_is_refused(steered, tiny_folder):
    """The reported data loss: pyvene's config.json replaced the model's, and the model no longer loaded."""
    before = tree(tiny_folder)
    with pytest.raises(OutputFolderError, match="^Refusing to write the steered model into .*: it already holds "
                                                "files steer_experts did not write"):
        steered.save_pretrained(tiny_folder)
    assert tree(tiny_folder) == before


def test_overwrite_into_a_model_folder_keeps_the_model_loadable(tiny, steered, tiny_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    model_files = tree(folder)
    steered.save_pretrained(folder, overwrite=True)
    after = tree(folder)
    assert all(after[name] == digest for name, digest in model_files.items())
    reloaded = load_model(str(folder))
    assert reloaded.fingerprint == tiny.fingerprint
    assert SteeredModel.from_pretrained(folder, reloaded).plan.neuron.tolist() == steered.plan.neuron.tolist()


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_saving_a_steered_model_onto_a_file_is_refused(steered, tmp_path, where):
    (tmp_path / "f").write_text("user data")
    before = tree(tmp_path)
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        steered.save_pretrained(tmp_path / "f" if where == "a file" else tmp_path / "f" / "s")
    assert tree(tmp_path) == before


def test_saving_a_steered_model_again_gives_the_same_files(steered, tmp_path):
    steered.save_pretrained(tmp_path / "s")
    first = {k: v for k, v in tree(tmp_path).items() if not k.startswith("s/pyvene/")}
    steered.save_pretrained(tmp_path / "s")
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("s/pyvene/")} == first
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["README.md", "pyvene", "steering.json",
                                                                   "steering.safetensors"]


# Each way a steered save can be broken, and the whole message it is refused with: the message is what a user
# reads to repair it, so a test that matched only a fragment would let its wording and its facts drift.
RECREATE = ". Re-create it with SteeredModel.save_pretrained."
BROKEN_STEERED = {
    "format version": (set_key("format_version", 99), None,
                       "(ValueError: format_version 99, expected 2)"),
    "unknown method": (set_key("method", "magic"), None,
                       "(ValueError: unknown steering method 'magic'; known: ['diffmean', 'experts', 'prompt'])"),
    "layer without a site": (lambda c: c["sites"].pop(), None, "(ValueError: plan names a layer that has no site)"),
    "negative neuron": (None, scale("neuron", value=-1, index=0), "(ValueError: plan names a neuron outside its layer)"),
    "neuron at the width": (None, lambda a: a["neuron"].__setitem__(-1, 48),
                            "(ValueError: plan names a neuron outside its layer)"),
    "concept past the list": (lambda c: c["spec"].update(k=None), scale("concept", value=1, index=0),
                              "(ValueError: plan names a concept index outside the concept list)"),
    "arrays of two lengths": (None, lambda a: a.update(bound=a["bound"][:-1]),
                              "(ValueError: plan arrays have different lengths [9, 10])"),
    "AP above 1": (None, scale("ap", value=2.0, index=0),
                   "(the plan: ap has values outside [0, 1] or non-finite ones.)"),
    "no spec": (lambda c: c.pop("spec"), None, "(KeyError: 'spec')"),
    "sites the model lacks": (lambda c: c["sites"].extend({**c["sites"][0], "layer": i} for i in (5, 6, 7, 8)), None,
                              "(ValueError: sites [" + ", ".join(
                                  f"UnitSite(layer={i}, module_path='model.layers.0.mlp.down_proj', width=48, "
                                  "port='input')" for i in (5, 6, 7)) + "] do not exist in 'tiny-llama')"),
}


@pytest.mark.parametrize("case", list(BROKEN_STEERED))
def test_broken_steered_model_is_refused_with_the_whole_story(tiny, saved_steered, tmp_path, case):
    edit_config, edit_arrays, why = BROKEN_STEERED[case]
    folder = tmp_path / "s"
    shutil.copytree(saved_steered, folder)
    restamp(folder, "steering.json", "steering.safetensors", edit_config, edit_arrays)
    with pytest.raises(CorruptFileError) as refused:
        SteeredModel.from_pretrained(folder, tiny)
    assert str(refused.value) == f"{folder} is not a valid steered model {why}{RECREATE}"


def test_unreadable_steered_files_are_refused_with_the_whole_story(tiny, saved_steered, other_steered, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(saved_steered, folder)
    (folder / "steering.json").write_text((folder / "steering.json").read_text()[:50])
    with pytest.raises(CorruptFileError) as refused:
        SteeredModel.from_pretrained(folder, tiny)
    message = str(refused.value)
    assert message.startswith(f"{folder} is not a valid steered model (JSONDecodeError: ") and message.endswith(RECREATE)

    shutil.copy(other_steered / "steering.json", folder / "steering.json")
    with pytest.raises(CorruptFileError) as refused:
        SteeredModel.from_pretrained(folder, tiny)
    assert str(refused.value).startswith(f"{folder} is not a valid steered model (CorruptFileError: {folder} is not a "
                                         "valid steered model: steering.safetensors and its JSON come from different saves")

    (folder / "steering.safetensors").unlink()
    with pytest.raises(SavedFolderNotFoundError) as refused:
        SteeredModel.from_pretrained(folder, tiny)
    assert str(refused.value) == f"{folder} is not a saved steered model: missing ['steering.safetensors']."


def test_a_save_without_a_method_is_an_expert_steering_and_loads_as_saved(tiny, steered, saved_steered, tmp_path):
    """Saves from before steering methods had names hold no "method": they are expert steering. Loading gives
    back the same plan, counts of contested units included."""
    from steer_experts.steering import ExpertSteeredModel

    folder = tmp_path / "s"
    shutil.copytree(saved_steered, folder)
    restamp(folder, "steering.json", "steering.safetensors", lambda c: (c.pop("method"), c.update(contested_units=3)))
    loaded = SteeredModel.from_pretrained(folder, tiny)
    assert type(loaded) is ExpertSteeredModel and loaded.plan.contested == 3
    assert {k: v for k, v in loaded.config().items() if k != "contested_units"} == \
        {k: v for k, v in steered.config().items() if k != "contested_units"}
    neuron_zero = tmp_path / "zero"
    shutil.copytree(saved_steered, neuron_zero)
    restamp(neuron_zero, "steering.json", "steering.safetensors", edit_arrays=scale("neuron", value=0, index=0))
    assert SteeredModel.from_pretrained(neuron_zero, tiny).plan.neuron[0] == 0  # the first neuron of a layer is valid


def test_steered_model_of_another_model_says_whose_it_is(tiny, saved_steered):
    with pytest.raises(ModelMismatchError) as refused:
        SteeredModel.from_pretrained(saved_steered, LoadedModel(tiny.model, tiny.tokenizer, "impostor", "1" * 32))
    assert str(refused.value) == (
        f"This steered model was saved for 'tiny-llama' (fingerprint {tiny.fingerprint[:12]}), but the model given is "
        "'impostor' (fingerprint 111111111111). Load the base model it was made with.")
