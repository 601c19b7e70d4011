"""From an :class:`EngineConfig` to images on disk: resolve components, build or load the models,
generate in batches, decode, write the grid (and per-image PNGs and tokens).

Python API::

    from mvar_engine.apps.config import EngineConfig
    from mvar_engine.apps.pipeline import Pipeline
    pipe = Pipeline.from_config(EngineConfig(trajectory="markov", model={"var_checkpoint": ..., "vae_checkpoint": ...}))
    result = pipe.generate(labels=[1, 7], samples_per_label=4)   # result.images: [N, 3, H, W] in [0, 1]
    pipe.save(result, "grid.png")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..core.adapter import ModelFamily
from ..core.backend_selection import BackendSelector, selector_for
from ..core.cache import CachePolicy
from ..core.compatibility import check_compatible
from ..core.engine import Engine
from ..core.errors import CheckpointError, IncompatibleComponentsError, UsageError
from ..core.registry import Registry, get_registry
from ..models.checkpoint import atomic_write, load_into, read_state_dict, save_state_dict
from ..models.default_models import available_defaults, default_checkpoints, weights_metadata
from ..models.raster_gpt import RasterGPT, RasterGPTConfig, infer_raster_config
from ..models.tokenizer import MultiScaleVQVAE, TokenizerConfig, llamagen_vq16_sized
from ..models.var import VAR, VARConfig, infer_var_config
from .cli_helpers import PROG
from .config import ComponentChoice, EngineConfig
from .images import save_grid, save_images

DERIVED_VAR_BUFFERS = ("lvl_1L", "attn_bias_for_masking")


@dataclass
class Components:
    """The resolved components and the names they were chosen by."""

    names: dict[str, str]
    trajectory: object
    pattern: object
    cache: object
    backends: BackendSelector
    model: ModelFamily | None = None


def resolve_components(config: EngineConfig, registry: Registry | None = None) -> Components:
    """Names -> validated, compatible component instances (errors are one line each)."""
    registry = registry or get_registry()
    trajectory = registry.create("trajectory", config.trajectory.name, config.trajectory.options)
    attention = config.attention or _default_choice(trajectory.default_attention)
    cache_choice = config.cache or _default_choice(trajectory.default_cache)
    names = {"trajectory": registry.get("trajectory", config.trajectory.name).name,
             "attention": registry.get("attention", attention.name).name,
             "cache": registry.get("cache", cache_choice.name).name}
    if trajectory.family not in ("next-scale", "next-token"):
        raise IncompatibleComponentsError(f"trajectory '{names['trajectory']}' is a {trajectory.family} trajectory; "
                                          f"this command runs next-scale and next-token models")
    pattern = registry.create("attention", attention.name, attention.options)
    names["model"] = choose_model(config, trajectory.family, registry)
    model = registry.create("model", names["model"], {})
    cache = registry.create("cache", cache_choice.name, cache_choice.options)
    check_compatible(trajectory, pattern, cache, model_family=model.family, names=names)
    for kind, component in (("attention", pattern), ("cache", cache)):
        availability = registry.get(kind, names[kind]).availability
        if not availability.ok:
            raise UsageError(f"{kind} '{names[kind]}' is unavailable: {availability.reason}")
    names["backend"] = config.backend.name
    return Components(names, trajectory, pattern, cache, build_backends(config, registry), model)


def choose_model(config: EngineConfig, family: str, registry: Registry) -> str:
    """The model family a run uses: ``--model-adapter NAME``, else the first registered (built-ins
    register first) that serves the trajectory's ``family``."""
    if config.model.adapter:
        return registry.get("model", config.model.adapter).name
    serving = [entry.name for entry in registry.components("model") if getattr(entry.record, "family", None) == family]
    if not serving:
        raise IncompatibleComponentsError(f"no installed model adapter generates {family} sequences "
                                          f"(see '{PROG} plugins --kind model')")
    return serving[0]


def build_backends(config: EngineConfig, registry: Registry) -> BackendSelector:
    return selector_for(config.backend.name, config.backend.options, registry)


def _default_choice(name: str) -> ComponentChoice:
    return ComponentChoice(name=name)


