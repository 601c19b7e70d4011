"""Run directories: what a new run may overwrite, what ``--resume`` needs, the settings record."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from ...core.errors import UsageError
from ...core.files import remove_orphan_temps
from ..cli_helpers import check_output_path
from ...models.checkpoint import atomic_write
from .checkpointing import CHECKPOINT_NAME, checkpoint_path

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"


def check_run_dir(output: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """The run directory; a fresh run refuses to replace an existing run's checkpoint unless
    ``overwrite`` (one-line :class:`UsageError` naming both ways out). Creates nothing."""
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
    return run


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
