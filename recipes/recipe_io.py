"""Plumbing shared by the steering recipes: output layout, resumable cells, experts, scorers.

Output folder layout (``--out``)::

    run.json           settings that fix what a cell's results mean (model, prompts, sampling, seed);
                       a resumed run must match them, or it stops and says which differ
    experts/           the ExpertSet used (ExpertSet.save_pretrained), reused on resume
    cells/<id>.jsonl   one file per finished grid cell, written atomically: present = done
    samples.jsonl      every cell's rows together (rebuilt from cells/ at the end)
    *.csv, *.png, report.txt   metrics, figures and the text report

A killed run loses at most the cell in progress; the next run skips every cell
whose file exists and does no generation for it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from steer_experts.atomic import atomic_write, claim_script_output
from steer_experts.concepts import Concept, ConceptSet
from steer_experts.evaluation import bootstrap_interval
from steer_experts.experts import ExpertSet, discover
from steer_experts.expertise import ConceptRows, Expertise, compute_expertise
from steer_experts.models import LoadedModel, load_model
from steer_experts.responses import collect_responses
from steer_experts.steering import SteeredModel

ONESEC = Path(__file__).resolve().parents[2] / "shared" / "data" / "concepts" / "onesec"

# Which model scores the other's text: perplexity under a *different* model, as the paper does.
CROSS_SCORER = {"smollm2-135m": "gemma3-270m", "gemma3-270m": "smollm2-135m"}


# --------------------------------------------------------------------------- run folder


class RunFolder:
    """An output folder whose grid cells are stored one JSONL file each (see the module docstring)."""

    def __init__(self, out: str | Path, settings: dict):
        self.root = claim_script_output(out)
        self.cells = self.root / "cells"
        self.cells.mkdir(parents=True, exist_ok=True)
        self._check_settings(settings)

    def _check_settings(self, settings: dict) -> None:
        path = self.root / "run.json"
        settings = json.loads(json.dumps(settings))  # tuples -> lists, as they come back from disk
        if path.exists():
            old = json.loads(path.read_text())
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if changed:
                raise SystemExit(
                    f"{self.root} holds results made with other settings ({', '.join(changed)}: "
                    f"{[old.get(k) for k in changed]} then, {[settings.get(k) for k in changed]} now). "
                    "Use another --out, or delete that folder to start over.")
        else:
            write_text(path, json.dumps(settings, indent=1))

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


def set_threads(n: int) -> None:
    """Use ``n`` torch threads. One is the default of the recipes: on a machine whose cores are
    shared with other jobs, two spinning OpenMP threads ran generation 6-15x slower than one."""
    if n < 1:
        raise SystemExit(f"--threads must be at least 1; got {n}.")
    torch.set_num_threads(n)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda p: Path(p).write_text(text))


def save_report(out: str | Path, lines: Sequence[str]) -> str:
    """Write ``lines`` as the run's ``report.txt`` (atomically); returns the text."""
    text = "\n".join(lines) + "\n"
    write_text(Path(out) / "report.txt", text)
    return text


