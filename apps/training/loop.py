"""The step loop shared by both trainers: progress bar, metrics JSONL, periodic checkpoints,
graceful interruption, and the run's closing record (every rank's weight hash).

Interruption contract: the first SIGINT (Ctrl-C) or SIGTERM only sets a flag; the loop notices it
at the next step boundary (agreed between ranks by an all-reduce, so all stop after the same
step), saves a checkpoint of that consistent state and raises :class:`TrainingInterrupted`. A
second SIGINT raises ``KeyboardInterrupt`` at once; then, as after a crash or SIGKILL, the previous
checkpoint (written atomically) is intact and at most ``--save-every`` steps are lost.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from ...core.errors import TrainingDivergedError
from ...models.checkpoint import atomic_write
from .. import distributed as D

StepFn = Callable[[int], dict[str, Any]]
"""``step_fn(step) -> metrics``: run optimizer step ``step`` (0-based) and return its rank-local
numbers (floats) and labels (``group`` etc.)."""
SaveFn = Callable[[int, dict[str, Any], float], None]
"""``save_fn(steps_done, metrics, seconds)``: write checkpoint and weights (collective, every rank
calls it); ``metrics`` are the last logged (rank-averaged) numbers, ``seconds`` the training time
so far, resumed runs included."""
Callback = Callable[[int, dict[str, Any]], None]
"""``callback(steps_done, metrics)`` after every step, on every rank (tests, the Python API)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after a graceful stop: the checkpoint at ``step`` has been written."""

    def __init__(self, step: int, checkpoint: Path, signal_name: str = "") -> None:
        by = f" by {signal_name}" if signal_name else ""
        super().__init__(f"interrupted{by} after step {step}; checkpoint saved to {checkpoint} (continue with --resume)")
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name

    @property
    def exit_status(self) -> int:
        """The shell convention 128 + the signal's number: 143 after SIGTERM, 130 after SIGINT (and
        on a rank that stopped because another rank was signalled)."""
        number = getattr(signal, self.signal_name, None) if self.signal_name.startswith("SIG") else None
        return 128 + int(number if number is not None else signal.SIGINT)


class StopFlag:
    """Set by the signal handlers; read at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""


@contextmanager
def graceful_signals() -> Iterator[StopFlag]:
    """Install SIGINT/SIGTERM handlers that set the returned flag (main thread only; elsewhere the
    flag simply never flips). A second SIGINT raises ``KeyboardInterrupt``. Handlers are restored
    on exit."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested, flag.signal_name = True, signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class MetricsLog:
    """Append-only JSON lines at ``path``, written by rank 0 only (no-op elsewhere)."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step`` beyond a resumed checkpoint (they were logged after the last
        checkpoint of an interrupted run and will be logged again), atomically."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if not isinstance(record, dict) or int(record.get("step", 0)) <= step:
                kept.append(line)
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=False, default=str) + "\n")
            f.flush()


@dataclass
class LoopResult:
    """``step``: optimizer steps completed; ``metrics``: the last step's numbers averaged over ranks."""

    step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


SUMMED_METRICS = ("skipped_images",)
"""Counts whose run-wide value is the sum over ranks, not the mean."""


def global_metrics(metrics: dict[str, Any], device: torch.device | None = None) -> dict[str, Any]:
    """Numeric entries averaged over ranks (:data:`SUMMED_METRICS` summed; collective), labels kept as they are."""
    averaged = D.mean_over_ranks(_numeric(metrics), device)
    summed = {k: round(v * D.world_size()) for k, v in averaged.items() if k in SUMMED_METRICS}
    return {**metrics, **averaged, **summed}


def _finite_loss(metrics: dict[str, Any]) -> bool:
    loss = metrics.get("loss")
    return not isinstance(loss, float) or math.isfinite(loss)


def run_loop(*, start_step: int, total_steps: int, step_fn: StepFn, save_fn: SaveFn, checkpoint: Path,
             metrics_log: MetricsLog, log_every: int, save_every: int, progress: bool, desc: str,
             elapsed_before: float = 0.0, callbacks: tuple[Callback, ...] = (), device: torch.device | None = None,
             postfix: tuple[str, ...] = ("loss",)) -> LoopResult:
    """Run steps ``start_step .. total_steps - 1``; log every ``log_every`` steps (and the last),
    save every ``save_every`` steps (and the last). Contract: ``save_fn`` is called exactly at
    those boundaries, or once more at a graceful stop (then :class:`TrainingInterrupted`)."""
    main = D.is_main()
    bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    started = time.perf_counter()
    interval_start, interval_steps = started, 0
    last: dict[str, Any] = {}
    step = start_step
    try:
        with graceful_signals() as stop:
            while step < total_steps:
                metrics = step_fn(step)
                if D.any_rank(not _finite_loss(metrics), device):  # the weights are already spoilt: never saved
                    kept = (f"{checkpoint} holds the last saved one" if checkpoint.is_file() else "no step was saved")
                    raise TrainingDivergedError(
                        f"training diverged at step {step + 1}: the loss is {metrics.get('loss')} (that step was not "
                        f"saved; {kept}): lower --lr or raise --warmup-steps, then --resume or start over")
                step += 1
                interval_steps += 1
                for callback in callbacks:
                    callback(step, metrics)
                bar.update(1)
                final = step == total_steps
                logged = step % max(1, log_every) == 0 or final
                if logged:
                    now = time.perf_counter()
                    last = global_metrics(metrics, device)
                    record = {"step": step, **last, "seconds": round(elapsed_before + now - started, 3),
                              "step_seconds": round((now - interval_start) / max(1, interval_steps), 4)}
                    metrics_log.write(record)
                    bar.set_postfix({k: f"{last[k]:.4g}" for k in postfix if isinstance(last.get(k), float)})
                    interval_start, interval_steps = now, 0
                saved = final or step % max(1, save_every) == 0
                if saved:
                    save_fn(step, last, elapsed_before + time.perf_counter() - started)
                if not final and D.any_rank(stop.requested, device):
                    if not saved:
                        save_fn(step, last if logged else global_metrics(metrics, device),
                                elapsed_before + time.perf_counter() - started)
                    raise TrainingInterrupted(step, checkpoint, stop.signal_name)
    finally:
        bar.close()
    if step == start_step and start_step >= total_steps:
        save_fn(step, last, elapsed_before)  # nothing to run: re-export what the checkpoint holds
    return LoopResult(step, last, elapsed_before + time.perf_counter() - started)


@dataclass
class TrainSummary:
    """What a finished (or already complete) run reports."""

    run_dir: Path
    step: int
    metrics: dict[str, Any]
    seconds: float
    weights: Path
    state_sha256: list[str]


def finish(metrics_log: MetricsLog, result: LoopResult, hashes: list[str]) -> None:
    """Final JSONL record with every rank's weight hash; differing hashes (ranks out of sync) are
    an error."""
    metrics_log.write({"event": "end", "step": result.step, "seconds": round(result.seconds, 3),
                       "world_size": len(hashes), "state_sha256": hashes})
    if len(set(hashes)) > 1:
        raise RuntimeError(f"ranks finished with different weights (state hashes {hashes}); DDP lost synchronisation")
