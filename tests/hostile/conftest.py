"""Fixtures of the hostile-input tests: one tiny llama, its saved folder, and a saved expert set."""

from __future__ import annotations

import numpy as np
import pytest
import torch


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


def random_experts(loaded, concepts=("football", "woman"), seed=0):
    """An ExpertSet of ``loaded`` with random statistics (AP, AUROC in [0, 1])."""
    from steer_experts.expertise import Expertise
    from steer_experts.experts import ExpertSet
    from steer_experts.models import locate_units

    sites = locate_units(loaded.model, "mlp")
    n_units = sum(s.width for s in sites)
    rng = np.random.default_rng(seed)
    stats = {s: rng.random((len(concepts), n_units)) for s in ("ap", "auroc")}
    stats.update({s: rng.normal(2.0, 1.0, (len(concepts), n_units)).astype(np.float32)
                  for s in ("on_p50", "on_mean", "on_p90", "off_mean")})
    n = len(concepts)
    expertise = Expertise(list(concepts), **stats, n_positives=np.full(n, 50), n_negatives=np.full(n, 100))
    return ExpertSet(expertise, sites, loaded.name, loaded.fingerprint)


@pytest.fixture(scope="package")
def saved_experts(tiny, tmp_path_factory):
    """A random expert set of the tiny llama, saved; tests copy it before damaging it."""
    return random_experts(tiny).save_pretrained(tmp_path_factory.mktemp("experts") / "set")