def available_devices() -> list[str]:
    """The ``--device`` values this machine can run: auto, cpu, cuda and cuda:N per GPU, mps."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str) -> torch.device:
    """``--device`` -> a torch device; a device this machine lacks (or a name torch does not know)
    is a one-line ``UsageError`` listing the available ones."""
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = available_devices()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: not a device name (available here: {', '.join(have)})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available (available here: {', '.join(have)}; "
                         f"use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(available here: {', '.join(have)})")
    if device.type == "cpu" and device.index not in (None, 0):
        raise UsageError(f"--device {name}: use --device cpu (available here: {', '.join(have)})")
    if device.type not in ("cpu", "cuda") and device.type not in have:
        raise UsageError(f"--device {name}: unavailable on this machine (available here: {', '.join(have)})")
    return device


def resolve_autocast(dtype: str, device: torch.device) -> torch.dtype | None:
    if dtype == "float32":
        return None
    if device.type != "cuda":
        raise UsageError(f"--dtype {dtype} (autocast) is supported on CUDA only; use --dtype float32 on {device.type}")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


# -- models ----------------------------------------------------------------------------------------
def recommended_choices(config: EngineConfig, metadata: dict[str, Any] | None) -> EngineConfig:
    """``config`` with the attention pattern's options taken from the weights' metadata when the run
    uses the same pattern and set none itself (explicit options always win)."""
    if not metadata:
        return config
    trained = metadata.get("attention") or {}
    chosen = config.attention
    if not trained.get("name") or not trained.get("options"):
        return config
    if chosen is None:
        if (metadata.get("trajectory") or {}).get("name") != config.trajectory.name:
            return config
        chosen = ComponentChoice(name=trained["name"])
    if chosen.name != trained["name"] or chosen.options:
        return config
    return config.model_copy(update={"attention": ComponentChoice(name=chosen.name, options=dict(trained["options"]))})


def with_weights(config: EngineConfig) -> EngineConfig:
    """``config`` with the shipped default checkpoints of its trajectory filled in when it names none
    (and asks for no random weights), and the pattern options the weights were trained with (from
    their metadata) where the run sets none."""
    m = config.model
    if not (m.var_checkpoint or m.vae_checkpoint or m.random_weights):
        found = default_checkpoints(config.trajectory.name)
        if found is None:
            return config  # build_models explains
        config = config.model_copy(update={"model": m.model_copy(update={"var_checkpoint": str(found[0]),
                                                                          "vae_checkpoint": str(found[1])})})
    if config.model.var_checkpoint and config.model.vae_checkpoint:
        config = recommended_choices(config, weights_metadata(config.model.var_checkpoint))
    return config


def _architecture(path, config_type):
    """The config of ``config_type`` stored in a weights file's metadata, or None."""
    meta = weights_metadata(path)
    arch = (meta or {}).get("architecture")
    if not arch:
        return None
    try:
        return config_type(**arch)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its metadata's architecture is invalid ({' '.join(str(error).split())[:200]})") from None


def load_var(path: Path, *, depth: int | None = None, patch_nums=None, num_classes: int | None = None,
             strict: bool = True) -> VAR:
    """A VAR from any supported checkpoint layout; the architecture comes from the file's metadata
    when it has some (our exports), else it is read off the tensor shapes."""
    _check_kind(path, "var", "next-scale trajectories (full, markov) run VAR/MVAR weights; run raster GPT weights "
                             "with --trajectory raster")
    state = read_state_dict(path)
    try:
        config = _architecture(path, VARConfig) or infer_var_config(state, depth=depth, patch_nums=patch_nums,
                                                                     num_classes=num_classes)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: {error.args[0] if error.args else error}") from None
    model = VAR(config)
    load_into(model, state, source=str(path), strict=strict, derived=DERIVED_VAR_BUFFERS)
    return model


def infer_tokenizer_config(state: dict[str, torch.Tensor], patch_nums) -> TokenizerConfig:
    """Tokenizer architecture read off its state dict (channels, ch_mult, blocks, vocabulary, phis)."""
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


def load_tokenizer(path: Path, patch_nums, strict: bool = True) -> MultiScaleVQVAE:
    state = read_state_dict(path)
    try:
        stored = _architecture(path, TokenizerConfig)
        config = (stored.model_copy(update={"patch_nums": tuple(patch_nums)}) if stored is not None
                  else infer_tokenizer_config(state, patch_nums))
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: {error.args[0] if error.args else error}") from None
    model = MultiScaleVQVAE(config)
    load_into(model, state, source=str(path), strict=strict, derived=("quantize.ema_vocab_hit_SV",))
    return model


