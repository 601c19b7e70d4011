"""Where a trainer's steps come from: one :class:`TrainingData` per ``--data`` kind (chosen by
:func:`.training_data.open_training_data`), each yielding a :class:`StepBatch` per step.

- ``digits`` (:class:`MemoryData`): the small built-in set, held in memory (its tokens computed
  once up front by the transformer trainers);
- an image folder (:class:`FolderData`): streamed by DataLoader workers (:mod:`.image_stream`), so
  memory does not grow with the dataset;
- a codes folder from ``mvar-engine cache-codes`` (:class:`~.code_cache.CodesData`): tokens read
  from memory-mapped shards.

Every source takes the same step's items (:class:`~.batches.ShardedBatches`: a seeded per-epoch
permutation, each rank its contiguous shard), so a resumed run continues at the exact sample.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from .. import distributed as D
from ..data import DataError, ImageSet, list_image_folder, split_indices
from .batches import ShardedBatches
from .image_stream import Crop, FolderItems, Skip, StepRequests, folder_loader

OnBadImage = Literal["skip", "fail"]


@dataclass
class StepBatch:
    """One rank's data of one step. ``labels [b]`` int64; ``rows [b]``: their positions in the
    rank's full local batch (fewer than it when images were skipped); then the images
    (``[b, 3, R, R]`` in [-1, 1]) or the tokens (``targets [b, L]`` int64, ``var_input [b, L - l_0,
    Cvae]`` when precomputed), all on CPU."""

    labels: torch.Tensor
    rows: torch.Tensor
    images: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    var_input: torch.Tensor | None = None
    skipped: tuple[Skip, ...] = ()


class TrainingData:
    """A training set: ``num_items`` items of ``class_names``; :meth:`stream` yields the steps."""

    kind: str = "images"
    num_items: int
    class_names: tuple[str, ...]
    source: str

    def describe(self) -> dict[str, Any]:
        """The ``data`` entry of exported weights' metadata."""
        return {"source": self.source, "kind": self.kind, "num_images": self.num_items}

    @contextmanager
    def stream(self, batches: ShardedBatches, start: int, stop: int) -> Iterator[Iterator[StepBatch]]:
        """The batches of steps ``start .. stop - 1`` in order (workers, if any, live inside the context)."""
        raise NotImplementedError

    def global_images(self, batches: ShardedBatches, step: int) -> torch.Tensor:
        """The readable images of ``step``'s whole global batch (the tokenizer's codebook initialisation)."""
        raise NotImplementedError


def all_rows(n: int) -> torch.Tensor:
    return torch.arange(n)


class MemoryData(TrainingData):
    """An :class:`ImageSet` in memory; after :meth:`with_tokens`, its tokens instead of its images."""

    def __init__(self, images: ImageSet, targets: torch.Tensor | None = None, var_input: torch.Tensor | None = None):
        self.images, self.targets, self.var_input = images, targets, var_input
        self.num_items, self.class_names, self.source = len(images), images.class_names, images.source
        self.kind = "images" if targets is None else "tokens"

    def with_tokens(self, targets: torch.Tensor, var_input: torch.Tensor | None) -> MemoryData:
        return MemoryData(self.images, targets, var_input)

    def batch(self, index: torch.Tensor) -> StepBatch:
        if self.targets is None:
            return StepBatch(self.images.labels[index], all_rows(len(index)), images=self.images.images[index])
        var_input = self.var_input[index] if self.var_input is not None else None
        return StepBatch(self.images.labels[index], all_rows(len(index)), targets=self.targets[index], var_input=var_input)

    @contextmanager
    def stream(self, batches: ShardedBatches, start: int, stop: int) -> Iterator[Iterator[StepBatch]]:
        yield (self.batch(batches.indices(step)) for step in range(start, stop))

    def global_images(self, batches: ShardedBatches, step: int) -> torch.Tensor:
        return self.images.images[batches.global_indices(step)]


class FolderData(TrainingData):
    """A class-per-subfolder image folder streamed by ``workers`` DataLoader processes (module docstring)."""

    def __init__(self, path: str | Path, resolution: int, split: str, max_images: int | None, *, crop: Crop,
                 hflip: bool, workers: int, seed: int) -> None:
        listing = list_image_folder(path)
        self.items = split_indices(listing.labels, split)  # type: ignore[arg-type]
        if max_images is not None:
            self.items = self.items[:max_images]
        self.dataset = FolderItems(listing, resolution, crop, seed)
        self.num_items, self.class_names, self.source = len(self.items), listing.class_names, str(listing.root)
        self.crop, self.hflip, self.workers = crop, hflip, workers

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "crop": self.crop, "hflip": self.hflip, "resize": "lanczos, shorter side 1.125 R"}

    @contextmanager
    def stream(self, batches: ShardedBatches, start: int, stop: int) -> Iterator[Iterator[StepBatch]]:
        loader = folder_loader(self.dataset, StepRequests(batches, self.items, start, stop, self.hflip), self.workers)
        iterator = iter(loader)
        try:
            yield (StepBatch(b.labels, b.rows, images=b.images, skipped=b.skipped) for b in iterator)
        finally:
            del iterator  # shuts the workers down

    def global_images(self, batches: ShardedBatches, step: int) -> torch.Tensor:
        requests = StepRequests(batches, self.items, step, step + 1, self.hflip).requests(step, whole=True)
        images = [item[0] for item in map(self.dataset.__getitem__, requests) if item[0] is not None]
        if not images:
            raise DataError(f"--data {self.source}: no image of the first batch could be read")
        return torch.stack(images)


class SkippedImages:
    """Images a run could not read: ``fail`` stops at the first (one line naming it), ``skip`` warns
    on stderr, counts (:attr:`count`, this rank's, from ``start`` on rank 0 after a resume) and
    writes one ``skipped_image`` record per file to the metrics log at :meth:`flush`."""

    def __init__(self, policy: OnBadImage, start: int = 0) -> None:
        self.policy, self.count, self.pending = policy, start if D.is_main() else 0, []

    def note(self, step: int, skipped: tuple[Skip, ...], batch_size: int) -> None:
        """Account for ``step``'s skips (``batch_size``: the images it still has); a step left with
        no image at all stops the run."""
        if batch_size == 0 and self.policy == "skip":
            raise DataError(f"no image of step {step + 1}'s batch on this process could be read (the last: "
                            f"{skipped[-1].file}); fix or remove the unreadable files")
        for skip in skipped:
            if self.policy == "fail":
                raise DataError(f"{skip.reason} (step {step + 1}; --on-bad-image skip trains on without it)")
            print(f"mvar-engine: skipped at step {step + 1}: {skip.reason}", file=sys.stderr)
            self.pending.append({"event": "skipped_image", "step": step + 1, "file": skip.file, "reason": skip.reason})
        self.count += len(skipped)

    def flush(self, metrics_log) -> int:
        """Collective: write every rank's pending records (rank 0) and return the run's total count."""
        pending = [record for records in D.all_gather_object(self.pending) for record in records]
        self.pending = []
        for record in sorted(pending, key=lambda r: r["step"]):
            metrics_log.write(record)
        return int(sum(D.all_gather_object(self.count)))


