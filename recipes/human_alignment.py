"""Human alignment of expert overlap (ExpertLens): Spearman rho against MEN ratings.

For concept data whose concept names are words (e.g. written by
recipes/generate_concepts.py), find the experts of every concept, compare
concepts by the Jaccard overlap of their expert sets at each tau and by the
cosine of their AP vectors, and correlate with the human ratings of the pairs
whose two words are concepts. The same pairs are scored by the baselines
(static word embedding, contextual hidden states per layer, all-MiniLM-L6-v2).

tau only means something relative to the positive rate r = P / (P + N): a unit
that knows nothing has AP about r. So besides the absolute sweep, tau is also
swept as r + m (1 - r) for multiples m; the paper's tau = 0.5 at 400 / 1000 is m = 0.3.

No tuning on the pairs reported: the rated pairs among the concepts are split (seeded, stratified
by rating) into a dev part and a test part. The expert method (and its tau), and each baseline's
variant (layer, centring), are chosen on dev; every method is then reported on test, with bootstrap
CIs and paired differences of the chosen expert method against each chosen baseline. The all-pairs
table is kept too. ``--curve`` then recomputes the chosen methods from fewer positives per concept
(nested seeded samples of the same data) and reports their rho on the test pairs.

    python recipes/human_alignment.py --concepts men100 --out out/men100/alignment

Resumable: the expert set (``<out>/experts``), the baseline matrices and each curve point are reused
when present in --out.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, from any working directory

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from _common import (  # noqa: E402
    MEN, MEN_AGREEMENT, LazyModel, RunFolder, Stopwatch, numbers, parse, recipe_parser, run_recipe, write_csv,
)
from steer_experts.atomic import atomic_write  # noqa: E402
from steer_experts.concepts import ConceptSet  # noqa: E402
from steer_experts.discovery import discover  # noqa: E402
from steer_experts.errors import InvalidArgumentError  # noqa: E402
from steer_experts.evaluation.sentence_encoder import SentenceEncoder  # noqa: E402
from steer_experts.experts import ExpertSet  # noqa: E402
from steer_experts.figures import save_figure  # noqa: E402
from steer_experts.lens.baselines import baseline_vectors  # noqa: E402
from steer_experts.lens.ratings import (  # noqa: E402
    WordPairRatings, agreement_ceiling, compare_with_baselines, human_alignment, load_men, load_ratings,
)
from steer_experts.responses import collect_responses  # noqa: E402
from steer_experts.lens.similarity import (  # noqa: E402
    PROFILE_METHODS, SimilarityMatrix, ap_cosine_similarity, ap_profile_similarity, experts_per_concept,
    jaccard_similarity, relative_taus, top_k_jaccard_similarity,
)

TAUS = [round(0.5 + 0.05 * i, 2) for i in range(10)]
MULTIPLES = [0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
CURVE = [25, 50, 100, 200, 300]
TOP_KS = [10, 30, 100, 300, 1000, 3000]
EXPERT_FAMILIES = ("jaccard", "jaccard relative", "jaccard top-k", "ap cosine", "ap profile")
BASELINE_FAMILIES = ("static", "contextual", "minilm word", "minilm sentences")
# A method chosen on dev must be defined on this share of the dev pairs: a Jaccard undefined on most
# pairs could otherwise win on the few easy ones left.
COVERAGE = 0.95


def parse_args(argv: list[str] | None):
    """The recipe's options (``argv``; None reads the command line), checked, with the data defaults filled."""
    p = recipe_parser(__doc__, experts=False)  # --seed: negative sampling and bootstrap
    p.add_argument("--concepts", help="concept file or folder (ConceptSet.load); names must be the rated words")
    p.add_argument("--experts", help="use this saved ExpertSet instead of discovering (baselines need --concepts)")
    p.add_argument("--ratings", help="word-pair ratings (MEN format, or see --ratings-columns; default: MEN)")
    p.add_argument("--ratings-columns", help="for TSV/CSV ratings: 'word1,word2,score' header names")
    p.add_argument("--ceiling", type=float, help="human ceiling; default: read from --agreement")
    p.add_argument("--agreement", help="MEN agreement-score.txt (default: in the shared data)")
    p.add_argument("--taus", default=",".join(map(str, TAUS)), help="absolute AP thresholds")
    p.add_argument("--multiples", default=",".join(map(str, MULTIPLES)),
                   help="thresholds relative to chance: tau = r + m (1 - r)")
    p.add_argument("--top-ks", default=",".join(map(str, TOP_KS)), help="Jaccard of the top-k expert sets")
    p.add_argument("--n-negatives", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=64, help="tokens kept per sentence")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--min-positives", type=int, default=1,
                   help="score only concepts with at least this many positives (all still serve as negatives)")
    p.add_argument("--primary", default="ap cosine centred",
                   help="the expert method judged against the baselines besides the best one (fixed in advance)")
    p.add_argument("--dev-fraction", type=float, default=0.5, help="share of the rated pairs used to choose")
    p.add_argument("--curve", default=",".join(map(str, CURVE)),
                   help="positives per concept at which the chosen methods are recomputed ('' for none)")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = parse(p, argv)
    if not args.concepts and not args.experts:
        p.error("give --concepts (and optionally --experts)")
    if args.experts and not args.concepts and not args.no_baselines:
        p.error("baselines need the sentences: give --concepts too, or --no-baselines")
    if not 0 < args.dev_fraction < 1:
        p.error(f"--dev-fraction must be between 0 and 1; got {args.dev_fraction}")
    args.curve = numbers(args.curve)
    if any(n < 1 for n in args.curve):
        p.error(f"--curve takes positive counts; got {args.curve}")
    args.ratings = args.ratings or str(args.data / MEN)
    args.agreement = args.agreement or str(args.data / MEN_AGREEMENT)
    return args


