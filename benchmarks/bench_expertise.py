"""Benchmark: expertise (AP, AUROC) for all units x concepts vs. a per-unit sklearn loop.

Case (a), synthetic: N sentences x U units of ReLU-like responses rounded to
float16 (about 70% exact zeros and many other ties), 20 concepts of N/20
positives each, scored twice:
  a1 "rest":   negatives = every other sentence (4,750 of 5,000);
  a2 "listed": negatives = 1,000 sentences drawn from the other concepts.
The responses stream through ``.columns(start, stop)`` like the on-disk cache.

The reference is sklearn's ``average_precision_score`` (and, timed apart,
``roc_auc_score``) called once per unit and concept. Timing it on all units
would take hours, so it runs on a random subset of units and its per-unit
time is extrapolated; on that subset both AP and AUROC are compared with ours.
Ratios are given for wall time (ours uses every core) and for CPU time (the
work done, which other load on the machine disturbs less).

Case (b): SmolLM2's real responses to OneSec football (all 46,080 MLP neurons;
collected on the first run, then read from the response cache).

``--device cuda`` times compute_expertise's torch path on that device (the
default, none, is its compiled kernel on every CPU core).

Usage: python benchmarks/bench_expertise.py [--quick] [--units U] [--sentences N] [--device D]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from steer_experts.concepts import ConceptRows
from steer_experts.expertise import compute_expertise


class HalfPrecisionResponses:
    """(N, U) responses kept as float16, served as float32 column blocks like the disk cache."""

    def __init__(self, values: np.ndarray):
        self.values = values
        self.shape = values.shape

    def columns(self, start: int, stop: int) -> np.ndarray:
        return self.values[:, start:stop].astype(np.float32)


def synthetic_responses(n_sentences: int, n_units: int, rng: np.random.Generator) -> HalfPrecisionResponses:
    """ReLU-like responses with heavy ties; each concept lifts some units a little."""
    values = np.empty((n_sentences, n_units), np.float16)
    for start in range(0, n_units, 4096):
        stop = min(start + 4096, n_units)
        z = rng.standard_normal((n_sentences, stop - start), dtype=np.float32)
        # A sentence-specific shift shared by every 97th unit makes some units informative.
        z[:, ::97] += rng.standard_normal((n_sentences, 1), dtype=np.float32)
        values[:, start:stop] = np.maximum(z - 0.5, 0.0)
    return HalfPrecisionResponses(values)


def concept_sets(n_sentences: int, n_concepts: int, n_listed: int, rng: np.random.Generator):
    """The "rest" and "listed" concept sets over one partition of the sentences."""
    parts = np.array_split(rng.permutation(n_sentences), n_concepts)
    names = [f"concept{i}" for i in range(n_concepts)]
    positives = [np.sort(p) for p in parts]
    everyone = np.arange(n_sentences)
    others = [np.setdiff1d(everyone, p) for p in positives]
    listed = [np.sort(rng.choice(o, size=min(n_listed, len(o)), replace=False)) for o in others]
    return {
        "rest": ConceptRows(names, positives, others),
        "listed": ConceptRows(names, positives, listed),
    }


def sklearn_reference(responses, concepts: ConceptRows, units: np.ndarray) -> dict:
    """Per-unit, per-concept sklearn AP and AUROC on ``units``, with their seconds spent."""
    block = np.stack([responses.columns(int(u), int(u) + 1)[:, 0] for u in units], axis=1)
    n_concepts = len(concepts.names)
    ap = np.empty((n_concepts, len(units)))
    auroc = np.empty((n_concepts, len(units)))
    labels, rows = [], []
    for c in range(n_concepts):
        pos, neg = concepts.positive_indices(c), concepts.negative_indices(c)
        labels.append(np.r_[np.ones(len(pos)), np.zeros(len(neg))])
        rows.append(np.r_[pos, neg])
    seconds = {"ap": 0.0, "auroc": 0.0, "cpu_ap": 0.0, "cpu_auroc": 0.0}
    for k in range(len(units)):
        for c in range(n_concepts):
            score = block[rows[c], k]
            wall, cpu = time.perf_counter(), time.process_time()
            ap[c, k] = average_precision_score(labels[c], score)
            wall_mid, cpu_mid = time.perf_counter(), time.process_time()
            auroc[c, k] = roc_auc_score(labels[c], score)
            seconds["auroc"] += time.perf_counter() - wall_mid
            seconds["cpu_auroc"] += time.process_time() - cpu_mid
            seconds["ap"] += wall_mid - wall
            seconds["cpu_ap"] += cpu_mid - cpu
    return {"ap": ap, "auroc": auroc, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4,096 units and 24 reference units")
    parser.add_argument("--units", type=int, default=46_080)
    parser.add_argument("--sentences", type=int, default=5_000)
    parser.add_argument("--concepts", type=int, default=20)
    parser.add_argument("--listed-negatives", type=int, default=1_000)
    parser.add_argument("--reference-units", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="score with torch on this device (default: the compiled kernel on the CPU)")
    args = parser.parse_args()
    if args.quick:
        args.units, args.reference_units = 4_096, 24

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    responses = synthetic_responses(args.sentences, args.units, rng)
    zeros = np.mean(responses.values[:, :512] == 0)
    print(
        f"(a) synthetic: {args.sentences} sentences x {args.units} units, {args.concepts} concepts; "
        f"{zeros:.0%} zeros, float16-rounded (built in {time.perf_counter() - t0:.1f} s)"
    )
    reference_units = np.sort(rng.choice(args.units, size=args.reference_units, replace=False))
    for case, concepts in concept_sets(args.sentences, args.concepts, args.listed_negatives, rng).items():
        n_neg = int(np.mean([len(n) for n in concepts.negatives]))
        compare(responses, concepts, reference_units, args.device,
                f"case a-{case}: {len(concepts.positives[0])} positives, ~{n_neg} negatives per concept")
    real_responses(args, rng)


def compare(responses, concepts, reference_units: np.ndarray, device, title: str) -> None:
    """Time ours on every unit (on ``device``, or with numpy where None) and sklearn on
    ``reference_units``; print throughputs, ratios and max deltas."""
    n_units, n_concepts = responses.shape[1], len(concepts.names)
    pairs = n_units * n_concepts
    # The first call sets the kernels up: torch's on a device (3 s on this CPU), or compiles the CPU
    # kernel on a fresh install (about 5 s; numba then caches it). Neither is per-unit work.
    compute_expertise(responses.columns(0, 8), concepts, device=device, progress=False)
    wall, cpu = time.perf_counter(), time.process_time()
    ours = compute_expertise(responses, concepts, device=device, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    ref = sklearn_reference(responses, concepts, reference_units)
    per_pair = {k: v / ref["ap"].size for k, v in ref["seconds"].items()}
    d_ap = np.abs(ours.ap[:, reference_units] - ref["ap"]).max()
    d_auroc = np.abs(ours.auroc[:, reference_units] - ref["auroc"]).max()

    print(f"\n  {title}")
    print(f"    ours:    {wall:6.2f} s wall, {cpu:6.2f} s CPU for all {pairs:,} unit-concept pairs "
          f"= {pairs / wall:,.0f} pairs/s (AP, AUROC and 4 statistics)")
    print(f"    sklearn: {len(reference_units)} random units x {n_concepts} concepts, "
          "per pair, extrapolated to all pairs:")
    for label, keys in (("AP only", ("ap",)), ("AP + AUROC", ("ap", "auroc"))):
        ref_wall = sum(per_pair[k] for k in keys)
        ref_cpu = sum(per_pair[f"cpu_{k}"] for k in keys)
        print(f"      {label:10s} {1 / ref_wall:8,.0f} pairs/s ({pairs * ref_wall / 60:5.1f} min)   "
              f"ours/sklearn: wall {ref_wall * pairs / wall:6.1f}x, CPU {ref_cpu * pairs / cpu:6.1f}x")
    print(f"    max |dAP| = {d_ap:.2e}, max |dAUROC| = {d_auroc:.2e} (float64, reference units)")


def real_responses(args, rng: np.random.Generator) -> None:
    """Case (b): SmolLM2's responses to OneSec football (collected once, then read from the cache)."""
    from pathlib import Path

    from steer_experts.concepts import ConceptSet
    from steer_experts.models import load_model
    from steer_experts.responses import collect_responses

    onesec = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "concepts" / "onesec"
    if not onesec.is_dir():
        print(f"\n(b) real SmolLM2 responses: skipped, no OneSec data at {onesec}.")
        return
    concepts = ConceptSet.load(onesec / "football.json")
    responses = collect_responses(load_model("smollm2-135m"), concepts.sentences)
    print(f"\n(b) real SmolLM2 responses: {responses.n_sentences} OneSec sentences x {responses.n_units} "
          f"MLP neurons, OneSec football (700 positives, 1000 listed negatives)")
    reference_units = np.sort(rng.choice(responses.n_units, size=args.reference_units, replace=False))
    compare(responses, concepts, reference_units, args.device, "case b")


if __name__ == "__main__":
    main()
