"""``mvar-engine bench train``: both strategies measured in fresh processes, report structure, errors."""

from __future__ import annotations

import json

import pytest

from mvar_engine.apps.bench.train import BenchTrainConfig, run_strategy
from mvar_engine.apps.cli import main

TINY = dict(depth=1, patch_nums=(1, 2, 3, 4), batch_size=1, steps=1, ratio=(2, 1, 1), kernel_size=3)


def test_parallel_groups_follow_the_neighbourhood_split():
    parallel = run_strategy(BenchTrainConfig(**TINY), "parallel")
    sequence = run_strategy(BenchTrainConfig(**TINY), "sequence")
    assert parallel["groups"] == [[0, 1], [2], [3]]  # apply_from -2: the last two scales train alone
    assert sequence["groups"] == [[0, 1, 2, 3]]
    assert parallel["tokens_per_step"] == {"scales 0-1": 5, "scales 2": 9, "scales 3": 16}
    assert sequence["tokens_per_step"] == {"scales 0-3": 30}
    assert parallel["peak_bytes"] > 0 and parallel["mean_step_ms"] > 0


def test_cli_runs_both_strategies_and_writes_json(tmp_cwd, capsys):
    argv = ["bench", "train", "--depth", "1", "--patch-nums", "1,2,3,4", "--batch-size", "1", "--steps", "1",
            "--ratio", "2:1:1", "--kernel-size", "3", "--output", "t.json"]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads((tmp_cwd / "t.json").read_text())
    assert [r["strategy"] for r in data["results"]] == ["sequence", "parallel"]
    assert data["peak_ratio_sequence_over_parallel"] > 0
    assert "sequence / parallel peak memory" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--strategies", "sequence,bogus"], "unknown strategy 'bogus'"),
    (["--patch-nums", "1,2"], "at least 3 scales"),
    (["--depth", "0"], "at least 1"),
    (["--ratio", "8:1"], "--ratio 8:1 has 2 entries but the parallel strategy forms 3 groups"),
    (["--ratio", "0:1:1"], "every count must be a positive integer"),
    (["--ratio", "8::1"], "colon-separated integers"),
    (["--kernel-size", "0"], "kernel_size"),
    (["--depth", "99999999999"], "the model needs at least"),
])
def test_bad_input_is_one_line(tmp_cwd, argv, needle, capsys):
    assert main(["bench", "train"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_throughput_rows_run_real_training_steps(tmp_cwd, capsys):
    """--throughput: VAR and MVAR from codes and from images, each a real training run in a fresh
    process; the parallel row weighs its groups by the ratio; shares are fractions of the step."""
    argv = ["bench", "train", "--throughput", "--depth", "1", "--patch-nums", "1,2,4", "--batch-size", "2",
            "--images", "4", "--cycles", "1", "--precisions", "fp32,fp16", "--workers", "0", "--output", "t.json"]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads((tmp_cwd / "t.json").read_text())
    rows = {(r["model"], r["precision"], r["source"]): r for r in data["results"]}
    assert set(rows) == {(m, p, s) for m in ("VAR", "MVAR") for p in ("fp32", "fp16") for s in ("codes", "images")}
    assert all("CUDA only" in rows[m, "fp16", s]["skipped"] for m in ("VAR", "MVAR") for s in ("codes", "images"))
    for (model, precision, source), row in rows.items():
        if precision == "fp16":
            continue
        assert row["images_per_s"] == pytest.approx(2 / row["step_s"]) and 0 <= row["data_wait_share"] < 1
        groups = {r["group"] for r in row["steps"]}
        assert len(groups) == (3 if model == "MVAR" else 1) and len(row["steps"]) == 2 * len(groups)
    mvar = rows["MVAR", "fp32", "codes"]["median_step_s_per_group"]
    assert list(mvar) == ["0", "1", "2"]  # the parallel groups: one scale each at this schedule
    assert rows["MVAR", "fp32", "codes"]["step_s"] == pytest.approx((8 * mvar["0"] + mvar["1"] + mvar["2"]) / 10)
    # encoding the images each step is work the codes spare
    assert rows["VAR", "fp32", "images"]["prepare_share"] > rows["VAR", "fp32", "codes"]["prepare_share"]
    assert data["cache_codes"]["images_per_s"] > 0 and "cache-codes:" in capsys.readouterr().out
