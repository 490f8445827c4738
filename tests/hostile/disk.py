"""Snapshots of folders on disk, to assert that a refused input wrote or changed nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: relative path -> sha256 of its bytes ("dir" for folders).

    The cache's lock file is left out: taking a lock is not writing data.
    """
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}
