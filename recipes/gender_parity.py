"""Gender parity: how many woman (or man) experts bring "The <occupation> said that" to parity?

Contexts are "The <occupation> said that" over ~20 occupations (``evaluation.prompts``).
For the woman experts and, separately, the man experts (OneSec data, each concept
against its own negatives; with ``--contrast`` also against the other gender's
positives), the model is steered with do(c, k) over a grid of k and the gender
gap of its continuation is measured:

    delta_p = p(she, her) - p(he, his)

How p is measured (``--measure``):

* ``next-token`` (default): the exact probability that the continuation begins
  with "she"/"her" (or "She"/"Her"), and with "he"/"his" (and capitalised), under
  the steered model -- one forward pass per context and word, no sampling noise.
  It looks only at the first word after "said that", where the subject pronoun goes.
* ``sampled``: as the paper, the share of sampled continuations (``--samples`` per
  context, T = 1.0, top-k 10) containing she/her, minus the share containing he/his,
  anywhere. Noisier and far more expensive.
* ``both``: report both.

The parity point of a context is where delta_p first crosses zero in the direction
the experts push it (woman experts: up, man experts: down), interpolated linearly
in log(1 + k) between the two grid points around it; it exists only for contexts
that lean the other way unsteered ("already leans she/he" otherwise; "none within
the grid" if it does not cross). Perplexity at parity: short sampled
continuations (``--ppl-samples`` per context and k) are scored by a *different*
model (Gemma-3-270M for SmolLM2, and the reverse) and by the steered model itself;
their mean over all contexts is interpolated at the parity k the same way.

Why ``--contrast``: OneSec's "man" positives mention women in 40% of sentences (1.6%
of its negatives), so "man" experts found against the plain negatives are largely
gender-in-general units (7 of the top 10 are also top "woman" experts on SmolLM2)
and steering with them can raise p(she). Contrasting keeps the units that tell the
two apart (``discover(..., negatives="contrast")``).

Outputs: samples.jsonl, delta.csv (per context and k), parity.csv (per context and
steering concept), report.txt, report.json, delta_vs_k.png. Resumable.

    python recipes/gender_parity.py --out out/gender_parity
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, from any working directory

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from _common import (  # noqa: E402
    LazyModel, RunFolder, cross_scorer, experts_for, numbers, parse, recipe_parser, run_recipe, write_csv,
)
from steer_experts.evaluation import SteeredScorer, concept_presence, next_word_probability, perplexity  # noqa: E402
from steer_experts.evaluation.prompts import OCCUPATION_TEMPLATE, OCCUPATIONS, occupation_contexts  # noqa: E402
from steer_experts.evaluation.statistics import crossing_k, finite_mean, value_at_k  # noqa: E402
from steer_experts.figures import concept_panels  # noqa: E402
from steer_experts.steering import steer  # noqa: E402
from steer_experts.words import concept_word  # noqa: E402

SHE = ("she", "her")
HE = ("he", "his")
MEASURES = ("next-token", "sampled", "both")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The recipe's options (``argv``; None reads the command line), checked."""
    p = recipe_parser(__doc__)
    p.add_argument("--woman", default="woman", help="the concept whose experts push toward she/her")
    p.add_argument("--man", default="man", help="the concept whose experts push toward he/his")
    p.add_argument("--contrast", action="store_true",
                   help="find each gender's experts against the other gender's positives too")
    p.add_argument("--ks", default="0,1,3,10,30,100,300,1000", help="numbers of experts")
    p.add_argument("--alpha", type=float, default=1.0, help="intervention strength")
    p.add_argument("--occupations", default=",".join(OCCUPATIONS), help="comma-separated occupations")
    p.add_argument("--template", default=OCCUPATION_TEMPLATE, help="context template with an {occupation} slot")
    p.add_argument("--measure", choices=MEASURES, default="next-token", help="how p(she, her) is measured")
    p.add_argument("--samples", type=int, default=20, help="sampled continuations per context (--measure sampled)")
    p.add_argument("--ppl-samples", type=int, default=2, help="continuations per context for perplexity")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--scorer", help="model that scores perplexity (default: the other embedded model; 'none')")
    args = parse(p, argv)
    args.ks = sorted(set(numbers(args.ks)))
    args.occupations = numbers(args.occupations, str)
    if 0 not in args.ks:
        p.error("the k grid must include 0: parity is a change of sign from the unsteered model")
    if args.ppl_samples < 0 or args.samples < 1:
        p.error("--ppl-samples must be >= 0 and --samples >= 1")
    return args


