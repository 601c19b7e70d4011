"""``mvar-engine bench train``: peak memory and step time of the ``sequence`` and ``parallel``
training strategies, side by side in one run.

Each strategy runs in a fresh process (peak memory on CPU is the process's peak resident set, so
processes must not share it): a VAR of ``--depth`` with random weights (cost does not depend on the
weights) on the ``--patch-nums`` schedule, MVAR's components (``markov`` + ``neighborhood`` +
``sdpa``), AdamW, random token targets and teacher-forcing inputs. ``sequence`` trains every scale
in one block-diagonal sequence each step; ``parallel`` cycles through MVAR's groups (the scales
before the neighbourhood packed together, then each later scale alone). Reported per strategy:
peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS) and that peak minus the memory after
the model was built, the median step time per group, and the cycle-weighted mean step time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from ...core.errors import ConfigError, UsageError
from ...core.layout import SequenceLayout
from ...models.var import VAR, VARConfig
from ..cli_helpers import PROG, Parser, int_list, name_list, one_line, seed_int
from ..output_files import add_overwrite_flag, check_outputs
from ..config import EngineConfig
from ..memory_fit import TRAINING_COPIES, refuse_unfitting
from ..pipeline import resolve_components
from ..training.grouped_forward import grouped_logits, parallel_groups, parse_ratio
from .report import format_table, machine_info, peak_rss_bytes, reset_peak_rss, rss_bytes, worker_env, write_json
from .train_throughput import ThroughputConfig, run_throughput

STRATEGIES = ("sequence", "parallel")


@dataclass(frozen=True)
class BenchTrainConfig:
    depth: int = 16
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    batch_size: int = 8
    steps: int = 2
    ratio: tuple[int, ...] = (8, 1, 1)
    kernel_size: int = 7
    strategies: tuple[str, ...] = STRATEGIES
    device: str = "cpu"
    seed: int = 0
    output: str = "bench-train.json"
    table: bool = True

    def problems(self) -> list[str]:
        out = []
        if self.depth < 1 or self.batch_size < 1 or self.steps < 1:
            out.append("--depth, --batch-size and --steps must be at least 1")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            out.append(f"unknown strategy {unknown[0]!r} (choose from {', '.join(STRATEGIES)})")
        if len(self.patch_nums) < 3:
            out.append("--patch-nums needs at least 3 scales (dense scales, then scales trained alone)")
        if self.device == "cuda" and not torch.cuda.is_available():
            out.append("--device cuda: no CUDA device is available (use --device cpu)")
        if not self.ratio or min(self.ratio) < 1:
            out.append(f"--ratio {':'.join(map(str, self.ratio))}: every count must be a positive integer (each "
                       f"group trains), e.g. 8:1:1")
        if out:
            return out
        try:  # everything a worker process would find, found here before any work
            refuse_unfitting({"transformer": self.model_config()}, torch.device(self.device), "--depth, --patch-nums",
                             copies=TRAINING_COPIES)
            if "parallel" in self.strategies:
                parse_ratio(":".join(map(str, self.ratio)), strategy_groups(self, "parallel")[1])
            else:
                strategy_groups(self, "sequence")
        except (UsageError, ConfigError) as error:
            out.append(one_line(error))
        return out

    def model_config(self) -> VARConfig:
        return VARConfig(depth=self.depth, patch_nums=self.patch_nums)


def strategy_groups(config: BenchTrainConfig, strategy: str):
    """MVAR's components (``markov`` + ``neighborhood`` of ``--kernel-size`` + ``sdpa``) and the scale
    groups ``strategy`` trains: ``(components, [group, ...])``; bad options are one-line errors."""
    components = resolve_components(EngineConfig(
        trajectory="markov", attention={"name": "neighborhood", "options": {"kernel_size": config.kernel_size}},
        cache="none", backend="sdpa"))
    layout = SequenceLayout.from_patch_nums(config.patch_nums)
    components.pattern.check_layout(layout)
    if strategy == "sequence":
        return components, [tuple(range(layout.num_scales))]
    return components, parallel_groups(layout.num_scales, components.pattern.first_scale(layout))


def run_strategy(config: BenchTrainConfig, strategy: str) -> dict[str, Any]:
    """Build, train ``steps`` steps per group, measure; meant to run in its own process."""

    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = VAR(config.model_config()).to(device).train()
    components, groups = strategy_groups(config, strategy)
    layout = model.layout
    weights = [1] if strategy == "sequence" else list(config.ratio)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = rss_bytes()
        reset_peak_rss()
    b = config.batch_size
    labels = torch.randint(0, model.num_classes, (b,), device=device)
    var_input = torch.randn(b, layout.length - layout.scales[0].numel, model.z_channels, device=device)
    targets = torch.randint(0, model.vocab_size, (b, layout.length), device=device)
    times: dict[str, list[float]] = {}
    for group in groups:
        positions = torch.cat([torch.arange(layout.scales[s].begin, layout.scales[s].end) for s in group]).to(device)
        for _ in range(config.steps + 1):  # the first step allocates the optimizer state: not timed
            start = time.perf_counter()
            logits = grouped_logits(model, components.trajectory, components.pattern, components.backends, labels,
                                    var_input, group)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, positions].flatten(),
                                                     reduction="sum") / (b * layout.length)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.setdefault(_group_name(group), []).append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    step_ms = {name: sorted(t[1:])[len(t[1:]) // 2] * 1e3 for name, t in times.items()}
    mean = sum(w * step_ms[_group_name(g)] for w, g in zip(weights, groups)) / sum(weights)
    return {"strategy": strategy, "groups": [list(g) for g in groups], "tokens_per_step": {
        _group_name(g): sum(layout.scales[s].numel for s in g) for g in groups},
        "peak_bytes": peak, "baseline_bytes": baseline, "peak_above_model_bytes": peak - baseline,
        "step_ms": step_ms, "mean_step_ms": mean, "parameters": sum(p.numel() for p in model.parameters())}


def _colon_ints(text: str) -> tuple[int, ...]:
    """argparse type of ``--ratio``: ``"8:1:1"`` -> ``(8, 1, 1)``."""
    try:
        return tuple(int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected colon-separated integers like 8:1:1, got {text!r}") from None


def _group_name(group: Sequence[int]) -> str:
    return f"scales {group[0]}" if len(group) == 1 else f"scales {group[0]}-{group[-1]}"


def run_bench_train(config: BenchTrainConfig, out=None) -> dict[str, Any]:
    """Every strategy in a fresh process; JSON written after each; returns the payload."""
    problems = config.problems()
    if problems:
        raise UsageError("; ".join(problems))
    out = out or sys.stdout
    payload: dict[str, Any] = {"benchmark": "train", "machine": machine_info(config.device), "config": asdict(config),
                               "results": []}
    for strategy in config.strategies:
        print(f"training strategy '{strategy}' in a fresh process ...", file=sys.stderr, flush=True)
        payload["results"].append(_in_subprocess(config, strategy))
        write_json(config.output, payload)
    results = {r["strategy"]: r for r in payload["results"]}
    if "sequence" in results and "parallel" in results:
        payload["peak_ratio_sequence_over_parallel"] = results["sequence"]["peak_bytes"] / results["parallel"]["peak_bytes"]
        payload["peak_above_model_ratio"] = (results["sequence"]["peak_above_model_bytes"]
                                             / results["parallel"]["peak_above_model_bytes"])
        write_json(config.output, payload)
    if config.table:
        print(table_text(payload), file=out)
    return payload


def _in_subprocess(config: BenchTrainConfig, strategy: str) -> dict[str, Any]:
    env = worker_env()
    done = subprocess.run([sys.executable, "-m", "mvar_engine.apps.bench.train", json.dumps(asdict(config)), strategy],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-1:]) or f"exit status {done.returncode}"
        raise UsageError(f"bench train: strategy '{strategy}' failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table_text(payload: dict[str, Any]) -> str:
    rows = []
    for r in payload["results"]:
        rows.append({"strategy": r["strategy"], "peak": r["peak_bytes"] / 2**30,
                     "above": r["peak_above_model_bytes"] / 2**30, "mean": r["mean_step_ms"] / 1e3,
                     "groups": ", ".join(f"{k}: {v / 1e3:.3g} s" for k, v in r["step_ms"].items())})
    text = format_table(rows, [("strategy", "strategy"), ("peak", "peak GiB"), ("above", "above model GiB"),
                               ("mean", "mean step s"), ("groups", "median step per group")])
    if "peak_ratio_sequence_over_parallel" in payload:
        text += (f"\nsequence / parallel peak memory: {payload['peak_ratio_sequence_over_parallel']:.2f}x "
                 f"(above the model: {payload['peak_above_model_ratio']:.2f}x)")
    return text


def main(argv: Sequence[str]) -> int:
    """Worker entry: ``python -m mvar_engine.apps.bench.train CONFIG_JSON STRATEGY`` prints one JSON line."""
    raw = json.loads(argv[0])
    raw["patch_nums"] = tuple(raw["patch_nums"])
    raw["ratio"] = tuple(raw["ratio"])
    raw["strategies"] = tuple(raw["strategies"])
    print(json.dumps(run_strategy(BenchTrainConfig(**raw), argv[1])))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))


def cmd_bench_train(argv: Sequence[str]) -> int:
    d = BenchTrainConfig()
    p = Parser(prog=f"{PROG} bench train", allow_abbrev=False,
                description="Peak memory and step time of MVAR's training strategies (sequence vs parallel), each in "
                            "a fresh process, random weights. Writes a JSON report.")
    p.add_argument("--depth", type=int, default=d.depth, help=f"VAR depth (default {d.depth}: VAR-d16)")
    p.add_argument("--patch-nums", type=int_list, default=d.patch_nums, metavar="N,N,...",
                   help="scale schedule (default VAR's 256px)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step (default {d.batch_size})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"timed steps per group, after one untimed (default {d.steps})")
    p.add_argument("--ratio", type=_colon_ints, default=d.ratio, metavar="A:B:C",
                   help="iterations per parallel group in a cycle, for the mean step time (default 8:1:1)")
    p.add_argument("--kernel-size", type=int, default=d.kernel_size, help=f"neighbourhood kernel (default {d.kernel_size})")
    p.add_argument("--strategies", type=name_list, default=d.strategies, metavar="NAME,...",
                   help=f"default {','.join(STRATEGIES)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--seed", type=seed_int, default=d.seed)
    p.add_argument("--output", metavar="PATH", default=None,
                   help=f"JSON report (default {d.output}; with --throughput {ThroughputConfig.output})")
    p.add_argument("--no-table", action="store_true", help="do not print the table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    t = p.add_argument_group("throughput (--throughput: images/s of real training steps, VAR vs MVAR, per precision "
                             "and data source; module docs in apps/bench/train_throughput.py)")
    t.add_argument("--throughput", action="store_true", help="measure throughput instead of memory")
    t.add_argument("--cycles", type=int, default=ThroughputConfig.cycles,
                   help=f"timed steps (sequence) or group cycles (parallel) after one untimed (default {ThroughputConfig.cycles})")
    t.add_argument("--precisions", type=name_list, default=ThroughputConfig.precisions, metavar="P,...",
                   help="default fp32,bf16 (bf16 rows are skipped with the reason where the device lacks it)")
    t.add_argument("--sources", type=name_list, default=ThroughputConfig.sources, metavar="S,...",
                   help="codes (cache-codes, memory-mapped) and/or images (decoded by workers, encoded each step)")
    t.add_argument("--images", type=int, default=ThroughputConfig.images, help="synthetic images written for the "
                   f"run (default {ThroughputConfig.images})")
    t.add_argument("--workers", type=int, default=ThroughputConfig.workers, help="DataLoader workers "
                   f"(default {ThroughputConfig.workers})")
    t.add_argument("--workdir", default=None, metavar="DIR", help="where the temporary inputs go (default: the "
                   "system's temp folder)")
    add_overwrite_flag(p)
    args = p.parse_args(argv)
    if args.throughput:
        output = args.output if args.output is not None else ThroughputConfig.output
        check_outputs({"--output": output}, args.overwrite)  # before any work
        run_throughput(ThroughputConfig(
            depth=args.depth, patch_nums=args.patch_nums, batch_size=args.batch_size if "--batch-size" in argv
            else ThroughputConfig.batch_size, cycles=args.cycles, ratio=args.ratio, strategies=args.strategies,
            precisions=args.precisions, sources=args.sources, images=args.images, workers=args.workers,
            device=args.device, seed=args.seed, output=output, workdir=args.workdir, table=not args.no_table))
        return 0
    args.output = args.output if args.output is not None else d.output
    check_outputs({"--output": args.output}, args.overwrite)  # before any work
    run_bench_train(BenchTrainConfig(depth=args.depth, patch_nums=args.patch_nums, batch_size=args.batch_size,
                                     steps=args.steps, ratio=args.ratio, kernel_size=args.kernel_size,
                                     strategies=args.strategies, device=args.device, seed=args.seed,
                                     output=args.output, table=not args.no_table))
    return 0
