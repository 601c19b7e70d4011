"""From a run's model settings to models, in two stages: a :class:`ModelPlan` (architectures and
files, read off metadata and tensor shapes, every check done: nothing is built and no weight is
read), then the models it describes (random initialisation or the checkpoints loaded).

The CLI plans first (``ModelFamily.inspect``), so a bad setting costs a second, not a model load;
``build_models`` plans and builds. Checkpoints in any supported layout
(:mod:`mvar_engine.models.checkpoint`); our own exports carry their architecture in metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ValidationError

from ..core.adapter import ModelFacts
from ..core.errors import CheckpointError, UsageError, setting
from ..models.checkpoint import check_finite, load_into, read_state_dict, read_state_shapes, save_state_dict, weights_fingerprint
from ..models.default_models import available_defaults, weights_metadata
from ..models.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig, infer_llamagen_vq_config, is_llamagen_vq_state
from ..models.raster_gpt import DERIVED_RASTER_BUFFERS, RasterGPT, RasterGPTConfig, infer_raster_config
from ..models.tokenizer import MultiScaleVQVAE, TokenizerConfig, llamagen_vq16_sized
from ..models.var import VAR, VARConfig, infer_var_config
from .cli_helpers import architecture_error
from .memory_fit import refuse_unfitting
from .model_options import CheckpointModelOptions, RasterOptions, VarOptions

DERIVED_VAR_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
"""VAR buffers recomputed from the config, never read."""

DERIVED_TOKENIZER_BUFFERS = ("quantize.ema_vocab_hit_SV",)

SIZE_SETTINGS = ", ".join(setting(name) for name in ("depth", "patch_nums", "num_classes"))

VAR_USE = (f"the var family (next-scale trajectories: full, markov) runs VAR/MVAR weights; run raster GPT weights "
           f"with {setting('model', 'llamagen')} (or {setting('trajectory', 'raster')})")
RASTER_USE = (f"the raster-gpt family ({setting('trajectory', 'raster')}) runs raster GPT weights (mvar-engine train "
              f"--trajectory raster, or LlamaGen's c2i GPT checkpoints); run next-scale weights with "
              f"{setting('model', 'var')} or mvar (or {setting('trajectory', 'full')} or markov)")
TOKENIZER_USE = (f"{setting('tokenizer')} takes the tokenizer's weights (mvar-engine train-tokenizer, or VAR's "
                 "vae_ch160v4096z32.pth)")


# -- reading architectures -------------------------------------------------------------------------
def stored_architecture(path, config_type: type[BaseModel], meta: dict | None = None):
    """The config of ``config_type`` stored in a weights file's metadata, or None."""
    meta = weights_metadata(path) if meta is None else meta
    arch = (meta or {}).get("architecture")
    if not arch:
        return None
    try:
        return config_type(**arch)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "architecture"
        raise CheckpointError(f"{path}: its metadata's architecture is not a {config_type.__name__} ({where}: "
                              f"{first.get('msg', 'invalid')}); give the file this flag expects") from None


def check_weights_kind(path, expected: str, use: str) -> dict | None:
    """The weights' metadata, after checking that it (when present) says ``kind == expected``; else a
    one-line error naming what the file holds and ``use`` (how to run it)."""
    meta = weights_metadata(path)
    kind = (meta or {}).get("kind")
    if kind is not None and kind != expected:
        family = (meta or {}).get("family") or {"var": "next-scale", "raster": "next-token"}.get(kind)
        raise CheckpointError(f"{path} holds {kind} weights{f' ({family})' if family else ''}, not {expected} "
                              f"weights; {use}")
    return meta


def refuse_overrides(path, held: dict[str, Any], given: dict[str, Any], strict: bool) -> None:
    """Under strict loading a size setting (``given``: name -> value or None) that contradicts what
    the checkpoint holds (``held``: name -> value) is an error: it would be ignored or fail to load."""
    if not strict:
        return
    for flag, value in given.items():
        if value is not None and held.get(flag) is not None and _same(value) != _same(held[flag]):
            shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            have = ",".join(map(str, held[flag])) if isinstance(held[flag], (list, tuple)) else held[flag]
            raise UsageError(f"{setting(flag, shown)}: {path} holds {setting(flag, have)} (drop {setting(flag)}, or add "
                             f"{setting('strict', False)} to load what matches into the other size)")


