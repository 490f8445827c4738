"""Chat samplers: the engines that write answers to chat prompts for :class:`~.writer.ConceptWriter`.

Two backends answer the same messages with the same sampling settings:

* :class:`CTranslate2Sampler` -- the model converted once to CTranslate2 (cached, keyed by the
  model's fingerprint) and run int8 on CPU, one thread per chunk of prompts: 267 tokens/s against
  transformers' 63-74 on 2 cores (``benchmarks/bench_writing.py``).
* :class:`TransformersSampler` -- transformers ``generate``, for any model the converter refuses.

Within one backend, the same seed gives the same answers. The two backends sample differently
(other kernels, other random streams), so which one wrote a folder is part of its settings.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from ..atomic import atomic_write, file_safe
from ..errors import InvalidArgumentError
from ..models import LoadedModel, cache_root

BACKENDS = ("auto", "ctranslate2", "transformers")


@dataclass(frozen=True)
class Sampling:
    """How answers are sampled: ``max_new_tokens`` per answer, ``temperature``, the ``top_k`` most likely
    tokens (0: all of them) and nucleus ``top_p``."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int = 0


class ChatSampler(Protocol):
    """Answers user messages through a model's chat template."""

    name: str  # the backend, and its precision where it has one: part of a writing folder's settings

    def sample(self, messages: Sequence[str], seed: int, sampling: Sampling) -> tuple[list[str], int]:
        """One answer per message, sampled under ``seed``, and the number of tokens generated
        (end-of-text and padding excluded)."""


def _chat_token_ids(model: LoadedModel, messages: Sequence[str]) -> list[list[int]]:
    tok = model.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for m in messages]


class TransformersSampler:
    """Samples with transformers ``generate`` on the model's own device and dtype."""

    name = "transformers"

    def __init__(self, model: LoadedModel):
        self.model = model

    @torch.no_grad()
    def sample(self, messages: Sequence[str], seed: int, sampling: Sampling) -> tuple[list[str], int]:
        """See :class:`ChatSampler`."""
        tok = self.model.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"  # generation continues from the last position of every row
        try:
            enc = tok.pad({"input_ids": _chat_token_ids(self.model, messages)}, return_tensors="pt")
        finally:
            tok.padding_side = side
        enc = enc.to(self.model.device)
        torch.manual_seed(seed)
        out = self.model.model.generate(
            **enc, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_new_tokens=sampling.max_new_tokens, pad_token_id=tok.pad_token_id,
        )
        new = out[:, enc["input_ids"].shape[1]:]
        # Rows that ended early are padded with pad (= eos here); count real tokens only.
        ended = torch.cumsum((new == tok.eos_token_id) | (new == tok.pad_token_id), dim=1) > 0
        return tok.batch_decode(new, skip_special_tokens=True), int((~ended).sum())


class ConversionError(InvalidArgumentError):
    """Raised when CTranslate2 is missing or cannot convert a model."""


def ctranslate2_folder(model: LoadedModel) -> Path:
    """The model converted to CTranslate2 (float32 weights, quantised when loaded), converting it once.

    The folder is ``<cache>/ctranslate2/<name>-<fingerprint>``. Conversion writes into a temporary
    folder that is renamed into place, so a killed or concurrent conversion never leaves a partial one.

    Every conversion is checked against the model's own float32 logits before it is kept.

    Raises:
        ConversionError: ctranslate2 is not installed, its converter does not support the model, or the
            conversion computes something else. A refused model is remembered (``<folder>.refused.json``),
            so the next call fails at once.
    """
    if importlib.util.find_spec("ctranslate2") is None:
        raise ConversionError("ctranslate2 is not installed (pip install ctranslate2).")
    target = cache_root() / "ctranslate2" / f"{file_safe(model.name, keep='-_.', last=60)}-{model.fingerprint[:16]}"
    if (target / "model.bin").exists():
        return target
    refused = target.with_name(target.name + ".refused.json")
    if refused.exists():
        raise ConversionError(json.loads(refused.read_text())["reason"])

    def refuse(reason: str):
        # Kept, so that the next run falls back at once instead of converting again.
        atomic_write(refused, lambda path: path.write_text(json.dumps({"reason": reason})))
        raise ConversionError(reason)

    import ctranslate2

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            model.model.save_pretrained(work / "transformers")
            model.tokenizer.save_pretrained(work / "transformers")
            ctranslate2.converters.TransformersConverter(str(work / "transformers")).convert(str(work / "converted"))
        except OSError:
            raise  # a full disk or a vanished folder says nothing about the model: try again next time
        except Exception as err:  # the converter raises ValueError, KeyError, AttributeError... per model
            refuse(f"CTranslate2 cannot convert {model.name}: {type(err).__name__}: "
                   f"{str(err).splitlines()[0] if str(err) else ''}")
        gap = _logit_gap(model, work / "converted")
        if gap > LOGIT_TOLERANCE:
            refuse(f"CTranslate2's conversion of {model.name} does not reproduce its logits (largest difference "
                   f"{gap:.3g} of the logit range, over {LOGIT_TOLERANCE:g})")
        try:
            os.replace(work / "converted", target)
        except OSError:
            if not (target / "model.bin").exists():
                raise
            # Another process finished the same conversion first; its copy is as good as ours.
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


