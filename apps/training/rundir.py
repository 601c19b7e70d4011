"""Run directories: what a new run may overwrite, what ``--resume`` needs, the settings record."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ...core.errors import UsageError
from ...core.files import remove_orphan_temps, same_file
from ..cli_helpers import check_output_path
from ...models.checkpoint import atomic_write
from .checkpointing import CHECKPOINT_NAME, checkpoint_path

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"


def check_run_dir(output: str | Path, *, resume: bool, overwrite: bool, kind: str | None = None,
                  weights_name: str | None = None, inputs: Mapping[str, str | Path | None] | None = None) -> Path:
    """The run directory; a fresh run refuses to replace an existing run's checkpoint unless
    ``overwrite`` (one-line :class:`UsageError` naming both ways out), and even then a run of another
    ``kind`` (a tokenizer run is never replaced by a transformer run) or a run whose files (checkpoint,
    ``weights_name``, metrics) are among the ``inputs`` (flag -> path) of this one. Creates nothing."""
    if not str(output).strip():
        raise UsageError("--output is empty: give the run directory (e.g. runs/mine)")
    run = Path(output)
    if not run.exists():  # where it will be made: no file on the way, somewhere writable
        check_output_path("--output", run / CHECKPOINT_NAME)
    if run.exists() and not run.is_dir():
        raise UsageError(f"--output {run} is a file, not a run directory (choose another --output)")
    if not resume and checkpoint_path(run).is_file() and not overwrite:
        raise UsageError(f"--output {run} already holds a run ({checkpoint_path(run).name}); pass --resume to continue it, "
                         f"--overwrite to start over, or choose another --output")
    if not resume and overwrite:
        replaced = [run / name for name in (CHECKPOINT_NAME, weights_name, METRICS_NAME) if name]
        for flag, path in (inputs or {}).items():
            if path is not None and any(same_file(path, old) for old in replaced if old.exists()):
                raise UsageError(f"--output {run} --overwrite would delete {path}, which {flag} reads (choose another "
                                 f"--output)")
        previous = checkpoint_kind(checkpoint_path(run))
        if kind is not None and previous is not None and previous != kind:
            raise UsageError(f"--output {run} holds a {previous} run; --overwrite replaces only a {kind} run (choose "
                             f"another --output)")
    return run


def checkpoint_kind(path: Path) -> str | None:
    """The ``kind`` a training checkpoint records (``var``, ``raster``, ``tokenizer``), or None."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: nothing to protect beyond what --overwrite says
        return None
    return ckpt.get("kind") if isinstance(ckpt, dict) and isinstance(ckpt.get("kind"), str) else None


def settings_dict(settings: Any) -> dict[str, Any]:
    """A dataclass of settings as a JSON-ready dict (paths and tuples as strings and lists)."""
    data = asdict(settings) if is_dataclass(settings) else dict(settings)
    return json.loads(json.dumps(data, default=str))


def write_settings(run: Path, settings: dict[str, Any]) -> Path:
    """``<run>/config.json``: the settings of the latest invocation (rank 0 only), atomically."""
    return atomic_write(run / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(settings, indent=2) + "\n"))


def fresh_start(run: Path, weights_name: str) -> None:
    """A run starting over (``--overwrite``, or a directory left without a checkpoint): remove the
    previous run's checkpoint, weights and metrics so that nothing of it can be resumed or mistaken
    for the new run's output."""
    for name in (CHECKPOINT_NAME, weights_name, METRICS_NAME):
        (run / name).unlink(missing_ok=True)


def remove_run_temps(run: Path, weights_name: str) -> list[Path]:
    """Delete the temp files interrupted saves (SIGKILL) left for this run's own files (checkpoint,
    weights, metrics, settings); the main process calls it before the run writes anything."""
    return remove_orphan_temps(run, (CHECKPOINT_NAME, weights_name, METRICS_NAME, CONFIG_NAME))