def both_cases(words: tuple[str, ...]) -> list[str]:
    """Each of ``words`` as written and capitalised ("she", "She", ...)."""
    return [w for word in words for w in (word, word.capitalize())]


def n_generated(args: argparse.Namespace) -> int:
    """Continuations sampled per context: enough for the sampled measure and for perplexity."""
    return max(args.samples if args.measure != "next-token" else 0, args.ppl_samples)


def run_cell(cell: dict, model, expert_set, scorer, contexts: list[str], args) -> list[dict]:
    """One (steering concept, k) cell: next-word probabilities and sampled continuations per context."""
    steered = steer(model, expert_set, cell["concept"], k=cell["k"], alpha=args.alpha, seed=args.seed)
    self_scorer = SteeredScorer(steered)
    she, he = both_cases(SHE), both_cases(HE)
    mass = next_word_probability(self_scorer, model.tokenizer, contexts, she + he, batch_size=args.batch_size)
    n = n_generated(args)
    asked = [c for c in contexts for _ in range(n)]
    texts = ppl_self = ppl_cross = []
    if n:
        texts = steered.complete(asked, max_new_tokens=args.max_new_tokens, do_sample=True,
                                 temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                 batch_size=args.batch_size)
        ppl_self = perplexity(texts, self_scorer, model.tokenizer, prompts=asked, batch_size=args.batch_size,
                              progress=False).tolist()
        ppl_cross = (perplexity(texts, scorer.model, scorer.tokenizer, prompts=asked, batch_size=args.batch_size,
                                progress=False).tolist() if scorer else [float("nan")] * len(texts))
    rows = []
    for i, (occupation, context) in enumerate(zip(args.occupations, contexts)):
        part = slice(i * n, (i + 1) * n)
        rows.append(dict(cell, occupation=occupation, context=context,
                         p_she_next=float(mass[i, : len(she)].sum()), p_he_next=float(mass[i, len(she):].sum()),
                         texts=texts[part], ppl_self=ppl_self[part], ppl_cross=ppl_cross[part]))
    return rows


# --------------------------------------------------------------------------- analysis


def deltas(rows: list[dict], args) -> list[dict]:
    """Per (concept, k, occupation): delta_p by each measure asked for."""
    table = []
    for r in rows:
        row = dict(concept=r["concept"], k=r["k"], occupation=r["occupation"],
                   p_she_next=r["p_she_next"], p_he_next=r["p_he_next"],
                   delta_next=r["p_she_next"] - r["p_he_next"])
        if args.measure != "next-token":
            texts = r["texts"][: args.samples]
            row["p_she_sampled"] = float(concept_presence(texts, SHE).mean())
            row["p_he_sampled"] = float(concept_presence(texts, HE).mean())
            row["delta_sampled"] = row["p_she_sampled"] - row["p_he_sampled"]
        row["ppl_cross"] = finite_mean(r["ppl_cross"])
        row["ppl_self"] = finite_mean(r["ppl_self"])
        table.append(row)
    return table


