"""Image batches as ADM-compatible ``.npz`` files: ``arr_0``: uint8 ``[N, H, W, 3]`` (the array the
ADM evaluator and torch-fidelity users read), optionally ``labels``: int64 ``[N]``, and
``written_by``: what wrote the file (a 0-d unicode array).

:func:`write_npz_images` streams the images into an uncompressed zip one at a time (memory for one
image, not for 50,000), with fixed entry timestamps so that equal images give equal file bytes,
and renames it into place atomically. :func:`read_npz_images` maps ``arr_0`` from the file when it
is stored uncompressed (as ``numpy.savez`` and this module write it) instead of reading it whole,
and refuses, in one line, files that are not image batches.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..core.errors import UsageError
from ..core.files import WRITTEN_BY, atomic_write, not_a_file_reason, writer

IMAGES_KEY, LABELS_KEY = "arr_0", "labels"
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)
"""Every entry's timestamp (the zip epoch): the file's bytes depend on its contents only."""


def _array_header(shape: tuple[int, ...], descr: str) -> dict:
    return {"descr": descr, "fortran_order": False, "shape": shape}


def _entry(archive: zipfile.ZipFile, name: str):
    info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_TIMESTAMP)
    info.compress_type = zipfile.ZIP_STORED
    return archive.open(info, "w", force_zip64=True)


def write_npz_images(path: str | Path, images: Iterable[np.ndarray], count: int, height: int, width: int,
                     labels: np.ndarray | None = None) -> Path:
    """Write ``count`` images (each uint8 ``[height, width, 3]``, taken from ``images`` one at a
    time) as ``arr_0`` and ``labels`` (int64 ``[count]``) to ``path`` atomically; returns the path."""

    def write(tmp: Path) -> None:
        written = 0
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with _entry(archive, IMAGES_KEY) as handle:
                np.lib.format.write_array_header_2_0(handle, _array_header((count, height, width, 3), "|u1"))
                for image in images:
                    if image.dtype != np.uint8 or image.shape != (height, width, 3):
                        raise ValueError(f"image {written}: expected uint8 [{height}, {width}, 3], "
                                         f"got {image.dtype} {list(image.shape)}")
                    handle.write(np.ascontiguousarray(image).tobytes())
                    written += 1
            if written != count:
                raise ValueError(f"expected {count} images, got {written}")
            if labels is not None:
                array = np.ascontiguousarray(labels, dtype=np.int64)
                with _entry(archive, LABELS_KEY) as handle:
                    np.lib.format.write_array(handle, array, allow_pickle=False)
            with _entry(archive, WRITTEN_BY) as handle:  # a 0-d unicode array: loads without pickle
                np.lib.format.write_array(handle, np.array(writer()), allow_pickle=False)

    return atomic_write(path, write)


@dataclass
class NpzImages:
    """``images``: uint8 ``[N, H, W, 3]`` (read-only, possibly mapped from the file); ``labels``:
    int64 ``[N]`` or None."""

    path: Path
    images: np.ndarray
    labels: np.ndarray | None

    @property
    def resolution(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _mapped_entry(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray | None:
    """``name.npy`` of the archive mapped read-only from the file, when it is stored uncompressed."""
    info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with archive.open(info) as handle:
        version = np.lib.format.read_magic(handle)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            return None
        shape, fortran, dtype = readers[version](handle)
        header_bytes = handle.tell()
    if fortran or dtype.hasobject:
        return None
    with open(path, "rb") as raw:  # the local file header precedes the data: 30 bytes + name + extra
        raw.seek(info.header_offset)
        local = raw.read(30)
        data_start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + header_bytes, shape=shape)


def read_npz_images(path: str | Path, flag: str) -> NpzImages:
    """The image batch in ``path``; anything else is a one-line :class:`UsageError` naming ``flag``."""
    path = Path(path)
    reason = not_a_file_reason(path)
    if reason is not None:
        raise UsageError(f"{flag} {path}: {reason} (give an .npz image batch, e.g. one `mvar-engine sample` wrote)")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UsageError(f"{flag} {path}: not an .npz file ({error})") from None
    with archive:
        names = {name.removesuffix(".npy") for name in archive.namelist()}
        if IMAGES_KEY not in names:
            raise UsageError(f"{flag} {path}: has no '{IMAGES_KEY}' array (an ADM-style batch stores its images "
                             f"there; it holds {sorted(names) or 'nothing'})")
        try:
            images = _mapped_entry(path, archive, IMAGES_KEY)
            if images is None:
                with archive.open(f"{IMAGES_KEY}.npy") as handle:
                    images = np.lib.format.read_array(handle, allow_pickle=False)
            labels = None
            if LABELS_KEY in names:
                with archive.open(f"{LABELS_KEY}.npy") as handle:
                    labels = np.lib.format.read_array(handle, allow_pickle=False)
        except (ValueError, OSError, zipfile.BadZipFile) as error:
            raise UsageError(f"{flag} {path}: cannot read its arrays ({' '.join(str(error).split())})") from None
    if images.dtype != np.uint8:
        raise UsageError(f"{flag} {path}: '{IMAGES_KEY}' is {images.dtype}; an image batch is uint8 [N, H, W, 3] "
                         f"(convert with (x * 255).round().clip(0, 255).astype(np.uint8))")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UsageError(f"{flag} {path}: '{IMAGES_KEY}' has shape {list(images.shape)}; an image batch is "
                         f"[N, H, W, 3] (channels last, RGB)")
    if images.shape[0] < 2:
        raise UsageError(f"{flag} {path}: holds {images.shape[0]} image(s); the statistics need at least 2")
    if labels is not None and labels.shape != (images.shape[0],):
        labels = None  # not ours to judge: the images are what is scored
    return NpzImages(path, images, labels)
