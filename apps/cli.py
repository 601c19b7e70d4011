"""The ``mvar-engine`` command.

``mvar-engine [flags]`` (or ``mvar-engine generate [flags]``) generates images; ``mvar-engine
plugins`` lists every component (backends with their capabilities); ``mvar-engine bench attention``
times the attention backends. Each selected component's options become flags named
``--{kind}-{option}`` (``--attention-kernel-size 5``, ``--trajectory-order 2``), listed by
``--help`` for the components chosen on the same command line.

Usage and configuration errors print one line per problem and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import COMPONENT_KINDS, ComponentChoice, EngineConfig, build_config, read_config_file
from ..core.errors import ComponentFailedError, MvarEngineError, UsageError
from ..core.records import KIND_LABELS
from ..core.registry import Registry, failing_component, get_registry

PROG = "mvar-engine"


class _Parser(argparse.ArgumentParser):
    """argparse that raises a one-line ``UsageError`` instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _component_flag(kind: str, field: str) -> str:
    return f"--{kind}-{field.replace('_', '-')}"


def _subcommands_epilog() -> str:
    """The ``--help`` list of subcommands, from :data:`SUBCOMMANDS` (names are never split)."""
    names = textwrap.fill(", ".join(SUBCOMMANDS), width=78, initial_indent="  ", subsequent_indent="  ",
                          break_on_hyphens=False, break_long_words=False)
    return f"subcommands:\n{names}\n\nsee '{PROG} SUBCOMMAND --help' for each one's options"


