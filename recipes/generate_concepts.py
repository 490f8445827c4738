"""Write concept data with a local instruct model: facts and short stories per word.

Words come from --words (comma-separated or a file, one per line) or are chosen
greedily from MEN (--men-words N) to cover the most rated pairs. The output
folder's ``concepts/`` loads with ``ConceptSet.load``. Re-running resumes: words
already done are skipped, and an interrupted word continues at its next round.

    python recipes/generate_concepts.py --men-words 100 --n-positives 100 --out out/men100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from steer_experts.atomic import atomic_write, claim_script_output  # noqa: E402
from steer_experts.concept_writing import PROMPTS, WritingSettings, write_concepts  # noqa: E402
from steer_experts.concepts import ConceptSet  # noqa: E402
from steer_experts.models import load_model  # noqa: E402
from steer_experts.similarity import greedy_word_choice, load_men  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MEN = DATA / "human" / "men" / "MEN_dataset_natural_form_full"


def choose_words(args: argparse.Namespace) -> list[str]:
    """The words to write for: --words, or the greedy MEN choice of --men-words words."""
    if args.words:
        path = Path(args.words)
        text = path.read_text() if path.exists() else args.words.replace(",", "\n")
        return [w.strip().lower() for w in text.splitlines() if w.strip()]
    ratings = load_men(args.ratings)
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, report: dict, settings: WritingSettings, words: list[str], sample: ConceptSet) -> None:
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
    atomic_write(out / "report.md", lambda p: p.write_text("\n".join(lines)))


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the writing report (also written to ``<out>/writing_report.json``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (concepts/ inside loads with ConceptSet.load)")
    p.add_argument("--words", help="comma-separated words, or a file with one word per line")
    p.add_argument("--men-words", type=int, default=100, help="otherwise: this many MEN words, chosen greedily")
    p.add_argument("--ratings", default=str(MEN), help="MEN file for --men-words")
    p.add_argument("--model", default="smollm2-135m", help="an instruct model with a chat template")
    p.add_argument("--n-positives", type=int, default=100)
    p.add_argument("--styles", default=",".join(PROMPTS), help=f"comma-separated, from {list(PROMPTS)}")
    p.add_argument("--batch-size", type=int, default=48, help="prompts per round (one word per round)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-words", type=int, default=40, help="longest sentence kept, in words")
    p.add_argument("--max-rounds", type=int, default=30, help="rounds per word before giving up")
    p.add_argument("--budget-minutes", type=float, help="start no new round after this much wall time")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads (1 is fastest on a busy shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = claim_script_output(args.out)
    words = choose_words(args)
    atomic_write(out / "words.txt", lambda f: f.write_text("\n".join(words) + "\n"))
    settings = WritingSettings(n_positives=args.n_positives, styles=tuple(args.styles.split(",")),
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                               max_words=args.max_words, max_rounds=args.max_rounds, seed=args.seed)
    print(f"Writing {settings.n_positives} positives for {len(words)} words with {args.model} "
          f"into {out / 'concepts'}", file=sys.stderr)
    model = load_model(args.model)
    started = time.time()
    result = write_concepts(model, words, out / "concepts", settings,
                            budget_seconds=None if args.budget_minutes is None else 60 * args.budget_minutes,
                            progress=not args.quiet)
    report = {"model": args.model, "threads": args.threads, "n_positives": settings.n_positives,
              "started": started, **result.to_dict()}
    atomic_write(out / "writing_report.json", lambda f: f.write_text(json.dumps(report, indent=1)))
    plot_yield(report, out / "yield_by_word.png")
    write_report(out, report, settings, words, ConceptSet.load(out / "concepts"))
    print(f"{report['kept_per_second']:.2f} sentences/s, {report['tokens_per_second']:.1f} tokens/s, "
          f"yield {report['yield']:.1%}; wrote {out}/report.md", file=sys.stderr)
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
