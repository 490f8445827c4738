"""Self-verifying saves: content hashes, save ids and range checks.

A saved expert set or steered model is a JSON file next to a safetensors file.
Either can be truncated, overwritten or swapped for one from another save, and
a loader that trusts them returns numbers that look fine and are not. So every
save stamps both files with one *save id* and the *content hash* of the arrays
(:func:`stamp`); :func:`load_verified` reads the arrays back and refuses them
unless the JSON's stamp, the safetensors header's stamp and the bytes agree.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

from .errors import CorruptFileError

STAMP_KEY = "integrity"


def content_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 (hex) of the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def file_checksum(path: str | Path, chunk: int = 1 << 24) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stamp(arrays: Mapping[str, np.ndarray], config: Mapping) -> dict[str, str]:
    """The save id and content hash of one save: store it in the JSON ``config`` (under
    ``"integrity"``) and as the metadata of the safetensors file holding ``arrays``.

    The save id hashes the JSON and the arrays together, so a JSON and a safetensors file
    from different saves disagree, while saving the same thing twice gives the same bytes.
    """
    digest = content_hash(arrays)
    return {"save_id": _save_id(config, digest), "content_hash": digest}


def _save_id(config: Mapping, digest: str) -> str:
    # Canonical JSON, as it reads back from disk (tuples as lists, keys as strings), so the
    # id computed at save time and the one recomputed at load time agree.
    body = json.loads(json.dumps({k: v for k, v in config.items() if k != STAMP_KEY}, default=str))
    return hashlib.sha256(f"{json.dumps(body, sort_keys=True)}|{digest}".encode()).hexdigest()[:32]


def header_metadata(stamped: Mapping[str, str]) -> dict[str, str]:
    """The safetensors metadata that carries a stamp: one key, because safetensors writes the
    keys of its metadata in no fixed order and the same save must give the same bytes."""
    return {STAMP_KEY: json.dumps(dict(stamped), sort_keys=True)}


def load_verified(path: str | Path, config: Mapping, what: str) -> dict[str, np.ndarray]:
    """The arrays of the safetensors file ``path``, checked against the stamp in ``config``:
    the same save id in both files, the arrays' content hash, and the JSON's own fields.

    Raises:
        CorruptFileError: no stamp, a stamp from another save, or bytes that changed since the save.
    """
    path = Path(path)
    expected = config.get(STAMP_KEY)
    if not isinstance(expected, dict) or not {"save_id", "content_hash"} <= set(expected):
        raise CorruptFileError(f"{path.parent} is not a valid {what}: its JSON has no integrity stamp "
                               "(saved by an older steer_experts, or edited). Save it again.")
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = json.loads((f.metadata() or {}).get(STAMP_KEY, "{}"))
        arrays = load_file(str(path))
    except (OSError, SafetensorError, ValueError, AttributeError) as err:
        raise CorruptFileError(f"{path} is not a readable safetensors file ({err}); the {what} is corrupt. "
                               "Save it again.") from None
    if not isinstance(header, dict) or header.get("save_id") != expected["save_id"]:
        header = header if isinstance(header, dict) else {}
        raise CorruptFileError(f"{path.parent} is not a valid {what}: {path.name} and its JSON come from "
                               f"different saves (save id {header.get('save_id')!r} vs {expected['save_id']!r}).")
    digest = content_hash(arrays)
    if digest != expected["content_hash"]:
        raise CorruptFileError(f"{path.parent} is not a valid {what}: the arrays in {path.name} changed after "
                               "they were saved (content hash mismatch). Save it again.")
    if _save_id(config, digest) != expected["save_id"]:
        raise CorruptFileError(f"{path.parent} is not a valid {what}: its JSON changed after it was saved "
                               "(its fields no longer give the save id). Save it again.")
    return arrays


def check_unit_interval(arrays: Mapping[str, np.ndarray], names: Iterable[str], where: str) -> None:
    """Raise :class:`CorruptFileError` unless every value of ``arrays[name]`` is in [0, 1]."""
    for name in names:
        a = np.asarray(arrays[name])
        if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise CorruptFileError(f"{where}: {name} has values outside [0, 1] or non-finite ones.")


def check_finite(arrays: Mapping[str, np.ndarray], names: Iterable[str], where: str) -> None:
    """Raise :class:`CorruptFileError` if any ``arrays[name]`` holds NaN or infinity."""
    for name in names:
        if not np.isfinite(np.asarray(arrays[name])).all():
            raise CorruptFileError(f"{where}: {name} holds non-finite values.")


def check_steered_save(config: Mapping, arrays: Mapping[str, np.ndarray], where: str) -> None:
    """Raise :class:`CorruptFileError` unless a steered model's plan arrays agree with its spec:
    AP/AUROC in [0, 1], the same concepts, at most k units per concept, AP > tau."""
    check_unit_interval(arrays, ("ap", "auroc"), where)
    check_finite(arrays, ("weight", "target"), where)
    spec = config["spec"]
    if set(config["concepts"]) != set(spec["concepts"]):
        raise CorruptFileError(f"{where}: the plan's concepts {config['concepts']} are not the spec's "
                               f"{sorted(spec['concepts'])}.")
    counts = np.bincount(np.asarray(arrays["concept"], dtype=np.int64), minlength=len(config["concepts"]))
    if spec.get("k") is not None and counts.size and counts.max() > spec["k"]:
        raise CorruptFileError(f"{where}: a concept holds {counts.max()} units but the spec asks for k={spec['k']}.")
    if spec.get("tau") is not None and len(arrays["ap"]) and np.asarray(arrays["ap"]).min() <= spec["tau"]:
        raise CorruptFileError(f"{where}: a unit has AP <= tau={spec['tau']}, which the spec excludes.")
