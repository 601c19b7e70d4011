"""``mvar-engine bench capacity``: throughput at a memory budget, the way compressed caches and MVAR pay off.

A smaller KV cache (or none, MVAR) barely changes the speed of one fixed batch (at most
``(W + KV) / (W + 0.2 KV)``, ../shared/DESIGN.md "Why compressed caches speed up"); it admits a
larger batch in the same memory, and that is where SSD's 6.6x at batch 128 comes from. For each
configuration this finds the largest batch whose peak memory fits ``--memory-budget`` and measures
its throughput there:

1. two probe batches (``--probes``, default 1 and 3) give the memory per batch row and the fixed part;
2. the batch the generation's peak predicts (extrapolated from the two largest batches that fit,
   at most 4x the larger: fixed transients can hide the slope at small probes), re-measured on the
   way up, then interpolated or bisected until a batch that fits sits next to one that does not:
   the prediction is never trusted alone. On the CPU a run whose resident set passes the budget is
   stopped at once (it cannot fit);
3. images/s and tokens/s at that batch, and the ratio to the baseline (the first configuration) at
   *its* largest batch. The search's runs time one generation each (they measure memory); with
   ``--repeats N`` (or ``--warmup``) one more fresh process at the largest batch times ``N``
   generations and the median is reported (one generation on a 2-core CPU varies by 10-20%). The
   memory per row reported is the line through the two largest batches that fit; where
   ``--max-batch`` stops the search first, that line's batch at the budget is reported beside the
   lower bound, marked as a guess.

Every measurement is a fresh process (the matrix worker, :mod:`.matrix`): peak memory is the
process's peak resident set while generating and decoding, the weights included (CPU), or ``max_memory_allocated``
(CUDA); a process that dies (out of memory) counts as not fitting. Random weights (cost does not
depend on the weights). Output: ``--output`` JSON (rewritten after every measurement), a markdown
table (``.md``) and a chart of throughput against batch with each configuration's largest batch
marked (``.png``).
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import torch

from ...core.errors import UsageError
from ...core.files import atomic_write, marked_markdown, save_marked_image
from ...models.janus import JANUS_PRO_1B_TEXT, language_model_minimum_elements
from ...models.raster_gpt import RasterGPTConfig
from ...models.tokenizer import TokenizerConfig, llamagen_vq16_sized
from ...models.var import VARConfig
from ..cli_helpers import PROG, Parser, check_output_path, finite_float, int_list, name_list, one_line, seed_int
from ..output_files import check_outputs, report_outputs
from ..memory_fit import FLOAT32_BYTES, format_bytes, total_memory
from .cells import Combo, check_combo, combo_family, model_spec, parse_combo, run_problems
from .matrix import attach_head_map, cell_for, run_cell_in_subprocess
from .report import (PALETTE, add_report_flags, add_run_flags, format_table, format_value, machine_info, resident_bytes,
                     write_json)

RASTER_CONFIGS = ("raster/dense/full", "raster/dense/sink:budget=0.2", "raster/dense/ssd:budget=0.2")
NEXT_SCALE_CONFIGS = ("full/dense/full", "markov/neighborhood/none")
SIZE_UNITS = {"b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
              "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"6GiB"`` / ``"1.5 GB"`` / ``"800MiB"`` / ``"123456B"`` -> bytes; else ``ValueError`` (a bare
    number too: bytes or gibibytes would be a guess)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is not None and unit == "":
        raise ValueError(f"{text!r} has no unit (give {match.group(1)}GiB, {match.group(1)}MiB or {match.group(1)}B)")
    if match is None or unit not in SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size such as 6GiB, 1.5GB or 800MiB")
    value = float(match.group(1)) * SIZE_UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


@dataclass(frozen=True)
class CapacityConfig:
    memory_budget: str = "2GiB"
    model: str = "llamagen-b"
    configs: tuple[str, ...] | None = None  # None: the model family's defaults; the first is the baseline
    probes: tuple[int, ...] = (1, 3)
    max_batch: int = 1024
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    cfg: float = 1.5
    seed: int = 0
    repeats: int = 1
    warmup: int = 0
    decode_chunk: int = 2
    calibration_images: int = 1
    threads: int | None = None
    timeout_s: float | None = None
    output: str = "bench-capacity.json"
    table: bool = True

    def budget_bytes(self) -> int:
        return parse_size(self.memory_budget)

    def device_name(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def combos(self) -> list[Combo]:
        if self.configs is not None:
            return [parse_combo(text) for text in self.configs]
        family = model_spec(self.model).family
        return [parse_combo(text) for text in (RASTER_CONFIGS if family == "next-token" else NEXT_SCALE_CONFIGS)]

    def problems(self) -> list[str]:
        """One line per invalid option (empty when valid); sizes, names and devices, before any process."""
        out = []
        try:
            budget = self.budget_bytes()
        except ValueError as error:
            out.append(f"--memory-budget {error}")
            budget = None
        if len(self.probes) != 2 or self.probes[0] >= self.probes[1] or self.probes[0] < 1:
            out.append(f"--probes takes two increasing batch sizes >= 1 (e.g. 1,3), got {','.join(map(str, self.probes))}")
        for flag, value, least in (("--max-batch", self.max_batch, 2), ("--repeats", self.repeats, 1),
                                   ("--warmup", self.warmup, 0), ("--decode-chunk", self.decode_chunk, 1),
                                   ("--calibration-images", self.calibration_images, 1)):
            if value < least:
                out.append(f"{flag} must be at least {least}, got {value}")
        if not (math.isfinite(self.cfg) and self.cfg >= 0):
            out.append(f"--cfg must be a finite number >= 0, got {self.cfg:g}")
        out += run_problems(threads=self.threads, timeout_s=self.timeout_s, device=self.device, dtype=self.dtype)
        if Path(self.output).suffix != ".json":
            out.append(f"--output {self.output}: give a .json path (the .md table and .png chart go beside it)")
        if out:
            return out
        try:
            spec = model_spec(self.model)
            combos = self.combos()
            if not combos:
                return ["--configs needs at least one configuration"]
            for combo in combos:
                check_combo(combo, self.backend, [spec])
                if combo_family(combo) != spec.family:
                    out.append(f"configuration {combo.text} is {combo_family(combo)}, but model {spec.id} is "
                               f"{spec.family} (give configurations of its family)")
            total = total_memory(torch.device(self.device_name()))
            if budget is not None and total is not None and budget > total:
                out.append(f"--memory-budget {self.memory_budget}: more than the {format_bytes(total)} this "
                           f"{self.device_name()} has (give at most {format_bytes(total)})")
            weights = weights_lower_bound(spec.id)
            if budget is not None and weights is not None and weights >= budget:
                out.append(f"--memory-budget {self.memory_budget}: {format_bytes(budget)} cannot hold {spec.id}'s "
                           f"float32 weights (at least {format_bytes(weights)}) plus one batch row (raise the budget)")
        except Exception as error:  # one line per problem, whatever layer found it
            if not isinstance(error, (UsageError, ValueError)) and not hasattr(error, "problems"):
                raise
            out.append(one_line(error))
        return out


def weights_lower_bound(model_id: str) -> int | None:
    """A lower bound on a benchmark model's weight bytes (float32), from its architecture alone."""
    spec = model_spec(model_id)
    if spec.id == "llamagen-b":
        grid = (spec.patch_nums[0], spec.patch_nums[0])
        parts = [RasterGPTConfig.llamagen_b(grid=grid), llamagen_vq16_sized(grid)]
    elif spec.family == "next-scale" and spec.id != "tiny":
        parts = [VARConfig(depth=spec.depth, patch_nums=spec.patch_nums), TokenizerConfig(patch_nums=spec.patch_nums)]
    elif spec.id == "janus-pro-1b":
        return language_model_minimum_elements(JANUS_PRO_1B_TEXT) * FLOAT32_BYTES
    else:
        return None
    return sum(part.minimum_elements() for part in parts) * FLOAT32_BYTES


