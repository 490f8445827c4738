"""Steered vs plain generation speed on SmolLM2-135M, experts in all 30 layers.

The expert set is synthetic (random AP over the real model's 46,080 MLP
neurons): speed does not depend on which units are steered, only on how many
layers are hooked. Both sides generate the same number of new tokens from the
same prompts with the same seeds (``min_new_tokens`` = ``max_new_tokens``, so
EOS cannot end one side early); runs alternate in order to share the machine's
noise. Sides: plain ``model.generate``; the same expert interventions as plain
torch forward pre-hooks (what steering costs without pyvene); and
``SteeredModel.generate`` (pyvene) for experts set to a value, experts clamped
up (``mode="clamp"``), experts shifted (``mode="add"``), and DiffMean (a random unit direction added at layer 25;
its speed does not depend on the direction). Prints tokens/s of each and the ratios to
plain (of medians, and the median of per-repeat ratios), by process CPU time (the figure
to trust on a shared machine: other processes' load does not count) and by wall-clock time.

Run: ``python benchmarks/bench_steering.py [--batch 8] [--new-tokens 40] [--repeats 5] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from steer_experts.diffmean import DiffMeanSteeredModel
from steer_experts.experts import ExpertSet
from steer_experts.expertise import Expertise
from steer_experts.models import load_model
from steer_experts.units import locate_units
from steer_experts.steering import steer

PROMPTS = ["The weather today is", "My favourite hobby is", "In the beginning", "She opened the door and",
           "The best way to learn", "Yesterday I went to", "Scientists have discovered", "Once upon a time"]


def synthetic_experts(loaded) -> ExpertSet:
    """An ExpertSet for ``loaded`` with one concept and random statistics (seeded)."""
    sites = locate_units(loaded.model, "mlp")
    n_units = sum(s.width for s in sites)
    rng = np.random.default_rng(0)
    stats = {s: rng.random((1, n_units)) for s in ("ap", "auroc")}
    stats.update({s: rng.normal(1.0, 0.5, (1, n_units)).astype(np.float32)
                  for s in ("on_p50", "on_mean", "on_p90", "off_mean")})
    expertise = Expertise(["football"], **stats, n_positives=np.array([700]), n_negatives=np.array([1000]))
    return ExpertSet(expertise, sites, loaded.name, loaded.fingerprint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 avoids oversubscription when the cores are shared")
    parser.add_argument("--per-layer", type=int, default=10, help="experts per layer (x30 layers)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m")
    experts = synthetic_experts(loaded)
    steered = steer(loaded, experts, "football", per_layer=args.per_layer)
    clamped = steer(loaded, experts, "football", per_layer=args.per_layer, mode="clamp")
    shifts = np.random.default_rng(1).normal(0.0, 0.1, experts.n_units)
    shifted = steer(loaded, experts, "football", per_layer=args.per_layer, mode="add", alpha=4.0, shifts=shifts)
    direction = np.random.default_rng(0).normal(size=loaded.model.config.hidden_size)
    diffmean = DiffMeanSteeredModel(loaded, "football", 25, 0.4, 100.0, direction / np.linalg.norm(direction))
    batch = loaded.tokenizer((PROMPTS * args.batch)[:args.batch], return_tensors="pt", padding=True,
                             padding_side="left")
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True, top_k=10,
                    pad_token_id=loaded.tokenizer.pad_token_id)

    def plain(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return loaded.model.generate(**batch, **settings)

    same_interventions = steered.plan.interventions(steered.sites)

    def hooked(seed: int) -> torch.Tensor:
        handles = [loaded.model.get_submodule(site.module_path).register_forward_pre_hook(
            lambda _, args, iv=iv: (iv(args[0]),) + args[1:]) for site, iv in same_interventions.items()]
        try:
            return plain(seed)
        finally:
            for handle in handles:
                handle.remove()

    def run_of(model):
        return lambda seed: model.generate(batch["input_ids"], batch["attention_mask"], seed=seed, **settings)

    sides = {"plain": plain, "torch hooks": hooked, "steered": run_of(steered), "clamp": run_of(clamped),
             "add": run_of(shifted), "diffmean": run_of(diffmean)}
    for run in sides.values():  # warm-up: allocator, first-call setup
        run(0)
    times = {(name, clock): [] for name in sides for clock in ("cpu", "wall")}
    for seed in range(args.repeats):
        for name, run in list(sides.items())[::1 if seed % 2 == 0 else -1]:
            wall, cpu = time.perf_counter(), time.process_time()
            out = run(seed)
            times[name, "cpu"].append(time.process_time() - cpu)
            times[name, "wall"].append(time.perf_counter() - wall)
            assert out.shape[1] - batch["input_ids"].shape[1] == args.new_tokens
    tokens = args.batch * args.new_tokens
    speed = {key: tokens / statistics.median(t) for key, t in times.items()}
    print(f"{steered!r}")
    print(f"batch {args.batch}, {args.new_tokens} new tokens, {args.repeats} alternating repeats, "
          f"torch threads {torch.get_num_threads()}")
    for clock in ("cpu", "wall"):
        for name in sides:
            runs = ", ".join(f"{t:.2f}s" for t in times[name, clock])
            print(f"{clock:4s} {name:11s} {speed[name, clock]:7.1f} tokens/s  "
                  f"{speed[name, clock] / speed['plain', clock]:.3f}x plain  (runs: {runs})")
        for name in ("torch hooks", "steered", "clamp", "add", "diffmean"):
            # within one repeat the sides run back to back, so a per-repeat ratio cancels the
            # machine's slow drifts that the ratio of medians still carries
            paired = statistics.median(p / t for p, t in zip(times["plain", clock], times[name, clock]))
            print(f"{clock:4s} ratio {name} / plain: {speed[name, clock] / speed['plain', clock]:.3f}x, "
                  f"median of per-repeat ratios {paired:.3f}x (target >= 0.95x)")


if __name__ == "__main__":
    main()
