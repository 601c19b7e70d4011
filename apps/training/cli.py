"""``mvar-engine train-tokenizer`` and ``mvar-engine train``: flags -> settings -> trainer.

``train`` picks its trainer by the trajectory's family: next-scale trajectories (``full``,
``markov``) train a VAR/MVAR transformer (:mod:`.var_trainer`), next-token ones (``raster``) a
LlamaGen-style GPT (:mod:`.raster_trainer`), each with its own flags.

Both run as one process or under torchrun (``python -m torch.distributed.run --nproc_per_node N
-m mvar_engine.apps.cli train ...``; ``--batch-size`` is the global batch, split over the ranks).
Bad input raises a one-line :class:`UsageError` (the top-level CLI prints it and exits 2); a
graceful interruption (Ctrl-C, SIGTERM) saves a checkpoint and exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from ...core.errors import UsageError
from ...core.registry import get_registry
from ..cli_helpers import PROG, Parser, int_list
from .. import distributed as D
from .loop import TrainingInterrupted
from .raster_trainer import RasterTrainSettings, train_raster
from .tokenizer_trainer import TokenizerTrainSettings, train_tokenizer
from .var_trainer import VarTrainSettings, train_var


def _common_run_flags(p: argparse.ArgumentParser, d: Any, default_output: str) -> None:
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=d.steps, help=f"total optimizer steps (default {d.steps}); "
                   "a resumed run continues up to this count")
    o.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"global batch, split evenly over torchrun ranks (default {d.batch_size})")
    rate = o.add_mutually_exclusive_group()
    rate.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    rate.add_argument("--base-lr", type=float, default=None, metavar="LR",
                      help="VAR's tblr instead of --lr: peak lr = base-lr x batch-size x grad-accum / 256 (VAR: 1e-4)")
    o.add_argument("--grad-accum", type=int, default=d.grad_accum, metavar="N",
                   help=f"micro-batches of --batch-size per optimizer step (default {d.grad_accum}); a step trains on "
                        f"batch-size x N images")
    o.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=d.precision,
                   help="autocast of the forward: fp32 (default); bf16 (CUDA, or a CPU with native bf16); fp16 "
                        "(CUDA, with a gradient scaler). Weights and optimizer state stay float32")
    o.add_argument("--betas", type=float_pair, default=d.betas, metavar="B1,B2",
                   help=f"AdamW betas (default {d.betas[0]:g},{d.betas[1]:g}, VAR's)")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay on matrices "
                   f"(default {d.weight_decay:g})")
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=f"linear warm-up steps (default {d.warmup_steps})")
    o.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default=d.lr_schedule,
                   help=f"decay after warm-up (default {d.lr_schedule})")
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"gradient-norm clip, 0 = off (default {d.grad_clip:g})")
    o.add_argument("--seed", type=int, default=d.seed, help=f"seed of initialisation, batches and dropout (default {d.seed})")
    data = p.add_argument_group("data")
    data.add_argument("--data", default=d.data, help="'digits' (default) or a folder with one subfolder of images per class")
    data.add_argument("--split", choices=("train", "all"), default=d.split,
                      help="'train' (default) keeps the stratified held-out fifth for evaluation; 'all' uses every image")
    data.add_argument("--max-images", type=int, default=None, metavar="N", help="train on the first N images only")
    data.add_argument("--workers", type=int, default=d.workers, metavar="N",
                      help=f"DataLoader processes decoding an image folder (default {d.workers}; 0: the main process)")
    data.add_argument("--crop", choices=("random", "center"), default=None,
                      help="image folder: VAR's random R x R crop after resizing the shorter side to 1.125 R (default), "
                           "or the centre crop (cache-codes' crop)")
    data.add_argument("--hflip", action="store_true",
                      help="flip half the images horizontally (a folder's images, or a codes folder's flipped twins)")
    data.add_argument("--on-bad-image", choices=("skip", "fail"), default=d.on_bad_image,
                      help="an unreadable image mid-epoch: skip it, name it on stderr and in metrics.jsonl and count "
                           "it (default), or stop the run naming it")
    r = p.add_argument_group("run")
    r.add_argument("--output", default=default_output, metavar="DIR",
                   help=f"run directory: checkpoint.pt, weights, metrics.jsonl, config.json (default {default_output})")
    r.add_argument("--save-every", type=int, default=d.save_every, metavar="N",
                   help=f"checkpoint and export every N steps (default {d.save_every}); also at the end and on Ctrl-C")
    r.add_argument("--log-every", type=int, default=d.log_every, metavar="N",
                   help=f"append to metrics.jsonl every N steps (default {d.log_every})")
    r.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint.pt")
    r.add_argument("--overwrite", action="store_true", help="start over in an --output that already holds a run")
    r.add_argument("--device", default=d.device, help="auto (default: each rank's CUDA device if any), cpu, cuda")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--debug", action="store_true", help="show tracebacks")


def float_pair(text: str) -> tuple[float, float]:
    """argparse type: two comma-separated numbers (``0.9,0.95``)."""
    parts = text.split(",")
    try:
        values = tuple(float(x) for x in parts)
    except ValueError:
        values = ()
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers such as 0.9,0.95, got {text!r}")
    return values  # type: ignore[return-value]


def data_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of :func:`_common_run_flags` beyond the basic loop: data streaming and the step's recipe."""
    return {"workers": args.workers, "crop": args.crop, "hflip": args.hflip, "on_bad_image": args.on_bad_image,
            "grad_accum": args.grad_accum, "precision": args.precision, "betas": args.betas, "base_lr": args.base_lr}