# -- the search ------------------------------------------------------------------------------------
Measure = Callable[[int], "dict[str, Any]"]


def peak_of(row: dict[str, Any]) -> int | None:
    """A measurement's peak bytes while generating and decoding, the resident weights included (the
    load's own transient, ``peak_load``, depends on how random weights are made, not on the batch,
    and stays in the row); None: the process failed."""
    if row.get("status") != "ok":
        return None
    return row["peak_rss_total"]


def growing_peak(row: dict[str, Any]) -> int:
    """The peak of the phase that grows with the batch: the generation's (``peak_rss_transformer``)
    where the row has it, else its whole peak."""
    return row.get("peak_rss_transformer") or row["peak_rss_total"]


def fits(row: dict[str, Any], budget: int) -> bool:
    peak = peak_of(row)
    return peak is not None and peak <= budget


MAX_JUMP = 4
"""An extrapolated batch is at most this many times the largest batch measured to fit: small probes'
peaks can be set by fixed transients, so the slope is re-measured on the way up."""


def memory_line(rows: dict[int, dict[str, Any]], good: Sequence[int]) -> tuple[float, float]:
    """(bytes per batch row, fixed bytes) of the generation's peak, through the two largest batches
    in ``good`` (batches that fit, ascending); through the origin when only one fits. A slope below
    one byte a row (fixed transients set both peaks) counts as one byte."""
    lo = good[-1]
    at_lo = growing_peak(rows[lo])
    if len(good) == 1:
        return at_lo / lo, 0.0
    base = good[-2]
    slope = max((at_lo - growing_peak(rows[base])) / (lo - base), 1.0)
    return slope, at_lo - slope * lo


