"""Chat samplers: the CTranslate2 conversion is checked against transformers, seeds repeat, the fallback
says why, and both backends' answers go through the same filters."""

from __future__ import annotations

import json
import warnings

import ctranslate2
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from steer_experts.models import LoadedModel
from steer_experts.words import mention_pattern
from steer_experts.writing import (
    ConceptWriter, ConversionError, CTranslate2Sampler, Sampling, TransformersSampler, WritingSettings,
    chat_sampler, ctranslate2_folder, sentence_problem, split_sentences,
)
from steer_experts.writing.samplers import CHUNK_PROMPTS, _chat_token_ids

from ..conftest import tiny_config


def _tiny(arch: str, tokenizer) -> LoadedModel:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)), dtype=torch.float32).eval()
    return LoadedModel.from_hf(model, tokenizer, name=f"tiny-{arch}")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models run faster on one thread."""


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_conversion_decodes_greedily_as_transformers_does(arch, tokenizer, tiny_cache):
    """CTranslate2's float32 greedy decoding of a converted model gives transformers' greedy tokens (computed
    here by full forwards, no cache)."""
    model = _tiny(arch, tokenizer)
    ids = _chat_token_ids(model, ["Tell me about dogs."])[0]
    generator = ctranslate2.Generator(str(ctranslate2_folder(model)), compute_type="float32", intra_threads=1)
    theirs = generator.generate_batch([tokenizer.convert_ids_to_tokens(ids)], max_length=8, sampling_topk=1,
                                      include_prompt_in_result=False)[0].sequences_ids[0]
    ours = list(ids)
    with torch.no_grad():
        for _ in range(8):
            ours.append(int(model.model(torch.tensor([ours])).logits[0, -1].argmax()))
    assert theirs == ours[len(ids):]


def test_conversion_is_cached_and_checked(tokenizer, tiny_cache):
    """A second call reuses the folder; a conversion that computes something else (tiny Gemma-3 in
    CTranslate2 4.8) or fails (GPT-NeoX) is refused, remembered, and refused again without converting."""
    llama = _tiny("llama", tokenizer)
    folder = ctranslate2_folder(llama)
    stamp = (folder / "model.bin").stat().st_mtime_ns
    assert ctranslate2_folder(llama) == folder and (folder / "model.bin").stat().st_mtime_ns == stamp
    for arch, why in (("gemma3", "does not reproduce its logits"), ("gpt_neox", "cannot convert")):
        model = _tiny(arch, tokenizer)
        with pytest.raises(ConversionError, match=why):
            ctranslate2_folder(model)
        refused = list(folder.parent.glob(f"tiny-{arch}-*.refused.json"))
        assert len(refused) == 1 and why in json.loads(refused[0].read_text())["reason"]
        assert not [p for p in folder.parent.glob(f"tiny-{arch}-*") if p.is_dir()]  # nothing converted is kept
        with pytest.raises(ConversionError, match=why):
            ctranslate2_folder(model)


def test_auto_falls_back_to_transformers_and_says_why(tokenizer, tiny_cache):
    neox = _tiny("gpt_neox", tokenizer)
    with pytest.warns(UserWarning, match="cannot convert tiny-gpt_neox.*Writing with transformers instead"):
        assert chat_sampler(neox).name == "transformers"
    with pytest.raises(ConversionError, match="cannot convert"):
        chat_sampler(neox, "ctranslate2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert chat_sampler(_tiny("llama", tokenizer)).name == "ctranslate2-int8-chunks24"
    with pytest.raises(ValueError, match="Unknown writing backend 'vllm'"):
        chat_sampler(neox, "vllm")


@pytest.mark.parametrize("backend", ["ctranslate2", "transformers"])
def test_same_seed_same_answers(backend, tokenizer, tiny_cache):
    model = _tiny("llama", tokenizer)
    sampler = chat_sampler(model, backend)
    sampling = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.95)
    messages = ["Write about dogs.", "Write a longer story about a cat and a dog."]
    first, tokens = sampler.sample(messages, 7, sampling)
    assert sampler.sample(messages, 7, sampling) == (first, tokens)
    assert sampler.sample(messages, 8, sampling)[0] != first
    assert 0 < tokens <= 2 * 10 and len(first) == 2


def test_ctranslate2_answers_do_not_depend_on_the_thread_count(tokenizer, tiny_cache):
    """Chunks run on parallel threads, each under its own seed: one thread or two give the same answers,
    and a chunk repeating another's prompts does not repeat its answers."""
    model = _tiny("llama", tokenizer)
    sampling = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.95)
    messages = ["Write about dogs."] * (2 * CHUNK_PROMPTS)
    one = CTranslate2Sampler(model, threads=1).sample(messages, 3, sampling)
    assert CTranslate2Sampler(model, threads=2).sample(messages, 3, sampling) == one
    answers = one[0]
    assert answers[:CHUNK_PROMPTS] != answers[CHUNK_PROMPTS:]
    assert len(set(answers)) > CHUNK_PROMPTS  # not one stream repeated row for row


class Recording:
    """A sampler that passes messages to another and keeps its answers."""

    def __init__(self, sampler):
        self.sampler, self.name, self.answers = sampler, sampler.name, []

    def sample(self, messages, seed, sampling):
        answers, tokens = self.sampler.sample(messages, seed, sampling)
        self.answers += answers
        return answers, tokens


@pytest.mark.integration
def test_both_backends_apply_the_same_filters(smollm2, tmp_path):
    """One round per backend on the real SmolLM2: each writer keeps exactly the sentences of its own
    answers that pass the shared filter, in order, and the counts add up."""
    settings = WritingSettings(batch_size=6, max_new_tokens=48, n_positives=100, max_rounds=1)
    kept = {}
    for sampler in (TransformersSampler(smollm2), CTranslate2Sampler(smollm2)):
        recording = Recording(sampler)
        progress = ConceptWriter(smollm2, tmp_path / sampler.name, settings, recording).write(
            ["apple"], progress=False).words[0]
        pattern, expected, seen = mention_pattern("apple"), [], set()
        for answer in recording.answers:
            for sentence in split_sentences(answer):
                key = " ".join(sentence.lower().split())
                if sentence_problem(sentence, pattern, 4, 40) is None and key not in seen:
                    expected.append(sentence)
                    seen.add(key)
        kept[sampler.name] = [k["text"] for k in progress.kept]
        assert kept[sampler.name] == expected and len(expected) > 0
        assert progress.counts["generated"] == sum(len(split_sentences(a)) for a in recording.answers)
    assert kept["transformers"] != kept["ctranslate2-int8-chunks24"]  # two backends, two samples: both really ran


@pytest.mark.integration
def test_smollm2_writes_with_a_checked_ctranslate2_conversion(smollm2):
    """The backend the writer picks by default for SmolLM2 is CTranslate2 int8, from a conversion whose
    float32 logits match transformers'."""
    sampler = chat_sampler(smollm2)
    assert isinstance(sampler, CTranslate2Sampler) and sampler.compute_type == "int8"
    generator = ctranslate2.Generator(str(sampler.folder), compute_type="float32", intra_threads=1)
    ids = _chat_token_ids(smollm2, ["Name a fruit."])[0]
    theirs = np.asarray(generator.forward_batch([smollm2.tokenizer.convert_ids_to_tokens(ids)]))[0]
    with torch.no_grad():
        ours = smollm2.model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < 1e-3 * (ours.max() - ours.min())
