"""The codes folder ``mvar-engine cache-codes`` writes, and training from it (:class:`CodesData`).

Layout of a codes folder (every file written atomically):

``plan.json``
    What the job computes (tokenizer identity, schedule, resolution, crop, twin, image count,
    classes, shard size, encoding batch); written first, compared on ``--resume``.
``labels.npy``
    int64 ``[N]``: the class of every image of the folder, in the listing's order.
``codes-KKKKK.npy`` + ``codes-KKKKK.json``
    Shard ``K``: ``[n, V, L]`` tokens (uint16 when the vocabulary fits, else int32; ``V`` = 2 with the
    flipped twin, variant 1 being the mirrored crop) of images ``K * shard_size ..``; the JSON (the
    shard's completion mark, written after the array) lists the images that could not be read
    (their rows hold zeros) and the array's SHA-256.
``manifest.json``
    The plan plus every shard and every skipped image; written last: a folder without it is an
    unfinished job (``cache-codes --resume`` finishes it).

``L`` is the schedule's token count: every scale of the tokenizer (``next-scale``: what VAR/MVAR
train on; their teacher-forcing input is rebuilt from the tokens), or the latent grid quantised as
one scale (``raster``). Memory-mapped on reading, so a training process holds only its batches.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ...core.errors import UsageError
from ..data import DataError, split_indices
from .batches import FLIP_STREAM, ShardedBatches
from .data_sources import StepBatch, TrainingData, all_rows

FORMAT = "mvar-engine/codes"
VERSION = 1
PLAN_NAME, MANIFEST_NAME, LABELS_NAME = "plan.json", "manifest.json", "labels.npy"
TARGETS = ("next-scale", "raster")


def scale_hws(patch_nums: Sequence) -> list[list[int]]:
    """A schedule as ``[[h, w], ...]`` (a side ``p`` is ``[p, p]``): how manifests record and compare it."""
    return [[int(p), int(p)] if np.ndim(p) == 0 else [int(x) for x in p] for p in patch_nums]


def shard_stem(k: int) -> str:
    return f"codes-{k:05d}"


def is_codes_folder(path: str | Path) -> bool:
    """A ``cache-codes`` folder, finished or not (it holds a plan or a manifest)."""
    root = Path(path)
    return (root / MANIFEST_NAME).is_file() or (root / PLAN_NAME).is_file()


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object of ours (``format`` = :data:`FORMAT`), or a one-line :class:`DataError`."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{what} {path} is unreadable ({type(error).__name__}); run cache-codes again with --overwrite") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DataError(f"{what} {path} is not an mvar-engine codes manifest (run cache-codes with --overwrite)")
    return record


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A finished codes folder's manifest (one-line errors for an unfinished or unreadable one)."""
    root = Path(path)
    if not (root / MANIFEST_NAME).is_file():
        raise DataError(f"--data {root}: cache-codes has not finished there (no {MANIFEST_NAME}); finish it with "
                        f"'mvar-engine cache-codes ... --output {root} --resume'")
    manifest = read_json(root / MANIFEST_NAME, f"--data {root}:")
    if manifest.get("version") != VERSION:
        raise DataError(f"--data {root}: codes format version {manifest.get('version')}, this mvar-engine reads "
                        f"{VERSION} (run cache-codes again)")
    return manifest


class CodesData(TrainingData):
    """Training from a codes folder: the step's items as :class:`~.batches.ShardedBatches` picks
    them among the readable images of ``split``; with ``hflip`` each item takes its flipped twin
    with the draw an image folder would flip it with (so both sources train on the same pixels)."""

    kind = "codes"

    def __init__(self, path: str | Path, split: str, max_images: int | None, *, crop: str | None, hflip: bool) -> None:
        root = Path(path)
        self.manifest = m = read_manifest(root)
        if crop not in (None, m["crop"]):
            raise UsageError(f"--crop {crop}: the codes in {root} were cut with a {m['crop']} crop (drop --crop, or train "
                             f"from the images)")
        if hflip and m["variants"] < 2:
            raise UsageError(f"--hflip: the codes in {root} have no flipped twin (drop --hflip, or run cache-codes "
                             f"without --no-flip-twin)")
        try:
            labels = np.load(root / LABELS_NAME)
            self.shards = [np.load(root / s["file"], mmap_mode="r") for s in m["shards"]]
        except (OSError, ValueError) as error:
            raise DataError(f"--data {root}: a codes file is unreadable ({type(error).__name__}: {error}); run "
                            f"cache-codes again with --overwrite") from None
        skipped = np.array(sorted(s["index"] for s in m["skipped"]), dtype=np.int64)
        items = split_indices(labels, split)  # type: ignore[arg-type]
        self.items = items[~np.isin(items, skipped)]
        if max_images is not None:
            self.items = self.items[:max_images]
        self.labels, self.hflip, self.shard_size = labels, hflip, int(m["shard_size"])
        self.num_items, self.class_names, self.source = len(self.items), tuple(m["class_names"]), str(root)

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {**super().describe(), "source_images": m["source"], "crop": m["crop"], "hflip": self.hflip}

    def check_tokens(self, *, tokenizer_sha256: str, resolution: int, target: str, patch_nums: Sequence) -> None:
        """Refuse codes that another tokenizer, resolution or schedule made than the model trains on."""
        m, root = self.manifest, self.source
        if m["tokenizer"]["sha256"] != tokenizer_sha256:
            raise UsageError(f"--data {root}: its codes were made by another tokenizer ({m['tokenizer']['path']}, sha256 "
                             f"{m['tokenizer']['sha256'][:12]}) than --tokenizer (sha256 {tokenizer_sha256[:12]}); give "
                             f"that tokenizer or run cache-codes with this one")
        if m["resolution"] != resolution:
            raise UsageError(f"--data {root}: codes of {m['resolution']} px images, the model trains at {resolution} px "
                             f"(run cache-codes at {resolution})")
        if m["target"] != target or m["scale_hws"] != scale_hws(patch_nums):
            raise UsageError(f"--data {root}: {m['target']} codes of scales {m['scale_hws']}, this trainer needs "
                             f"{target} codes of scales {scale_hws(patch_nums)} (run cache-codes --target {target} with "
                             f"the model's tokenizer)")

    def tokens(self, positions: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """``LongTensor[b, L]``: the codes of the split's items at ``positions``, twin 1 where ``flips``."""
        rows = []
        for position, flip in zip(positions.tolist(), flips.tolist()):
            index = int(self.items[position])
            shard, row = divmod(index, self.shard_size)
            rows.append(np.asarray(self.shards[shard][row, int(flip)]))
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def batch(self, batches: ShardedBatches, step: int) -> StepBatch:
        positions = batches.indices(step)
        flips = batches.uniform(step, FLIP_STREAM) < 0.5 if self.hflip else torch.zeros(len(positions), dtype=torch.bool)
        labels = torch.from_numpy(self.labels[self.items[positions.numpy()]])
        return StepBatch(labels, all_rows(len(positions)), targets=self.tokens(positions, flips))

    @contextmanager
    def stream(self, batches: ShardedBatches, start: int, stop: int) -> Iterator[Iterator[StepBatch]]:
        yield (self.batch(batches, step) for step in range(start, stop))
