"""Writing images: a grid (one row per label; PNG, JPEG or WebP by its suffix) and one PNG per
image, atomically."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.files import save_marked_image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [0, 1] -> uint8 ``[N, H, W, 3]``."""
    return (images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def grid_array(images: torch.Tensor, rows: int, pad: int = 2) -> np.ndarray:
    """Tile ``N`` images into ``rows`` rows (``ceil(N / rows)`` columns) with ``pad`` white pixels."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    rows = max(1, min(rows, n))
    cols = -(-n // rows)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top:top + h, left:left + w] = pixels[i]
    return canvas


def save_png(array: np.ndarray, path: Path) -> Path:
    """``array``: uint8 ``[H, W, 3]``, written to ``path`` as PNG atomically."""
    return save_marked_image(Image.fromarray(array), path, format="PNG")


GRID_FORMATS = {".png": ("PNG", {}), ".jpg": ("JPEG", {"quality": 95}), ".jpeg": ("JPEG", {"quality": 95}),
                ".webp": ("WEBP", {"lossless": True})}
"""Grid file suffix -> (Pillow format, save options): PNG and lossless WebP keep every pixel, JPEG
at quality 95."""


def save_grid(images: torch.Tensor, rows: int, path: str | Path) -> Path:
    """The grid of ``images`` (``[N, 3, H, W]`` in [0, 1]) in the format of ``path``'s suffix
    (:data:`GRID_FORMATS`; anything else is written as PNG), atomically."""
    path = Path(path)
    image_format, options = GRID_FORMATS.get(path.suffix.lower(), GRID_FORMATS[".png"])
    array = grid_array(images, rows)
    return save_marked_image(Image.fromarray(array), path, format=image_format, **options)


PER_IMAGE_NAME = re.compile(r"\d{4,}_class\d+\.png")
"""The names :func:`save_images` gives."""


def per_image_files(folder: str | Path) -> list[Path]:
    """The files in ``folder`` that :func:`save_images` might replace (its names)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if PER_IMAGE_NAME.fullmatch(p.name)) if folder.is_dir() else []


def save_images(images: torch.Tensor, labels: torch.Tensor, folder: str | Path) -> list[Path]:
    """One PNG per image: ``folder/{index:04d}_class{label}.png``."""
    folder = Path(folder)
    return [save_png(pixels, folder / f"{i:04d}_class{int(label)}.png") for i, (pixels, label) in
            enumerate(zip(to_uint8(images), labels))]
