"""``mvar-engine bench train --throughput``: images/s of real training steps, VAR (``sequence``:
``full`` + ``dense``, every scale each step) against MVAR (``parallel``: ``markov`` +
``neighborhood``, one group of scales a step), per precision and per data source, side by side in
one run, with the share of each step spent waiting for data.

The run builds its own inputs in a work folder: a class-per-subfolder folder of synthetic JPEGs
(smooth random content, sides between 1.2 R and 2 R, like ImageNet's), a random-weight tokenizer of
VAR's VQVAE architecture on ``--patch-nums`` (resolution = last side x 16), and its codes
(``mvar-engine cache-codes``, timed: the images/s of caching). Each row then runs ``train`` (the
real loop: data stream, tokenizer, optimizer step) in a fresh process and stops after its timed
steps without saving: ``sequence`` one untimed step then ``--cycles`` timed ones; ``parallel`` runs
its groups in a 1:1:... cycle (one untimed cycle, ``--cycles`` timed) and weighs each group's median
step by ``--ratio`` (MVAR's 8:1:1), the iteration mix of a real run. Reported per row: the mean step
(s), images/s (batch / step), and the shares of the step spent blocked on the DataLoader
(``data_wait_s``) and preparing the batch (``prepare_s``: encoding images with the tokenizer, or
rebuilding the next-scale input from codes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Sequence

import numpy as np
import torch

from ...core.errors import UsageError
from ...models.checkpoint import METADATA_KEY, save_state_dict
from ...models.tokenizer import MultiScaleVQVAE, TokenizerConfig
from ..cpu_features import native_bf16
from ..training.var_trainer import VarTrainSettings, train_var
from .report import format_table, machine_info, worker_env, write_json

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
MODELS = {"sequence": ("full", "dense"), "parallel": ("markov", "neighborhood")}
"""strategy -> (trajectory, attention): VAR and MVAR."""


@dataclass(frozen=True)
class ThroughputConfig:
    depth: int = 16
    patch_nums: tuple[int, ...] = VAR_256
    batch_size: int = 2
    cycles: int = 2
    ratio: tuple[int, ...] = (8, 1, 1)
    strategies: tuple[str, ...] = ("sequence", "parallel")
    precisions: tuple[str, ...] = ("fp32", "bf16")
    sources: tuple[str, ...] = ("codes", "images")
    images: int = 32
    workers: int = 2
    device: str = "cpu"
    seed: int = 0
    output: str = "bench-train-throughput.json"
    workdir: str | None = None
    table: bool = True

    @property
    def resolution(self) -> int:
        return int(self.patch_nums[-1]) * 16

    def problems(self) -> list[str]:
        out = []
        if min(self.depth, self.batch_size, self.cycles, self.images) < 1:
            out.append("--depth, --batch-size, --cycles and --images must be at least 1")
        if self.images < self.batch_size:
            out.append(f"--images {self.images} is fewer than --batch-size {self.batch_size}")
        for name, values, known in (("--strategies", self.strategies, MODELS), ("--precisions", self.precisions,
                                    ("fp32", "bf16", "fp16")), ("--sources", self.sources, ("codes", "images"))):
            unknown = [v for v in values if v not in known]
            if unknown:
                out.append(f"{name}: unknown {unknown[0]!r} (choose from {', '.join(known)})")
        if self.device == "cuda" and not torch.cuda.is_available():
            out.append("--device cuda: no CUDA device is available (use --device cpu)")
        return out


@dataclass
class Inputs:
    """The work folder's images, tokenizer and codes, and the caching rate."""

    images: Path
    tokenizer: Path
    codes: Path
    cache_codes: dict[str, Any] = field(default_factory=dict)


