"""Stage 3: unit responses and their cache.

The response z[i, m] of unit m to sentence i is the unit's activation pooled
over the sentence's tokens: the max (default) or the mean, with padding and
special tokens masked out. Collection runs the decoder stack only (no LM head),
batched under ``no_grad``, with one plain forward pre-hook per layer that pools
into a preallocated buffer.

Responses stream to a cache of safetensors shards, each written atomically, so
memory stays bounded and a killed run resumes where it stopped. The folder
layout names the work::

    <cache>/responses/<model>-<fingerprint>/<unit kind>-<pooling>-len<max length>/<sentences hash>/
        manifest.json         what was asked, and the fixed batching plan
        shard-00000.safetensors ...   rows (sentence indices) + responses

Shard contents depend only on the manifest's plan, never on when a run was
interrupted, so a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from .atomic import atomic_write
from .models import LoadedModel, UnitSite, cache_root, decoder_stack, locate_units

POOLINGS = ("max", "mean")
MANIFEST = "manifest.json"
CACHE_VERSION = 1


@dataclass
class Responses:
    """Pooled unit responses, an (n_sentences, n_units) float32 matrix held in shards on disk.

    Rows follow the order of the sentences given to :func:`collect_responses`;
    columns follow ``sites`` (layer by layer, neuron by neuron).
    """

    folder: Path
    sites: list[UnitSite]
    n_sentences: int
    truncated: int  # sentences longer than max_length, cut to it

    @property
    def n_units(self) -> int:
        """Number of units (columns), all layers together."""
        return sum(s.width for s in self.sites)

    @property
    def shape(self) -> tuple[int, int]:
        """(n_sentences, n_units)."""
        return (self.n_sentences, self.n_units)

    def _shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.safetensors"))

    def columns(self, start: int, stop: int) -> np.ndarray:
        """Responses of units ``start:stop`` to every sentence, shape (n_sentences, stop - start)."""
        out = np.empty((self.n_sentences, stop - start), dtype=np.float32)
        for shard in self._shards():
            with safe_open(str(shard), framework="numpy") as f:
                out[f.get_tensor("rows")] = f.get_slice("responses")[:, start:stop]
        return out

    def to_numpy(self) -> np.ndarray:
        """The whole matrix in memory (n_sentences x n_units x 4 bytes)."""
        return self.columns(0, self.n_units)


def _hash_sentences(sentences: Sequence[str]) -> str:
    return hashlib.blake2b(json.dumps(list(sentences)).encode(), digest_size=8).hexdigest()


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[-60:]


def response_cache_folder(model: LoadedModel, sentences: Sequence[str], unit_kind: str, pooling: str,
                          max_length: int, cache_dir: str | Path | None = None) -> Path:
    """Where the responses for this (model, sentences, unit kind, pooling, max length) live."""
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "responses"
    return (root / f"{_safe_name(model.name)}-{model.fingerprint[:16]}" / f"{unit_kind}-{pooling}-len{max_length}"
            / _hash_sentences(sentences))


def _plan(model: LoadedModel, sentences: Sequence[str], max_length: int, batch_size: int,
          shard_size: int) -> tuple[list[list[list[int]]], int]:
    """Batches (lists of sentence indices) grouped into shards; sorted by length to save padding."""
    lengths = [len(ids) for ids in model.tokenizer(list(sentences), add_special_tokens=True)["input_ids"]]
    truncated = sum(n > max_length for n in lengths)
    order = sorted(range(len(sentences)), key=lambda i: (min(lengths[i], max_length), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    per_shard = max(1, shard_size // batch_size)
    return [batches[i:i + per_shard] for i in range(0, len(batches), per_shard)], truncated


class _Pooler:
    """Forward pre-hooks that pool each site's input over tokens into one (batch, n_units) buffer."""

    def __init__(self, model: torch.nn.Module, sites: list[UnitSite], pooling: str):
        self.pooling = pooling
        self.mask: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        offsets = np.cumsum([0] + [s.width for s in sites])
        self.handles = [
            model.get_submodule(s.module_path).register_forward_pre_hook(self._hook(int(offsets[i]), s.width))
            for i, s in enumerate(sites)
        ]

    def _hook(self, offset: int, width: int):
        def pool(_module, args):
            x = args[0]
            mask = self.mask[..., None]
            if self.pooling == "max":
                pooled = x.masked_fill(~mask, float("-inf")).amax(dim=1)
            else:
                pooled = (x * mask).sum(dim=1) / mask.sum(dim=1)
            self.out[:, offset:offset + width] = pooled.float()
        return pool

    def remove(self) -> None:
        """Take the hooks off the model."""
        for h in self.handles:
            h.remove()