def extrapolated_batch(slope: float, fixed: float, budget: int) -> int:
    """The batch whose peak the line ``fixed + slope * batch`` puts at the budget."""
    return math.floor((budget - fixed) / slope)


def largest_batch(measure: Measure, budget: int, probes: Sequence[int], max_batch: int) -> dict[str, Any]:
    """Search the largest batch whose measured peak fits ``budget`` (see the module docstring).
    ``measure(batch)`` runs one fresh process and returns its row (memoised here). Upwards it
    extrapolates the generation's peak from the two largest batches that fit (:func:`memory_line`,
    at most :data:`MAX_JUMP` times the larger); once a batch does not fit it interpolates (or
    bisects) between the two until they are neighbours. Returns ``predicted_batch`` (the first
    extrapolation), the largest batch (0: none fits), ``per_row_bytes`` and ``fixed_bytes`` (the
    line through the two largest batches that fit, at the end), ``extrapolated_batch`` where
    ``max_batch`` stopped the search (that line's batch at the budget: a guess, never measured;
    None where the peaks did not grow) and every measurement in order taken."""
    rows: dict[int, dict[str, Any]] = {}

    def run(batch: int) -> None:
        if batch not in rows:
            rows[batch] = measure(batch)

    def done(largest: int, capped: bool, good: Sequence[int]) -> dict[str, Any]:
        slope, fixed = memory_line(rows, good) if good else (None, None)
        measured = capped and len(good) > 1 and slope > 1.0  # a clamped slope is no measurement
        extrapolated = extrapolated_batch(slope, fixed, budget) if measured else None
        return {"probes": [b1, b2], "predicted_batch": predicted, "largest_batch": largest, "capped": capped,
                "per_row_bytes": slope, "fixed_bytes": fixed, "extrapolated_batch": extrapolated,
                "measurements": list(rows.values())}

    b1, b2 = probes
    run(b1)
    run(b2)
    predicted = None
    while True:
        good = sorted(b for b in rows if fits(rows[b], budget))
        if not good:
            return done(0, False, good)
        lo = good[-1]
        at_lo = growing_peak(rows[lo])
        above = sorted(b for b in rows if b > lo and not fits(rows[b], budget))
        hi = above[0] if above else None
        if hi is not None and hi - lo <= 1 or hi is None and lo >= max_batch:
            return done(lo, hi is None, good)
        if hi is None:  # extrapolate the generation's peak from the two largest batches that fit
            target = max(lo + 1, min(extrapolated_batch(*memory_line(rows, good), budget), lo * MAX_JUMP, max_batch))
            predicted = target if predicted is None else predicted
        else:  # between a batch that fits and one that does not (nothing between them is measured yet)
            high = rows[hi].get("peak_rss_transformer") if rows[hi].get("status") == "ok" else None
            target = (lo + hi) // 2
            if high is not None and high > at_lo:
                guess = lo + math.floor((budget - at_lo) * (hi - lo) / (high - at_lo))
                target = min(max(guess, lo + 1), hi - 1)
        run(target)


