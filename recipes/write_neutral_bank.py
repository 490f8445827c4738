"""Write the neutral sentence bank: everyday sentences over varied topics, any word's default negatives.

Runs the concept writer in its "everyday" style over ``neutral_bank.TOPICS`` into ``--out``
(resumable, like generate_concepts.py), then packs every kept sentence with its provenance
into one gzipped JSON file. ``--install`` writes that file into the package
(``steer_experts/writing/neutral_bank.json.gz``), replacing the bank shipped today.

    python recipes/write_neutral_bank.py --out out/neutral-bank --threads 2 --install
"""

from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, from any working directory

from _common import LazyModel, RunFolder, parse, recipe_parser, run_recipe  # noqa: E402
from steer_experts.atomic import atomic_write  # noqa: E402
from steer_experts.writing import PROMPTS, ConceptWriter, WritingSettings  # noqa: E402
from steer_experts.writing.neutral_bank import BANK_FILE, TOPICS  # noqa: E402


def pack(writer: ConceptWriter, report: dict) -> tuple[bytes, int]:
    """The bank file's bytes (provenance and every topic's kept sentences, gzipped JSON with mtime 0, so
    the same sentences give the same bytes) and its number of sentences."""
    s = writer.settings
    first_topic = {}  # a sentence written for two topics is kept once, with the first
    for w in report["progress"]:
        for k in w.kept[:s.n_positives]:
            first_topic.setdefault(k["text"], w.word)
    sentences = [{"text": text, "topic": topic} for text, topic in first_topic.items()]
    provenance = {
        "written_by": "recipes/write_neutral_bank.py", "model": writer.model.name,
        "model_fingerprint": writer.model.fingerprint, "backend": writer.sampler.name,
        "settings": {k: v for k, v in s.generation_key().items() if k != "prompts"},
        "n_per_topic": s.n_positives, "prompts": list(PROMPTS["everyday"]), "topics": list(TOPICS),
        "kept_per_topic": {w.word: sum(t == w.word for t in first_topic.values()) for w in report["progress"]},
        "candidates": sum(w.counts["generated"] for w in report["progress"]), "sentences": len(sentences),
    }
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(json.dumps({"provenance": provenance, "sentences": sentences}, indent=0).encode())
    return raw.getvalue(), len(sentences)


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the writing summary (also in ``<out>/writing_report.json``)."""
    p = recipe_parser(__doc__, experts=False)
    p.add_argument("--per-topic", type=int, default=25, help="sentences kept per topic")
    p.add_argument("--backend", default="auto", choices=("auto", "ctranslate2", "transformers"))
    p.add_argument("--install", action="store_true", help=f"write the bank into the package ({BANK_FILE.name})")
    args = parse(p, argv)
    run = RunFolder(args.out)
    # The settings the shipped bank was written with (no top-k cut: it predates the writer's top_k 50).
    settings = WritingSettings(n_positives=args.per_topic, styles=("everyday",), batch_size=12, max_new_tokens=96,
                               top_k=0, seed=args.seed, backend=args.backend)
    writer = ConceptWriter(LazyModel(args).get(), run.root / "concepts", settings)
    result = writer.write(list(TOPICS))
    summary = result.to_dict()
    run.write("writing_report.json", summary)
    bank, n_sentences = pack(writer, {"progress": result.words})
    atomic_write(run.root / BANK_FILE.name, lambda path: path.write_bytes(bank))
    if args.install:
        atomic_write(BANK_FILE, lambda path: path.write_bytes(bank))
    print(f"{n_sentences} distinct sentences over {len(TOPICS)} topics "
          f"({summary['kept_per_second']:.2f} kept/s, yield {summary['yield']:.1%}); wrote "
          f"{BANK_FILE if args.install else run.root / BANK_FILE.name}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    run_recipe(main)