def transformer_flags(m: argparse._ArgumentGroup, d: Any) -> None:
    """Flags both transformer trainers add to their model group."""
    m.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help=f"cross-entropy label smoothing (VAR's --ls; default {d.label_smoothing:g})")
    m.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute each block's activations in backward instead of storing them (less memory, "
                        "about a third more compute)")
    m.add_argument("--shard", action="store_true",
                   help="under torchrun: FSDP2, each rank holds 1/N of the weights, gradients and optimizer state "
                        "(models whose optimizer state does not fit one GPU: d24, d30); default DDP")


def transformer_values(args: argparse.Namespace) -> dict[str, Any]:
    return {"label_smoothing": args.label_smoothing, "checkpoint_activations": args.checkpoint_activations,
            "shard": args.shard}


def tokenizer_parser() -> Parser:
    d = TokenizerTrainSettings()
    p = Parser(prog=f"{PROG} train-tokenizer", allow_abbrev=False,
                description="Train the multi-scale VQ-VAE tokenizer (L1 reconstruction + VQ codebook/commitment loss). "
                            "Writes <output>/tokenizer.safetensors (with metadata) and checkpoint.pt.")
    a = p.add_argument_group("architecture")
    a.add_argument("--resolution", type=int, default=d.resolution, help=f"image side in pixels (default {d.resolution})")
    a.add_argument("--patch-nums", type=int_list, default=d.patch_nums, metavar="N,N,...",
                   help=f"scale schedule; the last must be resolution / 2**(len(ch-mult)-1) "
                        f"(default {','.join(map(str, d.patch_nums))})")
    a.add_argument("--vocab-size", type=int, default=d.vocab_size, help=f"codebook size (default {d.vocab_size})")
    a.add_argument("--z-channels", type=int, default=d.z_channels, help=f"code dimension Cvae (default {d.z_channels})")
    a.add_argument("--ch", type=int, default=d.ch, help=f"base width; ch x each multiplier must be a multiple of 32 "
                   f"(default {d.ch})")
    a.add_argument("--ch-mult", type=int_list, default=d.ch_mult, metavar="M,M,...",
                   help=f"width multiplier per level; downsampling = 2**(levels-1) (default {','.join(map(str, d.ch_mult))})")
    a.add_argument("--num-res-blocks", type=int, default=d.num_res_blocks, help=f"res blocks per level (default {d.num_res_blocks})")
    a.add_argument("--self-attention", action="store_true", help="self-attention blocks in encoder/decoder (slow on CPU)")
    a.add_argument("--beta", type=float, default=d.beta, help=f"commitment weight (default {d.beta:g})")
    a.add_argument("--quant-resi", type=float, default=d.quant_resi, help=f"phi mixing ratio (default {d.quant_resi:g})")
    a.add_argument("--share-quant-resi", type=int, default=d.share_quant_resi,
                   help=f"number of shared phis (0 = one per scale; default {d.share_quant_resi})")
    a.add_argument("--codebook-init", choices=("data", "normal"), default=d.codebook_init,
                   help="'data' (default): codes drawn from the first batch's residuals; 'normal': N(0, 1)")
    lo = p.add_argument_group("loss")
    lo.add_argument("--l1-weight", type=float, default=d.l1_weight, help=f"L1 reconstruction weight (default {d.l1_weight:g})")
    lo.add_argument("--mse-weight", type=float, default=d.mse_weight, help=f"MSE reconstruction weight (default {d.mse_weight:g})")
    lo.add_argument("--vq-weight", type=float, default=d.vq_weight, help=f"VQ (codebook + commitment) weight (default {d.vq_weight:g})")
    _common_run_flags(p, d, d.output)
    return p