def write_images(root: Path, n: int, resolution: int, seed: int) -> Path:
    """``n`` JPEGs of smooth random content in 10 class folders (sides in [1.2 R, 2 R])."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (int(resolution * f) for f in rng.uniform(1.2, 2.0, 2))
        small = Image.fromarray(rng.integers(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8))
        small.resize((w, h), Image.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def write_tokenizer(path: Path, patch_nums: tuple[int, ...], resolution: int, seed: int) -> Path:
    """A random-weight tokenizer of VAR's VQVAE architecture, with the metadata ``train`` reads."""
    torch.manual_seed(seed)
    config = TokenizerConfig(patch_nums=patch_nums)
    model = MultiScaleVQVAE(config)
    meta = {"format": "mvar-engine/tokenizer", "version": 1, "kind": "tokenizer", "resolution": resolution,
            "architecture": config.model_dump(mode="json"), "patch_nums": list(patch_nums)}
    return save_state_dict(model.state_dict(), path, metadata={METADATA_KEY: json.dumps(meta)})


def prepare_inputs(config: ThroughputConfig, work: Path) -> Inputs:
    inputs = Inputs(write_images(work / "images", config.images, config.resolution, config.seed),
                    write_tokenizer(work / "tokenizer.safetensors", config.patch_nums, config.resolution, config.seed),
                    work / "codes")
    if "codes" in config.sources:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mvar_engine.apps.cli", "cache-codes", "--data",
                               str(inputs.images), "--tokenizer", str(inputs.tokenizer), "--output", str(inputs.codes),
                               "--workers", str(config.workers), "--device", config.device, "--no-progress",
                               "--batch-size", str(min(16, config.images))],
                              capture_output=True, text=True, env=worker_env())
        if done.returncode != 0:
            raise UsageError(f"bench train --throughput: cache-codes failed: {done.stderr.strip()[-300:]}")
        seconds = time.perf_counter() - start
        inputs.cache_codes = {"seconds": seconds, "images_per_s": config.images / seconds,
                              "note": "wall time of the command, start-up and tokenizer loading included; each "
                                      "image is encoded with its flipped twin"}
    return inputs


def row_settings(config: ThroughputConfig, inputs: Inputs, strategy: str, precision: str, source: str,
                 output: Path) -> dict[str, Any]:
    trajectory, attention = MODELS[strategy]
    return {"tokenizer": str(inputs.tokenizer), "data": str(inputs.codes if source == "codes" else inputs.images),
            "split": "all", "trajectory": trajectory, "attention": attention, "strategy": strategy,
            "depth": config.depth, "embed_dim": 64 * config.depth, "num_heads": config.depth,
            "batch_size": config.batch_size, "precision": precision, "workers": config.workers,
            "device": config.device, "seed": config.seed, "output": str(output), "progress": False,
            "save_every": 10**9, "log_every": 10**9, "warmup_steps": 0,
            **({"ratio": ":".join("1" for _ in config.ratio)} if strategy == "parallel" else {})}


class Enough(Exception):
    """Raised by the timing callback once the row's steps are done: the run stops without saving."""


def run_row(settings: dict[str, Any], steps: int) -> dict[str, Any]:
    """Train ``steps`` steps of ``settings`` (a worker process) and return each step's timings."""
    records: list[dict[str, Any]] = []
    last = [time.perf_counter()]

    def timing(step: int, metrics: dict[str, Any]) -> None:
        now = time.perf_counter()
        records.append({"step": step, "seconds": now - last[0], "data_wait_s": metrics["data_wait_s"],
                        "prepare_s": metrics["prepare_s"], "group": metrics.get("group"), "loss": metrics["loss"]})
        last[0] = now
        if step >= steps:
            raise Enough

    try:
        train_var(VarTrainSettings(**settings), callbacks=(timing,))
    except Enough:
        pass
    records[0]["seconds"] = float("nan")  # the first step includes the loop's set-up
    return {"steps": records}