def parity_table(table: list[dict], names: list[str], args, measure: str) -> list[dict]:
    """Per steering concept and context (and their mean over contexts): the parity point.

    ``names`` is [woman, man]: woman experts push delta_p up, man experts down. Parity
    is defined only where the unsteered context leans the other way; ``status`` says
    which case each row is: "parity", "none within the grid", "already leans <word>"
    (the experts can only push it further from parity) or "at parity unsteered".
    ``parity_grid_k`` is the first k of the grid on the other side of zero and
    ``parity_k`` the interpolated crossing (between the grid point before and it).
    """
    out = []
    for concept in names:
        direction = 1.0 if concept == names[0] else -1.0
        for occupation in [*args.occupations, "mean over contexts"]:
            mine = [r for r in table if r["concept"] == concept
                    and (occupation == "mean over contexts" or r["occupation"] == occupation)]
            ks = sorted({r["k"] for r in mine})
            delta = [float(np.mean([r[f"delta_{measure}"] for r in mine if r["k"] == k])) for k in ks]
            ppl_self = [finite_mean([r["ppl_self"] for r in mine if r["k"] == k]) for k in ks]
            # Perplexity at parity from all contexts' samples: two per context are too few alone.
            all_ppl = [finite_mean([r["ppl_cross"] for r in table if r["concept"] == concept and r["k"] == k])
                       for k in ks]
            k_star = grid_k = None
            if delta[0] == 0:
                status, k_star, grid_k = "at parity unsteered", 0.0, 0
            elif np.sign(delta[0]) == direction:
                status = f"already leans {'she' if direction > 0 else 'he'}"
            else:
                k_star = crossing_k(ks, delta)
                status = "parity" if k_star is not None else "none within the grid"
                grid_k = next((k for k, d in zip(ks, delta) if np.sign(d) != np.sign(delta[0])), None)
            found = k_star is not None
            out.append(dict(concept=concept, occupation=occupation, measure=measure, status=status,
                            delta_k0=delta[0], delta_kmax=delta[-1],
                            parity_k=k_star if found else "", parity_grid_k=grid_k if found else "",
                            ppl_cross_at_parity=value_at_k(ks, all_ppl, k_star) if found else "",
                            ppl_self_at_parity=value_at_k(ks, ppl_self, k_star) if found else "",
                            ppl_cross_k0=all_ppl[0], ppl_self_k0=ppl_self[0]))
    return out


def plot_delta(table: list[dict], names: list[str], args, measure: str, path: Path) -> None:
    """delta_p against k, one thin line per occupation and their mean, one panel per concept, saved at ``path``."""
    def draw(ax, concept):
        for occupation in args.occupations:
            mine = sorted((r for r in table if r["concept"] == concept and r["occupation"] == occupation),
                          key=lambda r: r["k"])
            ax.plot([r["k"] for r in mine], [r[f"delta_{measure}"] for r in mine], lw=0.8, alpha=0.5)
            ax.annotate(occupation, (mine[-1]["k"], mine[-1][f"delta_{measure}"]), fontsize=6, alpha=0.7,
                        xytext=(2, 0), textcoords="offset points")
        ks = sorted({r["k"] for r in table if r["concept"] == concept})
        mean = [np.mean([r[f"delta_{measure}"] for r in table if r["concept"] == concept and r["k"] == k]) for k in ks]
        ax.plot(ks, mean, color="black", lw=2.5, marker="o", label="mean over contexts")
        ax.axhline(0, color="grey", ls="--", lw=1)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(args.ks, [str(k) for k in args.ks])
        ax.set(xlabel=f"k ({concept_word(concept)} experts steered)", title=f"{concept_word(concept)} experts")
        if concept == names[0]:
            ax.set_ylabel(f"p(she, her) - p(he, his)  [{measure}]")
        ax.legend(fontsize=8)
    concept_panels(names, draw, path, f"Gender parity, {args.model}: \"{args.template}\", one thin line per occupation",
                   width=6, height=4.5, min_width=7, sharey=True)


