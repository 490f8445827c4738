"""The ``steer-experts`` command line: one subcommand per thing a user does."""

from __future__ import annotations

import argparse
import sys
import textwrap
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
    truncated = expert_set.metadata["truncated_sentences"]
    if truncated:
        print(f"\n{truncated} of {expert_set.metadata['n_sentences']} sentences were longer than "
              f"{args.max_length} tokens and were truncated (raise --max-length to keep them whole).")
    print(f"\nWrote {out}/ (expert set) and {figure}.")


def _side_by_side(left: str, right: str, titles: tuple[str, str], width: int = 48) -> str:
    columns = [textwrap.wrap(text.strip(), width) or [""] for text in (left, right)]
    rows = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(map(len, columns))):
        a, b = (col[i] if i < len(col) else "" for col in columns)
        rows.append(f"{a:<{width}} | {b}")
    return "\n".join(rows)


def _generate(args: argparse.Namespace) -> None:
    from .concepts import ConceptSet
    from .experts import ExpertSet
    from .models import load_model
    from .steering import steer

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1.")
    if args.method != "experts" and args.auto:
        raise ValueError("--auto calibrates expert steering; use it with --method experts.")
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    experts = ExpertSet.from_pretrained(args.experts, model=model)
    name = experts.concepts[experts.concept_index(args.concept)]

    def concept_data():
        if args.concepts is None:
            raise ValueError(f"--method {args.method}{' --auto' if args.auto else ''} needs the concept's "
                             "sentences: pass --concepts FILE.")
        return ConceptSet.load(args.concepts).with_sampled_negatives(seed=0)[name]

    if args.method == "prompt":
        from .prompting import steer_prompt

        steered = steer_prompt(model, name.split("-")[0].replace("_", " "))
    elif args.method == "diffmean":
        from .diffmean import residual_means, steer_diffmean

        steered = steer_diffmean(model, residual_means(model, concept_data()), args.layer, args.factor)
    else:
        if args.auto:
            try:
                experts.operating_point(name, args.max_perplexity_ratio)
            except KeyError:
                from .calibration import calibrate
                from .evaluation.concept_score import ConceptClassifier

                point = calibrate(model, experts, name, ConceptClassifier.fit(concept_data()),
                                  max_perplexity_ratio=args.max_perplexity_ratio, seed=args.seed)
                print(f"calibrated: k={point.k}, alpha={point.alpha:g} (concept score {point.concept_score:.2f} at "
                      f"{point.ppl_ratio:.2f}x perplexity{'' if point.within_budget else ', over the budget'})")
                if Path(args.experts).is_dir():
                    experts.save_pretrained(args.experts)  # the choice is kept with the expert set
            selection = {"k": "auto", "max_perplexity_ratio": args.max_perplexity_ratio}
        else:
            selection = {"k": args.k} if args.tau is None else {"tau": args.tau}
            selection["alpha"] = args.alpha
        layers = None if args.from_layer is None else range(args.from_layer, len(experts.sites))
        steered = steer(model, experts, name, mode=args.mode, positions=args.positions, layers=layers, **selection)
    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
                    top_k=args.top_k, seed=args.seed)
    # The unsteered side is the same path with no expert touched, so both sample alike.
    plain = steer(model, experts, name, k=0).complete([args.prompt], **sampling)[0]
    steered_text = steered.complete([args.prompt], **sampling)[0]
    print(f"prompt: {args.prompt}\n{steered!r}\n")
    print(_side_by_side(plain, steered_text, ("unsteered", f"steered toward {args.concept}")))


def _push(args: argparse.Namespace) -> None:
    from .hub import upload_folder

    folder = Path(args.experts)
    known = ("expert_set.json", "steering.json")
    if not any((folder / name).exists() for name in known):
        raise FileNotFoundError(f"{folder} holds neither a saved expert set nor a steered model ({known}).")
    print(upload_folder(folder, args.repo, private=args.private))


def _load_experts(args: argparse.Namespace):
    from .experts import ExpertSet

    return ExpertSet.from_pretrained(args.experts)


def _label(args: argparse.Namespace) -> None:
    from .lens import label_neurons

    experts = _load_experts(args)
    if args.layer is not None:
        rows = [{"layer": args.layer, "neuron": args.neuron, "concepts": experts.label(args.layer, args.neuron, args.tau)}]
    else:
        rows = label_neurons(experts, tau=args.tau)
    for row in rows:
        names = ", ".join(f"{c} ({ap:.3f})" for c, ap in row["concepts"]) or f"no concept with AP > {args.tau}"
        print(f"L{row['layer']}/{row['neuron']}: {names}")


