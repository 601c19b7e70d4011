"""Labelled image datasets for training and evaluation.

Every dataset becomes an :class:`ImageSet`: ``images [N, 3, R, R]`` float32 in ``[-1, 1]`` (the
tokenizer's input range), ``labels [N]`` int64 in ``0 .. C-1`` and the class names. Two sources:

- ``digits`` (the default): scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes,
  ships offline), ink as white on black, upsampled bicubically to ``R x R`` and repeated over RGB;
- a folder with one subfolder per class (``--data PATH``), each image centre-cropped to a square
  and resized to ``R x R``.

Splits are deterministic and stratified: ``heldout`` takes ``heldout_fraction`` of every class
(at least one image per class), ``train`` the rest, ``all`` everything.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import UsageError

Split = Literal["train", "heldout", "all"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(UsageError):
    """A dataset that cannot be read (no images, an unreadable file, a bad resolution)."""


@dataclass(frozen=True)
class ImageSet:
    """``images [N, 3, R, R]`` in [-1, 1], ``labels [N]`` (int64), ``class_names[c]`` for label c."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names, self.source)


def split_indices(labels: np.ndarray, split: Split, heldout_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Indices of ``split``: a seeded per-class shuffle; the first ``ceil(fraction * n_c)`` go to heldout."""
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        cut = max(1, int(np.ceil(heldout_fraction * len(members)))) if len(members) > 1 else 0
        chosen.append(members[:cut] if split == "heldout" else members[cut:])
    return np.sort(np.concatenate(chosen))


def _check_resolution(resolution: int) -> None:
    if resolution < 8:
        raise DataError(f"image resolution must be at least 8 pixels, got {resolution} (use --resolution 32)")


def load_digits_set(resolution: int = 32, split: Split = "train", *, heldout_fraction: float = 0.2,
                    seed: int = 0) -> ImageSet:
    """scikit-learn's digits at ``resolution`` (see the module docstring)."""
    _check_resolution(resolution)
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("the digits dataset needs scikit-learn (pip install scikit-learn)") from exc
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    index = split_indices(labels, split, heldout_fraction, seed)
    small = torch.from_numpy(digits.images[index].astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8], ink = 1
    images = F.interpolate(small, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True)
    images = images.clamp(0, 1).repeat(1, 3, 1, 1) * 2 - 1
    return ImageSet(images.contiguous(), torch.from_numpy(labels[index]), tuple(str(d) for d in range(10)), "digits")


def open_rgb(file: Path):
    """``file`` decoded as an RGB ``PIL.Image``. An unreadable file or one beyond pillow's
    decompression-bomb limit is a one-line :class:`DataError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as im:
                return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"--data: image {file} is too large to decode safely ({exc.__class__.__name__}: more than "
                        f"{Image.MAX_IMAGE_PIXELS} pixels); shrink it or remove it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"--data: cannot read image {file}: {exc.__class__.__name__} (remove or fix the file)") from None


def pil_to_tensor(im) -> torch.Tensor:
    """An RGB ``PIL.Image`` as ``[3, H, W]`` float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1


def read_square_image(file: Path, resolution: int) -> torch.Tensor:
    """``file`` centre-cropped to a square and resized bicubically: ``[3, R, R]`` float32 in [-1, 1]
    (errors as :func:`open_rgb`)."""
    from PIL import Image

    im = open_rgb(file)
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return pil_to_tensor(im)


@dataclass(frozen=True)
class ImageFolderListing:
    """A class-per-subfolder image folder's files, not yet read: ``files[i]`` has label ``labels[i]``
    (int64 ``[N]``, the index of its subfolder in ``class_names``, sorted by name)."""

    root: Path
    files: tuple[Path, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)


def list_image_folder(path: str | Path) -> ImageFolderListing:
    """The files of a folder with one subfolder of images per class (class names = subfolder names,
    sorted; files sorted within a class). Reads no image; a missing folder, a folder without class
    subfolders or images, or an empty class is a one-line :class:`DataError`."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"--data {path}: not a folder (give a folder with one subfolder of images per class, or 'digits')")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    members = {folder: [f for f in sorted(folder.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
               for folder in classes}
    if not any(members.values()):
        loose = any(f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES for f in root.iterdir())
        where = " (its images lie directly in it: move them into one subfolder per class)" if loose else ""
        raise DataError(f"--data {path}: no images found{where} (expected {path}/<class>/<image>{IMAGE_SUFFIXES[0]}, "
                        f"suffixes {', '.join(IMAGE_SUFFIXES)})")
    empty = [folder.name for folder in classes if not members[folder]]
    if empty:
        raise DataError(f"--data {path}: class folder {empty[0]!r} holds no images (every subfolder is a class; "
                        f"add images to it or remove it)")
    files = tuple(f for folder in classes for f in members[folder])
    labels = np.array([c for c, folder in enumerate(classes) for _ in members[folder]], dtype=np.int64)
    return ImageFolderListing(root, files, labels, tuple(c.name for c in classes))


def load_image_folder(path: str | Path, resolution: int, split: Split = "all", *, heldout_fraction: float = 0.2,
                      seed: int = 0) -> ImageSet:
    """A folder with one subfolder of images per class, read into memory (evaluation's real images;
    training streams folders instead, :mod:`mvar_engine.apps.training.image_stream`)."""
    _check_resolution(resolution)
    listing = list_image_folder(path)
    index = split_indices(listing.labels, split, heldout_fraction, seed)
    images = [read_square_image(listing.files[i], resolution) for i in index]
    return ImageSet(torch.stack(images), torch.from_numpy(listing.labels[index]), listing.class_names, str(listing.root))


def load_dataset(data: str | None, resolution: int, split: Split = "train", *, heldout_fraction: float = 0.2,
                 seed: int = 0) -> ImageSet:
    """``data`` None or ``"digits"``: the digits; anything else: a class-per-subfolder image folder."""
    if data is not None and not str(data).strip():
        raise DataError("--data is empty: give 'digits' or a folder with one subfolder of images per class")
    if data in (None, "digits"):
        return load_digits_set(resolution, split, heldout_fraction=heldout_fraction, seed=seed)
    return load_image_folder(data, resolution, split, heldout_fraction=heldout_fraction, seed=seed)
