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
