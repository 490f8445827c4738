"""The public surface: what ``import steer_experts`` offers, and the promises README makes about it."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import steer_experts
from steer_experts.errors import SteerExpertsError

PACKAGE = Path(steer_experts.__file__).resolve().parent
# README's reading order of the core modules: none imports one listed after it.
PIPELINE = ("errors", "atomic", "integrity", "hub", "distributed", "words", "concepts", "models", "units", "writing",
            "responses", "expertise", "experts", "discovery", "effects", "interventions", "model_card", "steering",
            "diffmean", "prompting", "calibration", "figures", "cli")


def test_every_exported_name_exists_and_is_documented():
    for name in steer_experts.__all__:
        obj = getattr(steer_experts, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"steer_experts.{name} has no docstring"


def test_every_library_error_derives_from_one_base():
    errors = [obj for name in steer_experts.__all__ if inspect.isclass(obj := getattr(steer_experts, name))
              and issubclass(obj, Exception)]
    assert len(errors) >= 8 and all(issubclass(e, SteerExpertsError) for e in errors)


def test_a_unit_kind_can_be_registered_with_the_exported_site_type():
    assert "register_unit_kind" in steer_experts.__all__ and "UnitSite" in steer_experts.__all__
    assert steer_experts.UnitSite(0, "model.layers.0.mlp.down_proj", 8).pyvene_component \
        == "model.layers[0].mlp.down_proj.input"


def _imported_modules(module: str) -> set[str]:
    """The core modules that ``module`` (a module, or a subpackage's files) imports (``from .x import ...``;
    ``from ..x`` inside a subpackage), wherever the import sits."""
    path = PACKAGE / module
    files, level = (sorted(path.glob("*.py")), 2) if path.is_dir() else ([path.with_suffix(".py")], 1)
    names = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == level and node.module:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", PIPELINE)
def test_no_stage_imports_a_later_one(module):
    later = set(PIPELINE[PIPELINE.index(module) + 1:])
    assert _imported_modules(module) & later == set()


def test_the_core_never_reaches_into_the_lens_or_the_atlas():
    for module in PIPELINE[:-1]:  # the CLI exposes the lens queries and builds the atlas
        assert not {"lens", "atlas"} & _imported_modules(module), module


def test_every_public_function_has_a_docstring():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "metrics" in path.parts:  # the evaluate scripts follow evaluate's own layout
            continue
        for node in ast.parse(path.read_text()).body:
            methods = [n for n in node.body if isinstance(n, ast.FunctionDef)] if isinstance(node, ast.ClassDef) else []
            for n in [node, *methods]:
                if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_") \
                        and ast.get_docstring(n) is None:
                    missing.append(f"{path.relative_to(PACKAGE)}:{n.lineno} {n.name}")
    # Methods whose contract is their protocol's (torch's forward, LabelledRows' members) need none.
    allowed = {"forward", "names", "positive_indices", "negative_indices"}
    assert [m for m in missing if m.rsplit(" ", 1)[1] not in allowed] == []