def load_rating_file(args):
    """MEN by default; a TSV/CSV with named columns when --ratings-columns is given."""
    if args.ratings_columns:
        w1, w2, score = args.ratings_columns.split(",")
        return load_ratings(args.ratings, word1_column=w1, word2_column=w2, score_column=score)
    return load_men(args.ratings)


def expert_set_for(args, concepts: ConceptSet | None, model: LazyModel) -> ExpertSet:
    """The saved expert set (--experts, or <out>/experts from an earlier run), else discover and save it."""
    saved = Path(args.experts) if args.experts else Path(args.out) / "experts"
    if (saved / "expert_set.json").exists():
        return ExpertSet.from_pretrained(saved)
    expert_set = discover(model.get(), concepts, n_negatives=args.n_negatives, seed=args.seed,
                          max_length=args.max_length, batch_size=args.batch_size, cache_dir=args.cache_dir,
                          progress=not args.quiet)
    expert_set.save_pretrained(saved)
    return expert_set


def baselines_for(args, vectors) -> dict[str, SimilarityMatrix]:
    """Baseline matrices, read from <out>/baselines/ when an earlier run wrote them, else made from
    ``vectors()`` (a :class:`BaselineVectors`) and written there."""
    folder = Path(args.out) / "baselines"
    index = folder / "index.json"
    if index.exists():
        names = json.loads(index.read_text())
        return {name: SimilarityMatrix.from_csv(folder / f"{i:03d}.csv") for i, name in enumerate(names)}
    matrices = vectors().similarities()
    folder.mkdir(parents=True, exist_ok=True)
    for i, matrix in enumerate(matrices.values()):
        matrix.to_csv(folder / f"{i:03d}.csv")
    atomic_write(index, lambda p: p.write_text(json.dumps(list(matrices), indent=1)))
    return matrices


def expert_similarities(expert_set: ExpertSet, names: list[str], args) -> dict[str, tuple[str, dict, SimilarityMatrix]]:
    """Every expert similarity over ``names``: ``{method: (family, extra row fields, matrix)}``."""
    kept = np.array([expert_set.concept_index(n) for n in names])
    out = {}

    def jaccard(method, family, tau, **extra):
        counts = experts_per_concept(expert_set, tau)[kept]
        out[method] = (family, {"tau": round(tau, 4), **extra, "experts_median": int(np.median(counts)),
                                "concepts_without_experts": int((counts == 0).sum())},
                       jaccard_similarity(expert_set, tau).subset(names))

    for tau in numbers(args.taus, float):
        jaccard(f"jaccard tau={tau:g}", "jaccard", tau)
    for m, tau in relative_taus(expert_set, numbers(args.multiples, float)).items():
        jaccard(f"jaccard m={m:g}", "jaccard relative", tau, multiple=m)
    for k in numbers(args.top_ks):
        if k <= expert_set.n_units:
            sim = top_k_jaccard_similarity(expert_set, k)
            out[sim.method] = ("jaccard top-k", {"k": k}, sim.subset(names))
    for centred in (False, True):
        sim = ap_cosine_similarity(expert_set, centred=centred)
        out[sim.method] = ("ap cosine", {"plot": True}, sim.subset(names))
    for method in PROFILE_METHODS:
        sim = ap_profile_similarity(expert_set, method)
        out[sim.method] = ("ap profile", {}, sim.subset(names))
    return out


