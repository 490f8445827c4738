"""Concept induction: does setting a concept's experts make the model write about it?

For each concept, sample continuations of neutral prompts (``evaluation.prompts``,
nothing in them invites the concept) from the model steered with do(c, k) --
the top-k experts set to their median response on the concept (``on_p50``) at
every position -- over a grid of k (and optionally alpha). The same grid is run
with two controls of the same size: k random units and the k lowest-AP units.
k = 0 is the unsteered model (``steer(..., k=0)`` holds no unit: a no-op
wrapper on the same generation path), sampled once and shared by all curves.

Metrics per cell, each with a 95% percentile-bootstrap interval over samples:

* p(concept): share of continuations containing the concept word or its
  inflections (``evaluation.concept_words``; add forms with ``--extra-words``).
* ppl_cross: perplexity of each continuation given its prompt under a
  *different* model (Gemma-3-270M scores SmolLM2, and the reverse), as the paper
  scores GPT-2 with openai-gpt. ppl_self: the same under the steered model
  itself (its steered forward, via ``evaluation.SteeredScorer``). Means over texts.
* Self-BLEU-3/4 (per prompt, then averaged; lower = more diverse) and distinct-1/2/3.

Operating point: the smallest k (then alpha) of the experts whose p(concept)
reaches ``--target-rate`` with a perplexity within ``--ppl-budget`` times the
unsteered one, chosen on half of the prompts and reported on the other half.

Defaults follow the paper's sampling (T = 1.0, top-k 10) with 12 prompts x 4
samples of 25 tokens per cell. Outputs (see _common for the folder layout):
samples.jsonl, metrics.csv, operating_point.csv, report.txt, report.json,
p_vs_k.png, p_vs_perplexity.png. Resumable: finished cells are skipped.

    python recipes/concept_induction.py --out out/concept_induction --concept football \\
        --ks 0,10,30,100,300,1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, from any working directory

from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from _common import (  # noqa: E402
    LazyModel, RunFolder, cross_scorer, experts_for, numbers, parse, recipe_parser, run_recipe, write_csv,
)
from steer_experts.errors import InvalidArgumentError  # noqa: E402
from steer_experts.evaluation import SteeredScorer, concept_presence, mean_row, perplexity, rate_row  # noqa: E402
from steer_experts.evaluation.diversity import diversity_by_prompt  # noqa: E402
from steer_experts.evaluation.prompts import NEUTRAL_PROMPTS  # noqa: E402
from steer_experts.figures import concept_panels  # noqa: E402
from steer_experts.steering import steer  # noqa: E402
from steer_experts.words import concept_word, concept_words  # noqa: E402

CONDITIONS = ("experts", "random", "lowest")
BASE = "base"  # the k = 0 cell, shared by every concept and condition


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The recipe's options (``argv``; None reads the command line), checked."""
    p = recipe_parser(__doc__)
    p.add_argument("--ks", default="0,1,3,10,30,100,300,1000", help="numbers of experts")
    p.add_argument("--alphas", default="1.0", help="intervention strengths (1 = set to on_p50 exactly)")
    p.add_argument("--controls", default="random,lowest", help="controls to run: random, lowest, or none")
    p.add_argument("--prompts-file", help="text file, one prompt per line; default: the neutral prompts")
    p.add_argument("--n-prompts", type=int, help="use only the first n prompts")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=25)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--extra-words", action="append", default=[],
                   help="more forms that count as the concept, CONCEPT=w1,w2 (e.g. football=footballer,soccer)")
    p.add_argument("--scorer", help="model that scores perplexity (default: the other embedded model; 'none')")
    p.add_argument("--target-rate", type=float, default=0.1, help="p(concept) the operating point must reach")
    p.add_argument("--ppl-budget", type=float, default=2.0,
                   help="operating point's perplexity may be at most this multiple of the unsteered one")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    args = parse(p, argv)  # --seed: sampling, random controls, bootstrap, prompt split
    args.ks = sorted(set(numbers(args.ks)))
    args.alphas = numbers(args.alphas, float)
    args.controls = [] if args.controls == "none" else numbers(args.controls, str)
    bad = [c for c in args.controls if c not in CONDITIONS[1:]]
    if bad:
        p.error(f"unknown control(s) {bad}; use random, lowest or none")
    if any(k < 0 for k in args.ks):
        p.error("k must be >= 0")
    # Controls run at one strength, compared with the experts at that strength.
    args.control_alpha = 1.0 if 1.0 in args.alphas else args.alphas[0]
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts: ``--prompts-file`` or the neutral prompts, cut to ``--n-prompts`` (at least 2)."""
    prompts = list(NEUTRAL_PROMPTS)
    if args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    prompts = prompts[: args.n_prompts] if args.n_prompts else prompts
    if len(prompts) < 2:
        raise InvalidArgumentError("Give at least 2 prompts: the operating point is chosen on one half of them and "
                         "reported on the other.")
    return prompts


def extra_words(specs: list[str]) -> dict[str, list[str]]:
    """``["football=footballer,soccer"]`` -> ``{"football": ["footballer", "soccer"]}``."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        concept, sep, words = spec.partition("=")
        if not sep:
            raise InvalidArgumentError(f"--extra-words {spec!r} should read CONCEPT=word1,word2.")
        out.setdefault(concept.strip(), []).extend(w.strip() for w in words.split(",") if w.strip())
    return out