LOGIT_TOLERANCE = 1e-3  # float32 kernels differ in summation order only; a wrong conversion is off by O(1)


@torch.no_grad()
def _logit_gap(model: LoadedModel, folder: Path) -> float:
    """Largest |logit difference| between the model and its float32 conversion on a probe chat, as a
    fraction of the model's logit range. Some conversions run but compute something else (we found
    CTranslate2 4.8 does for tiny Gemma-3 and GPT-2 models), so every one is checked."""
    import ctranslate2

    ids = _chat_token_ids(model, ["Write one sentence about the weather today."])[0]
    generator = ctranslate2.Generator(str(folder), device="cpu", compute_type="float32", intra_threads=1)
    theirs = np.asarray(generator.forward_batch([model.tokenizer.convert_ids_to_tokens(ids)]))[0]
    reference = model.model
    if model.device.type != "cpu" or reference.dtype != torch.float32:
        reference = copy.deepcopy(reference).to("cpu", torch.float32)  # what the conversion holds
    ours = reference(torch.tensor([ids])).logits[0].numpy()
    return float(np.abs(theirs - ours).max() / (ours.max() - ours.min()))


CHUNK_PROMPTS = 24  # prompts per CTranslate2 generator, each sampled under its own seed (see CTranslate2Sampler)
_SEEDING = threading.Lock()


class CTranslate2Sampler:
    """Samples with CTranslate2 from the cached conversion of ``model`` (:func:`ctranslate2_folder`).

    The messages are cut into chunks of ``CHUNK_PROMPTS``, and each chunk is sampled by its own
    generator under its own seed, on its own CPU thread: one thread per chunk writes 1.7x the tokens/s
    of one generator running both threads (SmolLM2, 48 prompts, 2 cores). The answers depend on the
    seed and the chunking only, never on the number of threads.

    Args:
        model: the model to convert (its tokenizer encodes the prompts and decodes the answers).
        compute_type: CTranslate2's precision; ``"int8"`` on CPU by default, ``"float16"`` on CUDA.
        threads: CPU threads (default: torch's thread count).
    """

    def __init__(self, model: LoadedModel, compute_type: str | None = None, threads: int | None = None):
        self.model, self.folder = model, ctranslate2_folder(model)
        self.device = "cuda" if model.device.type == "cuda" else "cpu"
        self.compute_type = compute_type or ("float16" if self.device == "cuda" else "int8")
        self.threads = threads or torch.get_num_threads()
        self.name = f"ctranslate2-{self.compute_type}-chunks{CHUNK_PROMPTS}"

    def sample(self, messages: Sequence[str], seed: int, sampling: Sampling) -> tuple[list[str], int]:
        """See :class:`ChatSampler`."""
        import ctranslate2

        tok = self.model.tokenizer
        prompts = [tok.convert_ids_to_tokens(ids) for ids in _chat_token_ids(self.model, messages)]
        chunks = [prompts[i:i + CHUNK_PROMPTS] for i in range(0, len(prompts), CHUNK_PROMPTS)]
        workers = 1 if self.device == "cuda" else min(self.threads, len(chunks))

        def run(index: int) -> list[list[int]]:
            chunk = chunks[index]
            generator = ctranslate2.Generator(str(self.folder), device=self.device, compute_type=self.compute_type,
                                              intra_threads=max(1, self.threads // workers) if self.device == "cpu" else 0)
            # A generator's worker thread seeds its random stream from the global seed at its first draw,
            # and keeps it (CTranslate2 issue #1757). Drawing once here, under the lock, gives each chunk
            # the stream of its own seed whatever the other threads do. The seed is 32-bit unsigned.
            with _SEEDING:
                ctranslate2.set_random_seed((seed + index) % 2**32)
                generator.generate_batch([chunk[0][:1]], max_length=1, sampling_topk=2)
            results = generator.generate_batch(
                chunk, max_length=sampling.max_new_tokens, sampling_topk=sampling.top_k,
                sampling_topp=sampling.top_p, sampling_temperature=sampling.temperature,
                include_prompt_in_result=False, end_token=tok.eos_token,
            )
            return [r.sequences_ids[0] for r in results]

        with ThreadPoolExecutor(workers) as pool:
            ids = [answer for part in pool.map(run, range(len(chunks))) for answer in part]
        return tok.batch_decode(ids, skip_special_tokens=True), sum(map(len, ids))


def chat_sampler(model: LoadedModel, backend: str = "auto") -> ChatSampler:
    """The sampler of ``backend`` for ``model``: ``"ctranslate2"``, ``"transformers"``, or ``"auto"``
    (CTranslate2 where it is installed and converts the model; otherwise transformers, with a warning
    that says why).

    Raises:
        InvalidArgumentError: an unknown backend.
        ConversionError: ``"ctranslate2"`` asked for, but it is missing or cannot convert the model.
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"Unknown writing backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "transformers":
        return TransformersSampler(model)
    try:
        return CTranslate2Sampler(model)
    except ConversionError as err:
        if backend == "ctranslate2":
            raise
        warnings.warn(f"{err} Writing with transformers instead (about 3x slower).", stacklevel=2)
        return TransformersSampler(model)