def _search(args: argparse.Namespace) -> None:
    from .lens import search_experts

    rows = search_experts(_load_experts(args), args.concept, k=args.k, tau=args.tau)
    print(f"{'rank':>4} {'layer':>5} {'neuron':>6} {'AP':>7} {'AUROC':>7} {'on_p50':>8} {'off_mean':>8}")
    for r in rows:
        print(f"{r['rank']:>4} {r['layer']:>5} {r['neuron']:>6} {r['ap']:>7.4f} {r['auroc']:>7.4f} "
              f"{r['on_p50']:>8.3f} {r['off_mean']:>8.3f}")


def _audit(args: argparse.Namespace) -> None:
    from .lens import audit_unrelated

    pairs = [p.split(",") for p in args.pair]
    for row in audit_unrelated(_load_experts(args), pairs, tau=args.tau):
        jaccard = "n/a" if row["jaccard"] is None else f"{row['jaccard']:.3f}"
        print(f"{row['concept_a']} ~ {row['concept_b']}: {len(row['shared'])} shared experts (Jaccard {jaccard})")
        for unit in row["shared"][:args.top]:
            print(f"    L{unit['layer']}/{unit['neuron']}  AP {unit['ap_a']:.3f} / {unit['ap_b']:.3f}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``steer-experts`` and all its subcommands."""
    from .steering import MODES, POSITIONS

    parser = argparse.ArgumentParser(prog="steer-experts", description=__doc__)
    parser.add_argument("--threads", type=_positive_int,
                        help="torch CPU threads (default: torch's; 1 is fastest on a busy shared machine)")
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

    g = sub.add_parser("generate", help="print steered and unsteered continuations of a prompt side by side")
    g.add_argument("prompt")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--experts", required=True, help="folder (or hub id) of an expert set from `discover`")
    g.add_argument("--concept", required=True)
    g.add_argument("--k", type=int, default=50, help="number of experts (top k by AP)")
    g.add_argument("--tau", type=float, help="use every expert with AP > tau instead of --k")
    g.add_argument("--alpha", type=float, default=1.0, help="strength: 1 sets experts to their value")
    g.add_argument("--mode", choices=MODES, default="set", help="clamp: z <- max(z, value), never lowers a unit")
    g.add_argument("--positions", choices=POSITIONS, default="all", help="which positions are steered")
    g.add_argument("--from-layer", type=int, help="only experts of this layer and later ones (e.g. 2)")
    g.add_argument("--auto", action="store_true",
                   help="k and alpha from a calibrated operating point (computed once with --concepts, then "
                        "kept in the expert set)")
    g.add_argument("--max-perplexity-ratio", type=float, default=2.0, help="budget of --auto")
    g.add_argument("--method", choices=("experts", "diffmean", "prompt"), default="experts",
                   help="diffmean: add the residual direction (needs --concepts); prompt: ask for the concept")
    g.add_argument("--concepts", help="the concept data (for --auto and --method diffmean)")
    g.add_argument("--layer", type=int, default=25, help="DiffMean's residual layer")
    g.add_argument("--factor", type=float, default=0.4, help="DiffMean's strength, x the layer's median token norm")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=10)
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="float32")
    g.add_argument("--device", default="cpu")
    g.set_defaults(run=_generate)

    p = sub.add_parser("push", help="upload a saved expert set or steered model folder to the Hugging Face Hub")
    p.add_argument("--experts", required=True, help="folder written by save_pretrained")
    p.add_argument("--repo", required=True, help="Hub repo id, e.g. user/football-experts")
    p.add_argument("--private", action="store_true")
    p.set_defaults(run=_push)

    for name, run, text in (("label", _label, "the concepts each neuron is expert for"),
                            ("search", _search, "the experts of a concept"),
                            ("audit", _audit, "experts shared by concepts declared unrelated")):
        q = sub.add_parser(name, help=text)
        q.add_argument("--experts", required=True, help="folder (or hub id) of an expert set")
        q.add_argument("--tau", type=float, default=0.5 if name != "search" else None, help="AP threshold")
        q.set_defaults(run=run)
        if name == "label":
            q.add_argument("--layer", type=int)
            q.add_argument("--neuron", type=int)
        elif name == "search":
            q.add_argument("concept")
            q.add_argument("--k", type=int, default=10)
        else:
            q.add_argument("--pair", action="append", required=True, help="two concepts, comma-separated")
            q.add_argument("--top", type=int, default=10, help="shared experts listed per pair")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``steer-experts``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        args.run(args)
    except (ValueError, KeyError, LookupError, FileNotFoundError, ConnectionError, NotImplementedError) as err:
        print(f"steer-experts {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
