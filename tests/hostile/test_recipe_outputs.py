"""Every recipe refuses an --out folder that holds files it did not write (here: a model folder),
with a one-line message and before any work, and leaves the folder as it was."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from .disk import tree

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

EXTRA = {
    "causal_validation": [], "concept_induction": [], "gender_parity": [], "human_alignment": ["--concepts", "nowhere"],
    "generate_concepts": [], "organisation": ["--expert-set", "nowhere"], "stability": ["--concepts", "nowhere"],
}


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"hostile_recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(EXTRA))
def test_recipe_refuses_a_foreign_out_folder(name, tiny_folder, tmp_path):
    # No stand-in for load_model here: recipe_io binds it at import, and the stand-in would outlive the test.
    out = tmp_path / "model"
    shutil.copytree(tiny_folder, out)
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as info:
        recipe(name).main(["--out", str(out), *EXTRA[name]])
    assert info.value.code == (f"error: Refusing to write the run output into {out}: it already holds files "
                               "steer_experts did not write (chat_template.jinja, model.safetensors), which a save could overwrite. "
                               "Choose a new or empty --out folder.")
    assert tree(tmp_path) == before
