"""End to end: discovery for 100 concepts x 100 positives on SmolLM2, vs a plain forward.

Ours: ``discover`` from nothing: collect every MLP neuron's response (fresh cache),
score expertise for all concepts, save the ExpertSet. Reference: a plain
decoder-only forward over the same sentences in the same batches, i.e. the model
time any method must spend. Each side runs in its own process so that its peak RSS
is its own.

Concepts: a folder of concept files (e.g. the output of
``recipes/generate_concepts.py``) with ``--concepts``; by default 100 concepts of
100 positives cut from the real OneSec sentences (each concept then gets 1000
negatives sampled from the others).

    python benchmarks/bench_end_to_end.py [--concepts DIR] [--n-concepts 100] [--positives 100]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ONESEC = REPO.parent / "shared" / "data" / "concepts" / "onesec"


def _concepts(args):
    from steer_experts.concepts import Concept, ConceptSet

    if args.concepts:
        concepts = ConceptSet.load(args.concepts)
        return concepts.subset(concepts.names[:args.n_concepts])
    pool = ConceptSet.load(ONESEC).sentences
    need = args.n_concepts * args.positives
    if len(pool) < need:
        # Fewer distinct sentences than asked for: concepts share sentences (each collected once).
        step = max(1, (len(pool) - args.positives) // max(1, args.n_concepts - 1))
        chunks = [pool[i * step:i * step + args.positives] for i in range(args.n_concepts)]
    else:
        chunks = [pool[i * args.positives:(i + 1) * args.positives] for i in range(args.n_concepts)]
    return ConceptSet([Concept(f"onesec-chunk-{i:03d}", tuple(c)) for i, c in enumerate(chunks)])


def _phase(which: str, args) -> dict:
    import torch

    from steer_experts.discovery import discover
    from steer_experts.experts import ExpertSet
    from steer_experts.models import load_model
    from steer_experts.responses import _encode, _plan, collect_responses
    from steer_experts.units import decoder_stack

    model = load_model("smollm2-135m")
    concepts = _concepts(args).with_sampled_negatives(1000, seed=0)
    shards, _ = _plan(model, concepts.sentences, 128, 32, 512)
    batches = [[concepts.sentences[i] for i in b] for shard in shards for b in shard]
    masks = [_encode(model.tokenizer, b, 128)["attention_mask"] for b in batches]
    start = time.perf_counter()
    scoring = None
    if which == "plain":
        stack = decoder_stack(model.model)
        with torch.no_grad():
            for batch in batches:
                enc = _encode(model.tokenizer, batch, 128)
                stack(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
        seconds = time.perf_counter() - start
    else:
        with tempfile.TemporaryDirectory() as tmp:
            experts = discover(model, concepts, cache_dir=Path(tmp) / "responses", progress=False)
            experts.save_pretrained(Path(tmp) / "experts")
            seconds = time.perf_counter() - start
            # Scoring again from the cache, outside the timed run, to split its time into its stages.
            responses = collect_responses(model, concepts.sentences, cache_dir=Path(tmp) / "responses", progress=False)
            again = time.perf_counter()
            ExpertSet.from_responses(responses, concepts, model, progress=False)
            scoring = time.perf_counter() - again
    return {"seconds": seconds, "scoring_seconds": scoring,
            "concepts": len(concepts), "sentences": len(concepts.sentences),
            "tokens": sum(int(m.sum()) for m in masks), "padded_tokens": sum(m.numel() for m in masks),
            "units": 46_080, "threads": torch.get_num_threads(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", help="folder of concept files (default: chunks of the OneSec sentences)")
    parser.add_argument("--n-concepts", type=int, default=100)
    parser.add_argument("--positives", type=int, default=100)
    parser.add_argument("--phase", choices=("plain", "discover"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(_phase(args.phase, args)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    passthrough = sys.argv[1:]
    results = {}
    for which in ("plain", "discover"):
        out = subprocess.run([sys.executable, __file__, "--phase", which, *passthrough], capture_output=True,
                             text=True, env=env, check=True)
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    r, plain = results["discover"], results["plain"]
    print(f"{r['concepts']} concepts, {r['sentences']} distinct sentences, {r['tokens']:,} tokens "
          f"({r['padded_tokens']:,} with padding), SmolLM2, {r['units']:,} MLP neurons, "
          f"{r['threads']} torch threads")
    for which, res in results.items():
        print(f"  {which:8s} {res['seconds']:7.1f} s   peak RSS {res['peak_rss_mib']:6.0f} MiB")
    print(f"  of discover: expertise scoring {r['scoring_seconds']:.1f} s (timed again from the cache), "
          f"collection and saving {r['seconds'] - r['scoring_seconds']:.1f} s")
    print(f"  per token: forward {plain['seconds'] / r['tokens'] * 1e3:.3f} ms; scoring "
          f"{r['scoring_seconds'] / (r['sentences'] * r['units']) * 1e9:.2f} ns per sentence x unit "
          f"({r['concepts']} concepts)")
    print(f"ratio discover/plain time: {r['seconds'] / plain['seconds']:.3f}   (goal: 1.05 or less)")


if __name__ == "__main__":
    main()
