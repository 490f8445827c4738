"""Atomic writes and output folders, used by every stage that persists something.

A killed run leaves either the old file or the new one, never half of one:
write to a temporary name in the same folder, then ``os.replace``.

A save never overwrites a file it did not write: :func:`claim_output_folder`
refuses a non-empty folder that holds anything but the names that save writes,
unless the caller passes ``overwrite=True``. The names are the evidence that a
folder is ours, so no marker file is needed (and none reaches the Hub).
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Callable, Iterable

from .errors import OutputFolderError


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path``; returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def settings_changes(path: str | Path, settings: dict) -> dict[str, tuple]:
    """Compare ``settings`` (JSON-able) with the settings saved at ``path`` by an earlier run:
    ``{key: (then, now)}`` for every key whose value differs, sorted by key. With no file there
    yet, the settings are written (atomically) and nothing differs. Resuming runs call this so
    that results made with other settings are never mixed with new ones."""
    path = Path(path)
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they come back from disk
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: p.write_text(json.dumps(settings, indent=1)))
        return {}
    old = json.loads(path.read_text())
    return {k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)}


def file_safe(name: str, keep: str = "-_", last: int | None = None) -> str:
    """``name`` as a file name: every character but letters, digits and ``keep`` becomes ``_``; with
    ``last``, only its last ``last`` characters. Callers fix ``keep`` and ``last`` once, because the
    names they give must stay stable for resuming (a response cache, a concept's written sentences)."""
    safe = "".join(ch if ch.isalnum() or ch in keep else "_" for ch in name)
    return safe[-last:] if last else safe


def _foreign_entries(folder: Path, ours: Iterable[str]) -> list[str]:
    # Temporary names are what a killed save of ours leaves behind.
    patterns = list(ours) + [".*.tmp", ".*.partial"]
    return sorted(p.name for p in folder.iterdir() if not any(fnmatch.fnmatch(p.name, pat) for pat in patterns))


OVERWRITE_REMEDY = "Choose a new or empty folder, or pass overwrite=True (--overwrite) to write anyway."


def check_output_folder(folder: str | Path, ours: Iterable[str] = (), *, overwrite: bool = False,
                        what: str = "output", remedy: str = OVERWRITE_REMEDY) -> Path:
    """Raise :class:`OutputFolderError` unless ``folder`` may be written by us; writes nothing.

    ``folder`` may be written when it does not exist yet (and its nearest existing parent is a
    writable folder), is empty, or holds only names matching the glob patterns ``ours`` (an
    earlier save of ours). ``overwrite=True`` accepts any folder.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"Cannot write the {what} to {folder}: it is a file, not a folder.")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputFolderError(f"Cannot write the {what} to {folder}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(f"Cannot write the {what} to {folder}: {existing} is not writable.")
    if folder.is_dir() and not overwrite:
        foreign = _foreign_entries(folder, ours)
        if foreign:
            raise OutputFolderError(
                f"Refusing to write the {what} into {folder}: it already holds files steer_experts did not "
                f"write ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}), which a save could "
                f"overwrite. {remedy}"
            )
    return folder


def claim_output_folder(folder: str | Path, ours: Iterable[str] = (), *, overwrite: bool = False,
                        what: str = "output", remedy: str = OVERWRITE_REMEDY) -> Path:
    """Check ``folder`` with :func:`check_output_folder` and create it; returns it.

    Raises:
        OutputFolderError: the folder holds files we did not write (and ``overwrite`` is False),
            or it is a file, or it cannot be written.
    """
    folder = check_output_folder(folder, ours, overwrite=overwrite, what=what, remedy=remedy)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(f"Cannot write the {what} to {folder}: {err.strerror or err}.") from None
    return folder


# What the recipes write in their --out folder (files, and the folders they fill): a folder
# holding only such names is a recipe's own, e.g. an earlier run to resume.
