"""The embedded default models: digits weights shipped inside the package (``core/weights/``).

Each trajectory has its own transformer trained by the project's own commands (see
``core/weights/MODEL_CARD.md`` for the exact commands, data, steps and losses): ``full`` -> VAR
(full, dense), ``markov`` -> MVAR (markov, neighbourhood), both on one multi-scale tokenizer;
``raster`` -> a LlamaGen-style GPT on its own one-scale (8x8) tokenizer. A run that names no
checkpoint uses the default of its trajectory.

Weights exported by ``mvar-engine train`` carry ``mvar_engine`` metadata (architecture, schedule,
classes, the attention pattern and options they were trained with); :func:`mvar_engine.apps.pipeline.recommended_choices`
turns it into component settings that a run uses unless the user overrides them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import read_weights_metadata

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Where the shipped safetensors files live (installed as package data)."""

TOKENIZER_FILE = "tokenizer-digits.safetensors"
"""The multi-scale tokenizer of the next-scale defaults."""

DEFAULT_TRANSFORMERS: dict[str, str] = {
    "full": "var-digits.safetensors",
    "markov": "mvar-digits.safetensors",
    "raster": "raster-digits.safetensors",
}
"""Trajectory name -> shipped transformer weights."""

DEFAULT_TOKENIZERS: dict[str, str] = {
    "raster": "tokenizer-raster-digits.safetensors",
}
"""Trajectory name -> shipped tokenizer, where it is not :data:`TOKENIZER_FILE`. The raster GPT has
its own one-scale tokenizer: the multi-scale one, run as one 8x8 scale, reconstructs the held-out
digits at 23.7 dB PSNR (classifier-feature FD 121) against 31.4 dB (FD 12.4) for a tokenizer
trained with that one scale (model card)."""


def tokenizer_file(trajectory: str) -> str:
    """The shipped tokenizer's file name for ``trajectory``."""
    return DEFAULT_TOKENIZERS.get(trajectory, TOKENIZER_FILE)


def default_checkpoints(trajectory: str) -> tuple[Path, Path] | None:
    """``(transformer, tokenizer)`` shipped for ``trajectory``, or None when there is none (or the
    files are missing from this installation)."""
    name = DEFAULT_TRANSFORMERS.get(trajectory)
    if name is None:
        return None
    var, tok = WEIGHTS_DIR / name, WEIGHTS_DIR / tokenizer_file(trajectory)
    return (var, tok) if var.is_file() and tok.is_file() else None


def available_defaults() -> list[str]:
    """Trajectories that have shipped weights in this installation."""
    return [t for t in DEFAULT_TRANSFORMERS if default_checkpoints(t) is not None]


def weights_metadata(path: str | Path) -> dict[str, Any] | None:
    """The ``mvar_engine`` metadata of a weights file (None for files without it, e.g. VAR's releases)."""
    return read_weights_metadata(path)