def cmd_train_tokenizer(argv: Sequence[str]) -> int:
    """``mvar-engine train-tokenizer [flags]``; returns the exit status."""
    args = tokenizer_parser().parse_args(list(argv))
    settings = TokenizerTrainSettings(
        data=args.data, split=args.split, max_images=args.max_images, **data_flags(args), resolution=args.resolution,
        patch_nums=args.patch_nums, vocab_size=args.vocab_size, z_channels=args.z_channels, ch=args.ch,
        ch_mult=args.ch_mult, num_res_blocks=args.num_res_blocks, self_attention=args.self_attention, beta=args.beta,
        quant_resi=args.quant_resi, share_quant_resi=args.share_quant_resi, codebook_init=args.codebook_init,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, grad_clip=args.grad_clip,
        l1_weight=args.l1_weight, mse_weight=args.mse_weight, vq_weight=args.vq_weight, seed=args.seed,
        output=args.output, save_every=args.save_every, log_every=args.log_every, resume=args.resume,
        overwrite=args.overwrite, device=args.device, progress=not args.no_progress)
    return _run(lambda: train_tokenizer(settings), ("loss", "psnr", "usage"))


# -- train -----------------------------------------------------------------------------------------
def _component_option_flags(p: argparse.ArgumentParser, kind: str, name: str) -> dict[str, str]:
    """``--{kind}-{option}`` flags for component ``name``'s options; returns dest -> option name."""
    entry = get_registry().get(kind, name)
    fields = entry.record.options.model_fields
    dests: dict[str, str] = {}
    if not fields:
        return dests
    g = p.add_argument_group(f"{kind} '{entry.name}' options")
    for field_name, info in fields.items():
        dest = f"opt__{kind}__{field_name}"
        default = "" if info.is_required() else f" (default {info.default!r})"
        g.add_argument(f"--{kind}-{field_name.replace('_', '-')}", dest=dest, metavar="VALUE", default=None,
                       help=f"{info.description or field_name}{default}")
        dests[dest] = field_name
    return dests


def var_parser(trajectory: str | None = None, attention: str | None = None, add_help: bool = True):
    """The ``train`` parser; with component names, also their option flags. Returns (parser, dests)."""
    d = VarTrainSettings()
    p = Parser(prog=f"{PROG} train", allow_abbrev=False, add_help=add_help,
                description="Train a VAR/MVAR transformer by teacher forcing on a frozen tokenizer. Writes "
                            "<output>/model.safetensors (with metadata) and checkpoint.pt.")
    t = p.add_argument_group("tokenizer")
    t.add_argument("--tokenizer", default=d.tokenizer, metavar="PATH",
                   help=f"tokenizer weights from train-tokenizer (default {d.tokenizer})")
    t.add_argument("--tokenizer-patch-nums", type=int_list, default=None, metavar="N,N,...",
                   help="scale schedule of a tokenizer file without mvar_engine metadata")
    t.add_argument("--resolution", type=int, default=None, help="image side; must match the tokenizer (default: its own)")
    c = p.add_argument_group("components (see 'mvar-engine plugins')")
    c.add_argument("--trajectory", default=d.trajectory, help=f"full (VAR) or markov (MVAR; default {d.trajectory})")
    c.add_argument("--attention", default=None, help="attention pattern (default: the trajectory's: markov -> "
                   "neighborhood, full -> dense)")
    c.add_argument("--backend", default=d.backend, help=f"attention backend with a backward pass (default {d.backend})")
    s = p.add_argument_group("strategy")
    s.add_argument("--strategy", choices=("sequence", "parallel"), default=d.strategy,
                   help="sequence: all scales every step (default); parallel: MVAR's per-scale groups (markov order 1)")
    s.add_argument("--ratio", default=None, metavar="A:B:...", help="parallel: iterations per group in a cycle "
                   "(default: each group's scale count, MVAR's 8:1:1 at 256px)")
    s.add_argument("--parallel-split", type=int, default=None, metavar="N",
                   help="parallel: scales 0..N-1 are packed together, each later scale trains alone (default: the "
                        "neighbourhood's first windowed scale; dense: num_scales - 2)")
    m = p.add_argument_group("model")
    m.add_argument("--depth", type=int, default=d.depth, help=f"transformer blocks (default {d.depth})")
    m.add_argument("--embed-dim", type=int, default=d.embed_dim, help=f"width (default {d.embed_dim})")
    m.add_argument("--num-heads", type=int, default=d.num_heads, help=f"attention heads (default {d.num_heads})")
    m.add_argument("--mlp-ratio", type=float, default=d.mlp_ratio, help=f"FFN width / width (default {d.mlp_ratio:g})")
    m.add_argument("--class-dropout", type=float, default=d.class_dropout,
                   help=f"probability of the null class (CFG training; default {d.class_dropout:g})")
    m.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from VAR/MVAR weights of the same architecture (.pth, .safetensors, checkpoint.pt)")
    m.add_argument("--finetune-from", default=None, metavar="CHECKPOINT",
                   help="fine-tune an official VAR or MVAR checkpoint (var_d16.pth, mvar-d16.pth, a training "
                        "checkpoint of either) into this trajectory, e.g. --trajectory markov --strategy parallel; "
                        "the size flags must match it")
    m.add_argument("--adaln-gamma-init", type=float, default=d.adaln_gamma_init, metavar="G",
                   help=f"scale of the AdaLN gamma weights at initialisation (VAR's --alng; default {d.adaln_gamma_init:g})")
    transformer_flags(m, d)
    _common_run_flags(p, d, d.output)
    dests: dict[str, tuple[str, str]] = {}
    if trajectory is not None:
        for dest, opt in _component_option_flags(p, "trajectory", trajectory).items():
            dests[dest] = ("trajectory", opt)
        registry = get_registry()
        attention = attention or getattr(registry.get("trajectory", trajectory).record.factory, "default_attention", "dense")
        for dest, opt in _component_option_flags(p, "attention", attention).items():
            dests[dest] = ("attention", opt)
    return p, dests


