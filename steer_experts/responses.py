"""Stage 3: unit responses and their cache.

The response z[i, m] of unit m to sentence i is the unit's activation pooled
over the sentence's tokens: the max (default) or the mean, with padding and
special tokens masked out. Collection runs the decoder stack only (no LM head),
batched under ``no_grad``, with one plain forward pre-hook per layer that pools
into a preallocated buffer.

Responses stream to a cache of safetensors shards, each written atomically, so
memory stays bounded and a killed run resumes where it stopped. The folder
layout names everything that changes the numbers::

    <cache>/responses/<model>-<fingerprint>/<unit kind>-<pooling>-len<max length>-<dtype>-v<format>/<sentences hash>/
        manifest.json         what was asked, the fixed batching plan, and a checksum per finished shard
        shard-00000.safetensors ...   rows (sentence indices) + responses

Shard contents depend only on the manifest's plan, never on when a run was
interrupted, so a resumed run ends bit-identical to an uninterrupted one. The
first run of a folder fixes the plan; runs at the same time (even with other
batch sizes) take a lock on the folder to read or write the manifest, so they
all follow that one plan. A shard whose bytes no longer match its checksum, or
a manifest that does not parse, is recomputed with a :class:`CacheRepairWarning`.

Several processes of one run (torchrun, ``steer-experts discover --workers N``; see
:mod:`~steer_experts.distributed`) split the plan by a fixed rule: its shards are dealt
out in a snake (ranks 0, 1, ..., size - 1, then back), so that over a plan sorted by
length every process gets about as many tokens. Each writes its shards as a lone run
would, under the same folder lock: an flock holds between processes of one machine and,
where the file system honours it (local disks, NFS with locking), of several. Then all
wait for each other, and each returns the whole :class:`Responses`. The folder ends byte
for byte as a lone run leaves it, and a run that lost a process resumes like any other,
with any number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from .atomic import atomic_write, file_safe
from .distributed import team
from .errors import CorruptFileError, InvalidArgumentError
from .integrity import file_checksum
from .models import LoadedModel, cache_root
from .units import UnitSite, decoder_stack, locate_units

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs on one cache are then unsupported
    fcntl = None

POOLINGS = ("max", "mean")
MANIFEST = "manifest.json"
LOCK_NAME = ".lock"
# Bump whenever what a shard holds changes meaning: old caches then live in other folders.
CACHE_VERSION = 3  # 3: batches padded on the right whatever the tokenizer's side


class CacheRepairWarning(UserWarning):
    """A cache file was corrupt (bad checksum, unreadable manifest) and is being recomputed."""


# a repair warning points past these, at the user's line
_INTERNAL_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules[__package__], torch))


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
    n_shards: int | None = None  # the plan's shard count; files beyond it belong to no plan of ours

    @property
    def n_units(self) -> int:
        """Number of units (columns), all layers together."""
        return sum(s.width for s in self.sites)

    @property
    def shape(self) -> tuple[int, int]:
        """(n_sentences, n_units)."""
        return (self.n_sentences, self.n_units)

    def _shards(self) -> list[Path]:
        if self.n_shards is None:
            return sorted(self.folder.glob("shard-*.safetensors"))
        return [_shard_path(self.folder, i) for i in range(self.n_shards) if _shard_path(self.folder, i).exists()]

    def columns(self, start: int, stop: int) -> np.ndarray:
        """Responses of units ``start:stop`` to every sentence, shape (n_sentences, stop - start)."""
        return self._read(lambda f: f.get_slice("responses")[:, start:stop], stop - start)

    def take(self, units: Sequence[int]) -> np.ndarray:
        """Responses of ``units`` (global unit indices, any order) to every sentence, shape
        (n_sentences, len(units)); reads each shard once."""
        units = np.asarray(units, dtype=np.int64)
        return self._read(lambda f: f.get_tensor("responses")[:, units], len(units))

    def _read(self, read, width: int) -> np.ndarray:
        out = np.empty((self.n_sentences, width), dtype=np.float32)
        filled = np.zeros(self.n_sentences, dtype=bool)
        for shard in self._shards():
            with safe_open(str(shard), framework="numpy") as f:
                rows = f.get_tensor("rows")
                out[rows] = read(f)
                filled[rows] = True
        # np.empty holds whatever memory held: a row no shard wrote must never reach a score.
        if not filled.all():
            raise CorruptFileError(f"The response cache {self.folder} lacks {int((~filled).sum())} sentences' "
                                   "rows (a shard was deleted?). Run collect_responses again to fill it.")
        return out

    def to_numpy(self) -> np.ndarray:
        """The whole matrix in memory (n_sentences x n_units x 4 bytes)."""
        return self.columns(0, self.n_units)


def _hash_sentences(sentences: Sequence[str]) -> str:
    return hashlib.blake2b(json.dumps(list(sentences)).encode(), digest_size=8).hexdigest()


def _dtype_name(model: LoadedModel) -> str:
    return str(next(model.model.parameters()).dtype).removeprefix("torch.")


def response_cache_folder(model: LoadedModel, sentences: Sequence[str], unit_kind: str, pooling: str,
                          max_length: int, cache_dir: str | Path | None = None) -> Path:
    """Where the responses for this (model and its dtype, sentences, unit kind, pooling, max length,
    cache format) live."""
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "responses"
    work = f"{unit_kind}-{pooling}-len{max_length}-{_dtype_name(model)}-v{CACHE_VERSION}"
    return root / f"{file_safe(model.name, keep='-_.', last=60)}-{model.fingerprint[:16]}" / work / _hash_sentences(sentences)


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on the cache folder: one process at a time reads-modifies-writes the manifest."""
    if fcntl is None:
        yield
        return
    with open(folder / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _valid_manifest(manifest, expected: dict) -> str | None:
    """Why ``manifest`` cannot be trusted for this work, or None when it can."""
    if not isinstance(manifest, dict):
        return "it is not a JSON object"
    changed = [k for k, v in expected.items() if manifest.get(k) != v]
    if changed:
        return f"it was written for other settings ({', '.join(changed)})"
    shards, checksums = manifest.get("shards"), manifest.get("checksums")
    if not isinstance(checksums, dict) or not isinstance(manifest.get("truncated"), int):
        return "fields are missing"
    try:
        rows = np.array([r for shard in shards for batch in shard for r in batch], dtype=np.int64)
    except (TypeError, ValueError):
        return "its plan is not lists of sentence indices"
    if not all(batch for shard in shards for batch in shard) or not np.array_equal(
            np.sort(rows), np.arange(expected["n_sentences"])):
        return "its plan does not cover every sentence exactly once"
    return None


def _warn_repair(message: str) -> None:
    """Warn with a CacheRepairWarning pointed at the caller's own line: the first frame outside this
    package and torch (a fixed stacklevel cannot be right: collect_responses is reached through
    torch.no_grad, and directly or through discover)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, CacheRepairWarning, stacklevel=level)


def _read_manifest(path: Path, expected: dict) -> dict | None:
    """The manifest at ``path`` if it can be trusted; None (after a warning) if it exists but cannot."""
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        why = _valid_manifest(manifest, expected)
    except (UnicodeDecodeError, json.JSONDecodeError):
        why = "it is not valid JSON (truncated?)"
    if why is None:
        return manifest
    _warn_repair(f"Response cache manifest {path} is corrupt ({why}); recomputing this cache folder.")
    return None


def _shard_path(folder: Path, i: int) -> Path:
    return folder / f"shard-{i:05d}.safetensors"


def _verified_shards(folder: Path, manifest: dict, indices: Sequence[int]) -> set[int]:
    """Those of shards ``indices`` on disk whose bytes match the manifest's checksum; warns about the others."""
    good = set()
    for i in indices:
        path = _shard_path(folder, i)
        if not path.exists():
            continue
        expected = manifest["checksums"].get(str(i))
        if expected is not None and file_checksum(path) == expected:
            good.add(i)
        elif expected is not None:
            _warn_repair(f"Response cache shard {path} does not match its checksum (truncated or overwritten); "
                         "recomputing it.")
    return good


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

    def set_mask(self, mask: torch.Tensor) -> None:
        """Pool the next batch over the tokens ``mask`` (batch, tokens, bool) keeps."""
        self.mask = mask
        # Batches hold sentences of similar lengths, so most tokens are kept in every sentence: max-pooling
        # those with a plain amax, and masking only the others, costs a fifth of masking them all.
        kept = mask.all(dim=0).tolist()
        start = kept.index(True) if True in kept else len(kept)
        stop = start
        while stop < len(kept) and kept[stop]:
            stop += 1
        self.everywhere = (start, stop)
        self.ragged = [(a, b) for a, b in ((0, start), (stop, len(kept))) if b > a]

    def _hook(self, offset: int, width: int):
        def pool(_module, args):
            x = args[0]
            mask = self.mask[..., None]
            if self.pooling == "max":
                start, stop = self.everywhere
                parts = [x[:, start:stop]] if stop > start else []
                parts += [x[:, a:b].masked_fill(~mask[:, a:b], float("-inf")) for a, b in self.ragged]
                pooled = parts[0].amax(dim=1)
                for part in parts[1:]:
                    pooled = torch.maximum(pooled, part.amax(dim=1))
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

    With several processes (see :mod:`~steer_experts.distributed`) this is a collective: each
    computes its share of the plan's shards, and returns when every shard is written.

    Returns:
        :class:`Responses`, an (n_sentences, n_units) float32 matrix on disk.
    """
    if pooling not in POOLINGS:
        raise InvalidArgumentError(f"pooling must be one of {POOLINGS}; got {pooling!r}.")
    if not sentences:
        raise InvalidArgumentError("No sentences to collect responses for.")
    if any(not isinstance(s, str) or not s.strip() for s in sentences):
        raise InvalidArgumentError("Every sentence must be a non-empty string.")
    if len(set(sentences)) != len(sentences):
        raise InvalidArgumentError("Sentences must be distinct; build them with ConceptSet, which collects each once.")
    for name, value in (("max_length", max_length), ("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer; got {value!r}.")
    sites = locate_units(model.model, unit_kind)
    folder = response_cache_folder(model, sentences, unit_kind, pooling, max_length, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    members = team(model.device)

    manifest_path = folder / MANIFEST
    expected = {"version": CACHE_VERSION, "fingerprint": model.fingerprint, "dtype": _dtype_name(model),
                "unit_kind": unit_kind, "pooling": pooling, "max_length": max_length,
                "n_sentences": len(sentences), "sites": [s.__dict__ for s in sites]}
    with _locked(folder):
        manifest = _read_manifest(manifest_path, expected)
        if manifest is None:
            # Shards of an unreadable manifest follow an unknown plan: none can be trusted.
            for stale in folder.glob("shard-*.safetensors"):
                stale.unlink()
            shards, truncated = _plan(model, sentences, max_length, batch_size, shard_size)
            manifest = {**expected, "model": model.name, "truncated": truncated, "shards": shards, "checksums": {}}
            atomic_write(manifest_path, lambda p: p.write_text(json.dumps(manifest)))
        shards, truncated = manifest["shards"], manifest["truncated"]
        mine = _dealt_shards(len(shards), members.rank, members.size)
        done = _verified_shards(folder, manifest, mine)
    responses = Responses(folder, sites, len(sentences), truncated, len(shards))

    todo = [i for i in mine if i not in done]
    if todo:
        _fill_shards(model, sentences, responses, shards, todo, pooling, max_length,
                     progress=progress and members.lead)
    members.barrier()
    return responses


def _dealt_shards(n_shards: int, rank: int, size: int) -> list[int]:
    """The indices of the shards (of a plan of ``n_shards``) that process ``rank`` of ``size`` computes.

    Dealt out in a snake (ranks 0, 1, ..., size - 1, then size - 1, ..., 0, and again), since the
    plan's shards grow longer with their index: with 4 shards of 2,000 OneSec sentences, two
    processes get 51% / 49% of the padded tokens this way, against 59% / 41% taking every other one.
    """
    return [i for i in range(n_shards) if (i % size if i // size % 2 == 0 else size - 1 - i % size) == rank]


def _fill_shards(model: LoadedModel, sentences: Sequence[str], responses: Responses, shards: list, todo: list[int],
                 pooling: str, max_length: int, progress: bool) -> None:
    """Compute the shards ``todo`` of the plan ``shards`` and store each as soon as it is done."""
    n_todo = sum(len(b) for i in todo for b in shards[i])
    device = model.device
    special = torch.tensor(sorted(model.tokenizer.all_special_ids), device=device)
    pooler = _Pooler(model.model, responses.sites, pooling)
    stack = decoder_stack(model.model)
    bar = tqdm(total=n_todo, unit="sent", desc="responses", disable=not progress)
    try:
        for i in todo:
            rows = [r for batch in shards[i] for r in batch]
            shard = np.empty((len(rows), responses.n_units), dtype=np.float32)
            done = 0
            for batch in shards[i]:
                enc = _encode(model.tokenizer, [sentences[r] for r in batch], max_length).to(device)
                # Special tokens (BOS, pad) are not the sentence: their activations are
                # sentence-independent and would set a floor under every max.
                pooler.set_mask(enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], special))
                empty = (~pooler.mask.any(dim=1)).nonzero().flatten().tolist()
                if empty:
                    raise InvalidArgumentError(f"Sentence {sentences[batch[empty[0]]]!r} has only special tokens; remove it.")
                pooler.out = torch.empty((len(batch), responses.n_units), dtype=torch.float32, device=device)
                stack(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
                shard[done:done + len(batch)] = pooler.out.cpu().numpy()
                done += len(batch)
                bar.update(len(batch))
            tensors = {"rows": np.asarray(rows, dtype=np.int64), "responses": shard}
            _store_shard(responses.folder, i, tensors)
    finally:
        pooler.remove()
        bar.close()


def _encode(tokenizer, sentences: list[str], max_length: int):
    """One padded batch of token ids and attention mask for ``sentences``, at most ``max_length`` tokens each.

    Padded on the right whatever the tokenizer's own side: a sentence then sits at the same positions in
    any batch, so its responses do not depend on what it was batched with.
    """
    return tokenizer(sentences, padding=True, padding_side="right", truncation=True, max_length=max_length,
                     return_tensors="pt")


def _store_shard(folder: Path, i: int, tensors: dict[str, np.ndarray]) -> None:
    """Write shard ``i`` atomically and record its checksum in the manifest, both under the folder lock."""
    path = _shard_path(folder, i)
    with _locked(folder):
        manifest_path = folder / MANIFEST
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        planned = [r for batch in manifest["shards"][i] for r in batch] if i < len(manifest["shards"]) else None
        # Another run may have replaced a corrupt manifest with a new plan meanwhile: our rows would not fit it.
        if planned != tensors["rows"].tolist():
            raise CorruptFileError(f"The plan of the response cache {folder} changed while this run was writing "
                                   "it (another run repaired the cache). Run again: finished shards are kept.")
        atomic_write(path, lambda p: save_file(tensors, str(p)))
        manifest["checksums"][str(i)] = file_checksum(path)
        # Processes sharing a plan finish its shards in any order; a lone run lists them by index.
        manifest["checksums"] = dict(sorted(manifest["checksums"].items(), key=lambda kv: int(kv[0])))
        atomic_write(manifest_path, lambda p: p.write_text(json.dumps(manifest)))


@torch.no_grad()
def token_responses(model: LoadedModel, sentences: Sequence[str], units: Sequence[int], *, unit_kind: str = "mlp",
                    max_length: int = 128) -> list[dict]:
    """The responses of a few ``units`` (global unit indices) at every token of each sentence, from
    one forward pass over ``sentences`` (nothing cached): what a pooled response is the max or mean of.

    Returns one dict per sentence: ``tokens``, the text of each token (special tokens left out, as
    pooling leaves them out), and ``values``, float32 of shape (n_tokens, len(units)), activation units.
    """
    sites = locate_units(model.model, unit_kind)
    offsets = np.cumsum([0] + [s.width for s in sites])
    units = np.asarray(units, dtype=np.int64)
    if not len(units) or units.min() < 0 or units.max() >= offsets[-1]:
        raise InvalidArgumentError(f"units must be indices in [0, {offsets[-1]}) and at least one; got {units.tolist()[:10]}.")
    layer_of = np.searchsorted(offsets, units, side="right") - 1
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int, neurons: torch.Tensor):
        def hook(_module, args):
            captured[layer] = args[0][..., neurons].float().cpu()
        return hook

    handles = [model.model.get_submodule(sites[layer].module_path).register_forward_pre_hook(
        capture(int(layer), torch.as_tensor(units[layer_of == layer] - offsets[layer], device=model.device)))
        for layer in np.unique(layer_of)]
    enc = _encode(model.tokenizer, list(sentences), max_length)
    try:
        decoder_stack(model.model)(input_ids=enc["input_ids"].to(model.device),
                                   attention_mask=enc["attention_mask"].to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    values = torch.empty(*enc["input_ids"].shape, len(units))
    for layer in np.unique(layer_of):
        values[..., torch.as_tensor(np.flatnonzero(layer_of == layer))] = captured[int(layer)]
    special = set(model.tokenizer.all_special_ids)
    out = []
    for row, ids in enumerate(enc["input_ids"].tolist()):
        keep = [i for i, t in enumerate(ids) if enc["attention_mask"][row, i] and t not in special]
        out.append({"tokens": [model.tokenizer.decode([ids[i]]) for i in keep],
                    "values": values[row, keep].numpy()})
    return out
