"""Causal validation of experts: are they needed for the concept, and are they found reliably?

Two tests per concept, each ending in a one-line verdict with its numbers.

1. **Ablation.** On prompts that invite the concept (``evaluation.prompts``, e.g. "My
   favourite sport is"), silence the top-k experts at every position -- set them
   to zero, or to their mean response on the negatives (``off_mean``), or dampen
   them AurA-style (``dampen``: z <- z (1 - 2 (AUROC - 0.5)), toward zero), or clamp
   them down per token (``clamp_down``: z <- min(z, off_mean), so a unit never
   exceeds its typical response on negatives and is never raised), or shift them
   down per token (``shift_down``: z <- z - alpha x (token-level mean on positives
   minus on negatives), ``steer(..., suppress="add")``, alpha ``--shift-alpha``), or zero
   only experts that promote the concept word (``promoting``: the top-k by AP among units
   whose write raises the word's logit, ``effects.promoting_scores``; its controls are
   drawn among those units too, so the test is whether *experts* matter beyond what
   any unit promoting the word does) -- and compare
   with treating k random units the same way (``--controls``). Why ``promoting``:
   about half of the top experts *lower* the concept word's logit (on SmolLM2's
   football, most experts of the last third of the layers), so silencing all of
   them raises p(concept). Note that
   ``off_mean`` is a mean of *sentence maxima* (responses are max-pooled), which
   lies above a unit's typical per-token value: setting a unit to it at every
   position raises it at most positions, so it can induce the concept rather than
   remove it (and so can ``zero`` for units whose per-token values are mostly
   negative). ``dampen`` only shrinks activations toward zero. Two measures:

   * p(concept) of sampled continuations (T = 1.0, top-k 10), with 95% bootstrap
     intervals; the verdict is YES when the interval of p(random) - p(experts) lies
     entirely above 0 at some k and silencing, REVERSED when instead it lies
     entirely below 0 somewhere (silencing the experts raises p(concept)), else
     NOT SHOWN. A second line says whether some silencing of the experts lowers
     p(concept) below the unablated model, its drop's interval excluding 0.
   * the exact probability that the continuation *begins* with the concept word
     (chain rule over its tokens; one forward pass, no sampling noise), averaged
     over prompts, reported next to it.

2. **Generalisation.** Split every concept's positives and negatives in two halves
   (``ConceptSet.split``), score expertise on each half from the cached unit
   responses, choose the top-k experts on the first half and measure their AP on
   the held-out half. Reported: mean AP on the choosing half, on the held-out half,
   the drop, the AP of the held-out half's own top-k (the best possible there),
   chance (the held-out positive rate) and the overlap of the two top-k sets. The
   verdict asks that the held-out AP keep at least ``--keep`` (default 0.8) of the
   choosing half's AP above chance, at every k.

Outputs: samples.jsonl, ablation.csv, generalisation.csv, report.txt, report.json,
ablation.png. Resumable (ablation cells are skipped when done).

    python recipes/causal_validation.py --out out/causal_validation --concept football
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, from any working directory

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from _common import (  # noqa: E402
    LazyModel, RunFolder, experts_for, numbers, parse, recipe_parser, run_recipe, write_csv,
)
from steer_experts.concepts import ConceptSet  # noqa: E402
from steer_experts.diffmean import unit_shifts  # noqa: E402
from steer_experts.evaluation import (  # noqa: E402
    SteeredScorer, concept_presence, difference_row, distinct_forms, mean_row, next_word_probability, rate_row,
)
from steer_experts.evaluation.prompts import inviting_prompts  # noqa: E402
from steer_experts.discovery import held_out_expertise  # noqa: E402
from steer_experts.effects import promoting_scores  # noqa: E402
from steer_experts.figures import save_figure  # noqa: E402
from steer_experts.steering import steer  # noqa: E402
from steer_experts.words import concept_forms, concept_word, concept_words  # noqa: E402

BASE = "base"
SILENCING = ("zero", "off_mean", "dampen", "clamp_down", "shift_down", "promoting")


def parse_args(argv: list[str] | None):
    """The recipe's options (``argv``; None reads the command line), checked."""
    p = recipe_parser(__doc__)  # --concepts: discovery and the generalisation split
    p.add_argument("--ks", default="10,30,100,300", help="numbers of units ablated")
    p.add_argument("--values", default="zero,off_mean,dampen,clamp_down,shift_down",
                   help="how units are silenced: zero, off_mean (set to that value), dampen (AurA factor), "
                        "clamp_down (z <- min(z, off_mean) per token), shift_down (z <- z - alpha x token-level "
                        "mean difference), promoting (zero the top-k experts among units whose write raises "
                        "the concept word)")
    p.add_argument("--shift-alpha", type=float, default=4.0, help="alpha of shift_down (> 0)")
    p.add_argument("--controls", default="random", help="controls: random, lowest")
    p.add_argument("--samples-per-prompt", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--split-ks", default="10,30,100,300", help="expert counts for the generalisation test")
    p.add_argument("--split-fraction", type=float, default=0.5)
    p.add_argument("--keep", type=float, default=0.8,
                   help="share of above-chance AP the held-out half must keep for the verdict")
    p.add_argument("--no-ablation", action="store_true", help="run the generalisation test only")
    p.add_argument("--n-boot", type=int, default=1000)
    args = parse(p, argv)  # --seed: sampling, random controls, bootstrap, split
    args.ks = sorted(set(numbers(args.ks)))
    args.split_ks = sorted(set(numbers(args.split_ks)))
    args.values = numbers(args.values, str)
    args.controls = numbers(args.controls, str)
    if args.shift_alpha <= 0:
        p.error("--shift-alpha must be > 0")
    if any(v not in SILENCING for v in args.values):
        p.error(f"--values takes some of {', '.join(SILENCING)}")
    if any(c not in ("random", "lowest") for c in args.controls):
        p.error("--controls takes random and/or lowest")
    if any(k < 1 for k in args.ks + args.split_ks):
        p.error("k must be >= 1 (k = 0, the unablated model, is always run)")
    return args


# --------------------------------------------------------------------------- ablation


def grid(names: list[str], args) -> list[dict]:
    """The ablation cells: per concept the unablated base, then every k, silencing and condition."""
    cells = []
    for concept in names:
        cells.append(dict(concept=concept, condition=BASE, value="none", k=0))
        for k in args.ks:
            for value in args.values:
                for condition in ["experts", *args.controls]:
                    # alpha names the cell, so cells of another alpha are never mixed in
                    alpha = dict(alpha=args.shift_alpha) if value == "shift_down" else {}
                    cells.append(dict(concept=concept, condition=condition, value=value, k=k, **alpha))
    return cells


def promoting_ranks(promoting: np.ndarray, condition: str, seed: int) -> np.ndarray:
    """Scores that rank the units promoting the concept word (``promoting`` > 0, which holds their
    AP) first: the experts by AP, or the controls among those same units -- ``random`` in a
    random order drawn with ``seed``, ``lowest`` by lowest AP."""
    if condition == "random":
        return np.where(promoting > 0, 1.0 + np.random.default_rng(seed).random(promoting.size), 0.0)
    if condition == "lowest":
        return np.where(promoting > 0, 2.0 - promoting, 0.0)
    return promoting


def run_cell(cell: dict, model, expert_set, shifts, promoting, args) -> list[dict]:
    """One ablation cell: sampled continuations of the inviting prompts and the next-word probability.
    ``shifts(concept)`` gives the concept's unit shifts (for ``shift_down``), ``promoting(concept)``
    its promoting scores (for ``promoting``)."""
    prompts = list(inviting_prompts(cell["concept"]))
    control = cell["condition"] if cell["condition"] in ("random", "lowest") else None
    if cell["value"] == "promoting":
        steered = steer(model, expert_set, cell["concept"], k=cell["k"], mode="ablate",
                        scores=promoting_ranks(promoting(cell["concept"]), cell["condition"], args.seed))
    elif cell["value"] == "shift_down":
        steered = steer(model, expert_set, {cell["concept"]: -1.0}, k=cell["k"], alpha=cell["alpha"],
                        suppress="add", shifts=shifts(cell["concept"]), control=control, seed=args.seed)
    elif cell["value"] == "clamp_down":
        steered = steer(model, expert_set, {cell["concept"]: -1.0}, k=cell["k"], suppress="clamp", control=control,
                        seed=args.seed)
    else:
        if cell["value"] == "dampen":
            mode, value = "dampen", None
        else:
            mode, value = "ablate", None if cell["value"] == "none" else cell["value"]
        steered = steer(model, expert_set, cell["concept"], k=cell["k"], mode=mode, value=value, control=control,
                        seed=args.seed)
    per_prompt = []
    for prompt in prompts:
        forms = distinct_forms(model.tokenizer, prompt, concept_forms(cell["concept"], capitalised=True))
        per_prompt.append(float(next_word_probability(SteeredScorer(steered), model.tokenizer, [prompt], forms).sum()))
    asked = [p for p in prompts for _ in range(args.samples_per_prompt)]
    texts = steered.complete(asked, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
                             top_k=args.top_k, seed=args.seed, batch_size=args.batch_size)
    return [dict(cell, prompt_index=i // args.samples_per_prompt, prompt=asked[i], text=texts[i],
                 p_next=per_prompt[i // args.samples_per_prompt]) for i in range(len(texts))]


def ablation_table(rows: list[dict], names: list[str], args) -> list[dict]:
    """One row per concept and cell: p(concept) and its drop from the base, and p_next, with 95% intervals."""
    table = []
    for concept in names:
        words = concept_words(concept_word(concept))
        mine = [r for r in rows if r["concept"] == concept]
        base = [r for r in mine if r["condition"] == BASE]
        base_flags = concept_presence([r["text"] for r in base], words)
        keys = [(BASE, "none", 0)] + [(c, v, k) for k in args.ks for v in args.values
                                       for c in ["experts", *args.controls]]
        for condition, value, k in keys:
            cell = [r for r in mine if (r["condition"], r["value"], r["k"]) == (condition, value, k)]
            flags = concept_presence([r["text"] for r in cell], words)
            next_by_prompt = list({r["prompt_index"]: r["p_next"] for r in cell}.values())
            row = dict(concept=concept, condition=condition, value=value, k=k, n=len(cell))
            row.update(rate_row(flags, "p_concept", args.seed, args.n_boot))
            row.update(difference_row(base_flags, flags, "drop", args.seed, args.n_boot))
            row.update(mean_row(next_by_prompt, "p_next", args.seed, args.n_boot))
            table.append(row)
    return table


def ablation_verdict(rows: list[dict], table: list[dict], concept: str, control: str, args) -> dict:
    """Whether ablating experts lowers p(concept) more than ablating ``control`` units, with the numbers.

    Supported when, at some k and value, the 95% bootstrap interval of
    gap = p(control ablated) - p(experts ablated) lies entirely above 0; reversed
    when some interval lies entirely below 0. Lowered when the interval of
    drop = p(unablated) - p(experts ablated) lies entirely above 0 somewhere.
    """
    words = concept_words(concept_word(concept))
    summary = {(r["condition"], r["value"], r["k"]): r for r in table if r["concept"] == concept}
    base = summary[(BASE, "none", 0)]

    def flags(condition, value, k):
        return concept_presence([r["text"] for r in rows if r["concept"] == concept
                                 and (r["condition"], r["value"], r["k"]) == (condition, value, k)], words)

    comparisons = []
    for value in args.values:
        for k in args.ks:
            e, c = summary[("experts", value, k)], summary[(control, value, k)]
            gap = difference_row(flags(control, value, k), flags("experts", value, k), "gap", args.seed, args.n_boot)
            drop = difference_row(flags(BASE, "none", 0), flags("experts", value, k), "drop", args.seed, args.n_boot)
            comparisons.append(dict(value=value, k=k, p_base=base["p_concept"], p_experts=e["p_concept"],
                                    p_control=c["p_concept"], **gap, **drop, p_next_base=base["p_next"],
                                    p_next_experts=e["p_next"], p_next_control=c["p_next"]))
    shown = [c for c in comparisons if c["gap_low"] > 0]
    return {"control": control, "supported": bool(shown), "first": shown[0] if shown else None,
            "reversed": any(c["gap_high"] < 0 for c in comparisons),
            "lowered": any(c["drop_low"] > 0 for c in comparisons), "comparisons": comparisons}


def plot_ablation(table: list[dict], names: list[str], args, path: Path) -> None:
    """p(concept) against k, one panel per silencing (rows) and concept (columns), saved at ``path``."""
    fig, axes = plt.subplots(len(args.values), len(names), figsize=(max(6.5, 5 * len(names)), 3.8 * len(args.values)),
                             squeeze=False)
    for i, value in enumerate(args.values):
        for ax, concept in zip(axes[i], names):
            base = next(r for r in table if r["concept"] == concept and r["condition"] == BASE)
            for condition in ["experts", *args.controls]:
                rows = [base] + [r for r in table if r["concept"] == concept and r["condition"] == condition
                                 and r["value"] == value]
                err = [[r["p_concept"] - r["p_concept_low"] for r in rows], [r["p_concept_high"] - r["p_concept"]
                                                                            for r in rows]]
                ax.errorbar([r["k"] for r in rows], [r["p_concept"] for r in rows], yerr=err, marker="o", ms=4,
                            capsize=3, label=f"{condition} ablated")
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xticks([0, *args.ks], [str(k) for k in [0, *args.ks]])
            top = max(r["p_concept_high"] for r in table if r["concept"] == concept)
            ax.set_ylim(0, min(1.0, 1.15 * top + 0.02))  # small rates stay readable
            ax.set_xlabel("k (units ablated)")
            ax.set_ylabel(f"p({concept_word(concept)})")
            ax.set_title(f"{concept_word(concept)}, silenced: {value}")
            ax.legend(fontsize=8)
    fig.suptitle(f"Ablation on concept-inviting prompts, {args.model} (95% bootstrap intervals)", fontsize=10)
    save_figure(fig, path)


# --------------------------------------------------------------------------- report


def write_report(names, verdicts, general, args, run: RunFolder) -> str:
    """The verdicts and their numbers as ``report.txt``; returns the text."""
    lines = [f"Causal validation on {args.model}. Ablation: {args.samples_per_prompt} samples per inviting prompt, "
             f"{args.max_new_tokens} tokens, T={args.temperature:g}, top-k {args.top_k}; gap = p(control ablated) - "
             "p(experts ablated) with a 95% bootstrap interval; p_next = probability that the continuation starts "
             f"with the concept word. Generalisation: split {args.split_fraction:g}/{1 - args.split_fraction:g}, "
             f"seed {args.seed}."]
    for concept in names:
        lines.append(f"\n== {concept}")
        for v in verdicts.get(concept, []):
            f = v["first"]
            reversed_ = [c for c in v["comparisons"] if c["gap_high"] < 0]
            if f:
                lines.append(f"ablation vs {v['control']}: YES - at k={f['k']} ({f['value']}) p(concept) "
                             f"{f['p_base']:.2f} -> {f['p_experts']:.2f} (experts) vs {f['p_control']:.2f} "
                             f"({v['control']}); gap {f['gap']:.2f} [{f['gap_low']:.2f}, {f['gap_high']:.2f}]; "
                             f"p_next {f['p_next_base']:.3f} -> {f['p_next_experts']:.3f} vs "
                             f"{f['p_next_control']:.3f}.")
            else:
                worst = min(reversed_ or v["comparisons"], key=lambda c: c["gap"])
                best = max(v["comparisons"], key=lambda c: c["gap"])
                shown = worst if reversed_ else best
                verdict = ("REVERSED - silencing the experts raises p(concept)" if reversed_
                           else "NOT SHOWN at this sample size")
                lines.append(f"ablation vs {v['control']}: {verdict}; e.g. k={shown['k']} ({shown['value']}): "
                             f"p {shown['p_base']:.2f} -> {shown['p_experts']:.2f} vs {shown['p_control']:.2f}, gap "
                             f"{shown['gap']:.2f} [{shown['gap_low']:.2f}, {shown['gap_high']:.2f}]; p_next "
                             f"{shown['p_next_base']:.3f} -> {shown['p_next_experts']:.3f} vs "
                             f"{shown['p_next_control']:.3f}.")
            if v is verdicts[concept][0]:  # the drop from the unablated model is the same for every control
                drops = v["comparisons"]
                lowered = [c for c in drops if c["drop_low"] > 0]
                d = max(lowered or drops, key=lambda c: (c["drop_low"], c["drop"]))
                lines.append(f"below the unablated model: {'YES' if lowered else 'NOT SHOWN'} - e.g. k={d['k']} "
                             f"({d['value']}): p(concept) {d['p_base']:.2f} -> {d['p_experts']:.2f}, drop "
                             f"{d['drop']:.2f} [{d['drop_low']:.2f}, {d['drop_high']:.2f}]; p_next "
                             f"{d['p_next_base']:.3f} -> {d['p_next_experts']:.3f}.")
            for c in v["comparisons"]:
                lines.append(f"   k={c['k']:>5} {c['value']:>8}: p base {c['p_base']:.2f}, "
                             f"experts {c['p_experts']:.2f}, "
                             f"{v['control']} {c['p_control']:.2f}, gap {c['gap']:+.2f} [{c['gap_low']:+.2f}, "
                             f"{c['gap_high']:+.2f}]; p_next {c['p_next_base']:.3f} / {c['p_next_experts']:.3f} / "
                             f"{c['p_next_control']:.3f}")
        mine = [g for g in general if g["concept"] == concept]
        if mine:
            ok = all(g["kept_above_chance"] >= args.keep for g in mine)
            lines.append(f"generalisation: {'YES' if ok else 'NO'} - held-out AP keeps "
                         + ", ".join(f"{g['kept_above_chance']:.2f} (k={g['k']})" for g in mine)
                         + f" of the above-chance AP (threshold {args.keep:g}); chance {mine[0]['chance']:.3f}.")
            for g in mine:
                lines.append(f"   k={g['k']:>5}: AP choosing {g['ap_choosing']:.3f}, held out {g['ap_held_out']:.3f} "
                             f"(drop {g['ap_drop']:.3f}, min {g['ap_held_out_min']:.3f}); held-out own top-k "
                             f"{g['ap_held_out_own_topk']:.3f}; overlap {g['overlap']:.2f}")
    return run.report(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the summary also written to report.json."""
    args = parse_args(argv)
    out = Path(args.out)
    settings = dict(recipe="causal_validation", model=args.model, samples_per_prompt=args.samples_per_prompt,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    batch_size=args.batch_size, seed=args.seed, experts=args.experts, concepts=args.concepts)
    run = RunFolder(out, settings)
    lazy = LazyModel(args)
    expert_set, names = experts_for(lazy, args)
    model = lazy.get(expert_set)  # the generalisation test reads the model's cached responses

    verdicts: dict[str, list[dict]] = {}
    cells_generated = 0
    if not args.no_ablation:
        cells = grid(names, args)
        ids = [RunFolder.cell_id(**c) for c in cells]
        todo = [(c, i) for c, i in zip(cells, ids) if not run.done(i)]
        cells_generated = len(todo)
        concept_set = ConceptSet.load(args.concepts).with_sampled_negatives(seed=0)
        shifts = functools.cache(lambda name: unit_shifts(model, expert_set, concept_set[name]))
        promoting = functools.cache(lambda name: promoting_scores(model, expert_set, name))
        for cell, cell_id in tqdm(todo, desc="ablation cells", unit="cell"):
            run.write_cell(cell_id, run_cell(cell, model, expert_set, shifts, promoting, args))
        rows = run.all_rows(ids)
        table = ablation_table(rows, names, args)
        write_csv(out / "ablation.csv", table)
        verdicts = {c: [ablation_verdict(rows, table, c, ctl, args) for ctl in args.controls] for c in names}
        plot_ablation(table, names, args, out / "ablation.png")

    concept_set = ConceptSet.load(args.concepts).with_sampled_negatives(seed=0)
    general = held_out_expertise(model, concept_set.subset(names), args.split_ks, fraction=args.split_fraction,
                                 seed=args.seed, cache_dir=args.cache_dir)
    write_csv(out / "generalisation.csv", general)
    print(write_report(names, verdicts, general, args, run))
    summary = {"cells_generated": cells_generated, "ablation": verdicts, "generalisation": general}
    run.write("report.json", summary)
    return summary


if __name__ == "__main__":
    run_recipe(main)
