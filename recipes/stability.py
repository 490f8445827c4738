"""Stability of expert-overlap similarity across models and across data.

* across models: experts of the same concepts (same sentences, same sampled
  negatives) in each model; Spearman rho between the models' concept-similarity
  matrices (distinct pairs), with a Mantel permutation p-value;
* across data, on the first model: the positives of every concept split into
  two disjoint halves (negatives: the other concepts' positives in the same
  half), and facts vs stories when the concept files carry a ``style`` column.

Responses are collected once per model; the data splits reuse them (expertise
is recomputed on the rows of each split only).

    python recipes/stability.py --concepts out/men100/concepts --out out/men100/stability

Resumable: each model's expert set is saved under <out>/models/ and reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, from any working directory

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import MEN, RunFolder, Stopwatch, parse, recipe_parser, run_recipe  # noqa: E402
from steer_experts.concepts import ConceptSet  # noqa: E402
from steer_experts.discovery import discover  # noqa: E402
from steer_experts.expertise import compute_expertise, scoring_device  # noqa: E402
from steer_experts.experts import ExpertSet  # noqa: E402
from steer_experts.figures import save_figure  # noqa: E402
from steer_experts.lens.organisation import size_confound, styles_of, view_of  # noqa: E402
from steer_experts.lens.ratings import human_alignment, load_men  # noqa: E402
from steer_experts.lens.similarity import (  # noqa: E402
    SimilarityMatrix, ap_cosine_similarity, jaccard_similarity, matrix_agreement, top_k_jaccard_similarity,
)
from steer_experts.models import load_model  # noqa: E402
from steer_experts.responses import collect_responses  # noqa: E402


def similarities(ap: np.ndarray, names: list[str], multiple: float, rate: float,
                 top_k: int) -> dict[str, SimilarityMatrix]:
    """The compared methods: AP cosine (raw, centred), Jaccard at tau = r + m (1 - r) and of the top k."""
    tau = rate + multiple * (1 - rate)
    jac = jaccard_similarity((ap, names), tau)
    jac.method = f"jaccard m={multiple:g}"
    top = top_k_jaccard_similarity((ap, names), top_k)
    return {"ap cosine": ap_cosine_similarity((ap, names)), "ap cosine centred": ap_cosine_similarity((ap, names), True),
            jac.method: jac, top.method: top}


def compare(label: str, a: dict[str, SimilarityMatrix], b: dict[str, SimilarityMatrix], args) -> list[dict]:
    """One row per method: agreement of ``a`` and ``b`` over their common concepts."""
    rows = []
    for method in a:
        common = [n for n in a[method].concepts if n in b[method].concepts]
        agreement = matrix_agreement(a[method].subset(common), b[method].subset(common),
                                     n_perm=args.n_perm, seed=args.seed)
        rows.append({"comparison": label, "method": method, "concepts": len(common), **agreement.to_dict()})
    return rows


def scatter(a: SimilarityMatrix, b: SimilarityMatrix, xlabel: str, ylabel: str, rho: float | None, path: Path) -> None:
    """Scatter of two matrices' values on the distinct pairs."""
    common = [n for n in a.concepts if n in b.concepts]
    x, y = a.subset(common).upper_triangle(), b.subset(common).upper_triangle()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(x, y, s=4, alpha=0.4)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(f"{a.method}: Spearman rho {rho:.2f}" if rho is not None else a.method, fontsize=9)
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the result dict also written to ``<out>/stability.json``."""
    p = recipe_parser(__doc__, experts=False)
    p.add_argument("--concepts", required=True, help="concept file or folder (ConceptSet.load)")
    p.add_argument("--models", default="smollm2-135m,gemma3-270m", help="comma-separated; the first one is used "
                   "for the data splits")
    p.add_argument("--multiple", type=float, default=0.1, help="Jaccard at tau = r + m (1 - r)")
    p.add_argument("--top-k", type=int, default=1000, help="Jaccard of the top-k expert sets (1000: the method "
                   "human_alignment chose on dev pairs for men100, on both models)")
    p.add_argument("--ratings", help="ratings for each model's alignment (default: MEN in the shared data; '' to skip)")
    p.add_argument("--n-negatives", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-perm", type=int, default=1000, help="Mantel permutations")
    p.add_argument("--quiet", action="store_true")
    args = parse(p, argv)
    args.ratings = str(args.data / MEN) if args.ratings is None else args.ratings
    run = RunFolder(args.out)
    out = run.root
    (out / "models").mkdir(parents=True, exist_ok=True)
    concepts = ConceptSet.load(args.concepts)
    ratings = load_men(args.ratings) if args.ratings else None
    sampled = concepts.with_sampled_negatives(args.n_negatives, args.seed)
    collect = dict(max_length=args.max_length, batch_size=args.batch_size, cache_dir=args.cache_dir,
                   progress=not args.quiet)

    per_model, alignment, rows, confound = {}, {}, [], {}
    first_model = None
    clock = Stopwatch()
    for name in args.models.split(","):
        folder = out / "models" / Path(name).name
        model = None
        if (folder / "expert_set.json").exists():
            expert_set = ExpertSet.from_pretrained(folder)
        else:
            print(f"discovering experts in {name}", file=sys.stderr)
            with clock.stage(f"discover {name}"):
                model = load_model(name, dtype=args.dtype, device=args.device)
                expert_set = discover(model, concepts, n_negatives=args.n_negatives, seed=args.seed, **collect)
                expert_set.save_pretrained(folder)
        e = expert_set.expertise
        rate = float(np.mean(e.n_positives / (e.n_positives + e.n_negatives)))
        per_model[name] = similarities(e.ap, expert_set.concepts, args.multiple, rate, args.top_k)
        counts = dict(zip(expert_set.concepts, e.n_positives.tolist()))
        # None: equal counts everywhere, so there is nothing for a similarity to track.
        confound[name] = (None if len(set(counts.values())) == 1
                          else {m: size_confound(sim, counts) for m, sim in per_model[name].items()})
        if ratings is not None:
            alignment[name] = {m: human_alignment(s, ratings, n_boot=1000, seed=args.seed).to_dict()
                               for m, s in per_model[name].items()}
        if first_model is None:
            first_model = (name, model)
    names = list(per_model)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            rows += compare(f"models: {names[i]} vs {names[j]}", per_model[names[i]], per_model[names[j]], args)
            method = "ap cosine centred"
            scatter(per_model[names[i]][method], per_model[names[j]][method], names[i], names[j],
                    next(r["rho"] for r in rows if r["comparison"].endswith(f"{names[i]} vs {names[j]}")
                         and r["method"] == method), out / f"models_{i}_{j}.png")

    # Data splits on the first model: one response matrix, expertise per split.
    with clock.stage("data splits"):
        name, model = first_model
        model = model or load_model(name, dtype=args.dtype, device=args.device)
        responses = collect_responses(model, sampled.sentences, **collect)
        row_of = {s: i for i, s in enumerate(sampled.sentences)}
        splits = {}
        half_a, half_b = concepts.split(0.5, seed=args.seed)
        splits["halves"] = ({c.name: list(c.positives) for c in half_a.concepts},
                            {c.name: list(c.positives) for c in half_b.concepts})
        styles = styles_of(Path(args.concepts))
        if {"facts", "stories"} <= set(styles):
            splits["facts vs stories"] = (styles["facts"], styles["stories"])
        split_sizes = {}
        for label, (first, second) in splits.items():
            matrices = []
            for k, groups in enumerate((first, second)):
                view = view_of(groups, row_of, args.n_negatives, args.seed + k)
                expertise = compute_expertise(responses, view, threads=torch.get_num_threads(),
                                              device=scoring_device(model.device), progress=not args.quiet)
                rate = float(np.mean(expertise.n_positives / (expertise.n_positives + expertise.n_negatives)))
                matrices.append(similarities(expertise.ap, view.names, args.multiple, rate, args.top_k))
                split_sizes[f"{label} {k}"] = {"concepts": len(view.names), "positives_median":
                                               float(np.median(expertise.n_positives))}
            rows += compare(f"data: {label}", matrices[0], matrices[1], args)
            method = "ap cosine centred"
            scatter(matrices[0][method], matrices[1][method], f"{label}: first", f"{label}: second",
                    next(r["rho"] for r in rows if r["comparison"] == f"data: {label}" and r["method"] == method),
                    out / f"data_{label.replace(' ', '_')}.png")

    result = {"models": names, "multiple": args.multiple, "rows": rows, "alignment": alignment,
              "positive_count_confound": confound,
              "split_sizes": split_sizes, "n_concepts": len(concepts), "wall": clock.summary()}
    run.write("stability.json", result)
    lines = ["# Stability of expert-overlap similarity", "",
             f"{len(concepts)} concepts; rho: Spearman between two similarity matrices' distinct pairs; "
             f"p: Mantel permutation test ({args.n_perm} permutations).", "",
             "| comparison | method | concepts | pairs | rho | p |", "|---|---|---|---|---|---|"]
    for r in rows:
        rho = "undefined" if r["rho"] is None else f"{r['rho']:.3f}"
        pv = "" if r["p_value"] is None else f"{r['p_value']:.3g}"
        lines.append(f"| {r['comparison']} | {r['method']} | {r['concepts']} | {r['n_pairs']} | {rho} | {pv} |")
    lines += ["", clock.line(), "", "Split sizes: " + "; ".join(f"{k}: {v['concepts']} concepts, median {v['positives_median']:.0f} "
                                             f"positives" for k, v in split_sizes.items())]
    lines += ["", "## Does a similarity just track the concepts' positive counts?", "",
              "Spearman rho between each model's similarity and log P_a + log P_b over the pairs (near 0 is good; "
              "a similarity that tracks the counts is stable for that reason alone):", ""]
    for name, methods in confound.items():
        if methods is None:
            lines.append(f"- {name}: undefined: every concept has the same number of positives, so the counts "
                         "cannot explain any similarity")
        else:
            lines.append(f"- {name}: " + ", ".join(f"{m} {'undefined' if v is None else f'{v:.3f}'}"
                                                  for m, v in methods.items()))
    if alignment:
        lines += ["", "## Human alignment per model (MEN, Spearman rho [95% CI], pairs)", ""]
        for name, methods in alignment.items():
            for m, c in methods.items():
                value = "undefined" if c["rho"] is None else f"{c['rho']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"
                lines.append(f"- {name}, {m}: {value}, {c['n_pairs']} pairs")
    lines += ["", "Figures: " + ", ".join(f"![{f.stem}]({f.name})" for f in sorted(out.glob("*.png")))]
    run.report(lines, "report.md")
    print(f"wrote {out}/report.md", file=sys.stderr)
    return result


if __name__ == "__main__":
    run_recipe(main)
