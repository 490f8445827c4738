"""Write concept data with a local instruct model: facts and short stories per word.

Words come from --words (comma-separated or a file, one per line) or are chosen
greedily from MEN (--men-words N) to cover the most rated pairs. The output
folder's ``concepts/`` loads with ``ConceptSet.load``. Re-running resumes: words
already done are skipped, and an interrupted word continues at its next round.

    python recipes/generate_concepts.py --men-words 100 --n-positives 100 --out out/men100
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, from any working directory

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from _common import MEN, LazyModel, RunFolder, parse, recipe_parser, run_recipe  # noqa: E402
from steer_experts.concepts import ConceptSet  # noqa: E402
from steer_experts.figures import save_figure  # noqa: E402
from steer_experts.lens.ratings import greedy_word_choice, load_men  # noqa: E402
from steer_experts.writing import PROMPTS, WritingSettings, write_concepts  # noqa: E402


def choose_words(args) -> list[str]:
    """The words to write for: --words, or the greedy MEN choice of --men-words words."""
    if args.words:
        path = Path(args.words)
        text = path.read_text() if path.exists() else args.words.replace(",", "\n")
        return [w.strip().lower() for w in text.splitlines() if w.strip()]
    ratings = load_men(args.ratings or args.data / MEN)
    return greedy_word_choice(ratings, args.men_words)


def plot_yield(report: dict, path: Path) -> None:
    """Bar chart of kept positives per word, with the target as a line."""
    words = list(report["positives_per_word"])
    counts = [report["positives_per_word"][w] for w in words]
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(words) + 2), 3.5))
    ax.bar(range(len(words)), counts, color="tab:blue")
    ax.axhline(report["n_positives"], color="k", ls="--", lw=1, label="target")
    ax.set_xticks(range(len(words)), words, rotation=90, fontsize=6 if len(words) > 40 else 8)
    ax.set_ylabel("positive sentences kept")
    ax.set_title(f"Concept sentences per word (yield {report['yield']:.0%} of candidate sentences)")
    ax.legend()
    save_figure(fig, path)


def write_report(run: RunFolder, report: dict, settings: WritingSettings, words: list[str], sample: ConceptSet) -> None:
    """One-page Markdown: settings, throughput, yield, drop reasons, example sentences."""
    lines = [
        "# Concept data written by a local model", "",
        f"- model: `{report['model']}`; words: {len(words)}; target positives per word: {settings.n_positives}",
        f"- settings: batch {settings.batch_size}, {settings.max_new_tokens} new tokens, temperature "
        f"{settings.temperature}, top-p {settings.top_p}, sentences of {settings.min_words}-{settings.max_words} "
        f"words, seed {settings.seed}, torch threads {report['threads']}",
        f"- this run: {report['run_seconds']:.0f} s, {report['run_tokens']} tokens "
        f"({report['tokens_per_second']:.1f} tokens/s), {report['run_kept']} sentences kept "
        f"({report['kept_per_second']:.2f} sentences/s)" + ("; stopped by the time budget" if report["stopped_early"] else ""),
        f"- yield after filtering (all rounds): {report['kept_sentences']} of {report['generated_sentences']} "
        f"candidate sentences ({report['yield']:.1%})",
        "- dropped: " + ", ".join(f"{k} {v}" for k, v in report["dropped"].items()),
        f"- positives per word: min {min(report['positives_per_word'].values())}, "
        f"max {max(report['positives_per_word'].values())}, total {sum(report['positives_per_word'].values())}",
        "", "![positives per word](yield_by_word.png)", "", "## Examples", "",
    ]
    for concept in sample.concepts[:3]:
        lines.append(f"**{concept.name}**")
        lines.extend(f"- {s}" for s in concept.positives[:4])
        lines.append("")
    run.write("report.md", "\n".join(lines))


def parse_args(argv: list[str] | None):
    """The recipe's options (``argv``; None reads the command line)."""
    p = recipe_parser(__doc__, experts=False)  # --out: concepts/ inside loads with ConceptSet.load
    p.add_argument("--words", help="comma-separated words, or a file with one word per line")
    p.add_argument("--men-words", type=int, default=100, help="otherwise: this many MEN words, chosen greedily")
    p.add_argument("--ratings", help="MEN file for --men-words (default: in the shared data)")
    p.add_argument("--n-positives", type=int, default=100)
    p.add_argument("--styles", default=",".join(WritingSettings.styles),
                   help=f"comma-separated, from {list(PROMPTS)} (everyday sentences need not name the word: "
                        "they are for the neutral bank, not for concept positives)")
    p.add_argument("--batch-size", type=int, default=48, help="prompts per round (one word per round)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-words", type=int, default=40, help="longest sentence kept, in words")
    p.add_argument("--max-rounds", type=int, default=30, help="rounds per word before giving up")
    p.add_argument("--backend", default="auto", choices=("auto", "ctranslate2", "transformers"),
                   help="what writes (auto: CTranslate2 where it converts the model, else transformers)")
    p.add_argument("--budget-minutes", type=float, help="start no new round after this much wall time")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parse(p, argv)  # --model: an instruct model with a chat template
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the writing report (also written to ``<out>/writing_report.json``)."""
    args = parse_args(argv)
    run = RunFolder(args.out)
    out = run.root
    words = choose_words(args)
    run.write("words.txt", "\n".join(words) + "\n")
    settings = WritingSettings(n_positives=args.n_positives, styles=tuple(args.styles.split(",")),
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                               max_words=args.max_words, max_rounds=args.max_rounds, seed=args.seed,
                               backend=args.backend)
    print(f"Writing {settings.n_positives} positives for {len(words)} words with {args.model} "
          f"into {out / 'concepts'}", file=sys.stderr)
    model = LazyModel(args).get()
    started = time.time()
    result = write_concepts(model, words, out / "concepts", settings,
                            budget_seconds=None if args.budget_minutes is None else 60 * args.budget_minutes,
                            progress=not args.quiet)
    report = {"model": args.model, "threads": args.threads, "n_positives": settings.n_positives,
              "started": started, **result.to_dict()}
    run.write("writing_report.json", report)
    plot_yield(report, out / "yield_by_word.png")
    write_report(run, report, settings, words, ConceptSet.load(out / "concepts"))
    print(f"{report['kept_per_second']:.2f} sentences/s, {report['tokens_per_second']:.1f} tokens/s, "
          f"yield {report['yield']:.1%}; wrote {out}/report.md", file=sys.stderr)
    return report


if __name__ == "__main__":
    run_recipe(main)
