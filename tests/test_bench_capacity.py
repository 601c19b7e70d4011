"""``mvar-engine bench capacity``: the largest-batch search (against simulated memory), sizes, bad
input, and one end-to-end run in fresh processes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvar_engine.apps.bench.capacity import CapacityConfig, largest_batch, largest_text, parse_size


def simulated(fixed: int, per_row: int, wobble: int = 0, dies_above: int | None = None):
    """``measure(batch)``: a peak of ``fixed + per_row * batch`` (+ a wobble that grows with the
    batch, as allocators do); a process above ``dies_above`` is killed. Records the batches run."""
    runs = []

    def measure(batch: int):
        runs.append(batch)
        if dies_above is not None and batch > dies_above:
            return {"status": "error", "reason": "killed by signal 9 (out of memory?)", "batch": batch}
        return {"status": "ok", "batch": batch, "peak_rss_total": fixed + per_row * batch + wobble * batch * batch,
                "peak_load": 10 * fixed}  # the load's transient does not count

    return measure, runs


@settings(max_examples=60, deadline=None)
@given(fixed=st.integers(100, 10_000), per_row=st.integers(1, 500), wobble=st.integers(0, 20),
       budget=st.integers(100, 200_000), max_batch=st.integers(4, 400))
def test_the_search_finds_the_true_largest_batch(fixed, per_row, wobble, budget, max_batch):
    measure, runs = simulated(fixed, per_row, wobble)
    found = largest_batch(measure, budget, (1, 3), max_batch)
    peak = lambda b: fixed + per_row * b + wobble * b * b  # noqa: E731
    truth = max([b for b in range(1, max_batch + 1) if peak(b) <= budget], default=0)
    assert found["largest_batch"] == truth
    if 0 < truth < max_batch:
        assert truth in runs and truth + 1 in runs  # confirmed on both sides, never the prediction alone
    assert len(runs) == len(set(runs))  # no batch measured twice


def test_a_linear_peak_is_found_in_five_runs():
    """Probes 1 and 3, a jump capped at 4x (12), the re-measured slope's prediction, its neighbour."""
    measure, runs = simulated(fixed=1000, per_row=100)
    found = largest_batch(measure, 2550, (1, 3), 1024)
    assert found["largest_batch"] == 15 and found["predicted_batch"] == 12 and runs == [1, 3, 12, 15, 16]
    assert found["per_row_bytes"] == 100 and found["fixed_bytes"] == 1000


def test_a_ceiling_reports_the_memory_line_of_the_largest_batches():
    """--max-batch stops the search below the true largest batch (15): the entry is capped, and the
    line through the two largest batches measured (3 and 12) extrapolates to 15."""
    measure, runs = simulated(fixed=1000, per_row=100)
    found = largest_batch(measure, 2550, (1, 3), 12)
    assert found["largest_batch"] == 12 and found["capped"] and runs == [1, 3, 12]
    assert (found["per_row_bytes"], found["fixed_bytes"], found["extrapolated_batch"]) == (100, 1000, 15)
    assert largest_text(found) == ">= 12 (--max-batch; about 15 by the memory line)"
    flat = largest_batch(simulated(fixed=1000, per_row=0)[0], 2550, (1, 3), 12)
    assert flat["extrapolated_batch"] is None and largest_text(flat) == ">= 12 (--max-batch)"


def test_a_process_killed_for_memory_does_not_fit():
    measure, runs = simulated(fixed=1000, per_row=100, dies_above=9)
    assert largest_batch(measure, 2550, (1, 3), 1024)["largest_batch"] == 9


def test_a_fixed_decoding_peak_does_not_hide_the_slope():
    """The probes' whole peaks are a batch-independent decode (1500); the generation's grows by 100
    a row: the prediction follows the generation."""
    runs = []

    def measure(batch):
        runs.append(batch)
        generation = 1000 + 100 * batch
        return {"status": "ok", "batch": batch, "peak_rss_transformer": generation,
                "peak_rss_total": max(generation, 1500)}

    found = largest_batch(measure, 2550, (1, 3), 1024)
    assert found["largest_batch"] == 15 and runs == [1, 3, 12, 15, 16]


def test_fixed_transients_at_the_probes_do_not_send_the_search_far():
    """LlamaGen-B with a sink cache, measured: batches 1 and 3 peak at 1001 and 1003 MiB (a fixed
    transient hides the cache), so the first slope is tiny; the search goes up 4x at a time and
    re-measures the slope instead of running batch 192."""
    runs = []

    def measure(batch):
        runs.append(batch)
        generation = max(1000, 936 + 16 * batch + 20)
        return {"status": "ok", "batch": batch, "peak_rss_transformer": generation, "peak_rss_total": max(generation, 1320)}

    found = largest_batch(measure, 1500, (1, 3), 1024)
    assert found["largest_batch"] == 34 and max(runs) <= 48 and runs[:3] == [1, 3, 12]


def test_nothing_fits_below_the_first_probe():
    measure, runs = simulated(fixed=5000, per_row=100)
    found = largest_batch(measure, 1000, (1, 3), 1024)
    assert found["largest_batch"] == 0 and runs == [1, 3]