def save_var(model: VAR, path: str | Path) -> Path:
    """Flat state dict (the released layout, mask buffers included) as .pth or .safetensors."""
    return save_state_dict(model.state_dict(), path)


@dataclass
class GenerationResult:
    """``images: [N, 3, H, W]`` in [0, 1]; ``labels: [N]``; ``tokens[s]: LongTensor[N, l_s]``."""

    images: torch.Tensor
    labels: torch.Tensor
    tokens: list[torch.Tensor]
    rows: int
    cache_peak_bytes: int = 0
    backends_used: dict[str, str] = field(default_factory=dict)


class Pipeline:
    """A ready-to-run engine plus the run settings of an :class:`EngineConfig`."""

    def __init__(self, config: EngineConfig, model: VAR, tokenizer: MultiScaleVQVAE, components: Components,
                 device: torch.device) -> None:
        self.config, self.model, self.tokenizer, self.components, self.device = config, model, tokenizer, components, device
        autocast = resolve_autocast(config.dtype, device)
        self.adapter = components.model.adapter(model, tokenizer)
        self.engine = Engine(self.adapter, components.trajectory, components.pattern, components.backends,
                             autocast_dtype=autocast)
        self.engine.check(components.cache, components.names)

    @classmethod
    def from_config(cls, config: EngineConfig, registry: Registry | None = None) -> "Pipeline":
        config = with_weights(config)
        components = resolve_components(config, registry)
        device = resolve_device(config.device)
        model, tokenizer = components.model.build(config)
        tokenizer = None if tokenizer is None else tokenizer.to(device).eval()
        return cls(config, model.to(device).eval(), tokenizer, components, device)

    def default_labels(self) -> list[int]:
        return list(range(min(self.adapter.num_classes, 10)))

    def generate(self, labels: Sequence[int] | None = None, samples_per_label: int | None = None,
                 cache: CachePolicy | None = None) -> GenerationResult:
        """Images for ``labels`` (default: the config's), with the config's cache or ``cache``."""
        cfg = self.config
        cache = cache or self.components.cache
        labels = list(labels if labels is not None else (cfg.labels if cfg.labels is not None else self.default_labels()))
        bad = [label for label in labels if not 0 <= label < self.adapter.num_classes]
        if bad:
            raise UsageError(f"--labels {bad}: this model has classes 0..{self.adapter.num_classes - 1}")
        per = samples_per_label or cfg.samples_per_label
        all_labels = torch.tensor([label for label in labels for _ in range(per)], dtype=torch.long)
        generator = torch.Generator(device=self.device).manual_seed(cfg.sampling.seed)
        images, tokens, peak = [], [], 0
        chunks = list(torch.split(all_labels, cfg.batch_size))
        steps, unit = len(self.engine.steps), self.components.trajectory.step_unit
        bar = tqdm(total=len(chunks) * steps, desc=f"{unit}s", unit=unit, disable=not cfg.progress, leave=False)
        for chunk in chunks:
            out = self.engine.generate(chunk.to(self.device), cache, cfg=cfg.sampling.cfg, top_k=cfg.sampling.top_k,
                                       top_p=cfg.sampling.top_p, generator=generator, progress=lambda s: bar.update(1))
            peak = max(peak, out.cache_peak_bytes)
            with torch.no_grad():
                pixels = self.adapter.decode(out)
                images.append(pixels.add(1).mul(0.5).clamp(0, 1).cpu())
            tokens.append([t.cpu() for t in self.adapter.token_maps(out)])
        bar.close()
        per_scale = [torch.cat([chunk[s] for chunk in tokens]) for s in range(len(tokens[0]))]
        return GenerationResult(torch.cat(images), all_labels, per_scale, rows=len(labels), cache_peak_bytes=peak,
                                backends_used=dict(self.components.backends.used))

    def save(self, result: GenerationResult, output: str | Path | None = None) -> list[Path]:
        """Write the grid (one row per label), optional per-image PNGs and tokens; returns the paths."""
        out_cfg = self.config.output
        grid_path = Path(output or out_cfg.output)
        # --output /dev/null discards the grid (never replace the device file)
        written = [grid_path if str(grid_path) == os.devnull else save_grid(result.images, result.rows, grid_path)]
        if out_cfg.per_image:
            written += save_images(result.images, result.labels, grid_path.with_suffix(""))
        if out_cfg.save_tokens:
            written.append(save_tokens(result, self.model, out_cfg.save_tokens))
        return written


