"""Scale-out: ``discover`` in 2 processes x 1 thread against 1 process x 1 thread, same sentences.

Both sides run ``discover`` on SmolLM2 from nothing: collect every MLP neuron's response
into a fresh response cache of their own, score expertise for every concept, save the
ExpertSet. The two-process side splits the work as ``steer-experts discover --workers 2``
does (a gloo team of two on this machine, each process taking every other shard of the
batching plan and half of the units). Each side runs in its own process; its clock starts
once the model is loaded (in every process) and stops when the expert set is saved. Every
process runs one thread, in the forward pass and in expertise scoring alike (scoring takes
torch's thread count).

Sentences: the first ``--sentences`` distinct sentences of the OneSec data
(``$STEER_EXPERTS_DATA``, else ``../shared/data`` beside the checkout), cut into 10
concepts that sample their negatives from each other. The run checks that both sides
wrote the same bytes (expert set and response cache), then prints both wall times and the
ratio.

The machine's own ceiling comes next, on the same sentences and batches: a plain decoder
forward (no hooks, no cache, no scoring) in 1 process x 1 thread, against two independent
1-thread processes that each run every other batch at the same time (started together
once both have loaded the model). Two cores that share caches, memory bandwidth or a
physical core give less than 2x even to this embarrassingly parallel work; discover's ratio
is then read against that ceiling.

    python benchmarks/bench_scaleout.py [--sentences 2000] [--batch-size 32] [--shard-size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("STEER_EXPERTS_DATA") or REPO.parent / "shared" / "data")
ONESEC = DATA / "concepts" / "onesec"
N_CONCEPTS = 10


def _concepts(n: int):
    from steer_experts.concepts import Concept, ConceptSet

    if not ONESEC.is_dir():
        raise SystemExit(f"OneSec data not found at {ONESEC} (set STEER_EXPERTS_DATA).")
    pool = ConceptSet.load(ONESEC).sentences
    if len(pool) < n:
        raise SystemExit(f"--sentences {n}: the OneSec data holds only {len(pool)} distinct sentences.")
    parts = [pool[i * n // N_CONCEPTS:(i + 1) * n // N_CONCEPTS] for i in range(N_CONCEPTS)]
    return ConceptSet([Concept(f"onesec-part-{i}", tuple(p)) for i, p in enumerate(parts)])


def _timed_discover(settings: dict) -> None:
    """One process of a side: load, wait for the others, time discover + save; rank 0 prints the result."""
    import torch

    from steer_experts.discovery import discover
    from steer_experts.distributed import team
    from steer_experts.models import load_model

    torch.set_num_threads(1)
    model = load_model("smollm2-135m")
    concepts = _concepts(settings["sentences"])
    members = team(model.device)
    members.barrier()
    start = time.perf_counter()
    experts = discover(model, concepts, batch_size=settings["batch_size"], shard_size=settings["shard_size"],
                       cache_dir=settings["cache"], progress=False)
    if members.lead:
        experts.save_pretrained(settings["out"])
        print(json.dumps({"seconds": time.perf_counter() - start, "sentences": len(concepts.sentences)}), flush=True)


def _timed_forward(settings: dict) -> None:
    """One process of the ceiling: load, wait until every part has loaded, time a plain forward over
    every ``parts``-th batch from ``part``; prints the seconds."""
    import torch

    from steer_experts.models import load_model
    from steer_experts.responses import _encode, _plan
    from steer_experts.units import decoder_stack

    torch.set_num_threads(1)
    model = load_model("smollm2-135m")
    sentences = _concepts(settings["sentences"]).sentences
    shards, _ = _plan(model, sentences, 128, settings["batch_size"], settings["shard_size"])
    batches = [[sentences[i] for i in b] for shard in shards for b in shard][settings["part"]::settings["parts"]]
    ready = Path(settings["ready"])
    (ready / str(settings["part"])).touch()
    while len(list(ready.iterdir())) < settings["parts"]:
        time.sleep(0.01)
    stack = decoder_stack(model.model)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            enc = _encode(model.tokenizer, batch, 128)
            stack(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def _phase(which: str, settings: dict) -> None:
    if which == "forward":
        _timed_forward(settings)
    elif which == "lone":
        _timed_discover(settings)
    else:
        from steer_experts.distributed import spawn_team

        spawn_team(2, _timed_discover, settings)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _forward_seconds(parts: int, args, ready: Path, env: dict) -> list[float]:
    """Each process's forward seconds when ``parts`` processes share the batches and start together."""
    ready.mkdir()
    running = []
    for part in range(parts):
        settings = {"sentences": args.sentences, "batch_size": args.batch_size, "shard_size": args.shard_size,
                    "part": part, "parts": parts, "ready": str(ready)}
        running.append(subprocess.Popen([sys.executable, __file__, "--phase", "forward", "--settings",
                                         json.dumps(settings)], stdout=subprocess.PIPE, text=True, env=env))
    outputs = [process.communicate()[0] for process in running]
    if any(process.returncode for process in running):
        raise SystemExit(f"a plain-forward process of {parts} failed")
    return [json.loads(out.strip().splitlines()[-1])["seconds"] for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=512,
                        help="sentences per cache shard: the unit of work shared out")
    parser.add_argument("--phase", choices=("lone", "team", "forward"), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        _phase(args.phase, json.loads(args.settings))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("lone", "team"):
            settings = {"sentences": args.sentences, "batch_size": args.batch_size, "shard_size": args.shard_size,
                        "cache": f"{tmp}/{which}/cache", "out": f"{tmp}/{which}/experts"}
            start = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--phase", which, "--settings", json.dumps(settings)],
                                 capture_output=True, text=True, env=env)
            if out.returncode:
                raise SystemExit(f"the {which} side failed:\n{out.stderr[-3000:]}")
            results[which] = {**json.loads(out.stdout.strip().splitlines()[-1]),
                              "command_seconds": time.perf_counter() - start}
        same = {what: _files(Path(tmp, "lone", what)) == _files(Path(tmp, "team", what))
                for what in ("experts", "cache")}
        forward = {parts: _forward_seconds(parts, args, Path(tmp, f"ready-{parts}"), env) for parts in (1, 2)}
    print(f"{results['lone']['sentences']} sentences, {N_CONCEPTS} concepts, batch {args.batch_size}, shards of "
          f"{args.shard_size}, SmolLM2, all 46,080 MLP neurons")
    for which, label in (("lone", "1 process x 1 thread"), ("team", "2 processes x 1 thread")):
        r = results[which]
        print(f"  {label:24s} discover {r['seconds']:7.1f} s   whole command {r['command_seconds']:7.1f} s")
    ratio = results["lone"]["seconds"] / results["team"]["seconds"]
    print(f"ratio 1 process / 2 processes, discover wall time: {ratio:.2f}x")
    ceiling = forward[1][0] / max(forward[2])
    print(f"machine ceiling, plain forward: 1 process {forward[1][0]:.1f} s, 2 independent processes "
          f"{' and '.join(f'{s:.1f}' for s in forward[2])} s: {ceiling:.2f}x; discover reaches "
          f"{ratio / ceiling:.0%} of it")
    print(f"byte-identical: expert set {'yes' if same['experts'] else 'NO'}, "
          f"response cache {'yes' if same['cache'] else 'NO'}")
    if not all(same.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
