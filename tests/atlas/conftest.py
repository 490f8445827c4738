"""Fixtures of the atlas tests: a tiny model's experts for four small concepts, and their site."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from steer_experts.atlas import build_atlas
from steer_experts.concepts import Concept, ConceptSet
from steer_experts.discovery import discover
from steer_experts.models import LoadedModel

from ..conftest import tiny_config

TOPICS = {
    "dogs": ["The dog barked at the mailman.", "A puppy chewed my shoe.", "Dogs love long walks in the park.",
             "My dog sleeps on the sofa.", "The hound followed the scent.", "She fed the dog at noon."],
    "rain": ["Rain fell all night long.", "We waited for the rain to stop.", "The storm brought heavy rain.",
             "Umbrellas opened as the rain began.", "Rain tapped on the window.", "The rain flooded the road."],
    "music": ["He played the piano softly.", "The band tuned their guitars.", "Music filled the hall.",
              "She sang a song about home.", "The drums kept the beat.", "An old tune played on the radio."],
    "bread": ["The bakery sells fresh bread.", "He sliced the warm loaf.", "Bread rose in the oven.",
              "We dipped bread in the soup.", "The toast was burnt.", "She kneaded the dough for bread."],
}


@pytest.fixture(scope="module")
def atlas_inputs(tokenizer, tmp_path_factory, one_torch_thread):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), dtype=torch.float32).eval()
    model = LoadedModel.from_hf(hf, tokenizer, name="tiny-llama")
    concepts = ConceptSet([Concept(name, tuple(sentences)) for name, sentences in TOPICS.items()])
    cache = tmp_path_factory.mktemp("responses")
    experts = discover(model, concepts, n_negatives=12, cache_dir=cache, progress=False)
    return model, concepts.with_sampled_negatives(12, 0), experts, cache


@pytest.fixture(scope="module")
def site(atlas_inputs, tmp_path_factory):
    model, concepts, experts, cache = atlas_inputs
    out = tmp_path_factory.mktemp("site") / "atlas"
    report = build_atlas(experts, out, model=model, concepts=concepts, top=4, shown_experts=2,
                         sentences_per_unit=2, tau=0.5, cache_dir=cache, progress=False)
    return report, model, concepts, experts


