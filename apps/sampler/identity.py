"""What decides a sample folder's images: every generation setting except those that only change
how fast they are made (batch size, progress bar, output paths, which GPU), the device type (CPU
and CUDA generators draw different numbers from one seed), the model files by content (SHA-256,
so a moved file still matches and a changed one does not), the labels, the images per class, the size they are resized to and how many are decoded at once."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...core.adapter import ModelFamily
from ...core.files import file_sha256
from ..config import EngineConfig

SPEED_ONLY = {"batch_size", "progress", "output", "device", "labels", "samples_per_label"}
"""Top-level config fields that do not change the images (labels are recorded as the plan's)."""

def model_files(config: EngineConfig, family: ModelFamily) -> dict[str, dict[str, str]]:
    """``{option: {"path", "sha256"}}`` of the weights files ``family`` reads (a model directory:
    each of its files, as ``model_dir/NAME``)."""
    files: dict[str, dict[str, str]] = {}
    for role, path in family.input_files().items():
        if path.is_dir():
            for member in sorted(p for p in path.iterdir() if p.is_file()):
                files[f"{role}/{member.name}"] = {"path": str(member), "sha256": file_sha256(member)}
        elif path.is_file():
            files[role] = {"path": str(path), "sha256": file_sha256(path)}
    return files


def sample_identity(config: EngineConfig, device: torch.device, labels: Sequence[int], per_class: int,
                    files: dict[str, dict[str, str]], resize: int | None = None, decode_chunk: int = 1
                    ) -> dict[str, Any]:
    """The settings a resumed run must share with the folder's first run (see the module docstring)."""
    settings = config.model_dump(mode="json", exclude=SPEED_ONLY)
    for role in {name.split("/")[0] for name in files}:  # the files count by content, not by path
        settings["model"]["options"].pop(role, None)
    return {**settings, "device_type": device.type, "labels": list(labels), "per_class": per_class, "resize": resize,
            "decode_chunk": decode_chunk,
            "model_files": {role: entry["sha256"] for role, entry in files.items()}}