# -- the run ---------------------------------------------------------------------------------------
def run_capacity(config: CapacityConfig, out: TextIO | None = None, log: TextIO | None = None) -> dict[str, Any]:
    """Validate, calibrate an ssd head map where needed, search every configuration's largest batch
    (JSON rewritten after every measurement), then write the table and the chart; returns the payload."""
    out, log = out or sys.stdout, log or sys.stderr
    problems = config.problems()
    if problems:
        raise UsageError("; ".join(problems))
    budget, spec, combos = config.budget_bytes(), model_spec(config.model), config.combos()
    device = config.device_name()
    payload: dict[str, Any] = {
        "benchmark": "capacity", "machine": machine_info(device), "config": asdict(config), "budget_bytes": budget,
        "model": spec.id, "baseline": combos[0].text, "random_weights": True,
        "memory_source": "cuda max_memory_allocated" if device.startswith("cuda") else
                         "peak resident set of a fresh process while generating and decoding, weights included",
        "note": "throughput at each configuration's largest batch that fits the budget; ratios against the baseline "
                "(the first configuration) at its own largest batch", "head_maps": {}, "results": []}
    write_json(config.output, payload)
    def watch(pid: int) -> str | None:  # CPU: a run whose resident set passes the budget cannot fit
        rss = resident_bytes(pid) if not device.startswith("cuda") else None
        return None if rss is None or rss <= budget else f"stopped at {format_bytes(rss)}: over the budget"

    for combo in combos:
        cell = cell_for(spec, 1, combo, backend=config.backend, device=device, dtype=combo.dtype or config.dtype,
                        cfg=config.cfg, seed=config.seed, repeats=config.repeats, warmup=config.warmup,
                        decode_chunk=config.decode_chunk, threads=config.threads)
        attach_head_map(cell, combo, payload, config.output, config.calibration_images, log)
        entry: dict[str, Any] = {"config": combo.text, "status": "running", "measurements": []}
        payload["results"].append(entry)

        def run(batch: int, cell: dict[str, Any], what: str, combo=combo) -> dict[str, Any]:
            print(f"{combo.text} batch {batch}: {what} ...", file=log, flush=True)
            t0 = time.perf_counter()
            row = run_cell_in_subprocess({**cell, "batch": batch}, config.timeout_s, watch=watch)
            row.setdefault("batch", batch)
            row["wall_s"] = time.perf_counter() - t0
            row["fits"] = fits(row, budget)
            peak = peak_of(row)
            shown = "failed: " + str(row.get("reason")) if peak is None else f"peak {format_bytes(peak)}"
            print(f"{combo.text} batch {batch}: {shown} ({'fits' if row['fits'] else 'over'} "
                  f"{format_bytes(budget)}), {row['wall_s']:.0f} s", file=log, flush=True)
            return row

        def measure(batch: int, cell=cell, entry=entry) -> dict[str, Any]:  # a search run: one generation
            row = run(batch, {**cell, "repeats": 1, "warmup": 0}, "fresh process")
            entry["measurements"].append(row)
            write_json(config.output, payload)
            return row

        found = largest_batch(measure, budget, config.probes, config.max_batch)
        entry.update({k: v for k, v in found.items() if k != "measurements"}, status="ok")
        best = next((r for r in entry["measurements"] if r.get("batch") == found["largest_batch"] and r["fits"]), None)
        if best is not None and (config.repeats > 1 or config.warmup > 0):
            timed = run(best["batch"], cell, f"throughput run ({config.repeats} timed generations)")
            entry["throughput_run"] = timed
            if timed["status"] == "ok":
                best = timed
            else:
                entry["throughput_note"] = (f"the throughput run failed ({timed.get('reason')}): images/s from the "
                                            f"search's single generation")
        if best is not None:
            entry.update(peak_bytes=max(peak_of(r) or 0 for r in (best, *entry["measurements"])
                                        if r.get("batch") == best["batch"]),
                         images_per_s=best["batch"] / best["transformer_s"],
                         tokens_per_s=best["tokens_per_s"], kv_bytes=best.get("cache_peak_bytes"),
                         timed_generations=best.get("repeats", 1))
        else:
            entry.update(status="none fits", images_per_s=None, tokens_per_s=None)
        add_capacity_ratios(payload["results"])
        write_json(config.output, payload)
    md = write_markdown(Path(config.output).with_suffix(".md"), payload)
    png = draw_chart(Path(config.output).with_suffix(".png"), payload)
    if config.table:
        print(table_text(payload), file=out)
    print(f"wrote {config.output}, {md}, {png}", file=out)
    return payload