def save_tokens(result: GenerationResult, model: VAR, path: str | Path) -> Path:
    """Per-scale token indices: ``tokens.{s}: LongTensor[N, h_s * w_s]``, ``labels: [N]``, ``grids: [S, 2]``."""
    state = {f"tokens.{s}": t for s, t in enumerate(result.tokens)}
    state["labels"] = result.labels
    state["grids"] = torch.tensor(model.layout.grids)
    path = Path(path)
    if path.suffix == ".safetensors":
        return save_state_dict(state, path)
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


DERIVED_RASTER_BUFFERS = ("freqs_cis",)
"""Raster GPT buffers recomputed from the config, never read (LlamaGen's checkpoints lack them too)."""


def _check_kind(path, expected: str, use: str) -> dict | None:
    """The weights' metadata, after checking that it (when present) says ``kind == expected``; else a
    one-line error naming what the file holds and ``use`` (how to run it)."""
    meta = weights_metadata(path)
    kind = (meta or {}).get("kind")
    if kind is not None and kind != expected:
        family = (meta or {}).get("family") or {"var": "next-scale", "raster": "next-token"}.get(kind)
        raise CheckpointError(f"{path} holds {kind} weights{f' ({family})' if family else ''}, not {expected} "
                              f"weights; {use}")
    return meta


def _raster_side(grid) -> object:
    """A one-scale schedule entry: the side of a square grid, else ``(h, w)``."""
    h, w = grid
    return h if h == w else (h, w)


def load_raster(path: Path, *, grid: tuple[int, int] | None = None, depth: int | None = None,
                num_classes: int | None = None, strict: bool = True) -> "RasterGPT":
    """A raster GPT from our ``model.safetensors`` (architecture from its metadata) or a LlamaGen c2i
    state dict (flat, or nested under ``model`` / ``module`` / ``state_dict`` as LlamaGen's released
    and training checkpoints are; architecture read off the shapes, ``grid`` required since the file
    does not hold it). Strict loading reports every missing, unexpected and mis-shaped key on one line."""

    meta = _check_kind(path, "raster", "--trajectory raster runs raster GPT weights (mvar-engine train --trajectory "
                                       "raster, or LlamaGen's c2i GPT checkpoints); run next-scale weights with "
                                       "--trajectory full or markov")
    state = read_state_dict(path)
    config = _architecture(path, RasterGPTConfig) if meta else None
    if config is not None:
        if grid is not None and tuple(grid) != tuple(config.grid):
            raise UsageError(f"--patch-nums {grid[0] if grid[0] == grid[1] else grid}: {path} was trained on a "
                             f"{config.grid[0]}x{config.grid[1]} token grid (drop --patch-nums)")
    else:
        try:
            infer_raster_config(state, depth=depth, num_classes=num_classes)  # is it a LlamaGen c2i state dict?
            if grid is None:
                raise UsageError(f"{path} does not record its token grid: give it with --patch-nums SIDE (LlamaGen: "
                                 f"16 at 256px, 24 at 384px)")
            config = infer_raster_config(state, grid=tuple(grid), depth=depth, num_classes=num_classes)
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{path}: {error.args[0] if error.args else error}") from None
    model = RasterGPT(config)
    load_into(model, state, source=str(path), strict=strict, derived=DERIVED_RASTER_BUFFERS)
    return model


