"""Response collection vs a plain decoder-only forward over the same batches.

Both sides run SmolLM2's decoder stack (no LM head) on the same sentences in the
same length-sorted batches; ours also pools all 46,080 MLP neurons and writes the
sharded cache. Each side runs in its own process so that its peak RSS is its own;
the two alternate ``--repeats`` times and the best time of each is kept.

    python benchmarks/bench_collection.py [--sentences 512] [--batch-size 32]
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


def _sentences(n: int) -> list[str]:
    from steer_experts.concepts import ConceptSet

    source = ONESEC if ONESEC.is_dir() else REPO / "examples" / "concepts.jsonl"
    sentences = ConceptSet.load(source).sentences
    return (sentences * (n // len(sentences) + 1))[:n] if len(sentences) < n else sentences[:n]


def _phase(which: str, n: int, batch_size: int) -> dict:
    import torch

    from steer_experts.models import load_model
    from steer_experts.responses import _plan, collect_responses
    from steer_experts.units import decoder_stack

    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    sentences = list(dict.fromkeys(_sentences(n)))
    shards, _ = _plan(model, sentences, 128, batch_size, 512)
    batches = [b for shard in shards for b in shard]
    n_tokens = sum(len(ids) for ids in model.tokenizer(sentences, truncation=True, max_length=128)["input_ids"])
    start = time.perf_counter()
    if which == "plain":
        stack = decoder_stack(model.model)
        with torch.no_grad():
            for batch in batches:
                enc = model.tokenizer([sentences[i] for i in batch], padding=True, truncation=True, max_length=128,
                                      return_tensors="pt")
                stack(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
    else:
        with tempfile.TemporaryDirectory() as cache:
            collect_responses(model, sentences, batch_size=batch_size, cache_dir=cache, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": n_tokens, "sentences": len(sentences),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--phase", choices=("plain", "collect"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(_phase(args.phase, args.sentences, args.batch_size)))
        return
    results: dict[str, list[dict]] = {"plain": [], "collect": []}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for _ in range(args.repeats):
        for which in ("plain", "collect"):
            out = subprocess.run([sys.executable, __file__, "--phase", which, "--sentences", str(args.sentences),
                                  "--batch-size", str(args.batch_size)], capture_output=True, text=True, env=env,
                                 check=True)
            results[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in results.items()}
    tps = {k: r["tokens"] / r["seconds"] for k, r in best.items()}
    print(f"{best['plain']['sentences']} sentences, {best['plain']['tokens']} tokens, batch {args.batch_size}, "
          f"best of {args.repeats}")
    for k in ("plain", "collect"):
        print(f"  {k:8s} {tps[k]:8.1f} tokens/s   peak RSS {best[k]['peak_rss_mib']:7.0f} MiB")
    print(f"ratio collect/plain tokens/s: {tps['collect'] / tps['plain']:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
