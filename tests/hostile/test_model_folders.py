"""Hostile model folders and loading options: the error names the file that is missing or broken
(never "install sentencepiece"), and loading writes nothing."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from steer_experts.cli import main
from steer_experts.errors import InvalidArgumentError, SteerExpertsError
from steer_experts.models import ModelLoadError, ModelNotFoundError, load_model

from .disk import tree


def broken_folder(tiny_folder, tmp_path, case):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "model.safetensors"
    if case == "garbage config.json":
        (folder / "config.json").write_bytes(b"\x00\x01garbage")
        return folder, ModelLoadError, r"config\.json is not valid JSON"
    if case == "truncated config.json":
        text = (folder / "config.json").read_text()
        (folder / "config.json").write_text(text[: len(text) // 2])
        return folder, ModelLoadError, r"config\.json is not valid JSON"
    if case == "config.json without model_type":
        (folder / "config.json").write_text('{"hidden_size": 32}')
        return folder, ModelLoadError, r"config\.json has no model_type"
    if case == "config.json is a list":
        (folder / "config.json").write_text("[]")
        return folder, ModelLoadError, r"config\.json has no model_type"
    if case == "config only":
        for p in folder.iterdir():
            if p.name != "config.json":
                p.unlink()
        return folder, ModelLoadError, r"has a config\.json but no weights file \(model\.safetensors\)"
    if case == "no tokenizer files":
        for p in folder.glob("tokenizer*"):
            p.unlink()
        return folder, ModelLoadError, r"has no tokenizer files \(one of tokenizer\.json"
    if case == "garbage weights":
        weights.write_bytes(b"this is not a safetensors file at all" * 10)
        return folder, ModelLoadError, r"Cannot load the weights of .*a weights file is missing or corrupt"
    if case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return folder, ModelLoadError, r"Cannot load the weights of .*a weights file is missing or corrupt"
    if case == "empty weights":
        weights.write_bytes(b"")
        return folder, ModelLoadError, r"Cannot load the weights of"
    if case == "garbage tokenizer.json":
        (folder / "tokenizer.json").write_text("{garbage")
        return folder, ModelLoadError, r"Cannot load the tokenizer of"
    if case == "no config.json":
        (folder / "config.json").unlink()
        return folder, ModelNotFoundError, r"is a folder but has no config\.json"
    if case == "unknown model_type":
        (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
        return folder, ModelLoadError, r"Cannot load the tokenizer of|Cannot load the weights of"
    raise AssertionError(case)


CASES = ["garbage config.json", "truncated config.json", "config.json without model_type", "config.json is a list",
         "config only", "no tokenizer files", "garbage weights", "truncated weights", "empty weights",
         "garbage tokenizer.json", "no config.json", "unknown model_type"]


@pytest.mark.parametrize("case", CASES)
def test_broken_model_folder_names_the_file(tiny_folder, tmp_path, case):
    folder, error, message = broken_folder(tiny_folder, tmp_path, case)
    before = tree(tmp_path)
    with pytest.raises(error, match=message) as info:
        load_model(str(folder))
    assert isinstance(info.value, SteerExpertsError)
    assert "sentencepiece" not in str(info.value).lower()
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", ["garbage config.json", "config only", "garbage weights"])
def test_cli_reports_a_broken_model_in_one_line(tiny_folder, tmp_path, capsys, monkeypatch, case):
    folder, _, message = broken_folder(tiny_folder, tmp_path, case)
    (tmp_path / "c.jsonl").write_text('{"concept": "a", "text": "A."}\n{"concept": "b", "text": "B."}\n')
    monkeypatch.setenv("STEER_EXPERTS_CACHE", str(tmp_path / "cache"))
    before = tree(tmp_path)
    assert main(["discover", "--model", str(folder), "--concepts", str(tmp_path / "c.jsonl"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("steer-experts discover: error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]) and "Traceback" not in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("dtype, message", [("float33", "Unknown dtype 'float33'"), ("int8", "Unknown dtype 'int8'"),
                                            (torch.int64, "Unknown dtype torch.int64"), (3, "Unknown dtype 3")])
def test_bad_dtype_is_refused_before_loading(tiny_folder, dtype, message):
    before = tree(tiny_folder)
    with pytest.raises(InvalidArgumentError, match=message):
        load_model(str(tiny_folder), dtype=dtype)
    assert tree(tiny_folder) == before


@pytest.mark.parametrize("device, message", [("banana", "Unknown device 'banana'"),
                                             ("meta", "Unsupported device 'meta'")]
                         + ([] if torch.cuda.is_available() else [("cuda", "torch sees no CUDA GPU"),
                                                                   ("cuda:1", "torch sees no CUDA GPU")]))
def test_bad_device_is_refused_before_loading(tiny_folder, device, message):
    with pytest.raises(InvalidArgumentError, match=message):
        load_model(str(tiny_folder), device=device)


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="No model folder at"):
        load_model(str(tmp_path / "nowhere.safetensors"))
