"""Bad input to the report commands (bench attention/train/matrix/cache, evaluate) and the last
generate/train holes: one line, exit 2, before any work, nothing written."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvar_engine.apps.bench.cache import BenchCacheConfig
from mvar_engine.apps.bench.matrix import MatrixConfig

HUGE = "99999999999999999999999"
NOT_FINITE = st.sampled_from(["inf", "-inf", "nan", "NaN", "1e999", "-1e999"])

FINITE_FLAGS = [(["bench", "matrix"], "--cfg"), (["bench", "matrix"], "--timeout-s"),
                (["bench", "cache"], "--cfg"), (["bench", "cache"], "--top-p"), (["bench", "cache"], "--timeout-s"),
                (["bench", "attention"], "--budget-s")]


@pytest.mark.parametrize("command, flag", FINITE_FLAGS)
@settings(max_examples=6, deadline=None)
@given(value=NOT_FINITE)
def test_report_commands_refuse_inf_and_nan(command, flag, value, refused):
    refused(command + [f"{flag}={value}"], f"argument {flag}: expected a finite number")


SEED_FLAGS = [(["bench", "matrix"], "--seed"), (["bench", "cache"], "--seed"), (["bench", "attention"], "--seed"),
              (["bench", "train"], "--seed"), (["evaluate"], "--seed"), (["evaluate"], "--classifier-seed")]


@pytest.mark.parametrize("command, flag", SEED_FLAGS)
@settings(max_examples=6, deadline=None)
@given(value=st.one_of(st.integers(min_value=2**64), st.integers(max_value=-(2**63) - 1)))
def test_report_commands_refuse_seeds_torch_cannot_take(command, flag, value, refused):
    refused(command + [f"{flag}={value}"], "a seed is an integer from -2**63 to 2**64 - 1")


@pytest.mark.parametrize("budgets, needle", [("0.2,,0.5", "empty entry between commas"), (",", "expected comma"),
                                             ("0.2,x", "expected a number"), ("0.2,nan", "expected a finite number")])
def test_bench_cache_budget_lists(budgets, needle, refused):
    refused(["bench", "cache", "--budgets", budgets], needle)


def test_programmatic_bench_configs_refuse_nan():
    """The configs check their own numbers too (the Python API skips argparse)."""
    nan = float("nan")
    assert any("--cfg" in p for p in MatrixConfig(cfg=nan).problems())
    assert any("--timeout-s" in p for p in MatrixConfig(timeout_s=nan).problems())
    assert any("--cfg" in p for p in BenchCacheConfig(cfg=nan).problems())
    assert any("--timeout-s" in p for p in BenchCacheConfig(timeout_s=nan).problems())


BENCH_TRAIN = ["bench", "train", "--depth", "1", "--patch-nums", "1,2,3", "--batch-size", "1", "--steps", "1",
               "--device", "cpu", "--no-table", "--output", "bt.json"]


@pytest.mark.parametrize("extra, needle", [
    (["--kernel-size", "0"], "kernel_size"),
    (["--ratio", "0:1:1"], "every count must be a positive integer"),
    (["--strategies", "sequence", "--ratio", "0:1:1"], "every count must be a positive integer"),
    (["--ratio", "1:1"], "has 2 entries but the parallel strategy forms 3 groups"),
    (["--ratio", "1::1"], "colon-separated integers"),
])
def test_bench_train_checks_before_any_process(extra, needle, refused, capsys):
    refused(BENCH_TRAIN + extra, needle)
    assert "fresh process" not in capsys.readouterr().out  # no progress line before the error


def test_evaluate_classifier_directory_is_refused_before_training(refused, tmp_cwd):
    (tmp_cwd / "cdir").mkdir()
    refused(["evaluate", "--classifier", "cdir"], "--classifier cdir: is a directory")


def test_random_weights_beside_files(refused, tmp_cwd):
    refused(["--random-weights", "--var-checkpoint", "a.safetensors", "--vae-checkpoint", "b.safetensors"],
            "--checkpoint and --tokenizer would be ignored")
    refused(["--random-weights", "--model-dir", "hf"], "--model-dir: model 'var' has no such option (model 'janus' has")


def test_an_empty_head_map_path(refused):
    refused(["--trajectory", "raster", "--cache", "ssd", "--cache-budget", "0.5", "--cache-head-map", ""],
            "option head_map: the path is empty")


def test_a_tokenizer_directory_names_the_file_to_give(refused, tmp_cwd):
    (tmp_cwd / "tok").mkdir()
    refused(["train", "--tokenizer", "tok", "--steps", "1"], "--tokenizer tok is a directory, not a file (give the "
                                                              "tokenizer file in it, e.g. tok/tokenizer.safetensors)")


@pytest.mark.parametrize("value", ["99", "-99", HUGE])
def test_training_apply_from_outside_the_schedule(value, refused):
    from mvar_engine.models.default_models import default_checkpoints

    refused(["train", "--tokenizer", str(default_checkpoints("markov")[1]), "--steps", "1", "--depth", "1",
             "--embed-dim", "32", "--num-heads", "2", "--no-progress", "--output", "run",
             "--attention-apply-from", value], "--attention-apply-from")
