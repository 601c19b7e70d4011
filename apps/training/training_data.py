"""``--data`` to a :class:`~.data_sources.TrainingData`: the digits, an image folder or a codes folder."""

from __future__ import annotations

from ...core.errors import UsageError
from ..data import DataError
from .batches import load_images
from .code_cache import CodesData, is_codes_folder
from .data_sources import FolderData, MemoryData, TrainingData
from .image_stream import Crop


def open_training_data(data: str, resolution: int, split: str, max_images: int | None, *, crop: Crop | None,
                       hflip: bool, workers: int, seed: int) -> TrainingData:
    """The source ``--data`` names: ``digits``, an image folder, or a ``cache-codes`` folder (see
    :mod:`.code_cache`); flags a source cannot honour are one-line :class:`UsageError` s."""
    if workers < 0:
        raise UsageError(f"--workers must be at least 0 (0 reads in the main process), got {workers}")
    if max_images is not None and max_images < 1:
        raise UsageError(f"--max-images must be at least 1, got {max_images}")
    if data is not None and not str(data).strip():
        raise DataError("--data is empty: give 'digits' or a folder with one subfolder of images per class")
    if data in (None, "digits"):
        if crop is not None or hflip:
            raise UsageError("--crop and --hflip apply to an image folder or a codes folder; the digits are used as "
                             "they are (drop the flags, or give --data FOLDER)")
        return MemoryData(load_images("digits", resolution, split, max_images))
    if is_codes_folder(data):
        return CodesData(data, split, max_images, crop=crop, hflip=hflip)
    return FolderData(data, resolution, split, max_images, crop=crop or "random", hflip=hflip, workers=workers, seed=seed)


def open_token_data(s, tok, target: str, patch_nums) -> TrainingData:
    """A transformer trainer's data (``s``: its settings' data fields): :func:`open_training_data`,
    and a codes folder checked against the tokenizer ``tok`` (a :class:`~.frozen_tokenizer.FrozenTokenizer`),
    ``target`` (``next-scale`` or ``raster``) and the schedule ``patch_nums`` the model trains on."""
    data = open_training_data(s.data, tok.resolution, s.split, s.max_images, crop=s.crop, hflip=s.hflip,
                              workers=s.workers, seed=s.seed)
    if isinstance(data, CodesData):
        data.check_tokens(tokenizer_sha256=tok.sha256, resolution=tok.resolution, target=target, patch_nums=patch_nums)
    return data