def build_raster_models(config: EngineConfig):
    """A raster GPT and its one-scale tokenizer: from ``--var-checkpoint`` (raster weights, see
    :func:`load_raster`) and ``--vae-checkpoint`` (a tokenizer, run with the one-scale schedule of
    the GPT's token grid); or, with ``--random-weights``, LlamaGen-B's size (12 layers, width 768)
    at ``--patch-nums`` (one side, default 24: 576 tokens, 384px), ``--depth`` overriding the depth,
    with a tokenizer of LlamaGen VQ-16's size (:func:`llamagen_vq16_sized`: 16384 codes).
    The shipped default raster weights come in through :func:`with_weights`."""

    m = config.model
    if m.patch_nums and len(m.patch_nums) != 1:
        raise UsageError(f"--patch-nums for a raster model is one grid side (e.g. 24), got {len(m.patch_nums)} scales")
    side = m.patch_nums[0] if m.patch_nums else None
    grid = None if side is None else ((side, side) if isinstance(side, int) else tuple(side))
    if m.var_checkpoint or m.vae_checkpoint:
        if not (m.var_checkpoint and m.vae_checkpoint):
            raise UsageError("give both --var-checkpoint (the raster GPT) and --vae-checkpoint (its tokenizer)")
        tok_meta = _check_kind(m.vae_checkpoint, "tokenizer", "--vae-checkpoint takes the tokenizer's weights")
        if grid is None and tok_meta and tok_meta.get("patch_nums") and not weights_metadata(m.var_checkpoint):
            last = tok_meta["patch_nums"][-1]  # a LlamaGen file does not say its grid; our tokenizer's metadata does
            grid = (last, last) if isinstance(last, int) else tuple(last)
        model = load_raster(m.var_checkpoint, grid=grid, depth=m.depth, num_classes=m.num_classes, strict=m.strict)
        tokenizer = load_tokenizer(m.vae_checkpoint, (_raster_side(model.config.grid),), strict=m.strict)
        if tokenizer.vocab_size != model.vocab_size:
            raise CheckpointError(f"tokenizer {m.vae_checkpoint} has {tokenizer.vocab_size} codes but the raster GPT "
                                  f"{m.var_checkpoint} predicts {model.vocab_size} (give the tokenizer it was trained on)")
        return model, tokenizer
    if not m.random_weights:
        have = ", ".join(available_defaults()) or "none in this installation"
        raise UsageError(f"no default weights for trajectory '{config.trajectory.name}' (shipped for: {have}); pass "
                         f"--var-checkpoint and --vae-checkpoint, or --random-weights to time a random raster model")
    grid = grid or (24, 24)
    torch.manual_seed(config.sampling.seed)
    tokenizer = MultiScaleVQVAE(llamagen_vq16_sized(grid))
    overrides = {"grid": grid, "vocab_size": tokenizer.vocab_size, "num_classes": m.num_classes or 1000}
    if m.depth:
        overrides["depth"] = m.depth
    return RasterGPT(RasterGPTConfig.llamagen_b(**overrides)), tokenizer


def build_models(config: EngineConfig, family: str = "next-scale") -> tuple[VAR, MultiScaleVQVAE]:
    """The VAR and tokenizer a config asks for: checkpoints, random weights, or the embedded default
    (``family="next-token"``: a raster GPT, see :func:`build_raster_models`)."""
    if family == "next-token":
        return build_raster_models(config)
    m = config.model
    if m.var_checkpoint or m.vae_checkpoint:
        if not (m.var_checkpoint and m.vae_checkpoint):
            raise UsageError("give both --var-checkpoint and --vae-checkpoint (the transformer and its tokenizer)")
        model = load_var(m.var_checkpoint, depth=m.depth, patch_nums=m.patch_nums, num_classes=m.num_classes, strict=m.strict)
        tokenizer = load_tokenizer(m.vae_checkpoint, model.config.patch_nums, strict=m.strict)
        _check_pair(model, tokenizer)
        return model, tokenizer
    if m.random_weights:
        torch.manual_seed(config.sampling.seed)
        patch_nums = m.patch_nums or VARConfig.model_fields["patch_nums"].default
        var_config = VARConfig(depth=m.depth or 16, num_classes=m.num_classes or 1000, patch_nums=patch_nums)
        tokenizer = MultiScaleVQVAE(TokenizerConfig(patch_nums=tuple(patch_nums)))
        return VAR(var_config), tokenizer
    have = ", ".join(available_defaults()) or "none in this installation"
    raise UsageError(f"no default weights for trajectory '{config.trajectory.name}' (shipped for: {have}); pass "
                     f"--var-checkpoint and --vae-checkpoint, or --random-weights (with --depth) to time a random model")


def _check_pair(model: VAR, tokenizer: MultiScaleVQVAE) -> None:
    tcfg = tokenizer.config
    if tcfg.vocab_size != model.vocab_size or tcfg.z_channels != model.z_channels:
        raise CheckpointError(f"tokenizer (vocabulary {tcfg.vocab_size}, Cvae {tcfg.z_channels}) does not fit the "
                              f"transformer (vocabulary {model.vocab_size}, Cvae {model.z_channels})")
