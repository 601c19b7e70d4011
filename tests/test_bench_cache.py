"""``mvar-engine bench cache``: every policy on the tiny raster model, the full row as the baseline
(ratio 1, agreement 1, KL 0), covering budgets exact, 20% budgets within 1/5 of full's bytes, the
fresh-process path, the JSON and markdown reports, target lines, ``--max-tokens`` and bad flags."""

from __future__ import annotations

import json

import pytest
import torch

from mvar_engine.apps.bench import cache as bc
from mvar_engine.apps.bench import quality as bq
from mvar_engine.apps.bench.report import format_markdown_table
from mvar_engine.apps.cli import main

POLICIES = ("full", "window", "sink", "h2o", "ssd")
FAST = ["--model", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "0", "--calibration-images", "2"]


def _rows(data):
    return {(r["policy"], r["budget"]): r for r in data["results"]}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One in-process run of every policy at 20% and a covering budget (1.0)."""
    out = tmp_path_factory.mktemp("bench_cache") / "cache.json"
    config = bc.BenchCacheConfig(model="tiny", batch=2, repeats=1, warmup=0, budgets=(0.2, 1.0), calibration_images=2,
                                 quality_images=3, isolate=False, output=str(out), table=False)
    payload = bc.run_bench_cache(config, out=open("/dev/null", "w"), log=open("/dev/null", "w"))
    return out, payload


def test_every_policy_runs_and_full_is_the_baseline(report):
    out, payload = report
    rows = _rows(payload)
    assert [r["policy"] for r in payload["results"]] == ["full"] + [p for p in POLICIES[1:] for _ in range(2)]
    assert all(r["status"] == "ok" for r in payload["results"]), payload["results"]
    full = rows[("full", None)]
    assert full["kv_ratio"] == 1 and full["speedup"] == 1 and full["bookkeeping_bytes"] == 0
    assert full["top1_agreement"] == 1.0 and full["kl"] == 0 and full["sampled_agreement"] == 1.0
    assert full["rows"] == 4 and full["tokens_per_image"] == 36 and full["budget_tokens"] == 37
    assert full["kv_bytes"] > 0 and full["tokens_per_s"] > 0 and full["s_per_image"] > 0
    assert payload["head_map"]["calibrated"] and payload["head_map"]["sink_heads"] + payload["head_map"]["local_heads"] == 4
    assert payload["model"]["random_weights"] and payload["model"]["sequence_length"] == 37


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_a_covering_budget_equals_full(report, policy):
    row = _rows(report[1])[(policy, 1.0)]
    assert row["top1_agreement"] == 1.0 and row["kl"] < 1e-6 and row["sampled_agreement"] == 1.0
    assert row["kv_ratio"] == 1.0


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_a_20_percent_budget_stores_at_most_a_fifth(report, policy):
    rows = _rows(report[1])
    row, full = rows[(policy, 0.2)], rows[("full", None)]
    assert row["budget_tokens"] == 7  # round(0.2 * 37), class token included
    assert row["kv_bytes"] <= 0.2 * full["kv_bytes"] + 64
    assert row["bookkeeping_bytes"] > 0 and row["cache_bytes"] == row["kv_bytes"] + row["bookkeeping_bytes"]
    assert 0 <= row["top1_agreement"] <= 1 and row["kl"] >= 0 and row["quality_tokens"] == 3 * 36


def test_reports_are_written(report):
    out, payload = report
    data = json.loads(out.read_text())
    assert data["results"] == json.loads(json.dumps(payload["results"]))
    assert {t["policy"] for t in data["targets"]} == set(POLICIES[1:]) and all(t["met"] for t in data["targets"])
    md = out.with_suffix(".md").read_text()
    assert md.count("\n| ") >= 1 + 9 and "KL(full||policy)".replace("|", "\\|") in md
    lines = bc.target_lines(payload)
    assert any("20% budget cache bytes <= 1/5 of full: ssd: met" in line for line in lines)
    assert any(line.startswith("throughput setting: tiny") and "target setting" in line for line in lines)
    assert out.with_suffix(".head_map.json").is_file()


def test_fresh_processes_and_the_cli(tmp_cwd, capsys):
    argv = ["bench", "cache", *FAST, "--policies", "window,full", "--budgets", "0.2", "--quality-images", "1",
            "--output", "b.json"]
    assert main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    data = json.loads((tmp_cwd / "b.json").read_text())
    assert [r["label"] for r in data["results"]] == ["full", "window@0.2"]
    assert all(r["status"] == "ok" and r["working_bytes"] >= 0 and r["load_s"] > 0 for r in data["results"])
    assert data["isolation"].startswith("each row in a fresh process") and "head_map" not in data
    assert "window" in captured.out and "met" in captured.out and (tmp_cwd / "b.md").is_file()


def test_max_tokens_truncates_generation_not_storage(tmp_cwd):
    config = bc.BenchCacheConfig(model="tiny", batch=1, repeats=1, warmup=0, policies=("full", "sink"), budgets=(0.5,),
                                 max_tokens=7, quality_images=2, isolate=False, output="m.json", table=False)
    payload = bc.run_bench_cache(config, out=open("/dev/null", "w"), log=open("/dev/null", "w"))
    full, sink = payload["results"]
    assert full["tokens_per_image"] == 7 and not payload["full_length"]
    assert full["kv_bytes"] == 2 * 2 * 2 * 2 * 37 * 16 * 4  # layers x (k, v) x rows x heads x positions x head_dim x fp32
    assert sink["budget_tokens"] == 18 and sink["quality_tokens"] == 2 * 7
    assert sink["top1_agreement"] == 1.0  # 7 tokens + the class token fit in 18: nothing evicted yet


def test_distribution_agreement():
    ref = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), -1)
    logp = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [3.0, 0.0, 0.0]]), -1)
    agree, kl, n = bq.distribution_agreement(ref, logp)
    assert (agree, n) == (1, 2)
    p = ref[1].exp()
    expected = float((p * (ref[1] - torch.log_softmax(torch.tensor([3.0, 0.0, 0.0]), -1))).sum())
    assert kl == pytest.approx(expected)
    assert bq.distribution_agreement(ref, ref)[1] == 0  # a distribution against itself: exactly 0


def test_default_model_without_weights_is_skipped(tmp_cwd, capsys, monkeypatch):
    from mvar_engine.models import default_models

    monkeypatch.setattr(default_models, "DEFAULT_TRANSFORMERS", {k: v for k, v in
                                                                 default_models.DEFAULT_TRANSFORMERS.items() if k != "raster"})
    assert main(["bench", "cache", "--model", "default", "--output", "d.json"]) == 0
    out = capsys.readouterr().out
    assert "no default raster weights" in out and "skipped" in out
    assert "skipped" in json.loads((tmp_cwd / "d.json").read_text())


def test_markdown_table_escapes_pipes():
    text = format_markdown_table([{"a": "x|y", "b": 0.5}], [("a", "A"), ("b", "B|C")])
    assert text.splitlines() == ["| A | B\\|C |", "|---|---|", "| x\\|y | 0.500 |"]


@pytest.mark.parametrize("argv, needle", [
    (["--policies", "full,bogus"], "unknown cache policy 'bogus' (available: ams, full, h2o, lines, none, scalekv, sink, ssd, window)"),
    (["--budgets", "0.2,0"], "--budgets: every budget must be > 0"),
    (["--budgets", "-0.5"], "--budgets: every budget must be > 0"),
    (["--budgets", "0.01"], "not more than the 1 class token"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--max-tokens", "99"], "--max-tokens 99: the model generates 36 tokens"),
    (["--head-map", "missing.json"], "head map missing.json does not exist"),
    (["--output", "x.txt"], "give a .json path"),
])
def test_bad_input_is_one_line(tmp_cwd, argv, needle, capsys):
    assert main(["bench", "cache", *FAST, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