def add_capacity_ratios(results: list[dict[str, Any]]) -> None:
    """Each configuration's largest batch and throughput over the baseline's (the first entry)."""
    base = results[0] if results else None
    for entry in results:
        ok = base is not None and base.get("images_per_s") and entry.get("images_per_s")
        entry["batch_ratio"] = entry["largest_batch"] / base["largest_batch"] if ok and base["largest_batch"] else None
        entry["throughput_ratio"] = entry["images_per_s"] / base["images_per_s"] if ok else None


# -- presentation ----------------------------------------------------------------------------------
TABLE_COLUMNS = (("config", "configuration"), ("largest_batch", "largest batch"), ("batch_ratio", "vs base"),
                 ("predicted_batch", "predicted"), ("peak", "peak at largest"), ("per_row", "per row"),
                 ("images_per_s", "images/s"), ("tokens_per_s", "tokens/s"), ("throughput_ratio", "vs base"),
                 ("runs", "runs"))


def table_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for entry in payload["results"]:
        rows.append({**entry, "peak": format_bytes(entry["peak_bytes"]) if entry.get("peak_bytes") else None,
                     "per_row": format_bytes(entry["per_row_bytes"]) if entry.get("per_row_bytes") else None,
                     "batch_ratio": f"{entry['batch_ratio']:.2f}x" if entry.get("batch_ratio") else None,
                     "throughput_ratio": f"{entry['throughput_ratio']:.2f}x" if entry.get("throughput_ratio") else None,
                     "largest_batch": largest_text(entry), "runs": len(entry["measurements"])})
    return rows


def largest_text(entry: dict[str, Any]) -> str | int:
    """The largest batch as the table shows it: where ``--max-batch`` stopped the search, a lower
    bound and the memory line's guess beside it."""
    if not entry.get("capped"):
        return entry["largest_batch"]
    guess = f"; about {entry['extrapolated_batch']} by the memory line" if entry.get("extrapolated_batch") else ""
    return f">= {entry['largest_batch']} (--max-batch{guess})"


def table_text(payload: dict[str, Any]) -> str:
    return (f"bench capacity: {payload['model']} within {format_bytes(payload['budget_bytes'])} "
            f"({payload['memory_source']})\n" + format_table(table_rows(payload), TABLE_COLUMNS))


