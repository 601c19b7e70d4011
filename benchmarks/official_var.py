#!/usr/bin/env python3
"""This engine against the official VAR code, side by side in one process, on the same weights.

Usage (a checkout of https://github.com/FoundationVision/VAR; nothing of it is copied here)::

    .venv/bin/python benchmarks/official_var.py --var-repo PATH/TO/VAR [--depth 16] [--batch 8]
        [--repeats 2] [--warmup 1] [--dtypes float32,bfloat16] [--output official-var.json]

The official ``build_vae_var`` builds VAR-d{depth} and its VQVAE with random weights (its own
initialisation for the transformer, normal(0, 0.02) for the VQVAE, whose built-in initialisation
``build_vae_var`` switches off); both state dicts are written to a temporary folder and this
engine loads them as it loads the released ``var_d16.pth`` / ``vae_ch160v4096z32.pth``. Each
repeat times, in turn, one generation of ``--batch`` images with CFG 1.5, top-k 900, top-p 0.96
(VAR's FID settings) including the decode to pixels (in the row's dtype for both):

- ``official``: ``VAR.autoregressive_infer_cfg(B, labels, g_seed, cfg, top_k, top_p)``, in float32
  (as released) and under CPU bf16 autocast;
- ``engine VAR`` (``--trajectory full --attention dense --cache full``) and ``engine MVAR``
  (``--trajectory markov --attention neighborhood --cache none``) in each dtype.

Reports the median seconds per image of each, the transformer alone (the decoder's time, measured
inside each call, subtracted) and with the decode, and their ratios to the official code in the
first dtype, as JSON and a markdown table. The MVAR rows run VAR's weights under MVAR's pattern (no fine-tuning): their
time is what the pattern costs, not their images' quality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}


def build_official(repo: Path, depth: int):
    """(vae, var) of the official code with random weights."""
    sys.path.insert(0, str(repo))
    saved = {cls: cls.__dict__.get("reset_parameters") for cls in (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.BatchNorm2d,
                                                                   torch.nn.SyncBatchNorm, torch.nn.Conv1d, torch.nn.Conv2d,
                                                                   torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d)}
    try:
        from models import build_vae_var  # the official package `models` of the checkout

        torch.manual_seed(0)
        vae, var = build_vae_var(device="cpu", depth=depth, shared_aln=False, attn_l2_norm=True,
                                 flash_if_available=False, fused_if_available=False)
    finally:
        for cls, method in saved.items():  # build_vae_var replaces them for speed; put them back
            if method is not None:
                cls.reset_parameters = method
    with torch.no_grad():
        for param in vae.parameters():
            param.normal_(0, 0.02)
    return vae.eval(), var.eval()


def engine_pipeline(trajectory: str, var_path: Path, vae_path: Path, dtype: str, batch: int):
    from mvar_engine.apps.config import EngineConfig, SamplingConfig
    from mvar_engine.apps.pipeline import Pipeline

    config = EngineConfig(trajectory={"name": trajectory}, device="cpu", dtype=dtype, batch_size=batch, progress=False,
                          sampling=SamplingConfig(seed=0, **SAMPLING),
                          model={"name": "var", "checkpoint": var_path, "tokenizer": vae_path})
    return Pipeline.from_config(config)


class DecodeClock:
    """Seconds spent in the decoder during one run (the official code decodes inside its call)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, decode):
        def timed_decode(*args, **kwargs):
            start = time.perf_counter()
            try:
                return decode(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed_decode


def timed(run, clock: DecodeClock) -> tuple[float, float]:
    """(total seconds, of which decoding) of one run."""
    clock.seconds = 0.0
    start = time.perf_counter()
    run()
    return time.perf_counter() - start, clock.seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--var-repo", required=True, type=Path, help="a checkout of FoundationVision/VAR")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--output", type=Path, default=Path("official-var.json"))
    args = p.parse_args(argv)
    if not (args.var_repo / "models" / "var.py").is_file():
        print(f"official_var: --var-repo {args.var_repo}: no models/var.py (give a checkout of FoundationVision/VAR)",
              file=sys.stderr)
        return 2
    dtypes = [d for d in args.dtypes.split(",") if d]
    labels = torch.tensor((LABELS * (args.batch // len(LABELS) + 1))[:args.batch])
    vae, var = build_official(args.var_repo, args.depth)
    clock = DecodeClock()
    vae.fhat_to_img = clock.wrap(vae.fhat_to_img)  # the official call's decode, timed where it runs
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        var_path, vae_path = Path(tmp) / f"var_d{args.depth}.pth", Path(tmp) / "vae_ch160v4096z32.pth"
        torch.save(var.state_dict(), var_path)
        torch.save(vae.state_dict(), vae_path)
        for dtype in dtypes:
            context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else nullcontext

            def official(context=context):
                with torch.inference_mode(), context():
                    var.autoregressive_infer_cfg(args.batch, labels, g_seed=0, more_smooth=False, **SAMPLING)

            runs[f"official VAR, {dtype}"] = official
            for name, trajectory in (("engine VAR", "full"), ("engine MVAR", "markov")):
                pipe = engine_pipeline(trajectory, var_path, vae_path, dtype, args.batch)

                def ours(pipe=pipe):
                    with torch.inference_mode():
                        generator = torch.Generator().manual_seed(0)
                        out = pipe.engine.generate(labels, pipe.components.cache, generator=generator, **SAMPLING)
                        with pipe.engine.autocast(labels.device):  # as the official decode runs in its context
                            clock.wrap(pipe.adapter.decode)(out)

                runs[f"{name}, {dtype}"] = ours
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for index in range(args.warmup + args.repeats):
        for name, run in runs.items():
            total, decode = timed(run, clock)
            print(f"{'warm-up' if index < args.warmup else f'repeat {index - args.warmup + 1}'}: {name}: "
                  f"{total / args.batch:.2f} s/img ({decode / args.batch:.2f} decoding)", file=sys.stderr, flush=True)
            if index >= args.warmup:
                times[name].append((total, decode))

    def medians(name: str) -> tuple[float, float]:
        """(transformer, total) median seconds per image of a run."""
        values = times[name]
        return (statistics.median(t - d for t, d in values) / args.batch,
                statistics.median(t for t, _ in values) / args.batch)

    base_transformer, base_total = medians(f"official VAR, {dtypes[0]}")
    rows = []
    for name, values in times.items():
        transformer, total = medians(name)
        rows.append({"run": name, "transformer_s_per_image": transformer, "s_per_image": total,
                     "transformer_vs_official": base_transformer / transformer, "vs_official": base_total / total,
                     "repeats": [{"total_s": t / args.batch, "decode_s": d / args.batch} for t, d in values]})
    payload = {"benchmark": "official-var", "depth": args.depth, "batch": args.batch, "sampling": SAMPLING,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "warmup": args.warmup,
               "repeats": args.repeats, "var_repo": str(args.var_repo), "rows": rows}
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"| run | transformer s/img (median of {args.repeats}) | vs official {dtypes[0]} | with decode s/img | "
          f"vs official {dtypes[0]} |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row['transformer_s_per_image']:.2f} | {row['transformer_vs_official']:.2f}x | "
              f"{row['s_per_image']:.2f} | {row['vs_official']:.2f}x |")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