def grid(names: list[str], args: argparse.Namespace) -> list[dict]:
    """The cells, base first, then by k so that early results cover the whole curve's start."""
    cells = [dict(concept="all", condition=BASE, k=0, alpha=0.0)] if 0 in args.ks else []
    for k in (k for k in args.ks if k > 0):
        for concept in names:
            for alpha in args.alphas:
                cells.append(dict(concept=concept, condition="experts", k=k, alpha=alpha))
            for control in args.controls:
                cells.append(dict(concept=concept, condition=control, k=k, alpha=args.control_alpha))
    return cells


def run_cell(cell: dict, model, expert_set, scorer, prompts: list[str], args: argparse.Namespace) -> list[dict]:
    """Sample one cell and score its texts; returns one row per continuation."""
    concept = expert_set.concepts[0] if cell["condition"] == BASE else cell["concept"]
    control = cell["condition"] if cell["condition"] in ("random", "lowest") else None
    steered = steer(model, expert_set, concept, k=cell["k"], alpha=cell["alpha"] if cell["k"] else 1.0,
                    control=control, seed=args.seed)
    asked = [p for p in prompts for _ in range(args.samples_per_prompt)]
    started = time.perf_counter()
    texts = steered.complete(asked, max_new_tokens=args.max_new_tokens, do_sample=True,
                             temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                             batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    ppl_self = perplexity(texts, SteeredScorer(steered), model.tokenizer, prompts=asked,
                          batch_size=args.batch_size, progress=False)
    ppl_cross = (perplexity(texts, scorer.model, scorer.tokenizer, prompts=asked, batch_size=args.batch_size,
                            progress=False) if scorer else np.full(len(texts), np.nan))
    return [dict(cell, prompt_index=i // args.samples_per_prompt, sample=i % args.samples_per_prompt,
                 prompt=asked[i], text=texts[i], ppl_self=float(ppl_self[i]), ppl_cross=float(ppl_cross[i]),
                 seconds=seconds / len(texts))
            for i in range(len(texts))]


# --------------------------------------------------------------------------- metrics


def cell_metrics(rows: list[dict], words: list[str], args: argparse.Namespace, seed: int) -> dict:
    """Rates, perplexities and diversity of one cell's rows (see the module docstring)."""
    texts = [r["text"] for r in rows]
    out = {"n": len(rows)}
    out.update(rate_row(concept_presence(texts, words), "p_concept", seed, args.n_boot))
    out.update(mean_row([r["ppl_cross"] for r in rows], "ppl_cross", seed, args.n_boot))
    out.update(mean_row([r["ppl_self"] for r in rows], "ppl_self", seed, args.n_boot))
    out.update(diversity_by_prompt(texts, [r["prompt_index"] for r in rows]))
    return out


def curve_rows(rows: list[dict], concept: str, condition: str, alpha: float) -> dict[int, list[dict]]:
    """Rows of one curve by k; the base cell serves as k = 0 of every curve."""
    by_k: dict[int, list[dict]] = {}
    for r in rows:
        if r["condition"] == BASE or (r["concept"] == concept and r["condition"] == condition
                                      and (condition != "experts" or r["alpha"] == alpha)):
            by_k.setdefault(r["k"], []).append(r)
    return dict(sorted(by_k.items()))


def metrics_table(rows, names, words, args) -> list[dict]:
    """One row per concept, condition, alpha and k: the cell's metrics (see :func:`cell_metrics`)."""
    table = []
    for concept in names:
        for condition in ["experts", *args.controls]:
            for alpha in (args.alphas if condition == "experts" else [args.control_alpha]):
                for k, cell in curve_rows(rows, concept, condition, alpha).items():
                    table.append(dict(concept=concept, condition=condition, k=k, alpha=alpha,
                                      **cell_metrics(cell, words[concept], args, args.seed)))
    return table


def first_separation(table: list[dict], concept: str, control: str, alpha: float) -> dict | None:
    """The smallest k > 0 at which the experts' p(concept) interval (at ``alpha``) lies entirely above the control's."""
    experts = {r["k"]: r for r in table if r["concept"] == concept and r["condition"] == "experts"
               and r["alpha"] == alpha}
    other = {r["k"]: r for r in table if r["concept"] == concept and r["condition"] == control}
    for k in sorted(set(experts) & set(other)):
        if k > 0 and experts[k]["p_concept_low"] > other[k]["p_concept_high"]:
            return {"k": k, "experts": experts[k], "control": other[k]}
    return None


def operating_point(rows, concept, words, args) -> dict:
    """Choose (k, alpha) on half of the prompts, report it on the other half."""
    n_prompts = len({r["prompt_index"] for r in rows})
    order = np.random.default_rng(args.seed).permutation(n_prompts)
    choose = set(order[: n_prompts // 2].tolist())
    ppl_key = "ppl_cross" if np.isfinite([r["ppl_cross"] for r in rows]).any() else "ppl_self"
    result = {"concept": concept, "target_rate": args.target_rate, "ppl_budget": args.ppl_budget,
              "perplexity": ppl_key, "choose_prompts": sorted(int(i) for i in choose)}
    candidates = []
    for alpha in args.alphas:
        candidates += [(k, alpha, cell) for k, cell in curve_rows(rows, concept, "experts", alpha).items()]
    base = next((cell for k, _, cell in candidates if k == 0), None)
    if base is None:
        return dict(result, found=False, why="the grid has no k = 0 cell to set the perplexity budget")

    def half(cell, chosen):
        part = [r for r in cell if (r["prompt_index"] in choose) == chosen]
        return cell_metrics(part, words, args, args.seed)

    base_choose = half(base, True)
    limit = args.ppl_budget * base_choose[ppl_key]
    feasible = [(k, a, cell) for k, a, cell in sorted(candidates, key=lambda c: (c[0], c[1])) if k > 0
                and (m := half(cell, True))["p_concept"] >= args.target_rate and m[ppl_key] <= limit]
    if not feasible:
        return dict(result, found=False, ppl_limit=limit,
                    why=f"no k reaches p >= {args.target_rate} with {ppl_key} <= {limit:.1f} on the choosing half")
    k, alpha, cell = feasible[0]
    chosen, report, base_report = half(cell, True), half(cell, False), half(base, False)
    return dict(result, found=True, k=k, alpha=alpha, ppl_limit=limit,
                p_choose=chosen["p_concept"], **{f"{key}_report": v for key, v in report.items()
                                                  if key.startswith(("p_concept", ppl_key))},
                **{f"{key}_base_report": v for key, v in base_report.items() if key in ("p_concept", ppl_key)})


# --------------------------------------------------------------------------- figures


def _curves(table, concept: str, args):
    """(label, rows in k order) for each curve of one concept: experts per alpha, then each control."""
    for condition in ["experts", *args.controls]:
        for alpha in (args.alphas if condition == "experts" else [args.control_alpha]):
            rows = [r for r in table if r["concept"] == concept and r["condition"] == condition
                    and r["alpha"] == alpha]
            yield (condition if condition != "experts" or len(args.alphas) == 1 else f"experts a={alpha:g}"), rows


def plot_p_vs_k(table, names, args, path: Path) -> None:
    """p(concept) against k with 95% intervals, one panel per concept, saved at ``path``."""
    def draw(ax, concept):
        for label, rows in _curves(table, concept, args):
            err = [[r["p_concept"] - r["p_concept_low"] for r in rows],
                   [r["p_concept_high"] - r["p_concept"] for r in rows]]
            ax.errorbar([r["k"] for r in rows], [r["p_concept"] for r in rows], yerr=err, marker="o", ms=4, capsize=3,
                        label=label)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(args.ks, [str(k) for k in args.ks])
        ax.set(xlabel="k (units steered)", ylabel=f"p({concept_word(concept)})", ylim=(-0.02, 1.02),
               title=concept_word(concept))
        ax.legend(fontsize=8)
    concept_panels(names, draw, path, f"Concept induction, {args.model}: p(concept) with 95% bootstrap intervals")


def plot_tradeoff(table, names, args, ppl_key: str, path: Path) -> None:
    """p(concept) against mean perplexity (``ppl_key``), one panel per concept, saved at ``path``."""
    def draw(ax, concept):
        for label, rows in _curves(table, concept, args):
            ax.plot([r[ppl_key] for r in rows], [r["p_concept"] for r in rows], marker="o", ms=4, label=label)
            for r in rows if label.startswith("experts") else []:
                ax.annotate(f"k={r['k']}", (r[ppl_key], r["p_concept"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())  # "3 x 10^1" labels overlap on short ranges
        ax.set(xlabel=f"{ppl_key} (mean perplexity)", ylabel=f"p({concept_word(concept)})", title=concept_word(concept))
        ax.legend(fontsize=8)
    concept_panels(names, draw, path, f"Concept induction, {args.model}: concept rate against perplexity")


# --------------------------------------------------------------------------- report


def interval(row: dict, key: str, digits: int = 2) -> str:
    """``row[key]`` with its 95% interval, e.g. ``0.12 [0.05, 0.20]``."""
    return f"{row[key]:.{digits}f} [{row[key + '_low']:.{digits}f}, {row[key + '_high']:.{digits}f}]"


def write_report(table, names, points, separations, ppl_key, args, run: RunFolder) -> str:
    """The table, separations and operating points as ``report.txt``; returns the text."""
    n_prompts = table[0]["n"] // args.samples_per_prompt
    lines = [f"Concept induction on {args.model}: {args.samples_per_prompt} samples x {n_prompts} prompts per cell, "
             f"{args.max_new_tokens} new tokens, T={args.temperature:g}, top-k {args.top_k}, seed {args.seed}. Intervals: 95% bootstrap. Perplexity scorer: {ppl_key}."]
    for concept in names:
        lines.append(f"\n== {concept}")
        lines.append(f"{'condition':>9} {'k':>5} {'alpha':>5}  {'p(concept)':<20} {ppl_key:<22} {'ppl_self':<22}"
                     f" {'sBLEU4':>6} {'dist2':>6}")
        for r in (r for r in table if r["concept"] == concept):
            lines.append(f"{r['condition']:>9} {r['k']:>5} {r['alpha']:>5g}  {interval(r, 'p_concept'):<20} "
                         f"{interval(r, ppl_key, 1):<22} {interval(r, 'ppl_self', 1):<22} "
                         f"{r['self_bleu4']:>6.3f} {r['distinct2']:>6.3f}")
        for control, sep in separations[concept].items():
            if sep is None:
                lines.append(f"experts vs {control}: no k in the grid puts the experts' interval above the control's.")
            else:
                e, c = sep["experts"], sep["control"]
                base = next((r for r in table if r["concept"] == concept and r["k"] == 0), None)
                cost = (f" vs {base[ppl_key]:.1f} unsteered ({e[ppl_key] / base[ppl_key]:.2f}x)" if base else "")
                lines.append(f"experts vs {control}: first separated at k={sep['k']}: experts p = "
                             f"{interval(e, 'p_concept')}, {control} p = {interval(c, 'p_concept')}; {ppl_key} "
                             f"{interval(e, ppl_key, 1)}{cost}.")
        point = points[concept]
        if point["found"]:
            lines.append(f"operating point (p >= {args.target_rate:g}, {ppl_key} <= {args.ppl_budget:g}x unsteered, "
                         f"chosen on prompts {point['choose_prompts']}): k={point['k']}, alpha={point['alpha']:g}; "
                         f"on the other prompts p = {point['p_concept_report']:.2f} "
                         f"[{point['p_concept_low_report']:.2f}, {point['p_concept_high_report']:.2f}], "
                         f"{ppl_key} = {point[ppl_key + '_report']:.1f} (unsteered: p = "
                         f"{point['p_concept_base_report']:.2f}, {ppl_key} = {point[ppl_key + '_base_report']:.1f}).")
        else:
            lines.append(f"operating point: none ({point['why']}).")
    return run.report(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the summary also written to report.json."""
    args = parse_args(argv)
    out = Path(args.out)
    prompts = read_prompts(args)
    settings = dict(recipe="concept_induction", model=args.model, prompts=prompts,
                    samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, batch_size=args.batch_size, seed=args.seed,
                    scorer=args.scorer, experts=args.experts)
    run = RunFolder(out, settings)
    lazy = LazyModel(args)
    expert_set, names = experts_for(lazy, args)
    extras = extra_words(args.extra_words)
    words = {n: concept_words(concept_word(n), extras.get(concept_word(n), []) + extras.get(n, [])) for n in names}

    cells = grid(names, args)
    ids = [RunFolder.cell_id(**c) for c in cells]
    todo = [(c, i) for c, i in zip(cells, ids) if not run.done(i)]
    model = lazy.get(expert_set) if todo else None
    scorer = cross_scorer(args) if todo else None
    for cell, cell_id in tqdm(todo, desc="cells", unit="cell"):
        run.write_cell(cell_id, run_cell(cell, model, expert_set, scorer, prompts, args))
    rows = run.all_rows(ids)

    ppl_key = "ppl_cross" if np.isfinite([r["ppl_cross"] for r in rows]).any() else "ppl_self"
    table = metrics_table(rows, names, words, args)
    write_csv(out / "metrics.csv", table)
    points = {c: operating_point(rows, c, words[c], args) for c in names}
    write_csv(out / "operating_point.csv", [{k: v for k, v in p.items() if k != "choose_prompts"}
                                            for p in points.values()])
    separations = {c: {ctl: first_separation(table, c, ctl, args.control_alpha) for ctl in args.controls}
                   for c in names}
    plot_p_vs_k(table, names, args, out / "p_vs_k.png")
    plot_tradeoff(table, names, args, ppl_key, out / "p_vs_perplexity.png")
    print(write_report(table, names, points, separations, ppl_key, args, run))
    summary = {"cells_generated": len(todo), "cells": len(cells), "words": words, "operating_points": points,
               "separation": {c: {ctl: (None if s is None else {"k": s["k"], "experts": s["experts"],
                                                                  "control": s["control"]})
                                  for ctl, s in sep.items()} for c, sep in separations.items()}}
    run.write("report.json", summary)
    return summary


if __name__ == "__main__":
    run_recipe(main)
