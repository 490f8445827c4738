"""What every recipe shares: its command line, its output folder, its writers, its model and experts.

Output folder layout (``--out``)::

    run.json           settings that fix what a cell's results mean (model, prompts, sampling, seed);
                       a resumed run must match them, or it stops and says which differ
    experts/           the ExpertSet used (ExpertSet.save_pretrained), reused on resume
    cells/<id>.jsonl   one file per finished grid cell, written atomically: present = done
    samples.jsonl      every cell's rows together (rebuilt from cells/ at the end)
    *.csv, *.png, report.*   metrics, figures and the report

A killed run loses at most the cell in progress; the next run skips every cell
whose file exists and does no generation for it.

The shared data (OneSec concepts, MEN ratings) is found at ``--data``, else at
``$STEER_EXPERTS_DATA``, else at ``../shared/data`` beside the checkout.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from steer_experts.atomic import atomic_write, claim_output_folder, settings_changes
from steer_experts.concepts import ConceptSet
from steer_experts.discovery import discover
from steer_experts.errors import InvalidArgumentError, SteerExpertsError, UnknownConceptError
from steer_experts.experts import ExpertSet
from steer_experts.models import DTYPES, LoadedModel, load_model

DATA_ENV = "STEER_EXPERTS_DATA"
ONESEC = Path("concepts") / "onesec"
MEN = Path("human") / "men" / "MEN_dataset_natural_form_full"
MEN_AGREEMENT = Path("human") / "men" / "agreement-score.txt"
# What a recipe may find in its --out folder besides its own files: anything else is refused.
RUN_OUTPUT_NAMES = ("run.json", "cells", "experts", "means", "concepts", "baselines", "similarity", "models",
                    "curve", "cache", "*.json", "*.json.gz", "*.jsonl", "*.csv", "*.png", "*.txt", "*.md")
# Which model scores the other's text: perplexity under a *different* model, as the paper does.
CROSS_SCORER = {"smollm2-135m": "gemma3-270m", "gemma3-270m": "smollm2-135m"}


# --------------------------------------------------------------------------- command line


def shared_data(asked: str | None = None) -> Path:
    """The shared-data folder: ``asked`` (``--data``), else ``$STEER_EXPERTS_DATA``, else
    ``../shared/data`` beside the checkout; absolute, so results do not depend on the working directory."""
    root = asked or os.environ.get(DATA_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(root).resolve()


def recipe_parser(doc: str, *, experts: bool = True) -> argparse.ArgumentParser:
    """The options every recipe takes (--out, --model, --device, --dtype, --data, --seed, --threads,
    --cache-dir) and, with ``experts``, the ones that find its experts (--experts, --concepts, --concept)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N, mps, or auto (accelerate's device_map)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="the model's weights (scorers stay float32)")
    p.add_argument("--data", help=f"shared data folder (default: ${DATA_ENV}, else ../shared/data beside the checkout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a busy shared machine; use every core on a quiet one)")
    p.add_argument("--cache-dir", help="response cache root (default: the library's)")
    if experts:
        p.add_argument("--experts", help="a saved ExpertSet folder; default: discover from --concepts")
        p.add_argument("--concepts", help="concept data (ConceptSet.load; default: OneSec in the shared data)")
        p.add_argument("--concept", action="append", help="concept to run (repeatable); default: all")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, set the torch threads and fill the data defaults (``args.data`` becomes a Path)."""
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1; got {args.threads}.")
    torch.set_num_threads(args.threads)
    args.data = shared_data(args.data)
    if "concepts" in args and args.concepts is None and "experts" in args:
        args.concepts = str(args.data / ONESEC)
    return args


def numbers(text: str, kind: Callable = int) -> list:
    """``"0,1,3"`` -> ``[0, 1, 3]`` (with ``kind`` applied to each item)."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgumentError(f"Could not read {text!r} as a comma-separated list of {kind.__name__}s.") from None


def run_recipe(main: Callable) -> None:
    """Run a recipe's ``main`` as a script: a library error prints one line and exits 2, as the CLI does."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        main()
    except SteerExpertsError as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        sys.exit(2)


class Stopwatch:
    """Wall seconds per stage of a run, for its report (a stage reused from an earlier run takes ~0 s)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        """Time the ``with`` block as stage ``name``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - started

    def summary(self) -> dict:
        """``{"threads": torch threads, "stages": {name: s}, "total": s since creation}``, rounded to 0.1 s."""
        return {"threads": torch.get_num_threads(), "stages": {k: round(v, 1) for k, v in self.seconds.items()},
                "total": round(time.perf_counter() - self.started, 1)}

    def line(self) -> str:
        """The summary as one report line."""
        s = self.summary()
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in s["stages"].items())
        return f"- wall time of this run on {s['threads']} torch threads: {s['total']:.0f} s ({stages})"


# --------------------------------------------------------------------------- run folder


class RunFolder:
    """An output folder whose grid cells are stored one JSONL file each (see the module docstring)."""

    def __init__(self, out: str | Path, settings: dict | None = None):
        self.root = claim_output_folder(out, RUN_OUTPUT_NAMES, what="run output",
                                        remedy="Choose a new or empty --out folder.")
        self.cells = self.root / "cells"
        if settings is not None:
            self.cells.mkdir(parents=True, exist_ok=True)
            self._check_settings(settings)

    def _check_settings(self, settings: dict) -> None:
        changed = settings_changes(self.root / "run.json", settings)
        if changed:
            raise InvalidArgumentError(
                f"{self.root} holds results made with other settings ({', '.join(changed)}: "
                f"{[then for then, _ in changed.values()]} then, {[now for _, now in changed.values()]} now). "
                "Use another --out, or delete that folder to start over.")

    @staticmethod
    def cell_id(**key) -> str:
        """A file-safe name for a grid cell, e.g. ``football__experts__k300__alpha1``."""
        parts = []
        for name, value in key.items():
            text = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(text if name in ("concept", "condition", "value") else f"{name}{text}")
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", "__".join(parts))

    def done(self, cell: str) -> bool:
        """Whether ``cell`` has its results on disk."""
        return (self.cells / f"{cell}.jsonl").exists()

    def write_cell(self, cell: str, rows: Sequence[dict]) -> None:
        """Store a finished cell's rows atomically."""
        write_text(self.cells / f"{cell}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def read_cell(self, cell: str) -> list[dict]:
        """The rows of a finished cell."""
        return [json.loads(line) for line in (self.cells / f"{cell}.jsonl").read_text().splitlines() if line]

    def all_rows(self, cells: Iterable[str]) -> list[dict]:
        """The rows of ``cells`` in order, also written together to ``samples.jsonl``."""
        rows = [r for c in cells for r in self.read_cell(c)]
        write_text(self.root / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def write(self, name: str, content: str | dict | list) -> str:
        """Write ``content`` to ``name`` in the folder atomically (a dict or list as indented JSON);
        returns the text."""
        text = content if isinstance(content, str) else json.dumps(content, indent=1)
        write_text(self.root / name, text)
        return text

    def report(self, lines: Sequence[str], name: str = "report.txt") -> str:
        """Write ``lines`` as the run's report (atomically); returns the text."""
        return self.write(name, "\n".join(lines) + "\n")


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda p: Path(p).write_text(text))


def write_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` (dicts) as CSV atomically: columns are every key in first-seen order, a key
    missing from a row is left empty; floats keep 6 significant digits."""
    if not rows:
        raise InvalidArgumentError(f"no rows to write to {path}.")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return write_text(path, buffer.getvalue())


# --------------------------------------------------------------------------- models and experts


class LazyModel:
    """A model loaded on first use, so that a run whose cells are all done loads nothing."""

    def __init__(self, args: argparse.Namespace):
        self.name, self.device, self.dtype = args.model, args.device, args.dtype
        self._loaded: LoadedModel | None = None

    def get(self, expert_set: ExpertSet | None = None) -> LoadedModel:
        """The loaded model (loads it the first time); checked against ``expert_set`` if given."""
        if self._loaded is None:
            self._loaded = load_model(self.name, dtype=self.dtype, device=self.device)
        if expert_set is not None:
            expert_set.check_model(self._loaded)
        return self._loaded


def cross_scorer(args: argparse.Namespace) -> LoadedModel | None:
    """The model that scores another model's text: ``--scorer`` (``"none"`` for no scorer), else the
    other embedded model (Gemma-3-270M for SmolLM2 and the reverse). None when there is none."""
    name = args.scorer or CROSS_SCORER.get(args.model)
    if name is None or name == "none":
        return None
    return load_model(name, device=args.device)


def experts_for(model: LazyModel, args: argparse.Namespace, names: Sequence[str] | None = None,
                contrast: bool = False) -> tuple[ExpertSet, list[str]]:
    """The ExpertSet of a recipe and the resolved names of the concepts to run (``names``, default
    ``--concept``, default all): ``--experts`` if given, else the one saved in ``<out>/experts``, else
    discovered from ``--concepts`` one concept at a time (``contrast``: against the others' positives
    too) and saved there. The model is loaded only to discover."""
    names = names if names is not None else args.concept
    saved = Path(args.out) / "experts"
    if args.experts:
        expert_set = ExpertSet.from_pretrained(args.experts)
    elif (saved / "expert_set.json").exists():
        expert_set = ExpertSet.from_pretrained(saved)
    else:
        # Negatives are sampled from all the concepts given, before keeping the ones asked for.
        concept_set = ConceptSet.load(args.concepts).with_sampled_negatives(seed=0)
        if names:
            concept_set = concept_set.subset(list(names))
        expert_set = discover(model.get(), concept_set, negatives="contrast" if contrast else "per_concept",
                              cache_dir=args.cache_dir)
        expert_set.save_pretrained(saved)
    try:
        return expert_set, [expert_set.concepts[expert_set.concept_index(n)] for n in names or expert_set.concepts]
    except UnknownConceptError as err:
        raise UnknownConceptError(f"{err} Use another --out, or pass --experts.") from None
