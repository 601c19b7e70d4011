#!/usr/bin/env python3
"""Where one ``Engine.generate`` of the bench matrix's LlamaGen-B (random weights, CFG 4, top-k 2000,
batch 1, 2 threads) spends its time under cProfile: the matrix products (the ``linear``, ``mm``,
``matmul`` and ``bmm`` builtins), attention (the SDPA builtin) and everything else (sampling, Python,
the other aten calls, the profiler's own overhead), in a fresh process; put another version of the
code on ``PYTHONPATH`` (a folder ``mvar_engine``) to compare.

Usage::

    .venv/bin/python benchmarks/raster_step_profile.py [--config raster/dense/full]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import torch

import mvar_engine
from mvar_engine.apps.bench.cells import model_spec, parse_combo
from mvar_engine.apps.bench.matrix_raster import bench_raster_models, engine_config
from mvar_engine.apps.pipeline import Pipeline, resolve_components

MATRIX_PRODUCTS = ("torch._C._nn.linear", "method mm", "method matmul", "method bmm")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="raster/dense/full", help="a raster configuration (default raster/dense/full)")
    args = p.parse_args()
    torch.set_num_threads(2)
    cell = {"model": "llamagen-b", "batch": 1, "backend": "auto", "device": "cpu", "dtype": "float32", "cfg": 4.0,
            "seed": 0}
    config = engine_config(parse_combo(args.config), cell)
    model, _ = bench_raster_models(model_spec("llamagen-b"), cell)
    engine = Pipeline(config, model.eval(), None, resolve_components(config), torch.device("cpu")).engine
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    engine.generate(torch.zeros(1, dtype=torch.long), resolve_components(config).cache, cfg=4.0, top_k=2000,
                    top_p=1.0, generator=torch.Generator().manual_seed(0))
    profile.disable()
    total = time.perf_counter() - start
    products = attention = 0.0
    for (file, _, name), (_, _, own, _, _) in pstats.Stats(profile).stats.items():
        if file == "~" and any(key in name for key in MATRIX_PRODUCTS):
            products += own
        elif file == "~" and "scaled_dot_product_attention" in name:
            attention += own
    print(json.dumps({"config": args.config, "code": mvar_engine.__file__, "total_s": round(total, 2),
                      "matrix_products_s": round(products, 2), "attention_s": round(attention, 2),
                      "rest_s": round(total - products - attention, 2)}))


if __name__ == "__main__":
    main()
