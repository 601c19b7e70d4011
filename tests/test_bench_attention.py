"""``mvar-engine bench attention`` and the shared bench helpers; backend capabilities in ``plugins``."""

from __future__ import annotations

import json

import pytest
import torch

from mvar_engine.apps.bench import attention as bench_attention
from mvar_engine.core.attention import AttentionBackend
from mvar_engine.apps.bench.attention import DENSE_ROW, AttentionBench, BenchAttentionConfig, Contender
from mvar_engine.apps.bench.report import (format_table, median_time, repeats_within, scaled_estimate, skip_reason,
                                           write_json)
from mvar_engine.apps.cli import main
from mvar_engine.core.neighborhood import neighborhood_mask_2d

SMALL = ["bench", "attention", "--sides", "8,16", "--kernel-size", "3", "--heads", "2", "--head-dim", "8",
         "--batches", "1", "--repeats", "2"]
ROW_KEYS = {"side", "N", "batch", "backend", "spec", "status", "reason", "median_ms", "repeats", "first_call_ms",
            "flops", "gflops_per_s", "speedup_vs_dense_sdpa", "flop_ceiling", "max_abs_err"}


def run_small(capsys, *extra: str, output: str = "tmp/x.json") -> tuple[dict, str]:
    assert main([*SMALL, *extra, "--output", output]) == 0
    out = capsys.readouterr().out
    with open(output) as handle:
        return json.load(handle), out


def test_report_structure_baseline_ceiling_and_error(tmp_cwd, capsys):
    data, out = run_small(capsys, "--backends", "sdpa,reference")
    assert data["benchmark"] == "attention"
    assert {"torch", "device_name", "cpu_count", "torch_threads", "python"} <= set(data["machine"])
    assert data["config"]["sides"] == [8, 16] and data["config"]["backends"] == ["sdpa", "reference"]
    rows = data["results"]
    assert [(r["side"], r["backend"]) for r in rows] == [(8, DENSE_ROW), (8, "sdpa"), (8, "reference"),
                                                        (16, DENSE_ROW), (16, "sdpa"), (16, "reference")]
    for row in rows:
        assert set(row) == ROW_KEYS and row["status"] == "ok" and row["repeats"] == 2
        n = row["side"] ** 2
        pairs = int(neighborhood_mask_2d(row["side"], row["side"], 3, 1, False, "cpu").sum())
        assert row["N"] == n and row["flop_ceiling"] == pytest.approx(n * n / pairs)
        dense = row["backend"] == DENSE_ROW
        assert row["spec"] == ("dense" if dense else f"neighborhood2d({row['side']}x{row['side']}, k=3)")
        assert row["flops"] == 4 * 1 * 2 * 8 * (n * n if dense else pairs)
        assert row["gflops_per_s"] == pytest.approx(row["flops"] / row["median_ms"] / 1e6)
        base = next(r for r in rows if r["side"] == row["side"] and r["backend"] == DENSE_ROW)
        assert row["speedup_vs_dense_sdpa"] == pytest.approx(base["median_ms"] / row["median_ms"])
        if dense:
            assert row["max_abs_err"] is None
        else:
            assert 0 <= row["max_abs_err"] < 1e-5
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["side", "batch", "backend", "median"] and "FLOP ceiling" in lines[0]
    assert sum(DENSE_ROW in line for line in lines) == 2
    assert lines[-2].startswith("fastest neighbourhood backend: 8x8 b1: ") and "16x16 b1: " in lines[-2]
    assert lines[-1] == "wrote tmp/x.json"


def test_no_table(tmp_cwd, capsys):
    data, out = run_small(capsys, "--backends", "sdpa", "--sides", "8", "--no-table")
    assert len(data["results"]) == 2
    assert "median ms" not in out and out.splitlines()[0].startswith("fastest neighbourhood backend:")


def test_unsupported_backend_has_a_reason(tmp_cwd, capsys):
    pytest.importorskip("natten")
    data, out = run_small(capsys, "--backends", "natten", "--head-dim", "12", "--sides", "8")
    row = data["results"][1]
    assert row["backend"] == "natten" and row["status"] == "unsupported"
    assert "head_dim" in row["reason"] and row["median_ms"] is None and row["max_abs_err"] is None
    assert "unsupported: natten" in out and "8x8 b1: none" in out


def test_unavailable_named_backend_is_a_row(tmp_cwd, capsys):
    if torch.cuda.is_available():
        pytest.skip("xformers may be available with CUDA")
    data, _ = run_small(capsys, "--backends", "xformers", "--sides", "8")
    row = data["results"][1]
    assert row["status"] == "unavailable" and "xformers" in row["reason"]


