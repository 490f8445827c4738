"""The ``steer-experts`` command line: one subcommand per thing a user does."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _discover(args: argparse.Namespace) -> None:
    from .concepts import ConceptSet
    from .experts import discover
    from .figures import plot_ap_by_layer
    from .models import load_model

    # Read and validate the data before loading anything heavy or writing anything.
    concepts = ConceptSet.load(args.concepts)
    print(f"{concepts}: {concepts.report}", file=sys.stderr)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    expert_set = discover(model, concepts, pooling=args.pooling, max_length=args.max_length,
                          batch_size=args.batch_size, n_negatives=args.n_negatives, seed=args.seed)
    out = Path(args.out)
    expert_set.save_pretrained(out)
    figure = plot_ap_by_layer(expert_set, out / "ap_by_layer.png")
    print(expert_set.summary(top=args.top))
    print(f"\nWrote {out}/ (expert set) and {figure}.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``steer-experts`` and all its subcommands."""
    parser = argparse.ArgumentParser(prog="steer-experts", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("discover", help="find the expert neurons of concepts and save them as an ExpertSet")
    d.add_argument("--model", default="smollm2-135m", help="embedded name, local folder or hub id")
    d.add_argument("--concepts", required=True, help="concept file (.json OneSec, .jsonl, .csv) or a folder of them")
    d.add_argument("--out", required=True, help="folder to write the expert set and figure to")
    d.add_argument("--pooling", choices=("max", "mean"), default="max")
    d.add_argument("--max-length", type=int, default=128, help="tokens kept per sentence")
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--n-negatives", type=int, default=1000, help="negatives sampled per concept that has none")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--top", type=int, default=10, help="experts listed per concept")
    d.add_argument("--dtype", default="float32")
    d.add_argument("--device", default="cpu")
    d.set_defaults(run=_discover)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``steer-experts``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, KeyError, LookupError, FileNotFoundError, ConnectionError, NotImplementedError) as err:
        print(f"steer-experts {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