@torch.no_grad()
def collect_responses(
    model: LoadedModel,
    sentences: Sequence[str],
    *,
    unit_kind: str = "mlp",
    pooling: str = "max",
    max_length: int = 128,
    batch_size: int = 32,
    shard_size: int = 512,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Responses:
    """Collect every unit's pooled response to each sentence, resuming from the cache.

    Args:
        model: the model (see :func:`~steer_experts.models.load_model`).
        sentences: distinct sentences (e.g. ``ConceptSet.sentences``).
        unit_kind: which units (``"mlp"``: MLP neurons).
        pooling: ``"max"`` or ``"mean"`` over the sentence's tokens.
        max_length: tokens kept per sentence; longer ones are truncated and counted.
        batch_size: sentences per forward pass (fixed by the first run of a cache folder).
        shard_size: sentences per shard file (also fixed by the first run).
        cache_dir: root of the response cache (default ``<cache>/responses``).

    Returns:
        :class:`Responses`, an (n_sentences, n_units) float32 matrix on disk.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}.")
    if not sentences:
        raise ValueError("No sentences to collect responses for.")
    if len(set(sentences)) != len(sentences):
        raise ValueError("Sentences must be distinct; build them with ConceptSet, which collects each once.")
    if any(not isinstance(s, str) or not s.strip() for s in sentences):
        raise ValueError("Every sentence must be a non-empty string.")
    if max_length < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError("max_length, batch_size and shard_size must be positive integers.")
    sites = locate_units(model.model, unit_kind)
    folder = response_cache_folder(model, sentences, unit_kind, pooling, max_length, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)

    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        shards, truncated = manifest["shards"], manifest["truncated"]
    else:
        shards, truncated = _plan(model, sentences, max_length, batch_size, shard_size)
        manifest = {
            "version": CACHE_VERSION, "model": model.name, "fingerprint": model.fingerprint, "unit_kind": unit_kind,
            "pooling": pooling, "max_length": max_length, "n_sentences": len(sentences), "truncated": truncated,
            "sites": [s.__dict__ for s in sites], "shards": shards,
        }
        atomic_write(manifest_path, lambda p: p.write_text(json.dumps(manifest)))
    responses = Responses(folder, sites, len(sentences), truncated)

    todo = [i for i in range(len(shards)) if not (folder / f"shard-{i:05d}.safetensors").exists()]
    if not todo:
        return responses
    n_todo = sum(len(b) for i in todo for b in shards[i])
    device = model.device
    special = torch.tensor(sorted(model.tokenizer.all_special_ids), device=device)
    pooler = _Pooler(model.model, sites, pooling)
    stack = decoder_stack(model.model)
    bar = tqdm(total=n_todo, unit="sent", desc="responses", disable=not progress)
    try:
        for i in todo:
            rows = [r for batch in shards[i] for r in batch]
            shard = np.empty((len(rows), responses.n_units), dtype=np.float32)
            done = 0
            for batch in shards[i]:
                enc = model.tokenizer([sentences[r] for r in batch], padding=True, truncation=True,
                                      max_length=max_length, return_tensors="pt").to(device)
                # Special tokens (BOS, pad) are not the sentence: their activations are
                # sentence-independent and would set a floor under every max.
                pooler.mask = enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], special)
                empty = (~pooler.mask.any(dim=1)).nonzero().flatten().tolist()
                if empty:
                    raise ValueError(f"Sentence {sentences[batch[empty[0]]]!r} has only special tokens; remove it.")
                pooler.out = torch.empty((len(batch), responses.n_units), dtype=torch.float32, device=device)
                stack(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
                shard[done:done + len(batch)] = pooler.out.cpu().numpy()
                done += len(batch)
                bar.update(len(batch))
            tensors = {"rows": np.asarray(rows, dtype=np.int64), "responses": shard}
            atomic_write(folder / f"shard-{i:05d}.safetensors", lambda p: save_file(tensors, str(p)))
    finally:
        pooler.remove()
        bar.close()
    return responses
