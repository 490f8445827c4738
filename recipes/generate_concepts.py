"""Write concept data with a local instruct model: facts and short stories per word.

Words come from --words (comma-separated or a file, one per line) or are chosen
greedily from MEN (--men-words N) to cover the most rated pairs. The output
folder's ``concepts/`` loads with ``ConceptSet.load``. Re-running resumes: words
already done are skipped, and an interrupted word continues at its next round.

    python recipes/generate_concepts.py --men-words 100 --n-positives 100 --out out/men100

``--package NAME`` also packs the kept sentences with their provenance (model, prompts, seeds,
filters, counts per word) into ``<out>/NAME.json.gz``, or with ``--install`` into the package,
where ``ConceptSet.load_builtin(NAME)`` reads it offline. ``--budget-minutes 0`` packs
what is written without writing more.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, from any working directory

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from _common import MEN, LazyModel, RunFolder, parse, recipe_parser, run_recipe  # noqa: E402
from steer_experts.atomic import atomic_write  # noqa: E402
from steer_experts.concepts import BUILTIN_FOLDER, ConceptSet, ConceptDataError  # noqa: E402
from steer_experts.figures import save_figure  # noqa: E402
from steer_experts.lens.ratings import greedy_word_choice, load_men  # noqa: E402
from steer_experts.writing import DROP_REASONS, PROMPTS, ConceptWriter, WritingReport, WritingSettings  # noqa: E402


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


def pack(writer: ConceptWriter, result: WritingReport, notes: list) -> bytes:
    """The built-in concept set file: gzipped JSON ``{"provenance", "rows"}`` (mtime 0, so the same
    sentences give the same bytes), each word's first ``n_positives`` kept sentences with their style."""
    s = writer.settings
    rows = [{"concept": w.word, "text": k["text"], "label": 1, "style": k["style"]}
            for w in result.words for k in w.kept[:s.n_positives]]
    kept = [min(len(w.kept), s.n_positives) for w in result.words]
    provenance = {
        "written_by": "recipes/generate_concepts.py", "model": writer.model.name,
        "model_fingerprint": writer.model.fingerprint, "backend": writer.sampler.name,
        "settings": {k: v for k, v in s.generation_key().items() if k != "prompts"},
        "prompts": s.generation_key()["prompts"], "n_positives": s.n_positives, "max_rounds": s.max_rounds,
        "seeds": f"round r of word w is sampled with round_seed({s.seed}, w, r) (writing.round_seed: blake2b)",
        "filters": f"a candidate sentence is kept when it ends in . ! or ?, has {s.min_words}-{s.max_words} "
                   "words, no emoji or control characters, names the word (any inflection, words.mention_pattern) "
                   "outside quotes, and is not a case- and space-insensitive repeat of a kept sentence",
        "per_word": {w.word: {"kept": n, "rounds": w.rounds, "tokens": w.tokens, "seconds": round(w.seconds, 1),
                              "candidates": w.counts["generated"],
                              "dropped": {r: w.counts[r] for r in DROP_REASONS}}
                     for w, n in zip(result.words, kept)},
        "positives": {"min": min(kept), "median": float(np.median(kept)), "max": max(kept), "total": sum(kept)},
        "notes": notes,
    }
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(json.dumps({"provenance": provenance, "rows": rows}, indent=0).encode())
    return raw.getvalue()


def install(name: str, data: bytes) -> Path:
    """Write a packed concept set into the package, refusing to replace a file this recipe did not write."""
    path = BUILTIN_FOLDER / f"{name}.json.gz"
    if path.exists():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            written_by = json.load(f).get("provenance", {}).get("written_by")
        if written_by != "recipes/generate_concepts.py":
            raise ConceptDataError(f"{path} exists and was not written by this recipe ({written_by!r}); "
                                   "choose another --package name.")
    path.parent.mkdir(exist_ok=True)
    return atomic_write(path, lambda p: p.write_bytes(data))


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
    p.add_argument("--package", metavar="NAME", help="pack the sentences and provenance into <out>/NAME.json.gz")
    p.add_argument("--install", action="store_true", help="with --package: into the package instead "
                   "(ConceptSet.load_builtin(NAME))")
    p.add_argument("--note", action="append", default=[],
                   help="with --package: a JSON file recorded in the provenance's notes (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parse(p, argv)  # --model: an instruct model with a chat template
    if (args.install or args.note) and not args.package:
        p.error("--install and --note need --package NAME")
    if args.package and not args.package.replace("-", "").replace("_", "").isalnum():
        p.error(f"--package {args.package!r}: use letters, digits, - and _ only")
    try:
        args.notes = [json.loads(Path(f).read_text()) for f in args.note]
    except (OSError, ValueError) as err:
        p.error(f"--note must name a JSON file: {err}")
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
    writer = ConceptWriter(LazyModel(args).get(), out / "concepts", settings)
    started = time.time()
    result = writer.write(words, budget_seconds=None if args.budget_minutes is None else 60 * args.budget_minutes,
                          progress=not args.quiet)
    report = {"model": args.model, "threads": args.threads, "n_positives": settings.n_positives,
              "started": started, **result.to_dict()}
    if args.budget_minutes != 0:  # a pack-only run wrote nothing: the last writing run's reports stay
        run.write("writing_report.json", report)
        plot_yield(report, out / "yield_by_word.png")
        write_report(run, report, settings, words, ConceptSet.load(out / "concepts"))
    if args.package:
        data = pack(writer, result, args.notes)
        packed = install(args.package, data) if args.install else \
            atomic_write(out / f"{args.package}.json.gz", lambda p: p.write_bytes(data))
        print(f"packed {packed}", file=sys.stderr)
    print(f"{report['kept_per_second']:.2f} sentences/s, {report['tokens_per_second']:.1f} tokens/s, "
          f"yield {report['yield']:.1%}; wrote {out}/report.md", file=sys.stderr)
    return report


if __name__ == "__main__":
    run_recipe(main)