def table_markdown(payload: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(h for _, h in TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for row in table_rows(payload):
        lines.append("| " + " | ".join(format_value(row.get(k)) for k, _ in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, payload: dict[str, Any]) -> Path:
    machine, config = payload["machine"], payload["config"]
    text = (f"# mvar-engine bench capacity\n\n{machine['device_name']} ({machine['device']}, {machine['cpu_count']} CPUs, "
            f"{machine['torch_threads']} torch threads), torch {machine['torch']}. Model `{payload['model']}` (random "
            f"weights), cfg {config['cfg']:g}, {config['dtype']}; budget {format_bytes(payload['budget_bytes'])} of "
            f"{payload['memory_source']}. Largest batch found by measurement (probes at batches "
            f"{', '.join(map(str, config['probes']))}, then the prediction and its neighbours, each in a fresh "
            f"process); throughput: median of {config['repeats']} generation(s) at that batch; ratios against "
            f"`{payload['baseline']}` at its own largest batch.\n\n" + table_markdown(payload) + "\n")
    return atomic_write(path, lambda tmp: tmp.write_text(marked_markdown(text)))


def draw_chart(path: Path, payload: dict[str, Any]) -> Path:
    """Images/s against batch for every measurement that fits, one line per configuration, its
    largest batch ringed."""
    from PIL import Image, ImageDraw

    width, height, margin = 760, 420, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    series = []
    for entry in payload["results"]:
        points = sorted((r["batch"], r["batch"] / r["transformer_s"]) for r in entry["measurements"]
                        if r.get("fits") and r.get("transformer_s"))
        series.append((entry, points))
    xs = [b for _, pts in series for b, _ in pts] or [1]
    ys = [v for _, pts in series for _, v in pts] or [1.0]
    x_max, y_max = max(xs) * 1.05, max(ys) * 1.15

    def at(batch: float, rate: float) -> tuple[float, float]:
        return (margin + (width - 2 * margin) * batch / x_max, height - margin - (height - 2 * margin) * rate / y_max)

    draw.line([at(0, 0), at(x_max, 0)], fill="black")
    draw.line([at(0, 0), at(0, y_max)], fill="black")
    draw.text((margin, 12), f"{payload['model']}: images/s against batch within {format_bytes(payload['budget_bytes'])} "
                            f"(ringed: largest batch that fits)", fill="black")
    draw.text((width // 2 - 20, height - margin + 18), "batch", fill="black")
    draw.text((6, margin - 20), f"images/s (max {max(ys):.3g})", fill="black")
    for index, (entry, points) in enumerate(series):
        colour = PALETTE[index % len(PALETTE)]
        coords = [at(b, v) for b, v in points]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for (b, v), (x, y) in zip(points, coords):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            if b == entry.get("largest_batch"):
                draw.ellipse([x - 8, y - 8, x + 8, y + 8], outline=colour, width=2)
        draw.text((width - margin - 250, margin + 16 * index), f"{entry['config']} (largest {entry['largest_batch']})",
                  fill=colour)
    return save_marked_image(image, path, format="PNG")


# -- command line ----------------------------------------------------------------------------------
def cmd_bench_capacity(argv: Sequence[str]) -> int:
    """``mvar-engine bench capacity``: parse, run, exit 0."""
    d = CapacityConfig()
    p = Parser(prog=f"{PROG} bench capacity", allow_abbrev=False,
               description="Throughput at a memory budget: per configuration the largest batch whose peak memory "
                           "(a fresh process, weights included) fits --memory-budget, found by measurement, and the "
                           "images/s there, against the baseline (the first configuration) at its own largest batch. "
                           "Writes JSON, a markdown table (.md) and a chart (.png).")
    p.add_argument("--memory-budget", default=d.memory_budget, metavar="SIZE",
                   help=f"e.g. 6GiB, 1.5GB, 800MiB (default {d.memory_budget})")
    p.add_argument("--model", default=d.model, help=f"benchmark model id (default {d.model}; d16-256 for VAR vs MVAR)")
    p.add_argument("--configs", type=name_list, default=None, metavar="T/A/C,...",
                   help="configurations, the first the baseline (default: raster full, sink@0.2, ssd@0.2; or "
                        "next-scale full/dense/full, markov/neighborhood/none)")
    p.add_argument("--probes", type=int_list, default=d.probes, metavar="B1,B2",
                   help="the two batches that estimate memory per row (default 1,3)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"search ceiling (default {d.max_batch})")
    add_run_flags(p, device=d.device, dtype=d.dtype, backend=d.backend, threads="torch threads per run",
                  timeout="limit per run")
    p.add_argument("--cfg", type=finite_float, default=d.cfg, help=f"classifier-free guidance (default {d.cfg:g})")
    p.add_argument("--seed", type=seed_int, default=d.seed)
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help=f"timed generations at the largest batch, median reported: above 1, one more fresh process "
                        f"there after the search, whose runs time one each (default {d.repeats})")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"untimed generations first in that throughput run (default {d.warmup})")
    p.add_argument("--decode-chunk", type=int, default=d.decode_chunk, metavar="N")
    p.add_argument("--calibration-images", type=int, default=d.calibration_images, metavar="N")
    add_report_flags(p, d.output)
    args = p.parse_args(argv)
    check_output_path("--output", args.output, (".json",))
    check_outputs(report_outputs(args.output, (".md", ".png")), args.overwrite)
    run_capacity(CapacityConfig(memory_budget=args.memory_budget, model=args.model, configs=args.configs,
                                probes=args.probes, max_batch=args.max_batch, backend=args.backend, device=args.device,
                                dtype=args.dtype, cfg=args.cfg, seed=args.seed, repeats=args.repeats,
                                warmup=args.warmup, decode_chunk=args.decode_chunk,
                                calibration_images=args.calibration_images, threads=args.threads,
                                timeout_s=args.timeout_s, output=args.output, table=not args.no_table))
    return 0
