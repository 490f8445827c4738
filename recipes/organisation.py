"""How concepts organise in expert space: clusters, categories, layers, neuron labels.

* hierarchical clustering (average linkage, distance 1 - similarity) of the
  concepts by expert overlap; dendrogram and ordered heatmap;
* adjusted Rand index of the clusters (cut at as many clusters as categories)
  against an optional concept -> category file (CSV/TSV: concept, category);
* where the experts sit: their distribution over layers as tau rises;
* neuron labels: every neuron with the concepts it is expert for.

    python recipes/organisation.py --experts out/men100/alignment/experts --out out/men100/organisation \
        --categories out/men100/categories.csv
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, from any working directory

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.cluster.hierarchy import dendrogram, fcluster  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from _common import RunFolder, parse, recipe_parser, run_recipe  # noqa: E402
from steer_experts.experts import ExpertSet  # noqa: E402
from steer_experts.figures import save_figure  # noqa: E402
from steer_experts.lens.organisation import (  # noqa: E402
    cluster, layer_distribution, read_categories, similarity_by_name,
)
from steer_experts.lens.queries import label_neurons  # noqa: E402
from steer_experts.lens.similarity import SimilarityMatrix, relative_taus  # noqa: E402


def plot_tree(sim: SimilarityMatrix, tree: np.ndarray, categories: dict[str, str], out: Path) -> list[str]:
    """Dendrogram and heatmap PNGs; returns the concepts in leaf order."""
    n = len(sim.concepts)
    fig, ax = plt.subplots(figsize=(max(6, 0.16 * n + 2), 4.5))
    labels = [f"{c} [{categories[c]}]" if c in categories else c for c in sim.concepts]
    leaves = dendrogram(tree, labels=labels, ax=ax, leaf_font_size=6 if n > 40 else 8, color_threshold=None)
    ax.set_title(f"Concepts clustered by {sim.method} (average linkage)")
    save_figure(fig, out / "dendrogram.png")
    order = leaves["leaves"]
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * n + 3), max(5, 0.12 * n + 2)))
    shown = sim.values[np.ix_(order, order)].copy()
    np.fill_diagonal(shown, np.nan)  # the diagonal (1) would flatten the colour scale
    image = ax.imshow(shown, cmap="viridis", interpolation="nearest")
    names = [sim.concepts[i] for i in order]
    ax.set_xticks(range(n), names, rotation=90, fontsize=5 if n > 40 else 8)
    ax.set_yticks(range(n), names, fontsize=5 if n > 40 else 8)
    fig.colorbar(image, ax=ax, shrink=0.7, label=sim.method)
    ax.set_title("Similarity, concepts in dendrogram order (diagonal blank)")
    save_figure(fig, out / "heatmap.png")
    return names


def plot_layers(distribution: dict[str, list[float]], totals: dict[str, int], path: Path) -> None:
    """Heatmap: thresholds (rows) x layers (columns), share of experts; total count on the right."""
    labels = list(distribution)
    n_layers = max((len(v) for v in distribution.values()), default=0)
    grid = np.array([v if v else [np.nan] * n_layers for v in distribution.values()])
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * n_layers + 3), 0.35 * len(labels) + 1.5))
    image = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(labels)), [f"{lab}  (n={totals[lab]})" for lab in labels], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title("Where the experts are: share per layer as tau rises (blank: no experts)")
    fig.colorbar(image, ax=ax, label="share of experts")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the result dict also written to ``<out>/organisation.json``."""
    p = recipe_parser(__doc__, experts=False)  # --seed: the shuffled-label baseline of the Rand index
    p.add_argument("--experts", required=True, help="a saved ExpertSet folder (e.g. from human_alignment.py)")
    p.add_argument("--method", default="ap-cosine-centred",
                   help="ap-cosine, ap-cosine-centred, jaccard:<tau> or jaccard-relative:<m>")
    p.add_argument("--categories", help="CSV/TSV concept,category for the adjusted Rand index")
    p.add_argument("--taus", default="0.5,0.6,0.7,0.8,0.9,0.95", help="absolute thresholds for the layer figure")
    p.add_argument("--multiples", default="0.05,0.1,0.2,0.3,0.5", help="relative thresholds for the layer figure")
    p.add_argument("--label-tau", type=float, help="tau for neuron labels (default: relative m=0.3)")
    args = parse(p, argv)
    run = RunFolder(args.out)
    out = run.root
    expert_set = ExpertSet.from_pretrained(args.experts)
    sim = similarity_by_name(expert_set, args.method)
    sim.to_csv(out / "similarity.csv")
    categories = read_categories(args.categories) if args.categories else {}
    tree = cluster(sim)
    order = plot_tree(sim, tree, categories, out)

    ari = None
    if categories:
        known = [c for c in sim.concepts if c in categories]
        if len(known) < len(sim.concepts):
            print(f"{len(sim.concepts) - len(known)} concepts have no category; the Rand index uses "
                  f"{len(known)}", file=sys.stderr)
        n_clusters = len({categories[c] for c in known})
        labels = fcluster(tree, t=n_clusters, criterion="maxclust")
        truth = [categories[c] for c in known]
        found = [labels[sim.index(c)] for c in known]
        rng = np.random.default_rng(args.seed)
        chance = [adjusted_rand_score(truth, rng.permutation(found)) for _ in range(200)]
        ari = {"ari": float(adjusted_rand_score(truth, found)), "clusters": n_clusters, "concepts": len(known),
               "shuffled_mean": float(np.mean(chance)), "shuffled_p95": float(np.percentile(chance, 95)),
               "clusters_by_concept": {c: int(f) for c, f in zip(known, found)}}

    thresholds = {f"tau={t:g}": float(t) for t in map(float, args.taus.split(","))}
    thresholds |= {f"m={m:g} (tau={tau:.3f})": tau
                   for m, tau in relative_taus(expert_set, [float(m) for m in args.multiples.split(",")]).items()}
    thresholds = dict(sorted(thresholds.items(), key=lambda kv: kv[1]))
    distribution = layer_distribution(expert_set, thresholds)
    totals = {k: int((expert_set.expertise.ap > t).sum()) for k, t in thresholds.items()}
    plot_layers(distribution, totals, out / "layers.png")

    label_tau = args.label_tau if args.label_tau is not None else relative_taus(expert_set, [0.3])[0.3]
    labels = label_neurons(expert_set, tau=label_tau)
    run.write("neuron_labels.jsonl", "".join(json.dumps(r) + "\n" for r in labels))
    sizes = np.bincount([len(r["concepts"]) for r in labels]) if labels else np.zeros(1, int)

    result = {"method": sim.method, "order": order, "adjusted_rand": ari, "layer_share": distribution,
              "experts_total": totals, "label_tau": label_tau, "labelled_neurons": len(labels),
              "neurons_by_number_of_concepts": {int(k): int(v) for k, v in enumerate(sizes) if k and v}}
    run.write("organisation.json", result)
    lines = ["# Organisation of concepts in expert space", "",
             f"- {len(sim.concepts)} concepts, {expert_set.n_units} units of `{expert_set.model_name}`; "
             f"similarity: {sim.method}", ""]
    if ari:
        lines += [f"- adjusted Rand index vs categories: **{ari['ari']:.3f}** ({ari['clusters']} clusters, "
                  f"{ari['concepts']} concepts); shuffled labels: mean {ari['shuffled_mean']:.3f}, "
                  f"95th percentile {ari['shuffled_p95']:.3f}"]
    best_layer = {k: int(np.argmax(v)) for k, v in distribution.items() if v}
    lines += ["- layer holding most experts, by threshold: " + ", ".join(f"{k}: L{v}" for k, v in best_layer.items()),
              f"- thresholds with no experts at all: {[k for k, v in distribution.items() if not v] or 'none'}",
              f"- neuron labels at tau={label_tau:.3f}: {len(labels)} neurons are expert for at least one concept; "
              "by number of concepts: " + ", ".join(f"{k}: {v}" for k, v in
                                                     result["neurons_by_number_of_concepts"].items()),
              "", "![dendrogram](dendrogram.png)", "", "![heatmap](heatmap.png)", "", "![layers](layers.png)"]
    run.report(lines, "report.md")
    print(f"wrote {out}/report.md", file=sys.stderr)
    return result


if __name__ == "__main__":
    run_recipe(main)