def _base_generate_parser(add_help: bool = True) -> _Parser:
    p = _Parser(prog=PROG, description="Generate images with a next-scale (VAR/MVAR) model: the default "
                                       f"subcommand,\nalso '{PROG} generate'.", epilog=_subcommands_epilog(),
                formatter_class=argparse.RawDescriptionHelpFormatter,
                argument_default=argparse.SUPPRESS, allow_abbrev=False, add_help=add_help)
    p.add_argument("--config", metavar="FILE", help="TOML or JSON config file (flags override it)")
    g = p.add_argument_group("components (see 'mvar-engine plugins')")
    g.add_argument("--trajectory", metavar="NAME", help="conditioning trajectory (default: markov)")
    g.add_argument("--attention", metavar="NAME", help="attention pattern (default: the trajectory's: markov -> neighborhood, full -> dense)")
    g.add_argument("--cache", metavar="NAME", help="KV-cache policy (default: the trajectory's: markov -> none, full -> full)")
    g.add_argument("--backend", metavar="NAME", help="attention backend, or auto (default: auto)")
    m = p.add_argument_group("model")
    m.add_argument("--var-checkpoint", metavar="PATH", help="VAR/MVAR transformer weights (.pth or .safetensors)")
    m.add_argument("--vae-checkpoint", metavar="PATH", help="multi-scale VQVAE tokenizer weights")
    m.add_argument("--depth", type=int, help="transformer depth (read off the checkpoint when omitted)")
    m.add_argument("--patch-nums", metavar="N,N,...", help="scale schedule (default: VAR's 256px 1,2,3,4,5,6,8,10,13,16)")
    m.add_argument("--num-classes", type=int, help="number of classes (random weights)")
    m.add_argument("--random-weights", action="store_true", help="randomly initialised model (time and memory only)")
    m.add_argument("--no-strict", action="store_true", help="load checkpoints that do not match exactly")
    s = p.add_argument_group("sampling")
    s.add_argument("--labels", metavar="L,L,...", help="class labels, one grid row each")
    s.add_argument("--samples-per-label", type=int, metavar="N", help="images per label (grid columns; default 8)")
    s.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass (default 16)")
    s.add_argument("--cfg", type=float, help="classifier-free guidance (default 1.5; 0 disables)")
    s.add_argument("--top-k", type=int, help="top-k (default 900; 1 = greedy)")
    s.add_argument("--top-p", type=float, help="top-p (default 0.96)")
    s.add_argument("--seed", type=int, help="random seed (default 0)")
    o = p.add_argument_group("output and run")
    o.add_argument("--output", metavar="PATH", help="PNG grid path (default outputs/samples.png)")
    o.add_argument("--per-image", action="store_true", help="also write one PNG per image")
    o.add_argument("--save-tokens", metavar="PATH", help="write per-scale token indices (.pt or .safetensors)")
    o.add_argument("--device", help="auto, cpu, cuda, cuda:N (default auto)")
    o.add_argument("--dtype", help="float32 (default), bfloat16 or float16 autocast (CUDA)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _chosen_names(known: argparse.Namespace, file_data: dict[str, Any], registry: Registry) -> dict[str, str]:
    """Component names after file and flags, with the trajectory's defaults filled in."""
    names: dict[str, str] = {}
    for kind in COMPONENT_KINDS:
        flag = getattr(known, kind, None)
        entry = file_data.get(kind)
        from_file = entry if isinstance(entry, str) else (entry or {}).get("name") if isinstance(entry, dict) else None
        if flag or from_file:
            names[kind] = flag or from_file
    names.setdefault("trajectory", "markov")
    names.setdefault("backend", "auto")
    trajectory_cls = registry.get("trajectory", names["trajectory"]).record.factory
    names.setdefault("attention", getattr(trajectory_cls, "default_attention", "dense"))
    names.setdefault("cache", getattr(trajectory_cls, "default_cache", "none"))
    return names


def _add_option_flags(parser: argparse.ArgumentParser, names: dict[str, str], registry: Registry) -> dict[str, tuple[str, str]]:
    """Flags for the chosen components' options; returns dest -> (kind, option)."""
    dests: dict[str, tuple[str, str]] = {}
    for kind in COMPONENT_KINDS:
        if kind == "backend" and names[kind] == "auto":
            continue
        entry = registry.get(kind, names[kind])
        fields = entry.record.options.model_fields
        if not fields:
            continue
        group = parser.add_argument_group(f"{KIND_LABELS[kind]} '{entry.name}' options")
        for field_name, info in fields.items():
            dest = f"opt__{kind}__{field_name}"
            default = "" if info.is_required() else f" (default {info.default!r})"
            group.add_argument(_component_flag(kind, field_name), dest=dest, metavar="VALUE",
                               help=f"{info.description or field_name}{default}")
            dests[dest] = (kind, field_name)
    return dests


def _overrides(args: argparse.Namespace, names: dict[str, str], dests: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Command-line values shaped like the config file (only what was given)."""
    given = vars(args)
    out: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {}
    for dest, (kind, field_name) in dests.items():
        if dest in given:
            options.setdefault(kind, {})[field_name] = given[dest]
    for kind in COMPONENT_KINDS:
        if kind in given or kind in options:
            out[kind] = {"name": names[kind], "options": options.get(kind, {})}
    model_keys = {"var_checkpoint", "vae_checkpoint", "depth", "patch_nums", "num_classes", "random_weights"}
    sampling_keys = {"cfg", "top_k", "top_p", "seed"}
    output_keys = {"output", "per_image", "save_tokens"}
    for key, value in given.items():
        if key in model_keys:
            out.setdefault("model", {})[key] = value
        elif key in sampling_keys:
            out.setdefault("sampling", {})[key] = value
        elif key in output_keys:
            out.setdefault("output", {})[key] = value
        elif key in ("labels", "samples_per_label", "batch_size", "device", "dtype"):
            out[key] = value
    if given.get("no_strict"):
        out.setdefault("model", {})["strict"] = False
    if given.get("no_progress"):
        out["progress"] = False
    return out


def _full_parser(argv: Sequence[str], registry: Registry):
    """Phase 1 reads the component names (flags and config file); phase 2's parser adds their option
    flags. Returns (parser, file data, chosen names, option dests)."""
    known, _ = _base_generate_parser(add_help=False).parse_known_args(argv)
    file_data = read_config_file(known.config) if getattr(known, "config", None) else {}
    names = _chosen_names(known, file_data, registry)
    parser = _base_generate_parser()
    dests = _add_option_flags(parser, names, registry)
    return parser, file_data, names, dests


def parse_generate_args(argv: Sequence[str], registry: Registry | None = None) -> EngineConfig:
    """Command-line arguments -> validated :class:`EngineConfig` (file < flags)."""
    registry = registry or get_registry()
    parser, file_data, names, dests = _full_parser(argv, registry)
    args = parser.parse_args(argv)
    config = build_config(file_data, _overrides(args, names, dests))
    # Fill the trajectory's defaults so that the config says what runs.
    updates = {kind: ComponentChoice(name=names[kind]) for kind in ("attention", "cache") if getattr(config, kind) is None}
    return config.model_copy(update=updates)


def cmd_generate(argv: Sequence[str]) -> int:
    from .pipeline import Pipeline

    config = parse_generate_args(argv)
    start = time.perf_counter()
    pipe = Pipeline.from_config(config)
    result = pipe.generate()
    written = pipe.save(result)
    names = pipe.components.names
    backends = ", ".join(f"{kind}: {name}" for kind, name in sorted(result.backends_used.items())) or "-"
    print(f"wrote {written[0]} ({result.rows} rows x {len(result.labels) // max(result.rows, 1)} images, "
          f"{names['trajectory']}/{names['attention']}/{names['cache']}, backends {backends}, "
          f"peak cache {result.cache_peak_bytes / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s)")
    for path in written[1:]:
        if path.suffix != ".png":
            print(f"wrote {path}")
    return 0


def cmd_plugins(argv: Sequence[str]) -> int:
    p = _Parser(prog=f"{PROG} plugins", description="List every component: kind, name, provider, availability.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--kind", choices=list(COMPONENT_KINDS), help="only this kind")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    registry = get_registry()
    components = registry.components(args.kind)
    if args.json:
        print(json.dumps({
            "components": [_component_dict(c) for c in components],
            "broken": [b.as_dict() for b in registry.broken],
            "skipped": [vars(s) for s in registry.skipped],
        }, indent=2, default=str))
        return 0
    rows = [(c.kind, c.name, str(c.provider), "yes" if c.availability.ok else f"no: {c.availability.reason}",
             c.record.description) for c in components]
    header = ("KIND", "NAME", "PROVIDER", "AVAILABLE", "DESCRIPTION")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    print("  ".join(header[i].ljust(widths[i]) for i in range(3)) + "  " + header[3])
    for component, row in zip(components, rows):
        print("  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3] + (f"  — {row[4]}" if row[4] else ""))
        capabilities = backend_capabilities(component)
        if capabilities:
            print(f"    capabilities: {capabilities}")
    for broken in registry.broken:
        print(f"broken plugin {broken.plugin} ({broken.provider}): {broken.error}")
    for skipped in registry.skipped:
        print(f"skipped plugin {skipped.plugin} ({skipped.package}): {skipped.reason}")
    return 0


def backend_capabilities(component) -> str | None:
    """``capabilities.summary()`` of a backend's factory class (never instantiated), or None for
    other kinds and for factories that declare none."""
    if component.kind != "backend":
        return None
    summary = getattr(getattr(component.record.factory, "capabilities", None), "summary", None)
    try:
        return summary() if callable(summary) else None
    except Exception as error:  # a plugin's broken declaration must not break the listing
        return f"unreadable ({type(error).__name__}: {error})"


def _component_dict(component) -> dict[str, Any]:
    data = component.as_dict()
    if component.kind == "backend":
        data["capabilities"] = backend_capabilities(component)
    return data


def _int_list(text: str) -> tuple[int, ...]:
    from .bench.attention import parse_int_list

    try:
        return parse_int_list(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated backend names, got {text!r}")
    return names


def cmd_bench_attention(argv: Sequence[str]) -> int:
    from .bench.attention import DEVICES, DTYPES, BenchAttentionConfig, run_bench_attention

    d = BenchAttentionConfig()
    p = _Parser(prog=f"{PROG} bench attention", allow_abbrev=False,
                description="Time neighbourhood attention on square maps: every backend against dense SDPA "
                            "on the same tokens, with achieved GFLOP/s, speed-up, the FLOP ceiling N^2/pairs "
                            "and the error against the float64 reference (N <= 1024). Writes a JSON report.")
    p.add_argument("--sides", type=_int_list, default=d.sides, metavar="S,S,...",
                   help=f"map sides (square maps; default {','.join(map(str, d.sides))})")
    p.add_argument("--kernel-size", type=int, default=d.kernel_size, metavar="K", help=f"window side (default {d.kernel_size})")
    p.add_argument("--heads", type=int, default=d.heads, metavar="H", help=f"attention heads (default {d.heads})")
    p.add_argument("--head-dim", type=int, default=d.head_dim, metavar="D", help=f"head dim (default {d.head_dim})")
    p.add_argument("--batches", type=_int_list, default=d.batches, metavar="B,B,...",
                   help=f"batch sizes (default {','.join(map(str, d.batches))})")
    p.add_argument("--backends", type=_name_list, default=None, metavar="NAME,...",
                   help="backends to time (default: every available one except reference)")
    p.add_argument("--repeats", type=int, default=d.repeats, metavar="N", help=f"timed calls per cell (default {d.repeats})")
    p.add_argument("--budget-s", type=float, default=d.budget_s, metavar="SECONDS",
                   help=f"time budget per cell: fewer repeats when calls are slow, and a cell predicted "
                        f"(from the previous side, as N^2) to need over 4x this is skipped (default {d.budget_s:g})")
    p.add_argument("--device", choices=DEVICES, default=d.device, help="default auto (CUDA when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=d.dtype, help=f"input dtype (default {d.dtype})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"input seed (default {d.seed})")
    p.add_argument("--output", metavar="PATH", default=d.output, help=f"JSON report (default {d.output})")
    p.add_argument("--no-table", action="store_true", help="do not print the table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    config = BenchAttentionConfig(sides=args.sides, kernel_size=args.kernel_size, heads=args.heads,
                                  head_dim=args.head_dim, batches=args.batches, backends=args.backends,
                                  repeats=args.repeats, budget_s=args.budget_s, device=args.device, dtype=args.dtype,
                                  seed=args.seed, output=args.output, table=not args.no_table)
    run_bench_attention(config, log=sys.stderr)
    return 0


def cmd_bench_train(argv: Sequence[str]) -> int:
    from .bench.train import STRATEGIES, BenchTrainConfig, run_bench_train

    d = BenchTrainConfig()
    p = _Parser(prog=f"{PROG} bench train", allow_abbrev=False,
                description="Peak memory and step time of MVAR's training strategies (sequence vs parallel), each in "
                            "a fresh process, random weights. Writes a JSON report.")
    p.add_argument("--depth", type=int, default=d.depth, help=f"VAR depth (default {d.depth}: VAR-d16)")
    p.add_argument("--patch-nums", type=_int_list, default=d.patch_nums, metavar="N,N,...",
                   help="scale schedule (default VAR's 256px)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step (default {d.batch_size})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"timed steps per group, after one untimed (default {d.steps})")
    p.add_argument("--ratio", type=lambda t: tuple(int(x) for x in t.split(":")), default=d.ratio, metavar="A:B:C",
                   help="iterations per parallel group in a cycle, for the mean step time (default 8:1:1)")
    p.add_argument("--kernel-size", type=int, default=d.kernel_size, help=f"neighbourhood kernel (default {d.kernel_size})")
    p.add_argument("--strategies", type=_name_list, default=d.strategies, metavar="NAME,...",
                   help=f"default {','.join(STRATEGIES)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output", metavar="PATH", default=d.output, help=f"JSON report (default {d.output})")
    p.add_argument("--no-table", action="store_true", help="do not print the table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    run_bench_train(BenchTrainConfig(depth=args.depth, patch_nums=args.patch_nums, batch_size=args.batch_size,
                                     steps=args.steps, ratio=args.ratio, kernel_size=args.kernel_size,
                                     strategies=args.strategies, device=args.device, seed=args.seed,
                                     output=args.output, table=not args.no_table))
    return 0


def cmd_bench_matrix(argv: Sequence[str]) -> int:
    from .bench.matrix import KNOWN_MODELS, PRESETS, MatrixConfig, run_matrix

    d = MatrixConfig()
    presets = "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())
    p = _Parser(prog=f"{PROG} bench matrix", allow_abbrev=False,
                description="Inference benchmark matrix: every model x batch x trajectory/attention/cache "
                            "cell in a fresh process, random weights; peak memory over the post-load baseline, "
                            "KV-cache bytes, attention FLOPs from the pattern, transformer and decoding time. Writes "
                            "JSON, a markdown table (.md) and a PNG chart (.png); ratios are against the first "
                            "configuration of each model family (next-scale VAR/MVAR models; raster LlamaGen-style "
                            f"models run raster/dense/CACHE triples). Presets: {presets}.")
    p.add_argument("--preset", choices=list(PRESETS), default=d.preset, help=f"default {d.preset}")
    p.add_argument("--models", type=_name_list, default=None, metavar="ID,...",
                   help=f"model ids ({', '.join(KNOWN_MODELS)}; any dN-256 / dN-512); with --batches, overrides "
                        f"the preset's cells")
    p.add_argument("--batches", type=_int_list, default=None, metavar="B,B,...", help="batch sizes (images)")
    p.add_argument("--cells", type=_name_list, default=None, metavar="MODEL:B,...",
                   help="exact (model, batch) cells, e.g. d16-256:8,d16-512:2 (overrides --models, --batches, preset)")
    p.add_argument("--configs", type=_name_list, default=None, metavar="T/A/C,...",
                   help="trajectory/attention/cache triples; the first of each family is its baseline (options as "
                        "neighborhood:kernel_size=5 or ssd:budget=0.2; ssd without head_map=FILE is calibrated)")
    p.add_argument("--backend", default=d.backend, help="attention backend or auto (default auto)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: the preset's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=d.dtype,
                   help="autocast dtype (16-bit on CUDA only; default float32)")
    p.add_argument("--repeats", type=int, default=None, help="timed generations per cell (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed generations first (default: the preset's)")
    p.add_argument("--cfg", type=float, default=d.cfg, help=f"classifier-free guidance (default {d.cfg}; 0 disables)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--decode-chunk", type=int, default=d.decode_chunk, metavar="N",
                   help=f"images decoded at a time (default {d.decode_chunk})")
    p.add_argument("--calibration-images", type=int, default=d.calibration_images, metavar="N",
                   help=f"generations that calibrate an ssd head map (default {d.calibration_images})")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads per cell (default: torch's)")
    p.add_argument("--timeout-s", type=float, default=None, metavar="SECONDS", help="limit per cell (default none)")
    p.add_argument("--output", metavar="PATH", default=d.output, help=f"JSON report (default {d.output})")
    p.add_argument("--no-table", action="store_true", help="do not print the table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    payload = run_matrix(MatrixConfig(
        preset=args.preset, cells_=args.cells, models=args.models, batches=args.batches, configs=args.configs, backend=args.backend,
        device=args.device, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup, cfg=args.cfg, seed=args.seed,
        decode_chunk=args.decode_chunk, calibration_images=args.calibration_images, threads=args.threads,
        timeout_s=args.timeout_s, output=args.output, table=not args.no_table),
        log=sys.stderr)
    return 1 if any(row["status"] != "ok" for row in payload["results"]) else 0


def cmd_bench_cache(argv: Sequence[str]) -> int:
    from .bench.cache import cmd_bench_cache as run

    return run(argv)


BENCH_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "attention": (cmd_bench_attention, "attention backends on neighbourhood maps against dense SDPA"),
    "train": (cmd_bench_train, "training memory and step time: sequence vs parallel strategy"),
    "matrix": (cmd_bench_matrix, "inference matrix: memory, time and FLOPs per model, batch and configuration"),
    "cache": (cmd_bench_cache, "raster KV-cache policies: cache bytes, throughput and quality against the full cache"),
}
"""``mvar-engine bench NAME``: benchmark name -> (command, one-line description)."""


def _bench_parser() -> _Parser:
    listing = "\n".join(f"  {name:<12} {text}" for name, (_, text) in BENCH_COMMANDS.items())
    p = _Parser(prog=f"{PROG} bench", usage=f"{PROG} bench {{{','.join(BENCH_COMMANDS)}}} [options]",
                description="Benchmarks; each writes a JSON report and prints a table.",
                epilog=f"benchmarks:\n{listing}\n\nsee '{PROG} bench NAME --help' for each one's options",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def cmd_bench(argv: Sequence[str]) -> int:
    if argv and argv[0] in BENCH_COMMANDS:
        return BENCH_COMMANDS[argv[0]][0](argv[1:])
    if argv and not argv[0].startswith("-"):
        raise UsageError(f"unknown benchmark '{argv[0]}' (available: {', '.join(BENCH_COMMANDS)}; "
                         f"see '{PROG} bench --help')")
    parser = _bench_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


def cmd_train_tokenizer(argv: Sequence[str]) -> int:
    from .training.cli import cmd_train_tokenizer as run

    return run(argv)


def cmd_train(argv: Sequence[str]) -> int:
    from .training.cli import cmd_train as run

    return run(argv)


def cmd_export_weights(argv: Sequence[str]) -> int:
    import torch

    from ..models.checkpoint import convert_weights

    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    p = _Parser(prog=f"{PROG} export-weights", allow_abbrev=False,
                description="Copy a weights file to .safetensors with its floating tensors cast to --dtype, keeping "
                            "the mvar_engine metadata (e.g. to ship trained weights at half the size).")
    p.add_argument("source", help="weights file (.safetensors, .pth, checkpoint.pt)")
    p.add_argument("target", help="output .safetensors file (written atomically)")
    p.add_argument("--dtype", choices=list(dtypes), default="float16", help="default float16")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    path = convert_weights(args.source, args.target, dtypes[args.dtype])
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB, {args.dtype})")
    return 0


def cmd_evaluate(argv: Sequence[str]) -> int:
    from .evaluation.cli import cmd_evaluate as run

    return run(argv)


def cmd_profile_heads(argv: Sequence[str]) -> int:
    from ..plugins.head_map import write_head_map, write_heatmap
    from .pipeline import Pipeline
    from .profile_heads import ProfilingCache

    p = _Parser(prog=f"{PROG} profile-heads", allow_abbrev=False,
                description="Calibrate a raster model's heads for --cache ssd: generate with the full cache, score "
                            "every (layer, head) by the share of attention outside the query's k x k neighbourhood "
                            "on the token grid, write a JSON head map and a PNG heat map. Every other flag is a "
                            "generation flag (model, --labels, --samples-per-label, --seed, --cfg, ...).")
    p.add_argument("--head-map", default="head_map.json", help="JSON to write (the PNG goes beside it); default "
                   "head_map.json")
    p.add_argument("--neighborhood", type=int, default=3, help="neighbourhood side k in tokens (default 3)")
    p.add_argument("--threshold", default="auto", help="sparsity above which a head is a sink head; 'auto' "
                   "(default) splits the scores into two groups by Otsu's method")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args, rest = p.parse_known_args(argv)
    if args.neighborhood < 1:
        raise UsageError(f"--neighborhood must be at least 1, got {args.neighborhood}")
    try:
        threshold = None if args.threshold == "auto" else float(args.threshold)
    except ValueError:
        raise UsageError(f"--threshold must be a number or 'auto', got {args.threshold!r}") from None
    if any(a == "--cache" or a.startswith("--cache=") for a in rest):
        raise UsageError("profile-heads calibrates with the full cache: drop --cache")
    if not any(a == "--trajectory" or a.startswith("--trajectory=") for a in rest):
        rest = ["--trajectory", "raster", *rest]
    config = parse_generate_args([*rest, "--cache", "full"])
    trajectory = get_registry().create("trajectory", config.trajectory.name, config.trajectory.options)
    if trajectory.family != "next-token":
        raise UsageError(f"profile-heads classifies the heads of raster (next-token) models, not trajectory "
                         f"'{config.trajectory.name}': use --trajectory raster")
    pipe = Pipeline.from_config(config)
    start = time.perf_counter()
    profiler = ProfilingCache(pipe.adapter.grid, pipe.adapter.prefix, args.neighborhood)
    result = pipe.generate(cache=profiler)
    calibration = {"images": len(result.labels), "labels": sorted(set(int(x) for x in result.labels)),
                   "cfg": config.sampling.cfg, "seed": config.sampling.seed, "grid": list(pipe.adapter.grid),
                   "model": str(config.model.var_checkpoint or "default weights")}
    head_map = profiler.head_map(threshold, calibration)
    json_path = write_head_map(head_map, args.head_map)
    png_path = write_heatmap(head_map, Path(args.head_map).with_suffix(".png"))
    counts = head_map.counts()
    print(f"wrote {json_path} and {png_path}: {head_map.layers} layers x {head_map.heads} heads, {counts['sink']} sink / "
          f"{counts['local']} local at threshold {head_map.threshold:.3f} ({len(result.labels)} calibration images, "
          f"{time.perf_counter() - start:.1f} s)")
    return 0


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "generate": cmd_generate,
    "plugins": cmd_plugins,
    "bench": cmd_bench,
    "train-tokenizer": cmd_train_tokenizer,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "export-weights": cmd_export_weights,
    "profile-heads": cmd_profile_heads,
}


DEBUG_HINT = "(rerun with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]](argv[1:])
        if "-h" in argv or "--help" in argv:
            return _print_help(argv)
        return cmd_generate(argv)
    except MvarEngineError as error:
        if debug:
            raise
        lines = str(error).splitlines() or [type(error).__name__]
        if isinstance(error, ComponentFailedError):
            lines[-1] += f" {DEBUG_HINT}"
        for line in lines:
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        text = " ".join(str(error).split())
        detail = f"{type(error).__name__}: {text}" if text else type(error).__name__
        origin = failing_component(error)  # the plugin component whose code raised, if any
        if origin is None:
            print(f"{PROG}: internal error: {detail} {DEBUG_HINT}", file=sys.stderr)
        else:
            where = "internal error" if origin.provider.builtin else "error"
            print(f"{PROG}: {where}: {origin} failed: {detail} {DEBUG_HINT}", file=sys.stderr)
        return 1


def _print_help(argv: Sequence[str]) -> int:
    stripped = [a for a in argv if a not in ("-h", "--help")]
    _full_parser(stripped, get_registry())[0].print_help()
    return 0


def entry() -> None:
    """The ``mvar-engine`` program (console script and ``python -m mvar_engine.apps.cli``).

    A torchrun worker leaves through ``os._exit`` once its streams are flushed: every file the
    command writes is already saved atomically, and skipping interpreter finalisation avoids an
    abort in the C++ teardown of the process group's threads ("terminate called without an active
    exception", seen on 1 CI run in about 10 although each rank had passed a final barrier and
    destroyed its group)."""
    code = main()
    from .training.distributed import under_torchrun

    if under_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
