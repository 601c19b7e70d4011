"""Per-image seeds: image ``index`` of class ``label`` under run seed ``seed`` draws from its own
generator, so an image does not depend on the batch size, the number of processes, the order of
generation or which other images a run makes."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

SEED_SPACE = 2 ** 64
"""``torch.Generator.manual_seed`` takes seeds in ``[-2**63, 2**64)``; they are read modulo this."""


def image_seed(seed: int, label: int, index: int) -> int:
    """The generator seed of image ``index`` (``>= 0``) of class ``label`` (``>= 0``) under run seed
    ``seed``: numpy's ``SeedSequence`` hash of the three, a 64-bit integer (distinct inputs give
    statistically independent streams)."""
    if label < 0 or index < 0:
        raise ValueError(f"label and index must be >= 0, got {label}, {index}")
    state = np.random.SeedSequence([seed % SEED_SPACE, label, index]).generate_state(1, np.uint64)
    return int(state[0])


def image_generators(seed: int, items: Iterable[tuple[int, int]], device: torch.device | str = "cpu") \
        -> list[torch.Generator]:
    """One generator per ``(label, index)`` item, seeded by :func:`image_seed`."""
    return [torch.Generator(device=device).manual_seed(image_seed(seed, label, index)) for label, index in items]


def numbered(labels: Sequence[int], per_label: int) -> list[tuple[int, int]]:
    """``(label, index)`` for ``per_label`` images of every label in order; a label given more than
    once continues its numbering (``[3, 3]`` x 2 -> ``(3, 0), (3, 1), (3, 2), (3, 3)``), so repeated
    labels give new images."""
    seen: dict[int, int] = {}
    items = []
    for label in labels:
        start = seen.get(label, 0)
        items += [(label, start + i) for i in range(per_label)]
        seen[label] = start + per_label
    return items
