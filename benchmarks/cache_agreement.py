"""Agreement with the full cache on the shipped VAR digits model, from the same seeds: the share of
equal tokens, the PSNR of the decoded images against ``full``'s, the peak cache. A first look ahead
of one quality protocol for every policy; run from the repository root:

    .venv/bin/python benchmarks/cache_agreement.py [--greedy] [--budget 0.2] [--images-per-label 4]
"""

from __future__ import annotations

import argparse
import math

import mvar_engine

POLICIES = (("full", False), ("scalekv", True), ("h2o", True), ("sink", True), ("window", True), ("ams", False))
"""(cache, takes --budget)"""


def psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--greedy", action="store_true", help="top-k 1 (else the model's sampling, seed 0)")
    parser.add_argument("--budget", type=float, default=0.2, help="cache budget of the budgeted policies")
    parser.add_argument("--images-per-label", type=int, default=4)
    args = parser.parse_args()
    pipe = mvar_engine.Pipeline.from_pretrained("digits-var")
    labels, sampling = list(range(10)), {"top_k": 1} if args.greedy else {}
    run = dict(labels=labels, images_per_label=args.images_per_label, seed=0, output_type="pt", **sampling)
    reference = pipe(cache="full", **run)
    print("| cache | budget | equal tokens | PSNR vs full (dB) | peak cache (MiB) |\n|---|---|---|---|---|")
    for cache, budgeted in POLICIES:
        out = reference if cache == "full" else pipe(cache=cache, cache_budget=args.budget if budgeted else None, **run)
        equal = sum(int((a == b).sum()) for a, b in zip(out.tokens, reference.tokens))
        total = sum(t.numel() for t in reference.tokens)
        print(f"| {cache} | {args.budget if budgeted else '-'} | {equal / total:.3f} | "
              f"{psnr(out.images, reference.images):.1f} | {out.facts['cache_peak_bytes'] / 2**20:.2f} |")


if __name__ == "__main__":
    main()