def test_default_backends_exclude_reference(tmp_cwd):
    bench = AttentionBench(BenchAttentionConfig(output="x.json"))
    names = [c.name for c in bench.contenders]
    assert "sdpa" in names and "reference" not in names
    assert all(c.backend is not None for c in bench.contenders)


@pytest.mark.parametrize("argv,needle", [
    (["--sides", "0"], "argument --sides: expected comma-separated positive integers"),
    (["--sides", "8,x"], "argument --sides: expected comma-separated positive integers"),
    (["--batches", "-1"], "argument --batches"),
    (["--backends", "sdpa,nope"], "unknown attention backend 'nope' (known: "),
    (["--kernel-size", "0"], "--kernel-size must be at least 1"),
    (["--budget-s", "0"], "--budget-s must be positive"),
    (["--dtype", "float8"], "argument --dtype: invalid choice"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_input_is_one_line_exit_2(tmp_cwd, argv, needle, capsys):
    assert main(["bench", "attention", *argv, "--output", "x.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mvar-engine: error: ") and needle in err[0], err
    assert not (tmp_cwd / "x.json").exists()


def test_unknown_backend_lists_known_ones(tmp_cwd, capsys):
    assert main(["bench", "attention", "--backends", "nope"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("sdpa", "reference", "natten"))


def test_cuda_without_cuda_is_a_usage_error(tmp_cwd, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    assert main(["bench", "attention", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda: no CUDA device" in err[0]


def test_bench_without_subcommand_lists_benchmarks(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "usage: mvar-engine bench" in out
    assert main(["bench", "nope"]) == 2
    assert "unknown bench command 'nope' (available: attention" in capsys.readouterr().err


def test_generate_stays_the_default_command(capsys):
    assert main(["--help"]) == 0
    assert "--var-checkpoint" in capsys.readouterr().out


# -- budget ---------------------------------------------------------------------------------------
def test_estimator_scales_quadratically_and_skips_past_four_budgets():
    assert scaled_estimate(None, 4096) is None
    assert scaled_estimate((256, 0.5), 4096) == pytest.approx(0.5 * 16 ** 2)
    assert scaled_estimate((256, 0.5), 256) == pytest.approx(0.5)
    assert skip_reason(None, 30) is None
    assert skip_reason(120.0, 30) is None  # exactly 4x the budget still runs
    reason = skip_reason(128.0, 30)
    assert reason is not None and "128" in reason and "4 x budget (30 s)" in reason


def test_repeats_follow_the_budget():
    assert repeats_within(30, 10, 5) == 3
    assert repeats_within(30, 100, 5) == 1
    assert repeats_within(30, 0.001, 5) == 5
    calls = []
    timing = median_time(lambda: calls.append(1), repeats=4, budget_s=10)
    assert timing.repeats == 4 and len(calls) == 5 and timing.median_s >= 0 and timing.first_call_s >= 0


def test_tiny_budget_skips_larger_sides(tmp_cwd, capsys):
    data, out = run_small(capsys, "--backends", "sdpa", "--budget-s", "1e-9")
    small = [r for r in data["results"] if r["side"] == 8]
    large = [r for r in data["results"] if r["side"] == 16]
    assert all(r["status"] == "ok" and r["repeats"] == 1 for r in small)
    assert [r["status"] for r in large] == ["skipped", "skipped"]
    assert all("estimated" in r["reason"] and "N=64" in r["reason"] for r in large)
    assert large[1]["speedup_vs_dense_sdpa"] is None


# -- guarding against wrong or failing backends ------------------------------------------------------
class _Zeros(AttentionBackend):
    name = "zeros"

    def attend(self, q, k, v, spec, *, scale):
        return torch.zeros_like(q)


class _Broken(AttentionBackend):
    name = "broken"

    def attend(self, q, k, v, spec, *, scale):
        raise RuntimeError("kernel exploded\nsecond line")


def _bench_with(contenders, tmp_path, **options) -> AttentionBench:
    config = BenchAttentionConfig(sides=(8,), kernel_size=3, heads=2, head_dim=8, batches=(1,), repeats=1,
                                  output=str(tmp_path / "r.json"), backends=("sdpa",), **options)
    bench = AttentionBench(config)
    bench.contenders = contenders
    return bench


def test_wrong_backend_shows_a_large_error_and_failing_one_an_error_row(tmp_path):
    bench = _bench_with([Contender("zeros", _Zeros()), Contender("broken", _Broken())], tmp_path)
    rows = {r["backend"]: r for r in bench.run()}
    assert rows["zeros"]["status"] == "ok" and rows["zeros"]["max_abs_err"] > 0.1
    assert rows["broken"]["status"] == "error"
    assert rows["broken"]["reason"] == "RuntimeError: kernel exploded; second line"
    assert json.loads((tmp_path / "r.json").read_text())["results"] == bench.results


def test_interrupted_run_keeps_measured_rows(tmp_cwd, capsys, monkeypatch):
    real = AttentionBench.make_cell

    def make_cell(self, side, batch):
        if side == 16:
            raise KeyboardInterrupt
        return real(self, side, batch)

    monkeypatch.setattr(bench_attention.AttentionBench, "make_cell", make_cell)
    assert main([*SMALL, "--backends", "sdpa", "--output", "tmp/x.json"]) == 130
    rows = json.loads((tmp_cwd / "tmp" / "x.json").read_text())["results"]
    assert [(r["side"], r["backend"]) for r in rows] == [(8, DENSE_ROW), (8, "sdpa")]


# -- report helpers ------------------------------------------------------------------------------
def test_format_table_aligns_numbers_right_and_text_left():
    rows = [{"name": "a", "ms": 1.5, "n": 10}, {"name": "longer", "ms": None, "n": 2}]
    lines = format_table(rows, [("name", "NAME"), ("n", "N"), ("ms", "MS")]).splitlines()
    assert lines == ["NAME     N    MS",
                     "a       10  1.50",
                     "longer   2     -"]


def test_write_json_round_trips(tmp_path):
    """The payload comes back whole, after a first key naming what wrote it."""
    from mvar_engine.core.files import writing_as

    with writing_as("bench attention"):
        path = write_json(tmp_path / "sub" / "r.json", {"a": [1, 2], "b": None})
    assert json.loads(path.read_text()) == {"written_by": "mvar-engine bench attention", "a": [1, 2], "b": None}
    assert list(json.loads(path.read_text())) == ["written_by", "a", "b"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]


# -- plugins ----------------------------------------------------------------------------------------
def test_plugins_json_has_backend_capabilities(capsys):
    assert main(["plugins", "--json"]) == 0
    components = json.loads(capsys.readouterr().out)["components"]
    backends = {c["name"]: c for c in components if c["kind"] == "backend"}
    assert backends["sdpa"]["capabilities"].startswith("any pattern; ")
    assert "cpu" in backends["sdpa"]["capabilities"]
    assert backends["natten"]["capabilities"].startswith("neighborhood2d; ")
    assert "head_dim <= 256" in backends["flash-attn"]["capabilities"]  # from the class, even when unavailable
    assert all("capabilities" not in c for c in components if c["kind"] != "backend")


def test_plugins_table_shows_capabilities(capsys):
    assert main(["plugins", "--kind", "backend"]) == 0
    lines = capsys.readouterr().out.splitlines()
    sdpa = next(i for i, line in enumerate(lines) if line.split()[:2] == ["backend", "sdpa"])
    assert lines[sdpa + 1].strip().startswith("capabilities: any pattern")


def test_a_call_that_cannot_fit_in_memory_is_skipped_not_run():
    from mvar_engine.backends.natten_backend import NattenBackend
    from mvar_engine.backends.reference import ReferenceBackend
    from mvar_engine.backends.sdpa import SdpaBackend
    from mvar_engine.core.attention import Neighborhood2D
    from mvar_engine.apps.bench.attention import Cell, memory_reason

    side, batch = 64, 8
    q = torch.empty(batch, 16, side * side, 64)
    cell = Cell(side, batch, Neighborhood2D(side, side, 7), q, q, q, 0.125)
    cpu = torch.device("cpu")
    eight_gib = 8 * 2**30
    reason = memory_reason(NattenBackend(), cell.spec, cell, cpu, available=eight_gib)
    assert reason is not None and "GiB" in reason and "\n" not in reason  # 8 x 16 x 4096^2 floats, three times
    assert memory_reason(ReferenceBackend(), cell.spec, cell, cpu, available=eight_gib) is not None
    assert memory_reason(SdpaBackend(), cell.spec, cell, cpu, available=eight_gib) is None  # tiled: a few MiB
    assert memory_reason(NattenBackend(), cell.spec, cell, cpu, available=2**50) is None