def baseline_family(method: str) -> str:
    """Which baseline a matrix key belongs to (``"contextual L3 centred"`` -> ``"contextual"``)."""
    return next(f for f in sorted(BASELINE_FAMILIES, key=len, reverse=True) if method.startswith(f))


def dev_test(rows: list[dict], matrices: dict[str, SimilarityMatrix], rated: WordPairRatings, args) -> dict:
    """Choose on dev, report on test: the expert method with the best dev rho (defined on at least
    ``COVERAGE`` of the dev pairs), the best variant of each baseline family likewise, then every method's
    rho on test with a bootstrap CI, and paired test differences of the chosen method against each
    chosen baseline."""
    dev, test = rated.split(args.dev_fraction, seed=args.seed)
    candidates = [r for r in rows if r["rho"] is not None and not r["method"].startswith("contextual best")]
    on_dev = {r["method"]: human_alignment(matrices[r["method"]], dev, n_boot=0).to_dict() for r in candidates}
    eligible = [r for r in candidates
                if on_dev[r["method"]]["rho"] is not None and on_dev[r["method"]]["n_pairs"] >= COVERAGE * len(dev)]
    best = lambda group: max(group, key=lambda r: on_dev[r["method"]]["rho"])  # noqa: E731
    experts = [r for r in eligible if r["family"] in EXPERT_FAMILIES]
    if not experts:
        raise InvalidArgumentError(f"No expert method is defined on {COVERAGE:.0%} of the {len(dev)} dev pairs; "
                                   "lower tau or add sentences.")
    chosen = best(experts)
    families = {}
    for r in eligible:
        if r["family"] == "baseline":
            families.setdefault(baseline_family(r["method"]), []).append(r)
    chosen_baselines = {family: best(group) for family, group in families.items()}
    test_rows = [{"method": r["method"], "family": r["family"], "dev_rho": on_dev[r["method"]]["rho"],
                  **{k: v for k, v in human_alignment(matrices[r["method"]], test, n_boot=args.n_boot,
                                                      seed=args.seed).to_dict().items()
                     if k in ("rho", "low", "high", "n_pairs")}} for r in candidates]
    by_method = {r["method"]: r for r in test_rows}
    verdict = compare_with_baselines(by_method[chosen["method"]],
                                     [by_method[r["method"]] for r in chosen_baselines.values()],
                                     matrices, test, n_boot=args.n_boot, seed=args.seed)
    return {"dev_pairs": len(dev), "test_pairs": len(test), "fraction": args.dev_fraction,
            "coverage": COVERAGE, "chosen": chosen["method"], "chosen_dev_rho": on_dev[chosen["method"]]["rho"],
            "chosen_baselines": {f: {"method": r["method"], "dev_rho": on_dev[r["method"]]["rho"]}
                                 for f, r in chosen_baselines.items()},
            "test": test_rows, "verdict": verdict, "test_ratings": test}