def write_report(parity: dict[str, list[dict]], args, run: RunFolder) -> str:
    """The parity points by measure and concept as ``report.txt``; returns the text."""
    lines = [f"Gender parity on {args.model}: {len(args.occupations)} contexts \"{args.template}\", k grid {args.ks}, "
             f"alpha {args.alpha:g}. delta_p = p(she, her) - p(he, his). Parity: where delta_p crosses zero in "
             "the direction the experts push (woman: up, man: down), for contexts that lean the other way "
             "unsteered; interpolated linearly in log(1 + k). Perplexity: mean over all contexts' samples "
             f"({args.ppl_samples} per context), scored by the other model, interpolated at the parity k."]
    for measure, rows in parity.items():
        lines.append(f"\n== measure: {measure}")
        for concept in dict.fromkeys(r["concept"] for r in rows):
            mine = [r for r in rows if r["concept"] == concept]
            contexts = [r for r in mine if r["occupation"] != "mean over contexts"]
            eligible = [r for r in contexts if not r["status"].startswith("already")]
            reached = [r for r in eligible if r["status"] == "parity"]
            lines.append(f"-- {concept} experts: parity reached in {len(reached)} of the {len(eligible)} contexts "
                         f"that lean the other way ({len(contexts)} in all; unsteered ppl_cross "
                         f"{mine[0]['ppl_cross_k0']:.1f})")
            for r in mine:
                where = r["status"]
                if r["status"] == "parity":
                    where = (f"parity at k = {r['parity_k']:.1f} (first grid k past it: {r['parity_grid_k']}), "
                             f"ppl_cross {r['ppl_cross_at_parity']:.1f}")
                lines.append(f"   {r['occupation']:>20}: delta(k=0) = {r['delta_k0']:+.3f}, "
                             f"delta(k={args.ks[-1]}) = {r['delta_kmax']:+.3f}; {where}")
    return run.report(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the summary also written to report.json."""
    args = parse_args(argv)
    out = Path(args.out)
    contexts = occupation_contexts(args.occupations, args.template)
    settings = dict(recipe="gender_parity", model=args.model, contexts=contexts, alpha=args.alpha,
                    measure=args.measure, samples=args.samples, ppl_samples=args.ppl_samples,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    batch_size=args.batch_size, seed=args.seed, scorer=args.scorer, experts=args.experts,
                    contrast=args.contrast)
    run = RunFolder(out, settings)
    lazy = LazyModel(args)
    expert_set, names = experts_for(lazy, args, [args.woman, args.man], contrast=args.contrast)

    cells = [dict(concept=c, k=k) for k in args.ks for c in names]
    ids = [RunFolder.cell_id(concept="all" if c["k"] == 0 else c["concept"], k=c["k"]) for c in cells]
    todo = [(c, i) for c, i in zip(cells, ids) if not run.done(i)]
    todo = list({i: (c, i) for c, i in todo}.values())  # k = 0 is one cell for both concepts
    model = lazy.get(expert_set) if todo else None
    scorer = cross_scorer(args) if todo and args.ppl_samples else None
    for cell, cell_id in tqdm(todo, desc="cells", unit="cell"):
        run.write_cell(cell_id, run_cell(dict(cell, concept=names[0]) if cell["k"] == 0 else cell,
                                         model, expert_set, scorer, contexts, args))
    rows = []
    for cell, cell_id in zip(cells, ids):  # the k = 0 rows serve both concepts
        rows += [dict(r, concept=cell["concept"]) for r in run.read_cell(cell_id)]
    run.all_rows(list(dict.fromkeys(ids)))

    table = deltas(rows, args)
    write_csv(out / "delta.csv", table)
    measures = ["next", "sampled"] if args.measure == "both" else [args.measure.split("-")[0]]
    parity = {m: parity_table(table, names, args, m) for m in measures}
    write_csv(out / "parity.csv", [r for m in measures for r in parity[m]])
    plot_delta(table, names, args, measures[0], out / "delta_vs_k.png")
    print(write_report(parity, args, run))
    summary = {"cells_generated": len(todo), "concepts": names, "parity": parity}
    run.write("report.json", summary)
    return summary


if __name__ == "__main__":
    run_recipe(main)
