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
    from steer_experts.models import load_model
    from steer_experts.units import decoder_stack
    from steer_experts.responses import _plan

    model = load_model("smollm2-135m")
    concepts = _concepts(args).with_sampled_negatives(1000, seed=0)
    start = time.perf_counter()
    if which == "plain":
        shards, _ = _plan(model, concepts.sentences, 128, 32, 512)
        stack = decoder_stack(model.model)
        with torch.no_grad():
            for batch in (b for shard in shards for b in shard):
                enc = model.tokenizer([concepts.sentences[i] for i in batch], padding=True, truncation=True,
                                      max_length=128, return_tensors="pt")
                stack(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            experts = discover(model, concepts, cache_dir=Path(tmp) / "responses", progress=False)
            experts.save_pretrained(Path(tmp) / "experts")
    return {"seconds": time.perf_counter() - start, "concepts": len(concepts),
            "sentences": len(concepts.sentences),
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
    r = results["discover"]
    print(f"{r['concepts']} concepts, {r['sentences']} distinct sentences")
    for which, res in results.items():
        print(f"  {which:8s} {res['seconds'] / 60:6.2f} min   peak RSS {res['peak_rss_mib']:6.0f} MiB")
    print(f"ratio discover/plain time: {r['seconds'] / results['plain']['seconds']:.3f}   "
          f"(target: discover under 10 min and 4 GiB)")


if __name__ == "__main__":
    main()