def parse_var_args(argv: Sequence[str]) -> VarTrainSettings:
    """Two phases, as ``generate``: the component names first, then a parser with their option flags."""
    argv = list(argv)
    known, _ = var_parser(add_help=False)[0].parse_known_args(argv)
    parser, dests = var_parser(known.trajectory, known.attention)
    args = parser.parse_args(argv)
    options: dict[str, dict[str, Any]] = {"trajectory": {}, "attention": {}}
    for dest, (kind, opt) in dests.items():
        value = getattr(args, dest)
        if value is not None:
            options[kind][opt] = value
    return VarTrainSettings(
        tokenizer=args.tokenizer, tokenizer_patch_nums=args.tokenizer_patch_nums, data=args.data, split=args.split,
        max_images=args.max_images, **data_flags(args), resolution=args.resolution, trajectory=args.trajectory,
        trajectory_options=options["trajectory"], attention=args.attention, attention_options=options["attention"],
        backend=args.backend, strategy=args.strategy, ratio=args.ratio, parallel_split=args.parallel_split,
        depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads, mlp_ratio=args.mlp_ratio,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, grad_clip=args.grad_clip,
        class_dropout=args.class_dropout, init_from=args.init_from, seed=args.seed, output=args.output,
        save_every=args.save_every, log_every=args.log_every, resume=args.resume, overwrite=args.overwrite,
        device=args.device, progress=not args.no_progress, adaln_gamma_init=args.adaln_gamma_init,
        finetune_from=args.finetune_from,
        **transformer_values(args))


NEXT_SCALE_ONLY: dict[str, str] = {
    "--attention": "attention patterns apply to next-scale trajectories; a raster GPT attends causally over the "
                   "class prefix and every earlier token",
    "--strategy": "training strategies split next-scale schedules into groups of scales; a raster GPT trains on "
                  "every token each step",
    "--ratio": "--ratio belongs to --strategy parallel (next-scale training)",
    "--parallel-split": "--parallel-split belongs to --strategy parallel (next-scale training)",
    "--mlp-ratio": "the raster GPT's SwiGLU width comes from --multiple-of and --ffn-dim-multiplier (LlamaGen's)",
}
"""``train`` flags a raster run refuses, with the reason."""


