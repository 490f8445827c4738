"""Steering frontier: concept score against perplexity, experts against DiffMean and prompting.

The AxBench protocol, offline. For each concept, every method's strength is swept
on one half of the neutral prompts (the *dev* half); each method's operating
point -- its highest concept score whose perplexity is within a budget
(``--ppl-budgets``, by default 1.5 and 2 times the unsteered one) -- is chosen
there, then generated again and reported on the other half (the *test* half),
with 95% bootstrap intervals over test prompts.

Methods (each one family of settings; ``--methods`` picks some):

* ``experts`` -- the mission's intervention: the top-k experts by AP set to their
  median response on positives (on_p50) at every position; k and alpha swept.
* ``experts_late`` -- the same without layers 0-1, whose top experts are lexical
  detectors of the word itself.
* ``experts_clamp`` -- clamp-up, z <- max(z, on_p50): experts are never lowered.
* ``experts_aligned`` -- experts ranked by AP x their push along the concept's
  DiffMean direction (``diffmean.aligned_scores``) instead of AP alone.
* ``experts_promoting`` -- the mission's intervention on the top-k experts by AP among
  units whose write raises the concept word's logit (``effects.promoting_scores``):
  about half of the top experts lower the word itself.
* ``experts_add`` -- the top-k experts by AP each shifted by alpha x the concept's
  token-level difference of mean responses, positives minus negatives
  (``diffmean.unit_shifts``), instead of set to a max-pooled value.
* ``random`` -- k random units set to their on_p50 (the control).
* ``diffmean`` -- the unit DiffMean direction added at one layer's residual stream,
  factor x the layer's median token norm; layer and factor swept (as many cells
  as the first four expert variants together).
* ``prompt`` -- an instruction to write about the concept, in the chat template.

``--grid`` replaces a method's settings: DiffMean's are ``layer`` and ``factor``; an expert
family's (and random's) are :func:`steer`'s own arguments -- exactly one of ``k`` and
``per_layer``, and optionally ``alpha``, ``value`` (e.g. ``"on_p90"``) and ``positions``
(``"generated"``) -- so ``recipes/grids/variants.json`` measures those choices too.

The best expert variant is chosen on dev among the ``experts*`` families.
Scores of a text: the concept classifier (logistic regression on all-MiniLM-L6-v2
embeddings, fitted on the concept's positives vs negatives; its held-out
accuracy is reported), p(word) (the concept word or its inflections), perplexity
of the continuation given its prompt under a *different* model (Gemma-3-270M for
SmolLM2; a cell's perplexity is exp of its mean token NLL, so texts weigh by their
length), distinct-2 and Self-BLEU-4 (per prompt).

Outputs (``--out``; see _common for the folder layout): cells/*.jsonl (texts
and perplexities, one file per cell; a killed run resumes), means/*.safetensors
(DiffMean statistics), frontier.csv (every cell), operating_points.csv (the test
half), report.md, frontier_<concept>.png.

With ``--contrast``, every concept's negatives also hold the other concepts' positives,
for the experts, DiffMean, the unit shifts and the classifier alike (man and woman:
40% of OneSec's "man" positives mention women).

    python recipes/steering_frontier.py --out out/frontier --concept football --concept man --concept woman
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, from any working directory

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from _common import (  # noqa: E402
    LazyModel, RunFolder, cross_scorer, experts_for, parse, recipe_parser, run_recipe, write_csv, write_text,
)
from steer_experts.atomic import atomic_write  # noqa: E402
from steer_experts.concepts import ConceptSet  # noqa: E402
from steer_experts.diffmean import (  # noqa: E402
    ResidualMeans, aligned_scores, residual_means, steer_diffmean, unit_shifts,
)
from steer_experts.effects import promoting_scores  # noqa: E402
from steer_experts.errors import InvalidArgumentError  # noqa: E402
from steer_experts.evaluation import concept_presence, distinct_n, perplexity, self_bleu  # noqa: E402
from steer_experts.evaluation.concept_score import ConceptClassifier  # noqa: E402
from steer_experts.evaluation.prompts import FRONTIER_PROMPTS  # noqa: E402
from steer_experts.evaluation.sentence_encoder import SentenceEncoder  # noqa: E402
from steer_experts.prompting import steer_prompt  # noqa: E402
from steer_experts.steering import steer  # noqa: E402
from steer_experts.words import concept_word, concept_words  # noqa: E402

SAMPLING = {"paper": dict(temperature=1.0, top_k=10), "nucleus": dict(temperature=0.7, top_p=0.9)}
EXPERT_VARIANTS = ("experts", "experts_late", "experts_clamp", "experts_aligned", "experts_promoting", "experts_add")
METHODS = (*EXPERT_VARIANTS, "random", "diffmean", "prompt")
EXPERT_SETTING = ("k", "per_layer", "alpha", "value", "positions")  # steer() arguments a grid may set


def default_grid(n_layers: int) -> dict[str, list[dict]]:
    """Each method's settings, weakest first. DiffMean gets 28 cells, the expert variants 35.

    Both got finer steps where their dev frontiers were steep, after the first football and
    woman sweeps: DiffMean factors 0.15-0.6 at its deepest two layers (where its best settings
    were on every concept measured), the shifted experts alpha 3."""
    ks = (10, 30, 100, 300)
    layers = sorted({round(n_layers * f) for f in (1 / 6, 1 / 3, 1 / 2, 2 / 3, 5 / 6)})
    return {
        "experts": [dict(k=k, alpha=1.0) for k in ks] + [dict(k=k, alpha=0.5) for k in (100, 300)],
        "experts_late": [dict(k=k) for k in ks],
        "experts_clamp": [dict(k=k) for k in ks[1:]],
        "experts_aligned": [dict(k=k) for k in ks],
        "experts_promoting": [dict(k=k, alpha=1.0) for k in ks] + [dict(k=k, alpha=0.5) for k in (100, 300)],
        "experts_add": [dict(k=k, alpha=a) for k in (100, 300, 1000) for a in (2.0, 3.0, 4.0, 8.0)],
        "random": [dict(k=k) for k in (30, 100)],
        "diffmean": [dict(layer=layer, factor=f) for layer in layers
                     for f in ((0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.6, 0.8) if layer in layers[-2:]
                               else (0.1, 0.2, 0.4, 0.8))],
        "prompt": [{}],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = recipe_parser(__doc__)
    p.add_argument("--contrast", action="store_true",
                   help="add the other concepts' positives to each concept's negatives (experts, DiffMean, classifier)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--grid", help="JSON {method: [settings...]}, or a .json file of it, replacing the default "
                                  "grid of those methods (e.g. recipes/grids/contrast.json)")
    p.add_argument("--n-prompts", type=int, default=len(FRONTIER_PROMPTS),
                   help=f"neutral prompts used, split in half (at most {len(FRONTIER_PROMPTS)})")
    p.add_argument("--samples-per-prompt", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--sampling", choices=sorted(SAMPLING), default="paper",
                   help="paper: T=1, top-k 10; nucleus: T=0.7, top-p 0.9")
    p.add_argument("--batch-size", type=int, default=96, help="continuations generated at once")
    p.add_argument("--score-batch-size", type=int, default=16,
                   help="texts scored at once (Gemma's 262k-word logits take ~1 GB per 16 texts of 50 tokens)")
    p.add_argument("--scorer", help="model that scores perplexity (default: the other embedded model)")
    p.add_argument("--ppl-budgets", default="1.5,2",
                   help="operating points' perplexity budgets, multiples of the unsteered perplexity (each > 1)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    args = parse(p, argv)  # --seed: sampling, prompt split, classifier split, bootstrap
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not 2 <= args.n_prompts <= len(FRONTIER_PROMPTS):
        p.error(f"--n-prompts must be in [2, {len(FRONTIER_PROMPTS)}]")
    try:
        args.ppl_budgets = sorted({float(b) for b in args.ppl_budgets.split(",") if b.strip()})
    except ValueError:
        p.error(f"--ppl-budgets takes numbers, e.g. 1.5,2; got {args.ppl_budgets!r}")
    if args.samples_per_prompt < 1 or args.max_new_tokens < 1 or not args.ppl_budgets or min(args.ppl_budgets) <= 1:
        p.error("--samples-per-prompt and --max-new-tokens must be >= 1, every --ppl-budgets value > 1")
    try:
        if args.grid and args.grid.endswith(".json"):
            args.grid = Path(args.grid).read_text()
        args.grid = json.loads(args.grid) if args.grid else {}
    except json.JSONDecodeError as err:
        p.error(f"--grid is not JSON: {err}")
    except OSError as err:
        p.error(f"--grid file cannot be read: {err}")
    for method, settings in args.grid.items():
        if method not in METHODS or not isinstance(settings, list):
            p.error(f"--grid: {method!r} must be one of {', '.join(METHODS)}, with a list of settings")
        for setting in settings:
            if not isinstance(setting, dict) or not valid_setting(method, setting):
                p.error(f"--grid: {method} setting {setting!r} is not valid: diffmean takes layer and factor, "
                        f"prompt nothing, the others exactly one of k and per_layer, and {', '.join(EXPERT_SETTING[2:])}")
    return args


def valid_setting(method: str, setting: dict) -> bool:
    """Whether ``setting`` (one grid cell's arguments) fits ``method``."""
    if method in ("diffmean", "prompt"):
        return set(setting) == ({"layer", "factor"} if method == "diffmean" else set())
    return set(setting) <= set(EXPERT_SETTING) and ("k" in setting) != ("per_layer" in setting)


def split_prompts(args: argparse.Namespace) -> dict[str, list[str]]:
    """The dev and test halves of the prompts, drawn with ``--seed``."""
    prompts = list(FRONTIER_PROMPTS[: args.n_prompts])
    order = np.random.default_rng(args.seed).permutation(len(prompts))
    half = len(prompts) // 2
    return {"dev": [prompts[i] for i in order[:half]], "test": [prompts[i] for i in order[half:]]}


def cell_name(concept: str, half: str, method: str, setting: dict) -> str:
    """A file-safe cell id, e.g. ``football__dev__diffmean__layer15__factor0.2``."""
    key = dict(concept="all" if method == "base" else concept, half=half, condition=method,
               **{name: float(v) if isinstance(v, float) else v for name, v in setting.items()})
    return RunFolder.cell_id(**key)


# --------------------------------------------------------------------------- generation


class Steering:
    """Everything one concept's cells need, loaded or computed once: the model, experts,
    DiffMean statistics and unit shifts (cached under ``out/means``) and alignment scores."""

    def __init__(self, model: LazyModel, expert_set, concepts: ConceptSet, out: Path):
        self.model, self.expert_set, self.concepts, self.out = model, expert_set, concepts, out

    @functools.cache
    def means(self, concept: str) -> ResidualMeans:
        path = self.out / "means" / f"{RunFolder.cell_id(concept=concept)}.safetensors"
        if path.exists():
            return ResidualMeans.load(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        means = residual_means(self.model.get(self.expert_set), self.concepts[concept])
        means.save(path)
        return means

    @functools.cache
    def shifts(self, concept: str) -> np.ndarray:
        path = self.out / "means" / f"{RunFolder.cell_id(concept=concept)}.unit_shifts.safetensors"
        if not path.exists():
            shifts = unit_shifts(self.model.get(self.expert_set), self.expert_set, self.concepts[concept])
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda p: save_file({"shifts": shifts}, str(p)))
        return load_file(str(path))["shifts"]

    @functools.cache
    def aligned(self, concept: str) -> np.ndarray:
        return aligned_scores(self.model.get(self.expert_set), self.expert_set, self.means(concept))

    @functools.cache
    def promoting(self, concept: str) -> np.ndarray:
        return promoting_scores(self.model.get(self.expert_set), self.expert_set, concept)

    def build(self, concept: str, method: str, setting: dict):
        """The steered model of one cell (``method`` ``"base"`` is the unsteered model)."""
        model = self.model.get(self.expert_set)
        if method == "base":
            return steer(model, self.expert_set, concept, k=0)
        if method == "prompt":
            return steer_prompt(model, concept_word(concept))
        if method == "diffmean":
            return steer_diffmean(model, self.means(concept), setting["layer"], setting["factor"])
        # An expert setting holds steer()'s own arguments (EXPERT_SETTING); a family adds its own.
        family = {
            "experts": dict,
            "experts_late": lambda: dict(layers=range(2, len(self.expert_set.sites))),
            "experts_clamp": lambda: dict(mode="clamp"),
            "experts_aligned": lambda: dict(scores=self.aligned(concept)),
            "experts_promoting": lambda: dict(scores=self.promoting(concept)),
            "experts_add": lambda: dict(mode="add", shifts=self.shifts(concept)),
            "random": lambda: dict(control="random"),
        }[method]
        return steer(model, self.expert_set, concept, **setting, **family())


def run_cell(steered, scorer, prompts: list[str], args: argparse.Namespace) -> list[dict]:
    """Sample one cell on ``prompts`` and score perplexity; one row per continuation."""
    asked = [p for p in prompts for _ in range(args.samples_per_prompt)]
    texts = steered.complete(asked, max_new_tokens=args.max_new_tokens, do_sample=True, seed=args.seed,
                             batch_size=args.batch_size, **SAMPLING[args.sampling])
    ppl = perplexity(texts, scorer.model, scorer.tokenizer, prompts=asked, batch_size=args.score_batch_size,
                     progress=False)
    return [dict(prompt_index=i // args.samples_per_prompt, prompt=asked[i], text=texts[i], ppl=float(ppl[i]))
            for i in range(len(texts))]


# --------------------------------------------------------------------------- metrics


def prompt_bootstrap(rows: list[dict], base: list[dict], values: dict, n_boot: int, seed: int) -> dict:
    """Weighted means with 95% intervals, resampling prompts (the same resampled prompts for the
    cell and the unsteered ``base``).

    ``values`` maps a name to a function of rows giving (value, weight) arrays, one pair per row;
    the statistic is sum(value * weight) / sum(weight). ``"nll"`` (mean token negative
    log-likelihood) is also computed on ``base`` and reported as ``ppl`` = exp(nll) and
    ``ppl_ratio`` = exp(nll - base nll).
    """
    prompts = sorted({r["prompt_index"] for r in rows})
    index = {p: i for i, p in enumerate(prompts)}

    def per_prompt(rs, fn):
        value, weight = (np.asarray(x, dtype=float) for x in fn(rs))
        sums, weights = np.zeros(len(prompts)), np.zeros(len(prompts))
        for r, v, w in zip(rs, value, weight):
            if np.isfinite(v) and w > 0:
                sums[index[r["prompt_index"]]] += v * w
                weights[index[r["prompt_index"]]] += w
        return sums, weights

    series = {name: per_prompt(rows, fn) for name, fn in values.items()}
    series["base_nll"] = per_prompt(base, values["nll"])
    rng = np.random.default_rng(seed)
    draws = [np.arange(len(prompts))] + [rng.integers(0, len(prompts), len(prompts)) for _ in range(n_boot)]
    stats: dict[str, list[float]] = {name: [] for name in values if name != "nll"}
    stats.update(ppl=[], ppl_ratio=[])
    for d in draws:
        mean = {name: s[d].sum() / max(w[d].sum(), 1e-12) for name, (s, w) in series.items()}
        for name in values:
            if name != "nll":
                stats[name].append(mean[name])
        stats["ppl"].append(float(np.exp(mean["nll"])))
        stats["ppl_ratio"].append(float(np.exp(mean["nll"] - mean["base_nll"])))
    out = {}
    for name, v in stats.items():
        low, high = np.quantile(v[1:], [0.025, 0.975])
        out.update({name: float(v[0]), f"{name}_low": float(low), f"{name}_high": float(high)})
    return out


def token_nll(rows: list[dict], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Per row: mean token NLL (log of its perplexity, nats) and its number of scored tokens, so
    that a cell's perplexity weighs texts by length: a two-token text with perplexity 10^4
    must not outweigh 89 full continuations."""
    n_tokens = [len(ids) for ids in tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]]
    return np.log([r["ppl"] for r in rows]), np.asarray(n_tokens, dtype=float)


def cell_metrics(rows: list[dict], base: list[dict], classifier: ConceptClassifier, words: list[str],
                 scorer_tokenizer, args: argparse.Namespace) -> dict:
    """Every metric of one cell (see the module docstring)."""
    texts = [r["text"] for r in rows]
    p_concept = classifier.probabilities(texts)
    ones = np.ones(len(rows))
    values = {"concept_score": lambda rs: (p_concept, ones),
              "p_word": lambda rs: (concept_presence(texts, words), ones),
              "nll": lambda rs: token_nll(rs, scorer_tokenizer)}
    out = prompt_bootstrap(rows, base, values, args.n_boot, args.seed)
    by_prompt: dict[int, list[str]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_index"], []).append(r["text"])
    out["self_bleu4"] = float(np.mean([self_bleu(t, n=4) for t in by_prompt.values() if len(t) > 1] or [np.nan]))
    try:
        out["distinct2"] = distinct_n(texts, 2)
    except ValueError:
        out["distinct2"] = float("nan")
    return out


def choose(rows: list[dict], budget: float) -> dict | None:
    """The operating point among one method's dev rows: the highest concept score with a perplexity
    ratio within ``budget``; None when no setting is within it."""
    within = [r for r in rows if r["ppl_ratio"] <= budget]
    return max(within, key=lambda r: (r["concept_score"], -r["ppl_ratio"])) if within else None


# --------------------------------------------------------------------------- figures and report


def plot_frontier(concept: str, dev: list[dict], test: list[dict], budgets: list[float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for method in METHODS:
        points = sorted((r for r in dev if r["method"] == method), key=lambda r: r["ppl_ratio"])
        if not points:
            continue
        frontier, best = [], -1.0
        for r in points:  # the upper-left envelope: best score at or below each perplexity
            if r["concept_score"] > best:
                frontier.append(r)
                best = r["concept_score"]
        ax.plot([r["ppl_ratio"] for r in points], [r["concept_score"] for r in points], ".", color=colours[method],
                alpha=0.35)
        ax.plot([r["ppl_ratio"] for r in frontier], [r["concept_score"] for r in frontier], "-", color=colours[method],
                label=method)
    for r in test:
        ax.errorbar(r["ppl_ratio"], r["concept_score"],
                    xerr=[[r["ppl_ratio"] - r["ppl_ratio_low"]], [r["ppl_ratio_high"] - r["ppl_ratio"]]],
                    yerr=[[r["concept_score"] - r["concept_score_low"]], [r["concept_score_high"] - r["concept_score"]]],
                    fmt="*", ms=11, color=colours.get(r["method"], "black"), mec="black", capsize=2)
    for budget in budgets:
        ax.axvline(budget, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity / unsteered perplexity (log)")
    ax.set_ylabel("concept score (classifier)")
    ax.set_title(f"{concept_word(concept)}: dev sweep (lines) and test operating points (stars, 95% CI)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path, args, classifiers: dict, dev_rows: list[dict], test_rows: list[dict]) -> str:
    lines = [f"# Steering frontier ({args.model}, sampling {args.sampling}: {SAMPLING[args.sampling]})", "",
             f"{args.n_prompts} neutral prompts, half to choose each method's setting (dev), half to report it "
             f"(test); {args.samples_per_prompt} samples each, {args.max_new_tokens} new tokens. Operating point: "
             f"the highest dev concept score within a budget of the unsteered perplexity. Intervals: "
             f"95% bootstrap over test prompts.", ""]
    for concept, clf in classifiers.items():
        lines += [f"## {concept_word(concept)}", "",
                  f"Classifier held-out accuracy {clf.held_out_accuracy:.3f} ({clf.n_held_out} sentences).", ""]
        for budget in args.ppl_budgets:
            lines += _budget_table([r for r in test_rows if r["concept"] == concept and r["budget"] == budget],
                                   [r for r in dev_rows if r["concept"] == concept], budget)
        lines += ["", f"![frontier](frontier_{RunFolder.cell_id(concept=concept)}.png)", ""]
    text = "\n".join(lines) + "\n"
    write_text(out / "report.md", text)
    return text


def _budget_table(mine: list[dict], dev: list[dict], budget: float) -> list[str]:
    lines = [f"Within {budget:g}x the unsteered perplexity:", "",
             "| method | setting (chosen on dev) | concept score [95% CI] | perplexity ratio [95% CI] | p(word) "
             "| distinct-2 |", "|---|---|---|---|---|---|"]
    for r in mine:
            lines.append(
                f"| {r['method']}{' (best variant)' if r.get('best_variant') else ''} | {r['setting']} | "
                f"{r['concept_score']:.2f} [{r['concept_score_low']:.2f}, {r['concept_score_high']:.2f}] | "
                f"{r['ppl_ratio']:.2f} [{r['ppl_ratio_low']:.2f}, {r['ppl_ratio_high']:.2f}] | {r['p_word']:.2f} | "
                f"{r['distinct2']:.2f} |")
    missing = sorted({r["method"] for r in dev} - {r["method"] for r in mine})
    if missing:
        lines.append(f"\nNo setting within the budget on dev: {', '.join(missing)}.")
    return lines + [""]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    halves = split_prompts(args)
    settings = {k: getattr(args, k) for k in ("model", "concepts", "n_prompts", "samples_per_prompt",
                                              "max_new_tokens", "sampling", "seed", "scorer")}
    if args.contrast:  # only when set, so folders written before the option still resume
        settings["contrast"] = True
    run = RunFolder(args.out, settings)
    model = LazyModel(args)
    expert_set, names = experts_for(model, args, contrast=args.contrast)
    concepts = ConceptSet.load(args.concepts).with_sampled_negatives(seed=0)
    if args.contrast:
        concepts = concepts.subset(names).contrasted()
    grid = {m: args.grid.get(m, g) for m, g in default_grid(len(expert_set.sites)).items() if m in args.methods}
    steering = Steering(model, expert_set, concepts, run.root)
    scorer = cross_scorer(args)
    if scorer is None:
        raise InvalidArgumentError("The frontier needs a perplexity scorer; pass --scorer MODEL (not 'none').")

    def cell(concept, half, method, setting) -> list[dict]:
        name = cell_name(concept, half, method, setting)
        if not run.done(name):
            rows = run_cell(steering.build(concept, method, setting), scorer, halves[half], args)
            run.write_cell(name, rows)
        return run.read_cell(name)

    encoder = SentenceEncoder()
    classifiers = {c: ConceptClassifier.fit(concepts[c], encoder, seed=args.seed) for c in names}
    dev_rows, test_rows = [], []

    def metrics(rows, base_rows, concept, words):
        return cell_metrics(rows, base_rows, classifiers[concept], words, scorer.tokenizer, args)

    for concept in names:
        words = concept_words(concept_word(concept))
        base = {half: cell(concept, half, "base", {}) for half in halves}
        todo = [(m, s) for m, settings_ in grid.items() for s in settings_]
        for method, setting in tqdm(todo, desc=f"{concept_word(concept)} dev sweep", unit="cell"):
            rows = cell(concept, "dev", method, setting)
            dev_rows.append(dict(concept=concept, half="dev", method=method, setting=json.dumps(setting),
                                 **metrics(rows, base["dev"], concept, words)))
        base_test = metrics(base["test"], base["test"], concept, words)
        for budget in args.ppl_budgets:
            chosen = {}
            for method in grid:
                mine = [r for r in dev_rows if r["concept"] == concept and r["method"] == method]
                point = choose(mine, budget)
                if point is not None:
                    chosen[method] = point
            variants = [m for m in EXPERT_VARIANTS if m in chosen]
            best_variant = max(variants, key=lambda m: chosen[m]["concept_score"]) if variants else None
            test_rows.append(dict(concept=concept, half="test", budget=budget, method="base", setting="{}",
                                  **base_test))
            for method, point in chosen.items():
                rows = cell(concept, "test", method, json.loads(point["setting"]))
                test_rows.append(dict(concept=concept, half="test", budget=budget, method=method,
                                      setting=point["setting"], best_variant=method == best_variant,
                                      **metrics(rows, base["test"], concept, words)))
        plot_frontier(concept, [r for r in dev_rows if r["concept"] == concept],
                      [r for r in test_rows if r["concept"] == concept and r["budget"] == max(args.ppl_budgets)],
                      args.ppl_budgets, run.root / f"frontier_{RunFolder.cell_id(concept=concept)}.png")
        # Written after every concept, so a long run's finished concepts can be read (and committed).
        write_csv(run.root / "frontier.csv", dev_rows + test_rows)
        write_csv(run.root / "operating_points.csv", test_rows)
        text = report(run.root, args, {c: classifiers[c] for c in names[:names.index(concept) + 1]},
                      dev_rows, test_rows)
    print(text)
    return {"dev": dev_rows, "test": test_rows,
            "classifier_accuracy": {c: clf.held_out_accuracy for c, clf in classifiers.items()}}


if __name__ == "__main__":
    run_recipe(main)
