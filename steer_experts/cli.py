"""The ``steer-experts`` command line: one subcommand per thing a user does.

Options are checked when parsed, and output folders before any model is loaded,
so a mistake costs seconds, not a run. Every library error ends as one line
``steer-experts <command>: error: ...`` and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import warnings
from pathlib import Path

from .errors import InvalidArgumentError, SteerExpertsError

DTYPES = ("float32", "bfloat16", "float16", "float64")  # models.DTYPES, without importing torch to parse
DEVICE_HELP = ("where the model runs: cpu, cuda, cuda:N, mps, or auto (accelerate spreads the layers over "
               "every GPU, for a model that does not fit one)")


def _discover_inputs(args: argparse.Namespace):
    """The output folder and the concepts of `discover`, checked before anything heavy loads or is written."""
    from .atomic import check_output_folder
    from .concepts import ConceptSet
    from .experts import SAVED_NAMES
    from .distributed import local_device
    from .models import check_device

    out = check_output_folder(args.out, SAVED_NAMES, overwrite=args.overwrite, what="expert set")
    check_device(local_device(args.device, args.workers if args.workers > 1 else None))
    concepts = ConceptSet.load(args.concepts)
    concepts.with_sampled_negatives(args.n_negatives, args.seed)  # fails now, not after the model ran
    return out, concepts


def _discover(args: argparse.Namespace) -> None:
    from .discovery import discover
    from .distributed import is_lead, local_device
    from .figures import plot_ap_by_layer
    from .models import load_model

    out, concepts = _discover_inputs(args)
    # With several processes (torchrun, --workers) all compute; only rank 0 speaks and saves.
    lead = is_lead()
    if lead:
        print(f"{concepts}: {concepts.report}", file=sys.stderr)
    model = load_model(args.model, dtype=args.dtype, device=local_device(args.device))
    expert_set = discover(model, concepts, pooling=args.pooling, max_length=args.max_length,
                          batch_size=args.batch_size, shard_size=args.shard_size, n_negatives=args.n_negatives,
                          seed=args.seed)
    if not lead:
        return
    expert_set.save_pretrained(out, overwrite=args.overwrite)
    figure = plot_ap_by_layer(expert_set, out / "ap_by_layer.png")
    print(expert_set.summary(top=args.top))
    truncated = expert_set.metadata["truncated_sentences"]
    if truncated:
        print(f"\n{truncated} of {expert_set.metadata['n_sentences']} sentences were longer than "
              f"{args.max_length} tokens and were truncated (raise --max-length to keep them whole).")
    print(f"\nWrote {out}/ (expert set) and {figure}.")


def _discover_workers(args: argparse.Namespace) -> None:
    """`discover --workers N`: the same command in N processes on this machine, sharing the threads out."""
    import torch

    from .distributed import spawn_team

    _discover_inputs(args)  # a mistake fails once, before any process starts
    # --threads is the run's total: N processes of that many threads each would fight for the cores.
    threads = max(1, (args.threads or torch.get_num_threads()) // args.workers)
    spawn_team(args.workers, _team_member, argparse.Namespace(**{**vars(args), "workers": 1, "threads": threads}))


def _team_member(args: argparse.Namespace) -> None:
    """One process of `discover --workers N`: runs the command and exits with its code."""
    code = _run(args, args.run)
    if code:
        sys.exit(code)


def _side_by_side(left: str, right: str, titles: tuple[str, str], width: int = 48) -> str:
    columns = [textwrap.wrap(text.strip(), width) or [""] for text in (left, right)]
    rows = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(map(len, columns))):
        a, b = (col[i] if i < len(col) else "" for col in columns)
        rows.append(f"{a:<{width}} | {b}")
    return "\n".join(rows)


def _print_continuations(args: argparse.Namespace, model, experts, name: str, steered, toward: str) -> None:
    from .steering import steer

    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
                    top_k=args.top_k, seed=args.seed)
    # The unsteered side is the same path with no expert touched, so both sample alike.
    plain = steer(model, experts, name, k=0).complete([args.prompt], **sampling)[0]
    steered_text = steered.complete([args.prompt], **sampling)[0]
    print(f"prompt: {args.prompt}\n{steered!r}\n")
    print(_side_by_side(plain, steered_text, ("unsteered", f"steered toward {toward}")))


def _generate(args: argparse.Namespace) -> None:
    from .concepts import ConceptSet
    from .experts import ExpertSet
    from .models import check_device, load_model
    from .steering import steer
    from .words import concept_word

    if args.method != "experts" and args.auto:
        raise InvalidArgumentError("--auto calibrates expert steering; use it with --method experts.")
    if args.auto and args.mode == "add":
        raise InvalidArgumentError("--auto calibrates k and alpha for --mode set; give --k and --alpha with --mode add.")
    check_device(args.device)
    # A broken expert set or an unknown concept fails before the model loads, not after.
    experts = ExpertSet.from_pretrained(args.experts)
    name = experts.concepts[experts.concept_index(args.concept)]
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    experts.check_model(model)

    def concept_data():
        if args.concepts is None:
            asked = "--mode add" if args.mode == "add" else f"--method {args.method}{' --auto' if args.auto else ''}"
            raise InvalidArgumentError(f"{asked} needs the concept's sentences: pass --concepts FILE.")
        return ConceptSet.load(args.concepts).with_sampled_negatives(seed=0)[name]

    if args.method == "prompt":
        from .prompting import steer_prompt

        steered = steer_prompt(model, concept_word(name))
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
        if args.mode == "add":
            from .diffmean import unit_shifts

            selection["shifts"] = unit_shifts(model, experts, concept_data())
        if args.promoting:
            from .effects import promoting_scores

            selection["scores"] = promoting_scores(model, experts, name)
        steered = steer(model, experts, name, mode=args.mode, positions=args.positions, layers=layers, **selection)
    _print_continuations(args, model, experts, name, steered, args.concept)


def _steer(args: argparse.Namespace) -> None:
    from .atomic import check_output_folder
    from .concepts import ConceptSet, resolve_concept
    from .discovery import check_concept_word, discover, discover_word
    from .models import check_device, load_model
    from .steering import SAVED_NAMES, steer
    from .writing import WritingSettings

    # Every check that needs no model comes first: a typo costs a second, not a written concept.
    out = None if args.save is None else check_output_folder(args.save, SAVED_NAMES, overwrite=args.overwrite,
                                                             what="steered model")
    check_device(args.device)
    concepts = None
    if args.concepts is not None:
        concepts = ConceptSet.load(args.concepts).with_sampled_negatives(args.n_negatives, args.seed)
        name = resolve_concept(args.concept, concepts.names)
    else:
        check_concept_word(args.concept)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    if concepts is None:
        experts = discover_word(model, args.concept, n_positives=args.n_positives, n_negatives=args.n_negatives,
                                writing=WritingSettings(backend=args.backend), seed=args.seed)
        name = experts.concepts[0]
        print(f"experts of {name!r}: {int(experts.expertise.n_positives[0])} sentences written by "
              f"{experts.metadata['writing_backend']} vs {int(experts.expertise.n_negatives[0])} from the neutral "
              "sentence bank", file=sys.stderr)
    else:
        experts = discover(model, concepts, seed=args.seed)
    steered = steer(model, experts, name, k=args.k, alpha=args.alpha)
    _print_continuations(args, model, experts, name, steered, name)
    if out is not None:
        print(f"\nWrote {steered.save_pretrained(out, overwrite=args.overwrite)}/ (steered model).")


def _push(args: argparse.Namespace) -> None:
    from .hub import SavedFolderNotFoundError, upload_folder

    folder = Path(args.experts)
    known = ("expert_set.json", "steering.json")
    if not any((folder / name).exists() for name in known):
        raise SavedFolderNotFoundError(f"{folder} holds neither a saved expert set nor a steered model ({known}).")
    print(upload_folder(folder, args.repo, private=args.private))


def _atlas(args: argparse.Namespace) -> None:
    from .atlas.site import SITE_NAMES, build_atlas
    from .atomic import check_output_folder
    from .concepts import ConceptSet
    from .experts import ExpertSet
    from .models import check_device, load_model

    if args.steer is not None and args.concepts is None:
        raise _UsageError("--steer needs --concepts (and so the model).")
    check_output_folder(args.out, SITE_NAMES, overwrite=args.overwrite, what="atlas")
    check_device(args.device)
    experts = ExpertSet.from_pretrained(args.experts)
    model = concepts = None
    if args.concepts is not None:
        seed = experts.metadata.get("negative_sampling_seed", 0)  # the negatives discovery drew: a cache hit
        concepts = ConceptSet.load(args.concepts).with_sampled_negatives(args.n_negatives, seed)
        model = load_model(args.model or experts.model_name, dtype=args.dtype, device=args.device)
        experts.check_model(model)
    report = build_atlas(experts, args.out, model=model, concepts=concepts, top=args.top, tau=args.tau,
                         steer_prompt=args.steer, overwrite=args.overwrite)
    print(f"Wrote {report.pages} pages ({report.bytes / 1e6:.1f} MB) in {report.seconds:.1f} s; "
          f"open {(report.folder / 'index.html').resolve().as_uri()}")


def _load_experts(args: argparse.Namespace):
    from .experts import ExpertSet

    return ExpertSet.from_pretrained(args.experts)


def _label(args: argparse.Namespace) -> None:
    from .lens.queries import label_neurons

    if (args.layer is None) != (args.neuron is None):
        raise _UsageError("--layer and --neuron go together: give both to label one neuron, or neither "
                          "to label every neuron.")
    experts = _load_experts(args)
    if args.layer is not None:
        rows = [{"layer": args.layer, "neuron": args.neuron, "concepts": experts.label(args.layer, args.neuron, args.tau)}]
    else:
        rows = label_neurons(experts, tau=args.tau)
    for row in rows:
        names = ", ".join(f"{c} ({ap:.3f})" for c, ap in row["concepts"]) or f"no concept with AP > {args.tau}"
        print(f"L{row['layer']}/{row['neuron']}: {names}")


def _search(args: argparse.Namespace) -> None:
    from .lens.queries import search_experts

    rows = search_experts(_load_experts(args), args.concept, k=args.k, tau=args.tau)
    print(f"{'rank':>4} {'layer':>5} {'neuron':>6} {'AP':>7} {'AUROC':>7} {'on_p50':>8} {'off_mean':>8}")
    for r in rows:
        print(f"{r['rank']:>4} {r['layer']:>5} {r['neuron']:>6} {r['ap']:>7.4f} {r['auroc']:>7.4f} "
              f"{r['on_p50']:>8.3f} {r['off_mean']:>8.3f}")


def _audit(args: argparse.Namespace) -> None:
    from .lens.queries import audit_unrelated

    pairs = [p.split(",") for p in args.pair]
    for row in audit_unrelated(_load_experts(args), pairs, tau=args.tau):
        jaccard = "n/a" if row["jaccard"] is None else f"{row['jaccard']:.3f}"
        print(f"{row['concept_a']} ~ {row['concept_b']}: {len(row['shared'])} shared experts (Jaccard {jaccard})")
        for unit in row["shared"][:args.top]:
            print(f"    L{unit['layer']}/{unit['neuron']}  AP {unit['ap_a']:.3f} / {unit['ap_b']:.3f}")


class _UsageError(SteerExpertsError, ValueError):
    """Options that are each valid but do not fit together."""


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _checked(parse, ok, need: str):
    """An argparse type: ``parse`` the text, then refuse a value for which ``ok`` is false, saying ``need``
    (and the value as parsed for integers, as typed for floats)."""
    def check(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{need}, got {value if isinstance(value, int) else text}")
        return value
    return check


_positive_int = _checked(_integer, lambda v: v >= 1, "must be at least 1")
_non_negative_int = _checked(_integer, lambda v: v >= 0, "must be at least 0")
_non_negative = _checked(_finite, lambda v: v >= 0, "must be at least 0")
_positive = _checked(_finite, lambda v: v > 0, "must be greater than 0")
_tau = _checked(_finite, lambda v: 0 <= v < 1, "must be in [0, 1) (an AP threshold)")


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=_positive_int, default=40)
    parser.add_argument("--temperature", type=_positive, default=1.0)
    parser.add_argument("--top-k", type=_non_negative_int, default=10)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=_non_negative_int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``steer-experts`` and all its subcommands."""
    from .steering import MODES, POSITIONS

    parser = argparse.ArgumentParser(prog="steer-experts", description=__doc__)
    parser.add_argument("--threads", type=_positive_int,
                        help="CPU threads of torch and of expertise scoring (default: torch's; 1 is fastest on a busy "
                             "shared machine)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("discover", help="find the expert neurons of concepts and save them as an ExpertSet")
    d.add_argument("--model", default="smollm2-135m", help="embedded name, local folder or hub id")
    d.add_argument("--concepts", required=True, help="concept file (.json OneSec, .jsonl, .csv) or a folder of them")
    d.add_argument("--out", required=True, type=_text, help="folder to write the expert set and figure to")
    d.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds files steer_experts did not write")
    d.add_argument("--pooling", choices=("max", "mean"), default="max")
    d.add_argument("--max-length", type=_positive_int, default=128, help="tokens kept per sentence")
    d.add_argument("--batch-size", type=_positive_int, default=32)
    d.add_argument("--shard-size", type=_positive_int, default=512,
                   help="sentences per response cache file (fixed by the first run of a cache folder); "
                        "the unit of work that --workers share out")
    d.add_argument("--workers", type=_positive_int, default=1,
                   help="processes on this machine, each collecting its share of the shards and scoring its "
                        "share of the units (same result, bit for bit); --threads is then their total")
    d.add_argument("--n-negatives", type=_positive_int, default=1000,
                   help="negatives sampled per concept that has none")
    d.add_argument("--seed", type=_non_negative_int, default=0)
    d.add_argument("--top", type=_non_negative_int, default=10, help="experts listed per concept")
    d.add_argument("--dtype", choices=DTYPES, default="float32")
    d.add_argument("--device", default="cpu", help=DEVICE_HELP)
    d.set_defaults(run=_discover)

    g = sub.add_parser("generate", help="print steered and unsteered continuations of a prompt side by side")
    g.add_argument("prompt", type=_text)
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--experts", required=True, help="folder (or hub id) of an expert set from `discover`")
    g.add_argument("--concept", required=True)
    g.add_argument("--k", type=_non_negative_int, default=50, help="number of experts (top k by AP)")
    g.add_argument("--tau", type=_tau, help="use every expert with AP > tau instead of --k")
    g.add_argument("--alpha", type=_non_negative, default=1.0, help="strength: 1 sets experts to their value")
    g.add_argument("--mode", choices=MODES, default="set", help="clamp: z <- max(z, value), never lowers a unit; add: z <- z + alpha x the "
                   "concept's token-level difference of mean responses (needs --concepts)")
    g.add_argument("--positions", choices=POSITIONS, default="all", help="which positions are steered")
    g.add_argument("--from-layer", type=_non_negative_int, help="only experts of this layer and later ones (e.g. 2)")
    g.add_argument("--promoting", action="store_true",
                   help="only experts whose write raises the concept word's logit (the top k by AP among them)")
    g.add_argument("--auto", action="store_true",
                   help="k and alpha from a calibrated operating point (computed once with --concepts, then "
                        "kept in the expert set)")
    g.add_argument("--max-perplexity-ratio", type=_positive, default=2.0, help="budget of --auto (> 1)")
    g.add_argument("--method", choices=("experts", "diffmean", "prompt"), default="experts",
                   help="diffmean: add the residual direction (needs --concepts); prompt: ask for the concept")
    g.add_argument("--concepts", help="the concept data (for --auto, --mode add and --method diffmean)")
    g.add_argument("--layer", type=_non_negative_int, default=25, help="DiffMean's residual layer")
    g.add_argument("--factor", type=float, default=0.4, help="DiffMean's strength, x the layer's median token norm")
    _add_generation_options(g)
    g.set_defaults(run=_generate)

    s = sub.add_parser("steer", help="steer toward any word: experts from sentences the model writes (cached), "
                       "then steered and unsteered text side by side")
    s.add_argument("prompt", type=_text)
    s.add_argument("--concept", required=True, type=_text, help="a word (no data needed), or a concept of --concepts")
    s.add_argument("--concepts", help="concept data to find the experts in, instead of writing sentences")
    s.add_argument("--model", default="smollm2-135m", help="an instruct model (it writes the sentences)")
    s.add_argument("--n-positives", type=_positive_int, default=100, help="sentences written about the word")
    s.add_argument("--n-negatives", type=_positive_int, default=400,
                   help="negatives: from the neutral sentence bank (a word) or sampled from the other concepts")
    s.add_argument("--backend", choices=("auto", "ctranslate2", "transformers"), default="auto",
                   help="what writes the sentences (auto: CTranslate2 where it converts the model)")
    s.add_argument("--k", type=_non_negative_int, default=100,
                   help="number of experts (top k by AP; 100 at alpha 1 is the setting chosen on held-out prompts "
                   "for woman and man within 1.5x perplexity, README)")
    s.add_argument("--alpha", type=_non_negative, default=1.0, help="strength: 1 sets experts to their value")
    s.add_argument("--save", help="also write the steered model here (save_pretrained)")
    s.add_argument("--overwrite", action="store_true",
                   help="write into --save even if it holds files steer_experts did not write")
    _add_generation_options(s)
    s.set_defaults(run=_steer)

    a = sub.add_parser("atlas", help="write a static website of the concepts and their expert neurons")
    a.add_argument("--experts", required=True, help="a saved expert set folder")
    a.add_argument("--concepts", help="the concept data the experts were found on: adds sentences, token "
                   "shading and histograms (needs the model)")
    a.add_argument("--out", default="site", type=_text, help="folder of the site (default: site)")
    a.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds files steer_experts did not write")
    a.add_argument("--model", help="the model (default: the one the expert set was found on)")
    a.add_argument("--n-negatives", type=_positive_int, default=1000,
                   help="negatives sampled per concept that has none, as in discover")
    a.add_argument("--top", type=_positive_int, default=10, help="experts per concept shown")
    a.add_argument("--steer", type=_text, metavar="PROMPT",
                   help="also show greedy continuations of PROMPT steered toward each concept (k = 10, 50, 200)")
    a.add_argument("--tau", type=_tau, default=0.5,
                   help="AP above which a unit counts as an expert")
    a.add_argument("--dtype", choices=DTYPES, default="float32")
    a.add_argument("--device", default="cpu", help=DEVICE_HELP)
    a.set_defaults(run=_atlas)

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
        q.add_argument("--tau", type=_tau, default=0.5 if name != "search" else None, help="AP threshold in [0, 1)")
        q.set_defaults(run=run)
        if name == "label":
            q.add_argument("--layer", type=_non_negative_int)
            q.add_argument("--neuron", type=_non_negative_int)
        elif name == "search":
            q.add_argument("concept", type=_text)
            q.add_argument("--k", type=_positive_int, default=10)
        else:
            q.add_argument("--pair", action="append", required=True, help="two concepts, comma-separated")
            q.add_argument("--top", type=_non_negative_int, default=10, help="shared experts listed per pair")
    return parser


# Errors that mean "the input, a file or the environment is wrong", not a bug: one line, exit 2.
# Library errors all derive from SteerExpertsError; the builtin ones come from the libraries below
# us (a disk that is full, a folder that vanished).
_USER_ERRORS = (SteerExpertsError, ValueError, LookupError, OSError, ConnectionError, NotImplementedError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``steer-experts``; returns the exit code (0 done, 2 error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    return _run(args, _discover_workers if getattr(args, "workers", 1) > 1 else args.run)


def _run(args: argparse.Namespace, run) -> int:
    """``run(args)`` with the global options applied and library errors turned into one line; the exit code."""
    try:
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        with warnings.catch_warnings():
            if not args.debug:  # a repaired cache file is news for the user, not a source line
                warnings.showwarning = lambda message, *_a, **_k: print(
                    f"steer-experts {args.command}: warning: {message}", file=sys.stderr)
            run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"steer-experts {args.command}: interrupted; finished work is cached and a rerun resumes.",
              file=sys.stderr)
        return 130
    except _USER_ERRORS as err:
        if args.debug:
            raise
        message = str(err) or type(err).__name__
        if isinstance(err, KeyError) and not isinstance(err, SteerExpertsError) and err.args:
            message = str(err.args[0])  # a plain KeyError prints its message quoted
        print(f"steer-experts {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