def positive_curve(args, protocol: dict, concepts: ConceptSet, expert_set: ExpertSet, names: list[str],
                   model: LazyModel, vectors) -> list[dict]:
    """The chosen expert method and the two best baselines (by dev rho), recomputed from at most n
    positives per concept for each n of ``args.curve`` and all of them, scored on the test pairs.
    Each point is stored in <out>/curve/ and reused."""
    folder = Path(args.out) / "curve"
    folder.mkdir(exist_ok=True)
    baselines = sorted(protocol["chosen_baselines"].values(), key=lambda b: -b["dev_rho"])[:2]
    methods = [protocol["chosen"], *(b["method"] for b in baselines)]
    most = int(max(len(c.positives) for c in concepts.concepts))
    caps = sorted({n for n in args.curve if n < most} | {most})
    sampled = concepts.with_sampled_negatives(args.n_negatives, args.seed)
    test = protocol["test_ratings"]
    responses = None
    points = []
    for n in tqdm(caps, desc="positives curve", unit="point", disable=args.quiet):
        path = folder / f"{n:05d}.json"
        if path.exists() and json.loads(path.read_text())["methods"] == methods:
            points.append(json.loads(path.read_text()))
            continue
        capped = sampled.capped(n, seed=args.seed)
        if responses is None:  # the responses discover collected, from the cache
            responses = collect_responses(model.get(), sampled.sentences, max_length=args.max_length,
                                          batch_size=args.batch_size, cache_dir=args.cache_dir, progress=not args.quiet)
        part = ExpertSet.from_responses(responses, capped.rows(sampled.sentences), model.get(), progress=False)
        matrices = {m: sim for m, (_, _, sim) in expert_similarities(part, names, args).items()}
        averaged = vectors().similarities(capped.subset(vectors().concepts.names))
        matrices |= {m: sim.subset(names) for m, sim in averaged.items()}
        counts = part.expertise.n_positives[[part.concept_index(c) for c in names]]
        point = {"cap": n, "positives_median": float(np.median(counts)), "positives_min": int(counts.min()),
                 "methods": methods,
                 "rho": {m: human_alignment(matrices[m], test, n_boot=args.n_boot, seed=args.seed).to_dict()
                         for m in methods}}
        atomic_write(path, lambda p: p.write_text(json.dumps(point, indent=1)))
        points.append(point)
    return points


