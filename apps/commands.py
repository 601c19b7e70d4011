"""The built-in subcommands, registered through the ``mvar_engine_register_commands`` hook exactly
as a plugin registers its own (the ``builtin-commands`` entry point)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..core.errors import UsageError
from ..core.hookspecs import hookimpl
from ..models.checkpoint import convert_weights
from . import cli
from .cli_helpers import PROG, Commands, Parser, check_output_path, lazy_command
from .output_files import add_overwrite_flag, check_outputs

BENCH = "mvar_engine.apps.bench"


def cmd_export_weights(argv: Sequence[str]) -> int:
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    p = Parser(prog=f"{PROG} export-weights", allow_abbrev=False,
                description="Copy a weights file to .safetensors with its floating tensors cast to --dtype, keeping "
                            "the mvar_engine metadata (e.g. to ship trained weights at half the size).")
    p.add_argument("source", help="weights file (.safetensors, .pth, checkpoint.pt)")
    p.add_argument("target", help="output .safetensors file (written atomically)")
    p.add_argument("--dtype", choices=list(dtypes), default="float16", help="default float16")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_overwrite_flag(p)
    args = p.parse_args(argv)
    source = Path(args.source)
    if not args.source.strip():
        raise UsageError("export-weights SOURCE '': the path is empty (give a weights file)")
    if not source.is_file():
        what = "is a directory" if source.is_dir() else "does not exist"
        raise UsageError(f"export-weights SOURCE {args.source}: {what} (give a weights file: .safetensors, .pth, .pt)")
    target = check_output_path("export-weights TARGET", args.target, (".safetensors",))
    if target.exists() and target.resolve() == source.resolve():
        raise UsageError(f"export-weights TARGET {args.target}: the same file as SOURCE (give another target path)")
    check_outputs({"export-weights TARGET": target}, args.overwrite)
    path = convert_weights(args.source, args.target, dtypes[args.dtype])
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB, {args.dtype})")
    return 0


TRAINING, EVALUATION = "mvar_engine.apps.training.cli", "mvar_engine.apps.evaluation.cli"


@hookimpl
def mvar_engine_register_commands(commands: Commands) -> None:
    add = commands.add
    add("generate", cli.cmd_generate, "generate images (the default command)")
    add("plugins", cli.cmd_plugins, "list every component: kind, name, provider, availability")
    commands.add_group("bench", "Benchmarks; each writes a JSON report and prints a table.")
    add("attention", lazy_command(f"{BENCH}.attention", "cmd_bench_attention"),
        "attention backends on neighbourhood maps against dense SDPA", group="bench")
    add("train", lazy_command(f"{BENCH}.train", "cmd_bench_train"),
        "training memory and step time: sequence vs parallel strategy", group="bench")
    add("matrix", lazy_command(f"{BENCH}.matrix", "cmd_bench_matrix"),
        "inference matrix: memory, time and FLOPs per model, batch and configuration", group="bench")
    add("cache", lazy_command(f"{BENCH}.cache", "cmd_bench_cache"),
        "raster KV-cache policies: cache bytes, throughput and quality against the full cache", group="bench")
    add("quality", lazy_command(f"{BENCH}.quality", "cmd_bench_quality"),
        "cache policies against the full cache on a shipped model: agreement, sample quality, memory, time",
        group="bench")
    add("capacity", lazy_command(f"{BENCH}.capacity", "cmd_bench_capacity"),
        "throughput at a memory budget: each configuration's largest batch that fits, and its images/s", group="bench")
    add("train-tokenizer", lazy_command(TRAINING, "cmd_train_tokenizer"), "train the multi-scale VQ-VAE tokenizer")
    add("train", lazy_command(TRAINING, "cmd_train"), "train a VAR/MVAR transformer or a raster GPT")
    add("cache-codes", lazy_command("mvar_engine.apps.training.cache_codes", "cmd_cache_codes"),
        "encode an image folder with a tokenizer into sharded codes to train from (centre crop + flipped twin)")
    add("sample", lazy_command("mvar_engine.apps.sampler.cli", "cmd_sample"),
        "sample N images per class into PNGs and an ADM-style .npz (shards under torchrun, --resume)")
    add("evaluate", lazy_command(EVALUATION, "cmd_evaluate"), "sample quality of generation configurations")
    add("fid", lazy_command("mvar_engine.apps.evaluation.fid", "cmd_fid"),
        "FID / IS of an .npz image batch against a reference batch (torch-fidelity's Inception, local weights)")
    add("export-weights", cmd_export_weights, "copy weights to .safetensors at another dtype")
    add("profile-heads", lazy_command("mvar_engine.apps.profile_heads", "cmd_profile_heads"),
        "classify a raster model's heads for --cache ssd")
    add("profile-scales", lazy_command("mvar_engine.apps.profile_scales", "cmd_profile_scales"),
        "profile a next-scale model's layers for --cache scalekv and --cache ams")
