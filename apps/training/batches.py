"""Training data: the image set, deterministic resumable batch sampling, per-step random streams.

Batches are a pure function of ``(seed, step)``: epoch ``e = step // (N // G)`` shuffles the ``N``
items with a generator seeded from ``(seed, e)``, and step ``step`` takes the next ``G`` of them
(``G`` = the global batch, the last incomplete batch of an epoch is dropped). Under torchrun rank
``r`` of ``W`` takes the contiguous slice ``r * G/W .. (r+1) * G/W`` of that global batch, so the
ranks' shards are disjoint and together form exactly the single-process batch; per-item random
draws (:meth:`ShardedBatches.uniform`) are made for the global batch and sharded the same way, so a
run on W ranks computes the same thing as one process (up to the order of float reductions). Nothing depends on
generator state carried between steps, which makes ``--resume`` exact by construction.
"""

from __future__ import annotations

import numpy as np
import torch

from ...core.errors import UsageError
from ..data import ImageSet, load_dataset


DROPOUT_STREAM, FLIP_STREAM, CROP_STREAM, CODEBOOK_STREAM = 1, 2, 3, 7
"""The random streams of a step: class dropout and flips (per item of the global batch, through
:meth:`ShardedBatches.uniform`), random crops (per item, ``rank`` = the item's slot in the global
batch) and the tokenizer's codebook initialisation."""


def stream_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` private to (seed, step, rank, stream)."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, step, rank))


class ShardedBatches:
    """Indices of the items each rank trains on at each step (see the module docstring)."""

    def __init__(self, num_items: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if global_batch < 1:
            raise UsageError(f"--batch-size must be at least 1, got {global_batch}")
        if global_batch % world_size:
            raise UsageError(f"--batch-size {global_batch} is not divisible by the {world_size} processes "
                             f"(torchrun --nproc_per_node); use a multiple of {world_size}")
        if num_items < global_batch:
            raise UsageError(f"--batch-size {global_batch} exceeds the {num_items} training images "
                             f"(lower --batch-size or use more data)")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = num_items // global_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(stream_seed(self.seed, 0x5EED, epoch))
            self._perm, self._epoch = torch.randperm(self.num_items, generator=g), epoch
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        """LongTensor[G]: the whole batch of ``step`` (0-based), identical on every rank."""
        position = step % self.steps_per_epoch
        return self._permutation(self.epoch_of(step))[position * self.global_batch:(position + 1) * self.global_batch]

    def shard(self, global_values: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor with one row per item of the global batch."""
        start = self.rank * self.local_batch
        return global_values[start:start + self.local_batch]

    def indices(self, step: int) -> torch.Tensor:
        """LongTensor[G / W]: this rank's disjoint shard of :meth:`global_indices`."""
        return self.shard(self.global_indices(step))

    def global_uniform(self, step: int, stream: int) -> torch.Tensor:
        """``G`` uniform [0, 1) draws private to (seed, step, stream), one per item of the global batch."""
        return torch.rand(self.global_batch, generator=step_generator(self.seed, step, 0, stream))

    def uniform(self, step: int, stream: int) -> torch.Tensor:
        """This rank's shard of :meth:`global_uniform`: per-item randomness (class dropout, flips)
        that does not depend on how the batch is split over ranks."""
        return self.shard(self.global_uniform(step, stream))


def load_images(data: str, resolution: int, split: str, max_images: int | None) -> ImageSet:
    """The training images (``max_images``: the first N of the split, for quick runs)."""
    images = load_dataset(data, resolution, split)  # type: ignore[arg-type]
    if max_images is not None:
        if max_images < 1:
            raise UsageError(f"--max-images must be at least 1, got {max_images}")
        images = images.subset(torch.arange(min(max_images, len(images))))
    return images
