"""What ``Pipeline.from_pretrained(name_or_path, ...)`` loads: a shipped model by name, or a local file
or folder of any family, turned into the :class:`~.config.EngineConfig` the CLI would build.

- ``digits-var``, ``digits-mvar``, ``digits-raster``: the weights that ship inside the package (VAR on
  ``full``, MVAR on ``markov``, the raster GPT), with their tokenizers;
- a weights file: ours (its metadata names its kind, trajectory and tokenizer file), VAR's or MVAR's
  official ``.pth`` (any of their layouts; ``trajectory`` default ``full``, ``markov`` for MVAR's
  nesting), LlamaGen's c2i ``.pt`` (raster; give its ``patch_nums``: 16 at 256 px, 24 at 384 px);
  ``tokenizer=`` names the tokenizer file where the weights do not;
- a folder: a Hugging Face model directory in transformers' layout (Janus-Pro), on ``raster``.

- a Hugging Face Hub id (``FoundationVision/var`` with ``variant="d16"``, ...: :mod:`.hub`), downloaded
  into the user's cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.errors import UsageError, setting
from ..models.checkpoint import read_state_shapes, read_weights_metadata
from ..models.default_models import default_checkpoints
from .config import EngineConfig
from .hub import looks_like_hub_id, pretrained_from_hub

SHIPPED = {"digits-var": "full", "digits-mvar": "markov", "digits-raster": "raster"}
"""Shipped model name -> the trajectory whose default weights it is."""


def shipped_names() -> str:
    return ", ".join(sorted(SHIPPED))


def official_trajectory(path: Path) -> str:
    """The trajectory an official file runs on by default: ``raster`` for a LlamaGen GPT, ``markov``
    for MVAR's ``mvar_wo_ddp`` nesting, else ``full`` (VAR). One-line error for anything else."""
    keys = set(read_state_shapes(path))
    if "tok_embeddings.weight" in keys or any(k.startswith("layers.") for k in keys):
        return "raster"
    if "pos_1LC" in keys or any(k.startswith("blocks.") for k in keys):
        try:
            top = torch.load(path, map_location="meta", weights_only=True, mmap=True)
        except Exception:  # a format torch.load refuses: the VAR family's default
            top = {}
        return "markov" if isinstance(top, dict) and "mvar_wo_ddp" in top else "full"
    raise UsageError(f"{path} holds neither VAR/MVAR nor LlamaGen GPT weights (give one of those, a model folder, "
                     f"or a shipped name: {shipped_names()})")


def file_trajectory(path: Path) -> str:
    """The trajectory a weights file runs on unless told otherwise: the one our metadata records
    (``raster`` for a raster GPT), else :func:`official_trajectory`."""
    meta = read_weights_metadata(path) if path.suffix == ".safetensors" else None
    kind = (meta or {}).get("kind")
    if kind == "tokenizer":
        raise UsageError(f"{path} holds tokenizer weights: give the model's weights, and this file as the tokenizer")
    if meta and kind == "raster":
        return "raster"
    if meta and kind == "var":
        return (meta.get("trajectory") or {}).get("name") or "markov"
    return official_trajectory(path)


def pretrained_config(name_or_path: str | Path, *, tokenizer: str | Path | None = None, trajectory: str | None = None,
                      variant: str | None = None, **settings: Any) -> EngineConfig:
    """The run of ``name_or_path`` (module docstring) with ``settings`` (any :class:`EngineConfig`
    field: ``attention``, ``cache``, ``backend``, ``device``, ``dtype``, ``batch_size``, ``sampling``,
    ``model`` options such as ``patch_nums`` or ``num_heads``, and its ``name``). One-line :class:`UsageError` for a name
    or file it cannot load."""
    text = str(name_or_path)
    model: dict[str, Any] = dict(settings.pop("model", {}) or {})
    if variant is not None and not looks_like_hub_id(text):
        raise UsageError(f"{setting('variant', variant)} picks a file of a Hub repository; {text} is not a Hub id")
    if text in SHIPPED:
        found = default_checkpoints(SHIPPED[text])
        if tokenizer is not None:
            raise UsageError(f"{text} ships with its tokenizer: drop tokenizer=")
        model.update(checkpoint=str(found[0]), tokenizer=str(found[1]))
        trajectory = trajectory or SHIPPED[text]
    else:
        path = Path(text)
        if path.is_dir():
            model["model_dir"] = str(path)
            trajectory = trajectory or "raster"
        elif path.is_file():
            trajectory = trajectory or file_trajectory(path)
            meta = read_weights_metadata(path) if path.suffix == ".safetensors" else None
            recorded = Path(str(((meta or {}).get("tokenizer") or {}).get("path", "")))
            if tokenizer is None and recorded.is_file():
                tokenizer = recorded
            if tokenizer is None:
                raise UsageError(f"{path}: give its tokenizer file as tokenizer= (VAR's vae_ch160v4096z32.pth, "
                                 f"LlamaGen's vq_ds16_c2i.pt, or a train-tokenizer run's tokenizer.safetensors)")
            model.update(checkpoint=str(path), tokenizer=str(tokenizer))
        elif looks_like_hub_id(text):
            if tokenizer is not None:
                raise UsageError(f"{text} brings its own tokenizer from the Hub: drop tokenizer=")
            known, options = pretrained_from_hub(text, variant)
            model = {"name": known.family, **options, **model}
            trajectory = trajectory or known.trajectory
        else:
            raise UsageError(f"{text}: no such file or folder, and not a shipped model ({shipped_names()})")
    return EngineConfig.model_validate({**settings, "trajectory": trajectory or "markov", "model": model,
                                        "progress": settings.get("progress", False)})