def raster_parser() -> Parser:
    """The ``train --trajectory raster`` parser."""
    d = RasterTrainSettings()
    p = Parser(prog=f"{PROG} train --trajectory raster", allow_abbrev=False,
                description="Train a LlamaGen-style raster (next-token) GPT by teacher forcing on the tokens of a "
                            "frozen tokenizer's last scale (its latent grid). Writes <output>/model.safetensors "
                            "(with metadata) and checkpoint.pt.")
    t = p.add_argument_group("tokenizer")
    t.add_argument("--tokenizer", default=d.tokenizer, metavar="PATH",
                   help=f"tokenizer weights from train-tokenizer; its last scale is the token grid (default {d.tokenizer})")
    t.add_argument("--tokenizer-patch-nums", type=int_list, default=None, metavar="N,N,...",
                   help="scale schedule of a tokenizer file without mvar_engine metadata (its last entry is used)")
    t.add_argument("--resolution", type=int, default=None, help="image side; must match the tokenizer (default: its own)")
    c = p.add_argument_group("components (see 'mvar-engine plugins')")
    c.add_argument("--trajectory", default=d.trajectory, help="a next-token trajectory (default raster)")
    c.add_argument("--backend", default=d.backend, help=f"attention backend with a backward pass (default {d.backend})")
    m = p.add_argument_group("model (LlamaGen c2i GPT)")
    m.add_argument("--depth", type=int, default=d.depth, help=f"transformer blocks (default {d.depth})")
    m.add_argument("--embed-dim", type=int, default=d.embed_dim, help=f"width (default {d.embed_dim})")
    m.add_argument("--num-heads", type=int, default=d.num_heads,
                   help=f"attention heads; head_dim must be divisible by 4 for 2-D RoPE (default {d.num_heads})")
    m.add_argument("--cls-token-num", type=int, default=d.cls_token_num,
                   help=f"class-prefix length (default {d.cls_token_num}, LlamaGen c2i)")
    m.add_argument("--multiple-of", type=int, default=d.multiple_of,
                   help=f"SwiGLU hidden width rounded up to a multiple of this (default {d.multiple_of})")
    m.add_argument("--ffn-dim-multiplier", type=float, default=d.ffn_dim_multiplier,
                   help="SwiGLU hidden width multiplier (default: none, LlamaGen's 8/3 x width)")
    m.add_argument("--class-dropout", type=float, default=d.class_dropout,
                   help=f"probability of the null class (CFG training; default {d.class_dropout:g})")
    m.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from raster weights of the same architecture (.pth, .safetensors, checkpoint.pt)")
    transformer_flags(m, d)
    for flag in NEXT_SCALE_ONLY:  # accepted by the parser only to refuse them with the reason
        p.add_argument(flag, dest=f"refused__{flag[2:].replace('-', '_')}", default=None, help=argparse.SUPPRESS)
    _common_run_flags(p, d, d.output)
    return p


def parse_raster_args(argv: Sequence[str]) -> RasterTrainSettings:
    args = raster_parser().parse_args(list(argv))
    for flag, reason in NEXT_SCALE_ONLY.items():
        if getattr(args, f"refused__{flag[2:].replace('-', '_')}") is not None:
            raise UsageError(f"{flag} does not apply to --trajectory {args.trajectory}: {reason} (drop {flag})")
    return RasterTrainSettings(
        tokenizer=args.tokenizer, tokenizer_patch_nums=args.tokenizer_patch_nums, data=args.data, split=args.split,
        max_images=args.max_images, **data_flags(args), resolution=args.resolution, trajectory=args.trajectory, backend=args.backend,
        depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads, cls_token_num=args.cls_token_num,
        multiple_of=args.multiple_of, ffn_dim_multiplier=args.ffn_dim_multiplier, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule, grad_clip=args.grad_clip, class_dropout=args.class_dropout,
        init_from=args.init_from, seed=args.seed, output=args.output, save_every=args.save_every,
        log_every=args.log_every, resume=args.resume, overwrite=args.overwrite, device=args.device,
        progress=not args.no_progress, **transformer_values(args))


def trajectory_family(argv: Sequence[str]) -> str:
    """The family (``next-scale``, ``next-token``) of the trajectory named on the command line."""
    known, _ = var_parser(add_help=False)[0].parse_known_args(list(argv))
    factory = get_registry().get("trajectory", known.trajectory).record.factory
    return getattr(factory, "family", "next-scale")


def cmd_train(argv: Sequence[str]) -> int:
    """``mvar-engine train [flags]``; returns the exit status."""
    if trajectory_family(argv) == "next-token":
        raster = parse_raster_args(argv)
        return _run(lambda: train_raster(raster), ("loss", "acc"))
    settings = parse_var_args(argv)
    return _run(lambda: train_var(settings), ("loss", "ce", "acc"))


def _run(train, keys: tuple[str, ...]) -> int:
    try:
        summary = train()
    except TrainingInterrupted as stop:
        if D.launch_rank() == 0:
            print(f"{PROG}: {stop}", file=sys.stderr)
        return stop.exit_status
    if D.launch_rank() == 0:
        numbers = ", ".join(f"{k} {summary.metrics[k]:.4g}" for k in keys if isinstance(summary.metrics.get(k), float))
        print(f"wrote {summary.weights} (step {summary.step}{', ' + numbers if numbers else ''}, "
              f"{summary.seconds:.1f} s; metrics in {summary.run_dir / 'metrics.jsonl'}; train further with "
              f"--resume --steps N)")
    return 0