def plot_curve(points: list[dict], ceiling: float, path: Path) -> None:
    """rho on the test pairs against positives per concept, one line per method, with CI bands."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = [p["positives_median"] for p in points]
    for i, method in enumerate(points[0]["methods"]):
        get = lambda key: np.array([np.nan if p["rho"][method][key] is None else p["rho"][method][key]  # noqa: E731
                                    for p in points])
        ax.plot(x, get("rho"), "o-", lw=2.5 if i == 0 else 1.5, label=("chosen expert method: " if i == 0 else "") + method)
        ax.fill_between(x, get("low"), get("high"), alpha=0.15)
    ax.axhline(ceiling, color="k", lw=1, label=f"human ceiling {ceiling:.2f}")
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.set_xlabel("positives per concept (median)")
    ax.set_ylabel("Spearman rho on the test pairs")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_alignment(rows: list[dict], ceiling: float, path: Path) -> None:
    """rho vs tau (absolute, and relative to chance) with CI bands; experts per concept on a second axis;
    horizontal lines for AP cosine, the baselines and the human ceiling."""
    fig, axes = plt.subplots(1, 2, figsize=(15, 5), sharey=True)
    references = [r for r in rows if r["family"] in ("ap cosine", "baseline") and r["rho"] is not None and r.get("plot")]
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(references), 2)))
    for ax, family, x_key, xlabel in ((axes[0], "jaccard", "tau", "tau (AP threshold)"),
                                      (axes[1], "jaccard relative", "multiple", "m, with tau = r + m (1 - r)")):
        curve = [r for r in rows if r["family"] == family]
        x = np.array([r[x_key] for r in curve], dtype=float)
        get = lambda key: np.array([np.nan if r[key] is None else r[key] for r in curve])  # noqa: E731
        rho = get("rho")
        ax.plot(x, rho, "o-", color="tab:red", lw=2, label="expert overlap (Jaccard), 95% CI")
        ax.fill_between(x, get("low"), get("high"), color="tab:red", alpha=0.2)
        undefined = np.isnan(rho)
        if undefined.any():
            ax.plot(x[undefined], np.full(undefined.sum(), -0.05), "x", color="grey", label="rho undefined")
        ax.axhline(ceiling, color="k", lw=1.5, label=f"human ceiling {ceiling:.2f}")
        for r, colour in zip(references, colours):
            ax.axhline(r["rho"], ls="--", lw=1, color=colour, label=r["method"])
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(xlabel)
        twin = ax.twinx()
        twin.plot(x, [max(r["experts_median"], 0.5) for r in curve], "s:", color="tab:grey", ms=3)
        twin.set_yscale("log")
        twin.set_ylabel("median experts per concept (0 drawn at 0.5)", color="tab:grey", fontsize=8)
    axes[0].set_ylabel("Spearman rho with human ratings")
    axes[0].set_title("Absolute tau")
    axes[1].set_title("tau relative to the positive rate r")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(0.80, 0.5))
    save_figure(fig, path, rect=(0, 0, 0.79, 1))


def fmt(r: dict) -> str:
    """'rho [low, high]' or 'undefined'."""
    return "undefined" if r["rho"] is None else f"{r['rho']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


def difference_lines(differences: list[dict], pairs: str) -> list[str]:
    """One line per baseline: the paired rho difference with its 95% CI, and what it says."""
    lines = []
    for d in differences:
        if d["difference"] is None:
            lines.append(f"- vs {d['baseline']}: undefined")
            continue
        sig = "better" if d["low"] > 0 else "worse" if d["high"] < 0 else "not resolved"
        lines.append(f"- vs {d['baseline']}: {d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] paired, "
                     f"over {d['n_pairs']} {pairs}: {sig}")
    return lines


def dev_test_lines(protocol: dict, ceiling: float) -> list[str]:
    """The report's dev/test section: what was chosen on dev, every method on test, the paired verdict."""
    v = protocol["verdict"]
    lines = ["## Chosen on dev, reported on test", "",
             f"The {protocol['dev_pairs'] + protocol['test_pairs']} rated pairs were split, stratified by rating, "
             f"into {protocol['dev_pairs']} dev and {protocol['test_pairs']} test pairs. On dev: the expert method "
             f"with the best rho (defined on at least {protocol['coverage']:.0%} of the dev pairs) and each "
             "baseline's best variant (layer, centring). On test: every method, 95% bootstrap CIs.", "",
             f"- chosen expert method: **{protocol['chosen']}** (dev rho {protocol['chosen_dev_rho']:.3f})"]
    for family, b in protocol["chosen_baselines"].items():
        lines.append(f"- chosen {family} baseline: {b['method']} (dev rho {b['dev_rho']:.3f})")
    lines += ["", f"**On test, {v['expert']}: rho {v['expert_rho']:.3f}; beats every chosen baseline: {v['answer']}** "
              f"(human ceiling {ceiling:.2f})", ""]
    lines += difference_lines(v["differences"], "test pairs")
    chosen = {protocol["chosen"], *(b["method"] for b in protocol["chosen_baselines"].values())}
    lines += ["", "| method | family | dev rho | test rho [95% CI] | test pairs |", "|---|---|---|---|---|"]
    for r in sorted(protocol["test"], key=lambda r: -(r["dev_rho"] if r["dev_rho"] is not None else -9)):
        if r["family"] == "baseline" and r["method"] not in chosen:
            continue  # every layer and variant is in alignment.json
        name = f"**{r['method']}**" if r["method"] in chosen else r["method"]
        dev = "undefined" if r["dev_rho"] is None else f"{r['dev_rho']:.3f}"
        lines.append(f"| {name} | {r['family']} | {dev} | {fmt(r)} | {r['n_pairs']} |")
    lines.append(f"| human ceiling | | | {ceiling:.2f} | |")
    return lines + [""]


