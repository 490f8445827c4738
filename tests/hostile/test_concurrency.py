"""Two real processes on one response cache, with different batch sizes, at the same time: both must end
with the responses and expertise of a clean run (one plan, never a mix of two)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .disk import tree

REPO_ROOT = Path(__file__).resolve().parents[2]

# Planning is made slow (as tokenising a large corpus is), and both processes start it together,
# so that without a lock both would plan before either wrote the manifest.
_RUN = r"""
import json, sys, time
from pathlib import Path
import numpy as np
import steer_experts.responses as responses
from steer_experts.concepts import ConceptSet
from steer_experts.discovery import discover
from steer_experts.models import load_model

model_dir, concepts_file, barrier, jobs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
model = load_model(model_dir)
concepts = ConceptSet.load(concepts_file)
if barrier != "-":
    plan = responses._plan

    def slow_plan(*a, **k):
        time.sleep(1.5)
        made = plan(*a, **k)
        Path(barrier + "-plans").mkdir(exist_ok=True)
        Path(barrier + "-plans", jobs[0]["out"].replace("/", "_")).write_text(json.dumps(made))
        return made

    responses._plan = slow_plan
    Path(barrier, jobs[0]["out"].replace("/", "_")).touch()
    while len(list(Path(barrier).iterdir())) < 2:
        time.sleep(0.01)
for job in jobs:  # [{"cache", "batch_size", "out"}], one after the other
    b = job["batch_size"]
    # Small shards, so that two plans would split the sentences differently across files.
    r = responses.collect_responses(model, concepts.with_sampled_negatives().sentences, batch_size=b,
                                    shard_size=2 * b, cache_dir=job["cache"], progress=False)
    experts = discover(model, concepts, batch_size=b, cache_dir=job["cache"], progress=False)
    np.savez(job["out"], responses=r.to_numpy(), ap=experts.expertise.ap, auroc=experts.expertise.auroc)
"""


def _start(tiny_folder, concepts, barrier, jobs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    jobs = [{"cache": str(c), "batch_size": b, "out": str(o)} for c, b, o in jobs]
    return subprocess.Popen([sys.executable, "-c", _RUN, str(tiny_folder), str(concepts), str(barrier),
                             json.dumps(jobs)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process):
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]


def test_two_processes_with_different_batch_sizes_never_mix_plans(tiny_folder, tmp_path):
    words = ["goal", "song", "rain", "bread", "train", "river", "match", "piano"]
    rows = [{"concept": c, "text": f"{w.capitalize()} number {i} is about {c}."} for c in ("football", "music")
            for i, w in enumerate(words)]
    rows += [{"concept": c, "text": f"Nothing here about it, {w} {i}.", "label": 0} for c in ("football", "music")
             for i, w in enumerate(words)]
    concepts = tmp_path / "c.jsonl"
    concepts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "barrier").mkdir()

    racing = [_start(tiny_folder, concepts, tmp_path / "barrier", [(tmp_path / "shared", b, tmp_path / f"race{b}.npz")])
              for b in (2, 3)]
    for p in racing:
        _finish(p)
    # Clean runs, one at a time, each on its own cache.
    _finish(_start(tiny_folder, concepts, "-", [(tmp_path / f"clean{b}", b, tmp_path / f"clean{b}.npz") for b in (2, 3)]))

    # With the lock, the second process finds the first one's manifest and never plans.
    plans = list((tmp_path / "barrier-plans").iterdir())
    assert len(plans) == 1
    manifest = next((tmp_path / "shared").rglob("manifest.json"))
    assert json.loads(manifest.read_text())["shards"] == json.loads(plans[0].read_text())[0]
    race = [np.load(tmp_path / f"race{b}.npz") for b in (2, 3)]
    clean = [np.load(tmp_path / f"clean{b}.npz") for b in (2, 3)]
    for key in ("responses", "ap", "auroc"):
        assert np.array_equal(race[0][key], race[1][key]), key
        # Whichever process planned first fixed the batching for both: the result is that clean run's.
        assert any(np.array_equal(race[0][key], c[key]) for c in clean), key
    shared = tree(tmp_path / "shared")
    assert len([k for k in shared if k.endswith("manifest.json")]) == 1
    assert not [k for k in shared if k.split("/")[-1].startswith(".") and k.endswith(".tmp")]


def test_lock_is_held_while_the_manifest_is_written(tiny, tmp_path):
    """In one process: a second collection waits for the first's lock instead of planning on its own."""
    import threading

    import steer_experts.responses as responses

    sentences = [f"Sentence number {i} about nothing." for i in range(6)]
    folder = responses.response_cache_folder(tiny, sentences, "mlp", "max", 128, tmp_path)
    folder.mkdir(parents=True)
    order = []

    def hold():
        with responses._locked(folder):
            order.append("held")
            time.sleep(0.5)
            order.append("released")

    t = threading.Thread(target=hold)
    t.start()
    while not order:
        time.sleep(0.01)
    responses.collect_responses(tiny, sentences, cache_dir=tmp_path, progress=False)
    order.append("collected")
    t.join()
    assert order == ["held", "released", "collected"]
