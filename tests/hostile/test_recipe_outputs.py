"""Every recipe refuses an --out folder that holds files it did not write (here: a model folder),
with a one-line message and before any work, and leaves the folder as it was."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from steer_experts.errors import OutputFolderError

from ..helpers import RECIPES, ROOT, recipe
from .disk import tree

EXTRA = {
    "causal_validation": [], "concept_induction": [], "gender_parity": [], "human_alignment": ["--concepts", "nowhere"],
    "generate_concepts": [], "organisation": ["--experts", "nowhere"], "stability": ["--concepts", "nowhere"],
}


@pytest.mark.parametrize("name", list(EXTRA))
def test_recipe_refuses_a_foreign_out_folder(name, tiny_folder, tmp_path):
    # No stand-in for load_model here: _common binds it at import, and the stand-in would outlive the test.
    out = tmp_path / "model"
    shutil.copytree(tiny_folder, out)
    before = tree(tmp_path)
    with pytest.raises(OutputFolderError) as info:
        recipe(name, "hostile_recipe").main(["--out", str(out), *EXTRA[name]])
    assert str(info.value) == (f"Refusing to write the run output into {out}: it already holds files "
                               "steer_experts did not write (chat_template.jinja, model.safetensors), which a save could overwrite. "
                               "Choose a new or empty --out folder.")
    assert tree(tmp_path) == before


def test_a_recipe_run_as_a_script_from_elsewhere_says_one_line(tiny_folder, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_folder, out)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(RECIPES / "organisation.py"), "--out", str(out), "--experts", "nowhere"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("organisation.py: error: Refusing to write the run output into")
    assert len(done.stderr.strip().splitlines()) == 1