def curve_lines(points: list[dict]) -> list[str]:
    """The report's section on rho against positives per concept (empty without a curve)."""
    if not points:
        return []
    methods = points[0]["methods"]
    lines = ["## rho on the test pairs against positives per concept", "",
             "Nested seeded samples of each concept's positives (negatives unchanged); the chosen expert method "
             "and the two best baselines on dev, recomputed at each size.", "", "![curve](curve.png)", "",
             "| positives per concept (min / median) | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    for p in points:
        lines.append(f"| {p['positives_min']} / {p['positives_median']:g} | "
                     + " | ".join(fmt(p["rho"][m]) for m in methods) + " |")
    return lines + [""]


def write_report(out: Path, result: dict) -> None:
    """The one-page Markdown summary of a run."""
    rows = result["rows"]
    protocol = result["dev_test"]
    lines = [
        "# Human alignment of expert overlap", "",
        f"- model `{result['model']}`, {result['n_concepts']} concepts "
        f"({result['positives_min']}-{result['positives_max']} positives, {result['negatives']} negatives each; "
        f"positive rate r = {result['positive_rate']:.3f})",
        f"- {result['concepts_left_out']} concepts with fewer than {result['min_positives']} positives left out of "
        "the scoring (their sentences still serve as negatives)",
        f"- ratings `{result['ratings']}`: {result['pairs_available']} pairs have both words among the concepts",
        f"- human ceiling {result['ceiling']:.2f}; bootstrap {result['n_boot']} resamples of pairs, 95% CI",
        result["wall_line"],
        "", *dev_test_lines(protocol, result["ceiling"]), *curve_lines(result["curve"]),
        "## Every pair (choices made on these same pairs: optimistic)", "",
        "![rho vs tau](alignment.png)", "",
        "| method | rho [95% CI] | pairs | experts per concept (median) | concepts without experts |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["family"] == "baseline" and not r.get("plot") and not r["method"].startswith("contextual best"):
            continue  # every layer is in alignment.csv; the table keeps the best and the summaries
        lines.append(f"| {r['method']} | {fmt(r)} | {r['n_pairs']} | {r.get('experts_median', '')} | "
                     f"{r.get('concepts_without_experts', '')} |")
    lines += ["", "### Do experts beat every baseline? (every pair)", "",
              f"Judged: `{result['primary']}` (fixed before looking) and the best expert method on these pairs. "
              "A method picked on the same pairs (best tau, best layer) is optimistic; the paired bootstrap "
              "difference (same resampled pairs for both) is the comparison.", ""]
    for v in result["verdicts"]:
        lines.append(f"**{v['expert']}** (rho {v['expert_rho']:.3f}; best baseline {v['best_baseline']}, "
                     f"rho {v['best_baseline_rho']:.3f}): **{v['answer']}**")
        lines += difference_lines(v["differences"], "pairs") + [""]
    lines += ["## Nearest neighbours (" + result["neighbour_method"] + ", every pair)", ""]
    for row in result["neighbours"][:15]:
        lines.append(f"- **{row['concept']}**: " + ", ".join(f"{n} ({s:.2f})" for n, s in row["neighbours"]))
    atomic_write(out / "report.md", lambda p: p.write_text("\n".join(lines) + "\n"))


def alignment_row(method: str, family: str, sim: SimilarityMatrix, ratings, args, **extra) -> dict:
    """One result row: the correlation with the ratings and anything extra (``sim`` already restricted)."""
    corr = human_alignment(sim, ratings, n_boot=args.n_boot, seed=args.seed).to_dict()
    return {"method": method, "family": family, **{k: corr[k] for k in ("rho", "low", "high", "n_pairs", "p_value")},
            **extra}


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the result dict also written to ``<out>/alignment.json``."""
    args = parse_args(argv)
    out = RunFolder(args.out).root
    (out / "similarity").mkdir(parents=True, exist_ok=True)
    ratings = load_rating_file(args)
    ceiling = args.ceiling if args.ceiling is not None else agreement_ceiling(args.agreement)
    concepts = ConceptSet.load(args.concepts) if args.concepts else None
    model = LazyModel(args)
    clock = Stopwatch()
    with clock.stage("experts"):
        expert_set = expert_set_for(args, concepts, model)
    e = expert_set.expertise
    names = [n for n, p in zip(expert_set.concepts, e.n_positives) if p >= args.min_positives]
    dropped = len(expert_set.concepts) - len(names)
    pairs_available = len(ratings.pairs_within(names))
    if pairs_available < 3:
        raise InvalidArgumentError(f"Only {pairs_available} rated pairs have both words among the concepts; "
                         "check that the concept names are the rated words.")
    print(f"{len(names)} concepts ({dropped} with fewer than {args.min_positives} positives left out), "
          f"{pairs_available} rated pairs among them", file=sys.stderr)

    kept = np.array([expert_set.concept_index(n) for n in names])
    rows, matrices = [], {}
    for method, (family, extra, sim) in expert_similarities(expert_set, names, args).items():
        matrices[method] = sim
        rows.append(alignment_row(method, family, sim, ratings, args, **extra))

    # Over every concept of the expert set, so the saved matrices do not depend on --min-positives.
    vectors = functools.cache(lambda: baseline_vectors(
        model.get(), concepts.subset(expert_set.concepts), encoder=SentenceEncoder(), max_length=args.max_length,
        batch_size=args.batch_size, progress=not args.quiet))
    if not args.no_baselines:
        with clock.stage("baselines"):
            baselines = {k: v.subset(names) for k, v in baselines_for(args, vectors).items()}
        contextual = []
        for key, sim in baselines.items():
            row = alignment_row(key, "baseline", sim, ratings, args, plot=not key.startswith("contextual"))
            rows.append(row)
            if key.startswith("contextual") and row["rho"] is not None:
                contextual.append(row)
            matrices[key] = sim
        if contextual:
            best = max(contextual, key=lambda r: r["rho"])
            rows.append({**best, "method": f"contextual best ({best['method']})", "plot": True})
            matrices[rows[-1]["method"]] = baselines[best["method"]]

    for i, (method, sim) in enumerate(matrices.items()):
        if not method.startswith("contextual"):  # per-layer matrices already sit in baselines/
            sim.to_csv(out / "similarity" / f"{i:03d}.csv")
    atomic_write(out / "similarity" / "index.json", lambda p: p.write_text(json.dumps(
        {f"{i:03d}.csv": m for i, m in enumerate(matrices) if not m.startswith("contextual")}, indent=1)))

    experts = [r for r in rows if r["family"] in EXPERT_FAMILIES and r["rho"] is not None]
    if not experts:
        raise InvalidArgumentError("Every expert similarity is undefined on these pairs; lower tau or add sentences.")
    best_expert = max(experts, key=lambda r: r["rho"])
    baseline_rows = [r for r in rows if r["family"] == "baseline" and r["rho"] is not None
                     and (r.get("plot") or r["method"].startswith("contextual best"))]
    primary = next((r for r in experts if r["method"] == args.primary), None)
    judged = [r for r in (primary, best_expert) if r is not None]
    verdicts = [compare_with_baselines(r, baseline_rows, matrices, ratings, n_boot=args.n_boot, seed=args.seed)
                for r in judged[: 1 if primary is best_expert else 2]]
    protocol = dev_test(rows, matrices, ratings.subset(ratings.pairs_within(names)), args)
    curve = []
    if args.curve and concepts is not None and not args.experts and not args.no_baselines:
        with clock.stage("curve"):
            curve = positive_curve(args, protocol, concepts, expert_set, names, model, vectors)
        plot_curve(curve, ceiling, out / "curve.png")
    neighbour_method = judged[0]["method"]
    result = {
        "model": expert_set.model_name, "n_concepts": len(names), "concepts_left_out": dropped,
        "min_positives": args.min_positives, "ratings": str(args.ratings),
        "pairs_available": pairs_available, "ceiling": ceiling, "n_boot": args.n_boot,
        "positives_min": int(e.n_positives[kept].min()), "positives_max": int(e.n_positives[kept].max()),
        "negatives": int(np.median(e.n_negatives)),
        "positive_rate": float(np.mean(e.n_positives / (e.n_positives + e.n_negatives))),
        "rows": rows,
        "primary": args.primary, "verdicts": verdicts,
        "neighbour_method": neighbour_method,
        "neighbours": matrices[neighbour_method].nearest_table(5),
        "dev_test": {k: v for k, v in protocol.items() if k != "test_ratings"}, "curve": curve,
        "wall": clock.summary(), "wall_line": clock.line(),
    }
    atomic_write(out / "alignment.json", lambda p: p.write_text(json.dumps(result, indent=1)))
    write_csv(out / "alignment.csv", [{k: r.get(k) for k in ("method", "family", "tau", "multiple", "rho", "low",
                                       "high", "n_pairs", "p_value", "experts_median", "concepts_without_experts")}
                                      for r in rows])
    plot_alignment(rows, ceiling, out / "alignment.png")
    write_report(out, result)
    v = protocol["verdict"]
    print(f"chosen on dev: {v['expert']}; on test rho {v['expert_rho']:.3f}, best baseline {v['best_baseline']} "
          f"{v['best_baseline_rho']:.3f}; beats every baseline: {v['answer']}", file=sys.stderr)
    for v in verdicts:
        print(f"all pairs, {v['expert']}: rho {v['expert_rho']:.3f}; best baseline {v['best_baseline']}: "
              f"{v['best_baseline_rho']:.3f}; beats every baseline: {v['answer']}", file=sys.stderr)
    print(f"ceiling {ceiling:.2f}; wrote {out}/report.md", file=sys.stderr)
    return result


if __name__ == "__main__":
    run_recipe(main)