def summarise(config: ThroughputConfig, strategy: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean step (ratio-weighted over the parallel groups), images/s and the data shares (of the
    same weighted step), from the timed steps (after the untimed first step or cycle)."""
    groups = sorted({r["group"] for r in records}, key=[r["group"] for r in records].index)
    timed = records[len(groups):]
    weights = list(config.ratio) if strategy == "parallel" else [1]
    if strategy == "parallel" and len(weights) != len(groups):
        weights = [1] * len(groups)

    def weighted(key: str) -> tuple[float, dict[str, float]]:
        """The ratio-weighted mean of the per-group medians of ``key``, and those medians."""
        medians = {g: median(r[key] for r in timed if r["group"] == g) for g in groups}
        return sum(w * medians[g] for w, g in zip(weights, groups)) / sum(weights), medians

    (step, per_group), (wait, _), (prepare, _) = weighted("seconds"), weighted("data_wait_s"), weighted("prepare_s")
    return {"step_s": step, "images_per_s": config.batch_size / step, "median_step_s_per_group": per_group,
            "data_wait_share": wait / step, "prepare_share": prepare / step, "steps": records}


def run_throughput(config: ThroughputConfig, out=None) -> dict[str, Any]:
    """Every row in a fresh process; JSON rewritten after each row; returns the payload."""
    problems = config.problems()
    if problems:
        raise UsageError("; ".join(problems))
    out = out or sys.stdout
    payload: dict[str, Any] = {"benchmark": "train-throughput", "machine": machine_info(config.device),
                               "config": asdict(config), "results": []}
    with tempfile.TemporaryDirectory(prefix="mvar-bench-train-", dir=config.workdir) as work:
        print("writing images, a random tokenizer and its codes ...", file=sys.stderr, flush=True)
        inputs = prepare_inputs(config, Path(work))
        payload["cache_codes"] = inputs.cache_codes
        for strategy in config.strategies:
            for precision in config.precisions:
                for source in config.sources:
                    row = {"strategy": strategy, "model": "VAR" if strategy == "sequence" else "MVAR",
                           "precision": precision, "source": source}
                    reason = unavailable(precision, config.device)
                    if reason:
                        payload["results"].append({**row, "skipped": reason})
                        continue
                    print(f"training {row['model']} {precision} from {source} in a fresh process ...",
                          file=sys.stderr, flush=True)
                    settings = row_settings(config, inputs, strategy, precision, source,
                                            Path(work) / f"run-{strategy}-{precision}-{source}")
                    groups = len(config.ratio) if strategy == "parallel" else 1
                    records = in_subprocess(settings, groups * (config.cycles + 1))
                    payload["results"].append({**row, **summarise(config, strategy, records)})
                    write_json(config.output, payload)
    write_json(config.output, payload)
    if config.table:
        print(table_text(payload), file=out)
    return payload


def unavailable(precision: str, device: str) -> str | None:
    """Why a precision cannot run on ``device`` here, or None."""
    if precision == "fp16" and device != "cuda":
        return "fp16 trains on CUDA only"
    if precision == "bf16" and device == "cpu":
        supported, why = native_bf16()
        return None if supported else why
    return None


def in_subprocess(settings: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "mvar_engine.apps.bench.train_throughput", json.dumps(settings),
                           str(steps)], capture_output=True, text=True, env=worker_env())
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-1:]) or f"exit status {done.returncode}"
        raise UsageError(f"bench train --throughput: a row failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])["steps"]


def table_text(payload: dict[str, Any]) -> str:
    rows = []
    for r in payload["results"]:
        if "skipped" in r:
            rows.append({**r, "step": None, "rate": None, "wait": None, "prep": None, "note": f"skipped: {r['skipped']}"})
            continue
        rows.append({**r, "step": r["step_s"], "rate": r["images_per_s"], "wait": 100 * r["data_wait_share"],
                     "prep": 100 * r["prepare_share"], "note": ""})
    text = format_table(rows, [("model", "model"), ("strategy", "strategy"), ("precision", "precision"),
                               ("source", "data"), ("step", "step s"), ("rate", "images/s"),
                               ("wait", "data wait %"), ("prep", "prepare %"), ("note", "")])
    cache = payload.get("cache_codes") or {}
    if cache:
        text += f"\ncache-codes: {cache['images_per_s']:.3g} images/s ({cache['seconds']:.1f} s, start-up included)"
    return text


def main(argv: Sequence[str]) -> int:
    """Worker entry: ``python -m mvar_engine.apps.bench.train_throughput SETTINGS_JSON STEPS``."""
    settings = json.loads(argv[0])
    print(json.dumps(run_row(settings, int(argv[1]))))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