def write_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` (dicts) as CSV atomically: columns are every key in first-seen order, a key
    missing from a row is left empty; floats keep 6 significant digits."""
    if not rows:
        raise ValueError(f"no rows to write to {path}.")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return write_text(path, buffer.getvalue())


def parse_numbers(text: str, kind: Callable = int) -> list:
    """``"0,1,3"`` -> ``[0, 1, 3]`` (with ``kind`` applied to each item)."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"Could not read {text!r} as a comma-separated list of {kind.__name__}s.") from None


# --------------------------------------------------------------------------- experts


def merge_expert_sets(parts: Sequence[ExpertSet]) -> ExpertSet:
    """One ExpertSet holding the concepts of several (same model, same units), in order."""
    first = parts[0]
    for p in parts[1:]:
        if p.model_fingerprint != first.model_fingerprint or p.n_units != first.n_units:
            raise ValueError("Expert sets to merge must come from the same model and units.")
    stack = {s: np.concatenate([getattr(p.expertise, s) for p in parts]) for s in Expertise.STATS}
    expertise = Expertise(concepts=[c for p in parts for c in p.concepts], **stack,
                          n_positives=np.concatenate([p.expertise.n_positives for p in parts]),
                          n_negatives=np.concatenate([p.expertise.n_negatives for p in parts]))
    metadata = dict(first.metadata, discovered="each concept against its own negatives")
    return ExpertSet(expertise, first.sites, first.model_name, first.model_fingerprint, first.unit_kind, metadata)


def discover_each(model: LoadedModel, concepts: ConceptSet, cache_dir: str | None = None,
                  progress: bool = True) -> ExpertSet:
    """Find the experts of each concept on its own sentences (its positives and its negatives).

    One concept at a time, as in the paper: every concept is scored against its own
    negatives, and each concept's unit responses are cached under its own sentences,
    so recipes asking for different groups of concepts share the cache. Concepts
    without negatives first get them sampled from the others' positives (seed 0).
    """
    concepts = concepts.with_sampled_negatives(seed=0)
    return merge_expert_sets([discover(model, concepts.subset([name]), cache_dir=cache_dir, progress=progress)
                              for name in concepts.names])


def rows_of(concepts: Sequence[Concept], sentences: Sequence[str]) -> ConceptRows:
    """``concepts`` (with negatives) as row indices into ``sentences``, which must hold all their sentences."""
    row = {s: i for i, s in enumerate(sentences)}
    return ConceptRows([c.name for c in concepts],
                           [np.array([row[s] for s in c.positives], dtype=np.int64) for c in concepts],
                           [np.array([row[s] for s in c.negatives], dtype=np.int64) for c in concepts])


def discover_contrast(model: LoadedModel, concepts: ConceptSet, cache_dir: str | None = None,
                      progress: bool = True) -> ExpertSet:
    """Experts of each concept against its own negatives *and the other concepts' positives*.

    For concepts that share a theme (man and woman: 40% of OneSec's "man" positives
    mention women), units that respond to the theme rank high for both concepts;
    contrasting them keeps the units that tell one concept from the other. Each
    concept's responses come from the per-concept cache that :func:`discover_each` fills.
    """
    concepts = concepts.with_sampled_negatives(seed=0)
    sentences: list[str] = []
    blocks, sites = [], None
    for name in concepts.names:
        part = concepts.subset([name]).sentences
        responses = collect_responses(model, part, cache_dir=cache_dir, progress=progress)
        sites = responses.sites
        seen = set(sentences)
        new = [i for i, s in enumerate(part) if s not in seen]
        blocks.append(responses.to_numpy()[new])
        sentences += [part[i] for i in new]
    expertise = compute_expertise(np.concatenate(blocks), rows_of(contrasted(concepts).concepts, sentences),
                                  progress=progress)
    metadata = {"negatives": "own negatives + the other concepts' positives", "n_sentences": len(sentences)}
    return ExpertSet(expertise, sites, model.name, model.fingerprint, "mlp", metadata)


def contrasted(concepts: ConceptSet) -> ConceptSet:
    """Each concept with the other concepts' positives added to its own negatives (sample
    negatives first: ``ConceptSet.with_sampled_negatives``)."""
    out = []
    for c in concepts.concepts:
        own = set(c.positives)
        others = [s for o in concepts.concepts if o.name != c.name for s in o.positives if s not in own]
        out.append(Concept(c.name, c.positives, tuple(dict.fromkeys(c.negatives + tuple(others))), c.group))
    return ConceptSet(out)


class LazyModel:
    """A model loaded on first use, so that a run whose cells are all done loads nothing."""

    def __init__(self, name: str):
        self.name = name
        self._loaded: LoadedModel | None = None

    def get(self, expert_set: ExpertSet | None = None) -> LoadedModel:
        """The loaded model (loads it the first time); checked against ``expert_set`` if given."""
        if self._loaded is None:
            self._loaded = load_model(self.name)
        if expert_set is not None:
            expert_set.check_model(self._loaded)
        return self._loaded


def experts_for(model: LazyModel, out: Path, experts: str | None, concepts: str, names: Sequence[str] | None,
                cache_dir: str | None = None, contrast: bool = False) -> ExpertSet:
    """The ExpertSet of a recipe: ``--experts`` if given, else the one saved in ``out/experts``,
    else discovered from ``--concepts`` (restricted to ``names``; with ``contrast``, by
    :func:`discover_contrast`, else :func:`discover_each`) and saved there.

    The model is loaded only to discover; steer with ``model.get(expert_set)``, which
    checks that the set was found on that model.
    """
    if experts:
        return ExpertSet.from_pretrained(experts)
    saved = out / "experts"
    if (saved / "expert_set.json").exists():
        expert_set = ExpertSet.from_pretrained(saved)
    else:
        # Negatives are sampled from all the concepts given, before keeping the ones asked for.
        concept_set = ConceptSet.load(concepts).with_sampled_negatives(seed=0)
        if names:
            concept_set = concept_set.subset(list(names))
        if contrast:
            discover_each(model.get(), concept_set, cache_dir=cache_dir)  # fills each concept's response cache
            expert_set = discover_contrast(model.get(), concept_set, cache_dir=cache_dir)
        else:
            expert_set = discover_each(model.get(), concept_set, cache_dir=cache_dir)
        expert_set.save_pretrained(saved)
    if names:
        missing = [n for n in names if not _known(expert_set, n)]
        if missing:
            raise SystemExit(f"{saved} has no experts for {missing} (it holds {expert_set.concepts}). "
                             "Use another --out, or pass --experts.")
    return expert_set


def _known(expert_set: ExpertSet, name: str) -> bool:
    try:
        expert_set.concept_index(name)
        return True
    except KeyError:
        return False


def concept_names(expert_set: ExpertSet, asked: Sequence[str] | None) -> list[str]:
    """The resolved concept names to run: ``asked`` (words or full names), or all of the set."""
    if not asked:
        return expert_set.concepts
    return [expert_set.concepts[expert_set.concept_index(a)] for a in asked]


# --------------------------------------------------------------------------- scoring


def cross_scorer(model_name: str, asked: str | None) -> LoadedModel | None:
    """The model that scores another model's text: ``asked`` (``"none"`` for no scorer), else the
    other embedded model (Gemma-3-270M for SmolLM2 and the reverse). None when there is none."""
    name = asked or CROSS_SCORER.get(model_name)
    if name is None or name == "none":
        return None
    return load_model(name)


class SteeredScorer(torch.nn.Module):
    """A steered model seen as a plain module, so ``evaluation.perplexity`` can score with it.

    The forward runs :meth:`SteeredModel.__call__` (steered at every position), so the
    perplexity it gives is that of the steered model itself. The base model is a
    submodule only so that ``parameters()``, ``eval()`` and ``.config`` reach it.
    """

    def __init__(self, steered: SteeredModel):
        super().__init__()
        self.steered = steered
        self.base = steered.base.model
        self.config = self.base.config

    def forward(self, input_ids, attention_mask):
        return self.steered(input_ids=input_ids, attention_mask=attention_mask)


def word_token_ids(tokenizer, context: str, word: str) -> list[int]:
    """Token ids of `` word`` as it follows ``context``: the tail of tokenize(context + " " + word)
    when the context's own tokens are its head (the natural split), else `` word`` tokenised alone."""
    head = tokenizer(context)["input_ids"]
    full = tokenizer(context + " " + word)["input_ids"]
    if full[: len(head)] == head and len(full) > len(head):
        return full[len(head):]
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"]


def next_word_probability(scorer: torch.nn.Module, tokenizer, contexts: Sequence[str], words: Sequence[str],
                          batch_size: int = 64) -> np.ndarray:
    """Probability that the continuation of each context begins with each word, shape (contexts, words).

    Exact under ``scorer`` (a causal LM module, e.g. a :class:`SteeredScorer`): the product
    of the probabilities of the word's tokens (chain rule), so one forward pass per
    (context, word) and no sampling. It counts the continuation's first tokens, so a
    derived word that starts with the same tokens ("footballer" after " football") counts too.
    Rows of words that share a token prefix overlap; see :func:`distinct_forms`.
    """
    contexts, words = list(contexts), list(words)
    items = []
    for c in contexts:
        head = tokenizer(c)["input_ids"]
        for w in words:
            items.append((head, word_token_ids(tokenizer, c, w)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(scorer.parameters()).device
    log_p = np.empty(len(items))
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            width = max(len(h) + len(w) for h, w in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (h, w) in enumerate(batch):  # right padding: positions stay those of generation
                ids[row, : len(h) + len(w)] = torch.tensor(h + w)
                mask[row, : len(h) + len(w)] = 1
            logits = scorer(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1).cpu()
            for row, (h, w) in enumerate(batch):
                positions = torch.arange(len(h) - 1, len(h) + len(w) - 1)
                log_p[start + row] = float(log_probs[row, positions, torch.tensor(w)].sum())
    return np.exp(log_p).reshape(len(contexts), len(words))


def distinct_forms(tokenizer, context: str, forms: Sequence[str]) -> list[str]:
    """The forms whose tokens after ``context`` do not start with another kept form's tokens,
    so that summing their :func:`next_word_probability` counts no continuation twice."""
    ids = {f: word_token_ids(tokenizer, context, f) for f in dict.fromkeys(forms)}
    kept: list[str] = []
    for form in sorted(ids, key=lambda f: (len(ids[f]), f)):
        if not any(ids[form][: len(ids[k])] == ids[k] for k in kept):
            kept.append(form)
    return kept


# --------------------------------------------------------------------------- statistics


def rate_row(flags: Sequence[bool] | np.ndarray, prefix: str, seed: int, n_resamples: int = 1000) -> dict:
    """``{prefix: estimate, prefix_low, prefix_high}``: a rate with its 95% percentile-bootstrap interval."""
    estimate, low, high = bootstrap_interval(np.asarray(flags, dtype=float), n_resamples=n_resamples, seed=seed)
    return {prefix: estimate, f"{prefix}_low": low, f"{prefix}_high": high}


def mean_row(values: Sequence[float] | np.ndarray, prefix: str, seed: int, n_resamples: int = 1000) -> dict:
    """Mean of the finite ``values`` with its 95% bootstrap interval (NaN when none is finite)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {prefix: float("nan"), f"{prefix}_low": float("nan"), f"{prefix}_high": float("nan")}
    estimate, low, high = bootstrap_interval(values, n_resamples=n_resamples, seed=seed)
    return {prefix: estimate, f"{prefix}_low": low, f"{prefix}_high": high}


def difference_row(a: np.ndarray, b: np.ndarray, prefix: str, seed: int, n_resamples: int = 1000) -> dict:
    """mean(a) - mean(b) with a 95% bootstrap interval, ``a`` and ``b`` resampled independently."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    diffs = np.array([a[rng.integers(0, a.size, a.size)].mean() - b[rng.integers(0, b.size, b.size)].mean()
                      for _ in range(n_resamples)])
    low, high = np.quantile(diffs, [0.025, 0.975])
    return {prefix: float(a.mean() - b.mean()), f"{prefix}_low": float(low), f"{prefix}_high": float(high)}
