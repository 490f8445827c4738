"""Fixtures of the hostile-input tests: one tiny llama, its saved folder, and a saved expert set."""

from __future__ import annotations

import pytest
import torch

from ..core.test_interventions import synthetic_experts


@pytest.fixture(scope="package")
def tiny(tokenizer):
    """One tiny random llama with SmolLM2's tokenizer, as a LoadedModel."""
    from transformers import AutoModelForCausalLM

    from steer_experts.models import LoadedModel

    from ..conftest import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), dtype=torch.float32).eval()
    return LoadedModel.from_hf(model, tokenizer, name="tiny-llama")


@pytest.fixture(scope="package")
def tiny_folder(tiny, tmp_path_factory):
    """The tiny llama saved as a Hugging Face model folder (config, weights, tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


random_experts = synthetic_experts  # random statistics, AP and AUROC in [0, 1]


@pytest.fixture(scope="package")
def saved_experts(tiny, tmp_path_factory):
    """A random expert set of the tiny llama, saved; tests copy it before damaging it."""
    return random_experts(tiny).save_pretrained(tmp_path_factory.mktemp("experts") / "set")
