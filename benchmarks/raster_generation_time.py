#!/usr/bin/env python3
"""Seconds of one ``Engine.generate`` of the bench matrix's LlamaGen-B (random weights, CFG 4,
top-k 2000), in a fresh process: for comparing two versions of the code on a noisy machine by
alternating them (put one on ``PYTHONPATH`` as a folder ``mvar_engine``).

Usage::

    .venv/bin/python benchmarks/raster_generation_time.py --config raster/dense/h2o:budget=0.2 \\
        [--batch 1] [--repeats 1] [--warmup 0] [--compile] [--threads 2]

Prints one JSON line: the configuration, the code's folder, every timed generation and their median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import mvar_engine
from mvar_engine.apps.bench.cells import model_spec, parse_combo
from mvar_engine.apps.bench.matrix_raster import bench_raster_models, engine_config
from mvar_engine.apps.pipeline import Pipeline, resolve_components


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="raster/dense/full", help="a raster configuration (default raster/dense/full)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=0, help="untimed generations first (one more under --compile)")
    p.add_argument("--compile", action="store_true", help="compiled decoding steps")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cell = {"model": "llamagen-b", "batch": args.batch, "backend": "auto", "device": "cpu", "dtype": "float32",
            "cfg": 4.0, "seed": 0}
    config = engine_config(parse_combo(args.config), cell)
    if args.compile:
        config = config.model_copy(update={"compile": True})
    model, _ = bench_raster_models(model_spec("llamagen-b"), cell)
    engine = Pipeline(config, model.eval(), None, resolve_components(config), torch.device("cpu")).engine
    labels = torch.arange(args.batch) % model.num_classes

    def generate() -> None:
        engine.generate(labels, resolve_components(config).cache, cfg=4.0, top_k=2000, top_p=1.0,
                        generator=torch.Generator().manual_seed(0))

    for _ in range(args.warmup + int(args.compile)):
        generate()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
    print(json.dumps({"config": args.config, "compile": args.compile, "batch": args.batch,
                      "code": os.path.dirname(mvar_engine.__file__), "seconds": times,
                      "median_s": statistics.median(times)}))


if __name__ == "__main__":
    main()
