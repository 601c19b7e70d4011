"""Streaming a class-per-subfolder image folder into training steps: files are decoded lazily by
DataLoader workers, with VAR's augmentation, so memory does not grow with the dataset.

Augmentation (VAR's ``build_dataset``): the shorter side is resized to ``round(1.125 R)`` with
Lanczos (the longer keeps the aspect ratio, torchvision's rule), then an ``R x R`` crop, random
(training, VAR) or centred (MVAR's code cache), then an optional horizontal flip; pixels map to
``[-1, 1]``.

Determinism: a step's items are :class:`ItemRequest` s made by :class:`StepRequests` from the
step's batch (:class:`~.batches.ShardedBatches`); each request carries its flip and the seed of
its crop, drawn per (seed, step, slot in the global batch), so the pixels a step trains on are a
pure function of (seed, step) whatever the number of workers or ranks, and ``--resume`` restarts
the stream at the exact sample. An image that cannot be decoded comes back as a skip (file and
reason), never as an exception in a worker: the caller decides (skip and count, or stop).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch

from ..data import DataError, ImageFolderListing, open_rgb, pil_to_tensor
from .batches import CROP_STREAM, FLIP_STREAM, ShardedBatches, step_generator

Crop = Literal["random", "center"]
MID_RESOLUTION = 1.125
"""VAR's ``mid_reso``: the shorter side is resized to ``round(1.125 R)`` before the ``R x R`` crop."""


def var_augment(im, resolution: int, crop: Crop, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """An RGB ``PIL.Image`` -> ``[3, R, R]`` float32 in [-1, 1] by VAR's augmentation (module
    docstring); ``generator`` draws the random crop's corner (required for ``crop="random"``)."""
    from PIL import Image

    short = round(MID_RESOLUTION * resolution)
    w, h = im.size
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    im = im.resize((new_w, new_h), Image.LANCZOS)
    if crop == "random":
        top = int(torch.randint(0, new_h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, new_w - resolution + 1, (1,), generator=generator))
    else:
        top, left = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_tensor(im)


class ItemRequest(NamedTuple):
    """One image of a step: ``item`` indexes the listing, ``slot`` is its place in the global batch."""

    item: int
    step: int
    slot: int
    flip: bool


@dataclass(frozen=True)
class Skip:
    """An image that could not be read: the file and the one-line reason."""

    file: str
    reason: str


class FolderItems(torch.utils.data.Dataset):
    """Map-style dataset over :class:`ItemRequest` keys -> ``(image [3, R, R] or None, label, slot, skip or None)``."""

    def __init__(self, listing: ImageFolderListing, resolution: int, crop: Crop, seed: int) -> None:
        self.files = [str(f) for f in listing.files]
        self.labels = listing.labels
        self.resolution, self.crop, self.seed = resolution, crop, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, request: ItemRequest):
        file = self.files[request.item]
        label = int(self.labels[request.item])
        try:
            im = open_rgb(file)
        except DataError as error:
            return None, label, request.slot, Skip(file, str(error))
        generator = step_generator(self.seed, request.step, request.slot, CROP_STREAM) if self.crop == "random" else None
        return var_augment(im, self.resolution, self.crop, request.flip, generator), label, request.slot, None


@dataclass
class FolderBatch:
    """A rank's batch of one step: ``images [b, 3, R, R]``, ``labels [b]``, ``rows [b]`` (their
    positions in the rank's full batch; ``b`` is less than the local batch when images were
    skipped) and the skips."""

    images: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor
    skipped: tuple[Skip, ...]


def collate_folder_batch(items: Sequence[tuple]) -> FolderBatch:
    """DataLoader ``collate_fn``: stack the readable images, keep the skips (slots become rank-local
    rows: the items arrive in slot order)."""
    kept = [(image, label, row) for row, (image, label, _, skip) in enumerate(items) if skip is None]
    skipped = tuple(skip for *_, skip in items if skip is not None)
    if not kept:
        return FolderBatch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped)
    images, labels, rows = zip(*kept)
    return FolderBatch(torch.stack(images), torch.tensor(labels, dtype=torch.long), torch.tensor(rows), skipped)


class StepRequests(torch.utils.data.Sampler):
    """DataLoader ``batch_sampler``: one list of :class:`ItemRequest` per step ``start .. stop - 1``,
    this rank's shard of the step's batch. ``items[i]`` is the listing index of the split's i-th image."""

    def __init__(self, batches: ShardedBatches, items: np.ndarray, start: int, stop: int, hflip: bool) -> None:
        self.batches, self.items, self.start, self.stop, self.hflip = batches, items, start, stop, hflip

    def requests(self, step: int, whole: bool = False) -> list[ItemRequest]:
        """This rank's requests of ``step`` (``whole``: the global batch's, e.g. to initialise a codebook)."""
        b = self.batches
        positions = b.global_indices(step)
        flips = b.global_uniform(step, FLIP_STREAM) < 0.5 if self.hflip else torch.zeros(len(positions), dtype=torch.bool)
        first = 0 if whole else b.rank * b.local_batch
        if not whole:
            positions, flips = b.shard(positions), b.shard(flips)
        return [ItemRequest(int(self.items[p]), step, first + j, bool(f))
                for j, (p, f) in enumerate(zip(positions.tolist(), flips.tolist()))]

    def __iter__(self) -> Iterator[list[ItemRequest]]:
        for step in range(self.start, self.stop):
            yield self.requests(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def _ignore_sigint(_worker_id: int) -> None:
    """Workers leave Ctrl-C to the main process, which stops gracefully after the step (workers end
    with it, and on their own if it dies: DataLoader's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def folder_loader(dataset: FolderItems, sampler: StepRequests, workers: int) -> torch.utils.data.DataLoader:
    """The DataLoader of a streamed folder: ``workers`` processes (0: in the main process), two
    steps prefetched per worker."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       collate_fn=collate_folder_batch, worker_init_fn=_ignore_sigint if workers else None,
                                       prefetch_factor=2 if workers else None, persistent_workers=False)