@pytest.mark.parametrize("text, value", [("6GiB", 6 * 2**30), ("1.5 GB", 1_500_000_000), ("800MiB", 800 * 2**20),
                                         ("4096B", 4096), ("2g", 2 * 2**30)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "six", "6 GiBs", "-1GiB", "0B", "nan", "1e999GiB", "10", "4096"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("argv, needle", [
    (["--memory-budget", "lots"], "is not a size"),
    (["--memory-budget", "10"], "'10' has no unit (give 10GiB, 10MiB or 10B)"),
    (["--memory-budget", "1e30GiB"], "--memory-budget 1e30GiB: more than the"),
    (["--memory-budget", "200MiB"], "200 MiB cannot hold llamagen-b's float32 weights (at least 538 MiB) plus one batch row"),
    (["--model", "d16-256", "--memory-budget", "1GiB"], "cannot hold d16-256's float32 weights (at least"),
    (["--model", "janus-pro-1b", "--memory-budget", "4GiB"], "4 GiB cannot hold janus-pro-1b's float32 weights (at least"),
    (["--probes", "3,1"], "--probes takes two increasing batch sizes"),
    (["--model", "d16-256", "--configs", "raster/dense/full"], "is next-token, but model d16-256 is next-scale"),
    (["--configs", "raster/dense/nonsense"], "nonsense"),
    (["--output", "c.txt"], "--output c.txt: the file name must end in .json"),
    (["--cfg", "nan"], "expected a finite number"),
    (["--model", "janus-tiny", "--configs", "raster/dense/full,raster/dense/ssd:budget=0.2"],
     "configuration 'raster/dense/ssd:budget=0.2': --cache-budget 0.2 gives 6 token(s), not more than the 16 class"),
    (["--model", "janus-tiny", "--configs", "raster/dense/full,raster/dense/sink:budget=0.2"], "--cache-budget 0.2 gives"),
    (["--model", "tiny", "--configs", "full/dense/full,markov/neighborhood:apply_from=99/none"],
     "--attention-apply-from 99: the schedule has 3 scales"),
])
def test_bad_input_is_one_line_before_any_process(argv, needle, refused):
    refused(["bench", "capacity"] + argv, needle)


def test_programmatic_config_problems():
    assert any("--max-batch" in p for p in CapacityConfig(max_batch=1).problems())


def test_end_to_end_in_fresh_processes(tmp_cwd, capsys):
    from mvar_engine.apps.cli import main

    argv = ["bench", "capacity", "--model", "raster-tiny", "--memory-budget", "4GiB", "--max-batch", "4",
            "--configs", "raster/dense/full,raster/dense/sink:budget=0.5", "--threads", "1", "--device", "cpu",
            "--output", "c.json"]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads((tmp_cwd / "c.json").read_text())
    full, sink = data["results"]
    assert data["benchmark"] == "capacity" and data["baseline"] == "raster/dense/full"
    assert full["largest_batch"] == sink["largest_batch"] == 4 and full["capped"]  # tiny rows: the ceiling binds
    assert [m["batch"] for m in full["measurements"]][:2] == [1, 3]
    assert all(m["fits"] and m["status"] == "ok" for m in full["measurements"])
    assert sink["throughput_ratio"] > 0 and full["throughput_ratio"] == 1.0
    assert (tmp_cwd / "c.md").read_text().count("| raster/dense/") == 2 and (tmp_cwd / "c.png").stat().st_size > 0
    out = capsys.readouterr().out  # the memory line's guess shows only where the peaks grew (page-granular here)
    assert ">= 4 (--max-batch" in out and all(str(largest_text(entry)) in out for entry in (full, sink))


def test_repeats_time_the_largest_batch_in_one_more_process(tmp_cwd, capsys):
    """The search's runs time one generation each; --repeats N adds one fresh process at the largest
    batch timing N generations, and the reported images/s is its median."""
    from mvar_engine.apps.cli import main

    argv = ["bench", "capacity", "--model", "raster-tiny", "--memory-budget", "4GiB", "--probes", "1,2", "--max-batch",
            "2", "--configs", "raster/dense/full", "--repeats", "2", "--threads", "1", "--device", "cpu",
            "--output", "c.json"]
    assert main(argv) == 0, capsys.readouterr().err
    (entry,) = json.loads((tmp_cwd / "c.json").read_text())["results"]
    assert [(m["batch"], m["repeats"]) for m in entry["measurements"]] == [(1, 1), (2, 1)]
    timed = entry["throughput_run"]
    assert (timed["batch"], timed["repeats"], entry["timed_generations"]) == (2, 2, 2)
    assert entry["images_per_s"] == pytest.approx(2 / timed["transformer_s"])
    assert "throughput run (2 timed generations)" in capsys.readouterr().err


def test_a_watched_worker_is_stopped_when_the_watch_says_so():
    import os
    import time

    from mvar_engine.apps.bench.report import resident_bytes, run_json_worker

    assert resident_bytes(os.getpid()) > 10 * 2**20
    seen = []
    start = time.perf_counter()
    row = run_json_worker("mvar_engine.apps.bench.matrix", json.dumps({"model": "llamagen-b", "batch": 64}),
                          watch=lambda pid: seen.append(pid) or "over the budget")
    assert row == {"status": "stopped", "reason": "over the budget"} and seen
    assert time.perf_counter() - start < 10  # stopped at the first look, not after a generation
