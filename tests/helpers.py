"""Helpers the test folders share: loading a recipe script as a module, and reading its outputs."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
EXAMPLES = ROOT / "examples" / "concepts.jsonl"


def recipe(name: str, prefix: str = "recipe"):
    """The recipe ``recipes/<name>.py`` loaded as a fresh module (its ``main(argv)`` runs it)."""
    spec = importlib.util.spec_from_file_location(f"{prefix}_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV file as dicts of strings."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def is_png(path: Path) -> bool:
    """Whether ``path`` starts with the PNG signature."""
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