def _same(value: Any) -> Any:
    """Schedules compare as tuples of ``(h, w)``; scalars as they are."""
    if isinstance(value, (list, tuple)):
        return tuple(tuple(v) if isinstance(v, (list, tuple)) else (v, v) for v in value)
    return value


def _shape_error(path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: {error.args[0] if error.args else error}")


def var_architecture(path, *, depth: int | None = None, patch_nums=None, num_classes: int | None = None,
                     strict: bool = True) -> VARConfig:
    """A VAR checkpoint's architecture: from its metadata (our exports) or its tensor shapes."""
    meta = check_weights_kind(path, "var", VAR_USE)
    given = {"depth": depth, "patch_nums": patch_nums, "num_classes": num_classes}
    stored = stored_architecture(path, VARConfig, meta)
    if stored is not None:
        refuse_overrides(path, {"depth": stored.depth, "patch_nums": stored.patch_nums,
                                "num_classes": stored.num_classes}, given, strict)
        updates = {k: v for k, v in (("depth", depth), ("patch_nums", patch_nums), ("num_classes", num_classes)) if v}
        return VARConfig(**{**stored.model_dump(), **updates}) if updates else stored
    shapes = read_state_shapes(path)
    if "tok_embeddings.weight" in shapes:
        raise CheckpointError(f"{path} holds a raster GPT (LlamaGen's c2i keys), not VAR/MVAR weights; {VAR_USE}")
    try:
        found = infer_var_config(shapes, **({"patch_nums": tuple(patch_nums)} if patch_nums else {}))
    except (KeyError, ValueError) as error:
        raise _shape_error(path, error) from None
    refuse_overrides(path, {"depth": found.depth, "num_classes": found.num_classes}, given, strict)
    if strict and patch_nums and found.layout.length != shapes["pos_1LC"].shape[1]:
        raise UsageError(f"{setting('patch_nums', ','.join(map(str, patch_nums)))}: {found.layout.length} tokens, but "
                         f"{path} has positions for {shapes['pos_1LC'].shape[1]} (give its schedule, or drop "
                         f"{setting('patch_nums')})")
    try:
        return VARConfig(**{**found.model_dump(), **{k: v for k, v in (("depth", depth), ("num_classes", num_classes)) if v}})
    except ValidationError as error:
        raise architecture_error(error, SIZE_SETTINGS) from None


def infer_tokenizer_config(state: dict[str, torch.Tensor], patch_nums) -> TokenizerConfig:
    """Tokenizer architecture read off its state dict's shapes (channels, ch_mult, blocks, vocabulary, phis)."""
    try:
        vocab, z = state["quantize.embedding.weight"].shape
        ch = state["encoder.conv_in.weight"].shape[0]
    except KeyError as error:
        raise KeyError(f"not a multi-scale VQVAE state dict: missing {error.args[0]}") from None
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
    ch_mult = []
    for level in range(levels):
        ch_mult.append(state[f"encoder.down.{level}.block.0.conv1.weight"].shape[0] // ch)
    blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    phis = {int(k.split(".")[3]) for k in state if k.startswith("quantize.quant_resi.qresi_ls.")}
    share = len(phis) if phis else 4
    using_sa = any(k.startswith("encoder.down.") and ".attn." in k for k in state)
    using_mid_sa = any(k.startswith("encoder.mid.attn_1.") for k in state)
    return TokenizerConfig(vocab_size=int(vocab), z_channels=int(z), ch=int(ch), ch_mult=tuple(ch_mult),
                           num_res_blocks=blocks, share_quant_resi=share, patch_nums=tuple(patch_nums),
                           using_sa=using_sa, using_mid_sa=using_mid_sa)


def tokenizer_architecture(path, patch_nums, *, strict: bool = True, model_path=None,
                           final_only: bool = False) -> TokenizerConfig:
    """A tokenizer checkpoint's architecture, run with ``patch_nums`` (the transformer's schedule).
    Under strict loading a tokenizer whose metadata records another training schedule is refused
    (``model_path`` names the transformer in the message); ``final_only`` (raster models, which use
    one scale) compares only the last scale of the schedules."""
    meta = check_weights_kind(path, "tokenizer", TOKENIZER_USE)
    stored = stored_architecture(path, TokenizerConfig, meta)
    if stored is not None:
        trained = (meta or {}).get("patch_nums") or stored.patch_nums
        compared = (lambda nums: _same(nums)[-1:]) if final_only else _same
        if strict and compared(trained) != compared(patch_nums):
            raise UsageError(f"tokenizer {path} was trained on the schedule {','.join(map(str, trained))} but "
                             f"{model_path or 'the transformer'} runs {','.join(map(str, patch_nums))} (give the "
                             f"tokenizer the transformer was trained with, or add {setting('strict', False)} to run it "
                             f"anyway)")
        try:
            return TokenizerConfig(**{**stored.model_dump(), "patch_nums": tuple(patch_nums)})
        except ValidationError as error:
            raise architecture_error(error, setting("patch_nums")) from None
    shapes = read_state_shapes(path)
    if "tok_embeddings.weight" in shapes:
        raise CheckpointError(f"{path} holds a raster GPT (LlamaGen c2i keys), not a tokenizer: give it as "
                              f"{setting('checkpoint')} and the tokenizer (e.g. LlamaGen's vq_ds16_c2i.pt) as "
                              f"{setting('tokenizer')}")
    try:
        return infer_tokenizer_config(shapes, patch_nums)
    except (KeyError, ValueError) as error:
        raise _shape_error(path, error) from None


def llamagen_vq_architecture(path, shapes: dict[str, torch.Tensor]) -> LlamaGenVQConfig:
    """The architecture of a LlamaGen VQ file (``vq_ds16_c2i.pt``: keys under ``model``) from its shapes."""
    try:
        return infer_llamagen_vq_config(shapes)
    except (KeyError, ValueError) as error:
        raise _shape_error(path, error) from None


def raster_architecture(path, *, grid: tuple[int, int] | None, depth: int | None = None,
                        num_classes: int | None = None, num_heads: int | None = None,
                        strict: bool = True) -> RasterGPTConfig:
    """A raster GPT checkpoint's architecture: from its metadata (our exports) or, for LlamaGen's
    c2i files (flat or nested under ``model`` / ``module`` / ``state_dict``), its tensor shapes
    (``grid`` required: the files do not hold it; the head count from LlamaGen's table of released
    sizes unless ``num_heads`` gives it)."""
    meta = check_weights_kind(path, "raster", RASTER_USE)
    stored = stored_architecture(path, RasterGPTConfig, meta) if meta else None
    given = {"depth": depth, "num_classes": num_classes, "num_heads": num_heads}
    if stored is not None:
        if grid is not None and tuple(grid) != tuple(stored.grid):
            raise UsageError(f"{setting('patch_nums', grid[0] if grid[0] == grid[1] else grid)}: {path} was trained "
                             f"on a {stored.grid[0]}x{stored.grid[1]} token grid (drop {setting('patch_nums')})")
        refuse_overrides(path, {"depth": stored.depth, "num_classes": stored.num_classes,
                                "num_heads": stored.heads}, given, strict)
        return stored
    shapes = read_state_shapes(path)
    if "pos_1LC" in shapes:
        raise CheckpointError(f"{path} holds VAR/MVAR weights (next-scale), not a raster GPT; {RASTER_USE}")
    if is_llamagen_vq_state(shapes):
        raise CheckpointError(f"{path} holds LlamaGen VQ tokenizer weights, not a raster GPT: give it as "
                              f"{setting('tokenizer')} and the GPT (e.g. c2i_B_384.pt) as {setting('checkpoint')}")
    try:
        found = infer_raster_config(shapes, heads=num_heads)  # is it a LlamaGen c2i state dict?
        refuse_overrides(path, {"depth": found.depth, "num_classes": found.num_classes}, given, strict)
        if grid is None:
            raise UsageError(f"{path} does not record its token grid: give it with {setting('patch_nums', 'SIDE')} (LlamaGen: "
                             f"16 at 256px, 24 at 384px)")
        return infer_raster_config(shapes, grid=tuple(grid), depth=depth, num_classes=num_classes, heads=num_heads)
    except (KeyError, ValueError) as error:
        raise _shape_error(path, error) from None


# -- plans -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelPlan:
    """What a build will make: the transformer's and the tokenizer's architecture, the files to load
    them from (None: random initialisation seeded with ``seed``), strictness."""

    model: VARConfig | RasterGPTConfig
    tokenizer: TokenizerConfig | LlamaGenVQConfig
    model_path: Path | None = None
    tokenizer_path: Path | None = None
    strict: bool = True
    seed: int = 0

    def facts(self) -> ModelFacts:
        config = self.model
        heads = config.heads
        return ModelFacts(layout=config.layout, num_layers=config.depth, num_heads=heads,
                          num_classes=config.num_classes,
                          weights_id=weights_fingerprint(self.model_path) if self.model_path else None,
                          pixels_per_token=self.tokenizer.downsample)


def _no_weights() -> UsageError:
    have = ", ".join(available_defaults()) or "none in this installation"
    return UsageError(f"no weights given, and none ship for this run's trajectory (shipped for: {have}); give "
                      f"{setting('checkpoint')} and {setting('tokenizer')}, or {setting('random_weights')} to time a "
                      f"random model")


def _check_vocab(tokenizer: TokenizerConfig | LlamaGenVQConfig, vocab_size: int, z_channels: int | None, paths) -> None:
    if tokenizer.vocab_size != vocab_size or (z_channels is not None and tokenizer.z_channels != z_channels):
        tok, model = paths
        raise CheckpointError(f"tokenizer {tok} (vocabulary {tokenizer.vocab_size}, Cvae {tokenizer.z_channels}) does "
                              f"not fit the transformer {model} (vocabulary {vocab_size}"
                              f"{f', Cvae {z_channels}' if z_channels is not None else ''}; give the tokenizer it was "
                              f"trained on)")


def _both_files(options: CheckpointModelOptions, what: str) -> None:
    if not (options.checkpoint and options.tokenizer):
        raise UsageError(f"give both {setting('checkpoint')} and {setting('tokenizer')} ({what} and its tokenizer)")


def plan_var_models(options: VarOptions) -> ModelPlan:
    """The VAR/MVAR transformer and multi-scale tokenizer ``options`` name: checkpoints, or random
    weights of ``depth`` at ``patch_nums`` (the shipped defaults come in through the pipeline's
    ``with_weights``)."""
    m = options
    if m.checkpoint or m.tokenizer:
        _both_files(m, "the transformer")
        var = var_architecture(m.checkpoint, depth=m.depth, patch_nums=m.patch_nums, num_classes=m.num_classes,
                               strict=m.strict)
        tok = tokenizer_architecture(m.tokenizer, var.patch_nums, strict=m.strict, model_path=m.checkpoint)
        _check_vocab(tok, var.vocab_size, var.z_channels, (m.tokenizer, m.checkpoint))
        return fitting(ModelPlan(var, tok, Path(m.checkpoint), Path(m.tokenizer), m.strict), m)
    if not m.random_weights:
        raise _no_weights()
    patch_nums = m.patch_nums or VARConfig.model_fields["patch_nums"].default
    try:
        var = VARConfig(depth=m.depth or 16, num_classes=m.num_classes or 1000, patch_nums=patch_nums)
        tok = TokenizerConfig(patch_nums=tuple(patch_nums))
    except ValidationError as error:
        raise architecture_error(error, SIZE_SETTINGS) from None
    return fitting(ModelPlan(var, tok, seed=m.init_seed), m)


def fitting(plan: ModelPlan, options: CheckpointModelOptions) -> ModelPlan:
    """``plan`` after checking that its two modules fit in this machine's free memory (where they are
    built), before anything is allocated: else a one-line :class:`UsageError` naming the size
    settings ``options`` gives (or the checkpoint) and the sizes."""
    source = [setting("checkpoint", plan.model_path)] if plan.model_path else []
    flags = ", ".join(source + options.size_settings()) or "the default size"
    refuse_unfitting({"transformer": plan.model, "tokenizer": plan.tokenizer}, torch.device("cpu"), flags)
    return plan


def _raster_side(grid) -> object:
    """A one-scale schedule entry: the side of a square grid, else ``(h, w)``."""
    h, w = grid
    return h if h == w else (h, w)


def plan_raster_models(options: RasterOptions) -> ModelPlan:
    """A raster GPT and its one-scale tokenizer: from ``checkpoint`` (raster weights) and
    ``tokenizer`` (a tokenizer, run with the one-scale schedule of the GPT's token grid); or, with
    ``random_weights``, LlamaGen-B's size (12 layers, width 768) at ``patch_nums`` (one side,
    default 24: 576 tokens, 384px), ``depth`` overriding the depth, with a tokenizer of LlamaGen
    VQ-16's size (:func:`llamagen_vq16_sized`: 16384 codes)."""
    m = options
    if m.patch_nums and len(m.patch_nums) != 1:
        raise UsageError(f"{setting('patch_nums')} for a raster model is one grid side (e.g. 24), got "
                         f"{len(m.patch_nums)} scales")
    side = m.patch_nums[0] if m.patch_nums else None
    grid = None if side is None else ((side, side) if isinstance(side, int) else tuple(side))
    if m.checkpoint or m.tokenizer:
        _both_files(m, "the raster GPT")
        tok_meta = check_weights_kind(m.tokenizer, "tokenizer", TOKENIZER_USE)
        if grid is None and tok_meta and tok_meta.get("patch_nums") and not weights_metadata(m.checkpoint):
            last = tok_meta["patch_nums"][-1]  # a LlamaGen file does not say its grid; our tokenizer's metadata does
            grid = (last, last) if isinstance(last, int) else tuple(last)
        gpt = raster_architecture(m.checkpoint, grid=grid, depth=m.depth, num_classes=m.num_classes,
                                  num_heads=m.num_heads, strict=m.strict)
        vq_shapes = None if tok_meta else read_state_shapes(m.tokenizer)
        if vq_shapes is not None and is_llamagen_vq_state(vq_shapes):
            tok = llamagen_vq_architecture(m.tokenizer, vq_shapes)
        else:
            tok = tokenizer_architecture(m.tokenizer, (_raster_side(gpt.grid),), strict=m.strict,
                                         final_only=True, model_path=m.checkpoint)
        _check_vocab(tok, gpt.vocab_size, None, (m.tokenizer, m.checkpoint))
        return fitting(ModelPlan(gpt, tok, Path(m.checkpoint), Path(m.tokenizer), m.strict), m)
    if not m.random_weights:
        raise _no_weights()
    grid = grid or (24, 24)
    try:
        tok = llamagen_vq16_sized(grid)
        overrides = {"grid": grid, "vocab_size": tok.vocab_size, "num_classes": m.num_classes or 1000}
        if m.depth:
            overrides["depth"] = m.depth
        if m.num_heads:
            overrides["heads"] = m.num_heads
        gpt = RasterGPTConfig.llamagen_b(**overrides)
    except ValidationError as error:
        raise architecture_error(error, SIZE_SETTINGS) from None
    return fitting(ModelPlan(gpt, tok, seed=m.init_seed), m)


# -- building --------------------------------------------------------------------------------------
def _load(make_model: Callable[[], torch.nn.Module], path: Path, strict: bool, derived) -> torch.nn.Module:
    """``make_model()`` with the weights of ``path``, read and checked (NaN, inf) before the model is made."""
    state = read_state_dict(path)
    check_finite({key: value for key, value in state.items() if key not in set(derived)}, str(path))
    model = make_model()
    load_into(model, state, source=str(path), strict=strict, derived=derived)
    return model


def build_var_plan(plan: ModelPlan) -> tuple[VAR, MultiScaleVQVAE]:
    """The models of a :func:`plan_var_models` plan."""
    if plan.model_path is None:
        torch.manual_seed(plan.seed)
        return VAR(plan.model), MultiScaleVQVAE(plan.tokenizer)
    return (_load(lambda: VAR(plan.model), plan.model_path, plan.strict, DERIVED_VAR_BUFFERS),
            _load(lambda: MultiScaleVQVAE(plan.tokenizer), plan.tokenizer_path, plan.strict, DERIVED_TOKENIZER_BUFFERS))


def make_tokenizer(config: TokenizerConfig | LlamaGenVQConfig) -> MultiScaleVQVAE | LlamaGenVQ:
    """The (untrained) tokenizer module of ``config``: LlamaGen's VQ or a multi-scale VQ-VAE."""
    return LlamaGenVQ(config) if isinstance(config, LlamaGenVQConfig) else MultiScaleVQVAE(config)


def build_raster_plan(plan: ModelPlan) -> tuple[RasterGPT, MultiScaleVQVAE | LlamaGenVQ]:
    """The models of a :func:`plan_raster_models` plan (random: the tokenizer is drawn first)."""
    if plan.model_path is None:
        torch.manual_seed(plan.seed)
        tokenizer = MultiScaleVQVAE(plan.tokenizer)
        return RasterGPT(plan.model), tokenizer
    derived = () if isinstance(plan.tokenizer, LlamaGenVQConfig) else DERIVED_TOKENIZER_BUFFERS
    return (_load(lambda: RasterGPT(plan.model), plan.model_path, plan.strict, DERIVED_RASTER_BUFFERS),
            _load(lambda: make_tokenizer(plan.tokenizer), plan.tokenizer_path, plan.strict, derived))


def build_models(options: VarOptions | RasterOptions) -> tuple[VAR | RasterGPT, MultiScaleVQVAE | LlamaGenVQ]:
    """The models ``options`` name: a VAR and its tokenizer, or (:class:`RasterOptions`) a raster GPT
    and its tokenizer."""
    if isinstance(options, RasterOptions):
        return build_raster_plan(plan_raster_models(options))
    return build_var_plan(plan_var_models(options))


def load_var(path: Path, *, depth: int | None = None, patch_nums=None, num_classes: int | None = None,
             strict: bool = True) -> VAR:
    """A VAR from any supported checkpoint layout (architecture from metadata or shapes)."""
    config = var_architecture(path, depth=depth, patch_nums=patch_nums, num_classes=num_classes, strict=strict)
    return _load(lambda: VAR(config), Path(path), strict, DERIVED_VAR_BUFFERS)


def load_tokenizer(path: Path, patch_nums, strict: bool = True) -> MultiScaleVQVAE:
    """A multi-scale tokenizer run with ``patch_nums``."""
    config = tokenizer_architecture(path, patch_nums, strict=strict)
    return _load(lambda: MultiScaleVQVAE(config), Path(path), strict, DERIVED_TOKENIZER_BUFFERS)


def load_raster(path: Path, *, grid: tuple[int, int] | None = None, depth: int | None = None,
                num_classes: int | None = None, num_heads: int | None = None, strict: bool = True) -> RasterGPT:
    """A raster GPT from our export or a LlamaGen c2i file (see :func:`raster_architecture`)."""
    config = raster_architecture(path, grid=grid, depth=depth, num_classes=num_classes, num_heads=num_heads,
                                 strict=strict)
    return _load(lambda: RasterGPT(config), Path(path), strict, DERIVED_RASTER_BUFFERS)


def save_var(model: VAR, path: str | Path) -> Path:
    """Flat state dict (the released layout, mask buffers included) as .pth or .safetensors."""
    return save_state_dict(model.state_dict(), path)

