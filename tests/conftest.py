"""Shared fixtures: tiny random models of every architecture, the real SmolLM2, the OneSec data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config,
)

# The shared data: $STEER_EXPERTS_DATA, else ../shared/data beside the checkout (as the recipes find it).
SHARED_DATA = Path(os.environ.get("STEER_EXPERTS_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
ONESEC = SHARED_DATA / "concepts" / "onesec"
MEN = SHARED_DATA / "human" / "men"
NO_SHARED_DATA = (f"real concept data not found at {ONESEC.resolve()} (set STEER_EXPERTS_DATA, or put the "
                  "shared data beside the checkout, as CI does)")



def in_ci() -> bool:
    """Whether the tests run in CI (``$CI`` set and not "0"/"false", as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_shared_data(reason: str):
    """Skip the test for lack of the shared data, or fail it in CI: there the data must be present, and a
    green run that skipped every test on real data would claim what it never checked."""
    if in_ci():
        pytest.fail(f"{reason} [CI is set: the shared data is required there]", pytrace=False)
    pytest.skip(reason)


def needs_data(path: Path, reason: str | None = None):
    """Mark a test (or a module, as ``pytestmark``) that reads ``path`` of the shared data."""
    return pytest.mark.needs_data(path=Path(path), reason=reason or f"shared data not found at {Path(path).resolve()}")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs_data"):
        if not mark.kwargs["path"].exists():
            missing_shared_data(mark.kwargs["reason"])


needs_shared_data = needs_data(ONESEC, NO_SHARED_DATA)

TINY = dict(hidden=32, inner=48, layers=2, heads=4)


def tiny_config(arch: str, vocab_size: int):
    """A 2-layer random config of ``arch`` (llama, gemma3, gpt2, qwen2, gpt_neox)."""
    h, i, n, a = TINY["hidden"], TINY["inner"], TINY["layers"], TINY["heads"]
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                           num_attention_heads=a, num_key_value_heads=2)
    if arch == "gemma3":
        return Gemma3TextConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                                num_attention_heads=a, num_key_value_heads=2, head_dim=h // a)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=h, n_inner=i, n_layer=n, n_head=a,
                          bos_token_id=0, eos_token_id=0)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                           num_attention_heads=a, num_key_value_heads=2)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                             num_attention_heads=a, bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


ARCHS = ("llama", "gemma3", "gpt2", "qwen2", "gpt_neox")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module on one torch thread: tiny models otherwise spend their time synchronising threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (dequantised once into the user cache)."""
    from steer_experts.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2.tokenizer


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model(request, tokenizer):
    """A tiny random model of each architecture, with SmolLM2's tokenizer, as a LoadedModel."""
    from steer_experts.models import LoadedModel

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(request.param, len(tokenizer)), dtype=torch.float32).eval()
    return LoadedModel.from_hf(model, tokenizer, name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def bos_tokenizer(tokenizer):
    """SmolLM2's tokenizer made to start every text with its BOS token, as Llama's and Gemma's do.

    SmolLM2's own adds no special token, so with it alone nothing can tell whether special
    tokens are pooled or steered like words."""
    import copy

    from tokenizers.processors import TemplateProcessing

    bos = copy.deepcopy(tokenizer)
    bos._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos.bos_token} $A", pair=f"{bos.bos_token} $A {bos.bos_token} $B",
        special_tokens=[(bos.bos_token, bos.bos_token_id)])
    assert bos("a dog")["input_ids"][0] == bos.bos_token_id != tokenizer("a dog")["input_ids"][0]
    return bos


@pytest.fixture(scope="session")
def tiny_bos_model(bos_tokenizer):
    """A tiny random llama whose tokenizer adds a BOS token, as a LoadedModel."""
    from steer_experts.models import LoadedModel

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(bos_tokenizer)), dtype=torch.float32).eval()
    return LoadedModel.from_hf(model, bos_tokenizer, name="tiny-llama-bos")


@pytest.fixture(scope="session")
def onesec():
    """The three real OneSec concepts (football, man, woman)."""
    if not ONESEC.is_dir():
        missing_shared_data(NO_SHARED_DATA)
    from steer_experts.concepts import ConceptSet

    return ConceptSet.load(ONESEC)


@pytest.fixture(scope="session")
def response_cache(tmp_path_factory):
    """One response cache for the whole session, so real responses are collected once."""
    return tmp_path_factory.mktemp("responses")


@pytest.fixture(scope="session")
def football_experts(smollm2, onesec, response_cache):
    """Experts of OneSec football on the real SmolLM2 (700 positives, 1000 negatives, all 46,080 neurons)."""
    from steer_experts.discovery import discover

    return discover(smollm2, onesec.subset(["football"]), cache_dir=response_cache, progress=False)
