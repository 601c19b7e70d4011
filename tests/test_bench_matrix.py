"""``mvar-engine bench matrix``: FLOPs from the pattern vs a brute-force mask count, the worker's row,
the matrix end to end in fresh processes (JSON, ratios, .md, .png), target checks and input errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mvar_engine.apps.bench import matrix as bm
from mvar_engine.apps.bench.report import peak_rss_bytes, reset_peak_rss
from mvar_engine.apps.cli import load_commands, main

from conftest import make_engine, small_models

TINY_TOKENS = 1 + 4 + 16  # scales 1, 2, 4
# tiny model: depth 2, 2 heads of head_dim 32; keys per step under full/dense/full: 1, 5, 21
FULL_PAIRS = 1 * 1 + 4 * 5 + 16 * 21          # 357
MVAR_K3_PAIRS = 1 + 4 * 4 + (4 * 3) ** 2       # 161: 2x2 map is covered by k=3, 4x4 map: 3 keys per axis


def _brute_force_flops(engine, batch: int, cfg: float) -> int:
    """Run a generation and count 4 * B * H * D * (allowed pairs of the materialised mask) per attend call."""
    counted = []
    original = engine.backends.attend

    def attend(q, k, v, spec, *, scale):
        mask = spec.mask(q.shape[-2], k.shape[-2], "cpu")
        pairs = q.shape[-2] * k.shape[-2] if mask is None else int(mask.sum())
        counted.append(4 * q.shape[0] * q.shape[1] * q.shape[-1] * pairs)
        return original(q, k, v, spec, scale=scale)

    engine.backends.attend = attend
    engine.generate(torch.arange(batch) % 5, cfg=cfg, generator=torch.Generator().manual_seed(0))
    return sum(counted)


@pytest.mark.parametrize("combo", [
    ("full", "dense", "full", {}),
    ("full", "dense", "none", {}),
    ("full", "dense", "window", {}),
    ("full", "neighborhood", "full", {"attention": {"kernel_size": 3}}),
    ("markov", "dense", "none", {}),
    ("markov", "neighborhood", "none", {"attention": {"kernel_size": 3}}),
    ("markov", "neighborhood", "window", {"trajectory": {"order": 2}, "attention": {"kernel_size": 3}}),
])
@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_attention_flops_equals_brute_force_mask_count(combo, cfg):
    trajectory, attention, cache, options = combo
    model, tokenizer = small_models((1, 2, 4, 6), depth=2, width=32, heads=2)
    engine = make_engine(model, tokenizer, trajectory, attention, cache, trajectory_options=options.get("trajectory"),
                         attention_options=options.get("attention"))
    batch = 2
    rows = batch * (2 if cfg > 0 else 1)
    per_scale: list[int] = []
    analytic = bm.attention_flops(model.layout, engine.trajectory, engine.pattern, engine.cache, depth=2, heads=2,
                                  head_dim=16, rows=rows, per_scale=per_scale)
    assert len(per_scale) == 4 and sum(per_scale) == analytic
    assert analytic == _brute_force_flops(engine, batch, cfg)


def test_attention_flops_hand_counts():
    model, tokenizer = small_models((1, 2, 4), depth=2, width=32, heads=2)
    unit = 4 * 1 * 2 * 16 * 2  # rows 1, heads 2, head_dim 16, depth 2

    def flops(*names, **options):
        e = make_engine(model, tokenizer, *names, **options)
        return bm.attention_flops(model.layout, e.trajectory, e.pattern, e.cache, depth=2, heads=2, head_dim=16, rows=1)

    assert flops("full", "dense", "full") == unit * FULL_PAIRS
    assert flops("markov", "dense", "none") == unit * (1 + 16 + 256)
    assert flops("markov", "neighborhood", "none", attention_options={"kernel_size": 3}) == unit * MVAR_K3_PAIRS
    # no cache under the full trajectory recomputes the visible prefix: 1, then 1 + 4*5, then 357
    assert flops("full", "dense", "none") == unit * (1 + 21 + FULL_PAIRS)


def test_model_ids():
    d16_512 = bm.model_spec("d16-512")
    assert (d16_512.depth, d16_512.resolution, d16_512.tokens_per_image) == (16, 512, 2240)
    assert d16_512.patch_nums[-1] == 32
    assert bm.model_spec("VAR-d20-256").id == "d20-256" and bm.model_spec("d20-256").tokens_per_image == 680
    assert bm.model_spec("tiny").tokens_per_image == TINY_TOKENS
    with pytest.raises(bm.UsageError, match="unknown model 'd16-384'.*d16-512.*tiny"):
        bm.model_spec("d16-384")


@pytest.mark.parametrize("model_id", ["tiny", "d16-256", "d16-512", "raster-tiny", "llamagen-b", "janus-tiny",
                                      "janus-pro-1b"])
def test_a_model_specs_layout_and_heads_are_the_built_models(model_id):
    """What the parent checks configurations against before any process (``ModelSpec.layout`` and
    ``heads``) is what the worker's model generates: the tiny models built for real, the large ones
    from their configs or on the meta device."""
    from mvar_engine.apps.bench.cells import JANUS_PROMPT_TOKENS
    from mvar_engine.apps.bench.matrix_raster import bench_raster_models, janus_bench_model
    from mvar_engine.models.raster_gpt import RasterGPTConfig
    from mvar_engine.models.var import VARConfig

    spec = bm.model_spec(model_id)
    if model_id == "janus-pro-1b":
        pytest.importorskip("transformers")
        from mvar_engine.models.janus import JANUS_PRO_1B_TEXT, JANUS_PRO_BOI, JanusAdapter, janus_pro_1b

        with torch.device("meta"):
            hf_model = janus_pro_1b(understanding_layers=1)
        prompt = torch.full((JANUS_PROMPT_TOKENS,), 1000)
        prompt[0], prompt[-1] = JANUS_PRO_1B_TEXT["bos_token_id"], JANUS_PRO_BOI
        adapter = JanusAdapter(hf_model, prompt)
        layout, heads, layers = adapter.layout, adapter.num_heads, adapter.num_layers
    elif model_id == "janus-tiny":
        pytest.importorskip("transformers")
        adapter = janus_bench_model(model_id, 0).adapter()
        layout, heads, layers = adapter.layout, adapter.num_heads, adapter.num_layers
    elif model_id == "llamagen-b":
        config = RasterGPTConfig.llamagen_b()
        layout, heads, layers = config.layout, config.heads, config.depth
    elif model_id.startswith("d"):
        config = VARConfig(depth=spec.depth, patch_nums=spec.patch_nums)
        layout, heads, layers = config.layout, config.heads, config.depth
    else:
        model = (bm.bench_next_scale_models if spec.family == "next-scale" else bench_raster_models)(spec, {"seed": 0})[0]
        layout, heads, layers = model.layout, model.config.heads, model.config.depth
    assert (spec.layout, spec.heads, spec.depth) == (layout, heads, layers)


def test_parse_combo_options():
    combo = bm.parse_combo("markov:order=2/neighborhood:kernel-size=5/window:scales=1")
    assert (combo.trajectory, combo.attention, combo.cache) == ("markov", "neighborhood", "window")
    assert combo.options == {"trajectory": {"order": 2}, "attention": {"kernel_size": 5}, "cache": {"scales": 1}}


def test_a_configuration_may_name_its_autocast_dtype():
    combo = bm.parse_combo("full/dense/full@bfloat16")
    assert (combo.text, combo.cache, combo.dtype) == ("full/dense/full@bfloat16", "full", "bfloat16")
    assert bm.parse_combo("full/dense/full").dtype is None
    with pytest.raises(bm.UsageError, match="@bf16 is not an autocast dtype"):
        bm.parse_combo("full/dense/full@bf16")


def test_bf16_rows_run_beside_float32_and_record_their_dtype(tmp_cwd, capsys, monkeypatch):
    monkeypatch.setenv("MVAR_ENGINE_CPU_BF16", "1")
    argv = ["bench", "matrix", "--cells", "tiny:1", "--configs", "full/dense/full,full/dense/full@bfloat16",
            "--repeats", "1", "--warmup", "0", "--threads", "1", "--device", "cpu", "--output", "m.json"]
    assert main(argv) == 0, capsys.readouterr().err
    f32, bf16 = json.loads((tmp_cwd / "m.json").read_text())["results"]
    assert (f32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert bf16["config"] == "full/dense/full@bfloat16" and bf16["cache_peak_bytes"] * 2 == f32["cache_peak_bytes"]  # a bf16 cache


def test_bf16_rows_are_refused_where_the_cpu_lacks_it(refused, monkeypatch):
    monkeypatch.setenv("MVAR_ENGINE_CPU_BF16", "0")
    refused(["bench", "matrix", "--cells", "tiny:1", "--device", "cpu", "--configs",
             "full/dense/full,full/dense/full@bfloat16"], "configuration full/dense/full@bfloat16: --dtype bfloat16")


def test_a_configuration_that_does_not_fit_a_models_layout_is_refused_before_any_process(refused):
    """A 20% budget of janus-tiny's 32 positions keeps 6, fewer than its 16 prompt tokens: the parent
    refuses it against the model's layout (it was a failed row per cell before); the configuration
    stays valid for a model it fits (raster-tiny beside it is checked too and passes)."""
    pytest.importorskip("transformers")
    refused(["bench", "matrix", "--cells", "janus-tiny:1", "--device", "cpu", "--configs", "raster/dense/ssd:budget=0.2"],
            "configuration 'raster/dense/ssd:budget=0.2': --cache-budget 0.2 gives 6 token(s), not more than the 16")
    refused(["bench", "matrix", "--cells", "raster-tiny:1,tiny:1", "--device", "cpu", "--configs",
             "raster/dense/full,full/dense/full,markov/neighborhood:apply_from=5/none"],
            "--attention-apply-from 5: the schedule has 3 scales")


def test_the_kv_target_compares_a_cache_with_the_full_cache_of_its_dtype():
    """A float32 full row beside a bf16 one: a bf16 ssd row is measured against the bf16 full cache
    (half the bytes of the float32 one), not whichever full row came last."""
    def row(config, cache, dtype, kv):
        budget = {"cache": {"budget": 0.2}} if cache != "full" else {}
        return {"status": "ok", "family": "next-token", "model": "llamagen-b", "batch": 12, "cfg": 4.0, "config": config,
                "cache": cache, "dtype": dtype, "options": budget, "kv_bytes": kv, "cache_peak_bytes": kv}

    rows = [row("raster/dense/full@bfloat16", "full", "bfloat16", 500), row("raster/dense/ssd@bfloat16", "ssd", "bfloat16", 100),
            row("raster/dense/full", "full", "float32", 1000)]
    (check,) = bm.raster_cache_checks(rows)
    assert check["config"] == "raster/dense/ssd@bfloat16" and check["reduction"] == 5.0


def test_worker_row_in_process():
    row = bm.run_cell({"model": "tiny", "batch": 2, "config": "full/dense/window", "backend": "sdpa", "device": "cpu",
                       "dtype": "float32", "cfg": 1.5, "seed": 0, "repeats": 2, "warmup": 1, "decode_chunk": 1,
                       "threads": 1})
    assert row["status"] == "ok" and row["random_weights"] is True and row["rows"] == 4
    # window of 1 kept scale: capacity 4 + 16 tokens, k and v, 2 layers, 4 rows, 2 heads, head_dim 32, float32
    assert row["cache_peak_bytes"] == 2 * 2 * 4 * 2 * 20 * 32 * 4
    assert row["attention_gflops"] * 1e9 == pytest.approx(4 * 4 * 2 * 32 * 2 * (1 + 4 * 5 + 16 * 20))
    assert row["repeats"] == 2 and len(row["warmup_times_s"]) == 1
    assert row["tokens_per_s"] == pytest.approx(2 * TINY_TOKENS / row["transformer_s"])
    assert row["transformer_s_per_image"] == pytest.approx(row["transformer_s"] / 2)
    assert 0 < row["baseline_rss"] <= row["peak_rss_transformer"] <= row["peak_rss_total"]
    assert row["working_memory"] == row["peak_rss_total"] - row["baseline_rss"]
    assert row["peak_resets"] is True and row["backends_used"] == {"dense": "sdpa"}
    assert row["weights_bytes"] >= 4 * (row["params"] + row["tokenizer_params"])


def test_peak_reset_separates_phases():
    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    block = torch.ones(64 << 20, dtype=torch.float32)  # 256 MiB, touched
    high = peak_rss_bytes()
    del block
    assert reset_peak_rss()
    assert high - peak_rss_bytes() > 128 << 20


def test_matrix_end_to_end(tmp_cwd, capsys):
    argv = ["bench", "matrix", "--models", "tiny", "--batches", "2", "--configs",
            "full/dense/full,markov/neighborhood:kernel_size=3/none", "--repeats", "1", "--warmup", "0",
            "--backend", "sdpa", "--threads", "1", "--output", "out/m.json"]
    assert main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    data = json.loads((tmp_cwd / "out" / "m.json").read_text())
    assert data["benchmark"] == "matrix" and data["baseline"] == "full/dense/full" and data["random_weights"]
    base, mvar = data["results"]
    assert [r["config"] for r in (base, mvar)] == ["full/dense/full", "markov/neighborhood:kernel_size=3/none"]
    assert base["memory_ratio"] == base["time_ratio"] == base["flops_ratio"] == 1.0
    assert mvar["flops_ratio"] == pytest.approx(MVAR_K3_PAIRS / FULL_PAIRS)
    assert mvar["memory_ratio"] == pytest.approx(mvar["peak_rss_total"] / base["peak_rss_total"])
    assert mvar["time_ratio"] == pytest.approx(mvar["transformer_s_per_image"] / base["transformer_s_per_image"])
    assert mvar["working_memory_ratio"] == pytest.approx(mvar["working_memory"] / base["working_memory"])
    assert base["cache_peak_bytes"] == 2 * 2 * 4 * 2 * 21 * 32 * 4 and mvar["cache_peak_bytes"] == 0
    assert mvar["backends_used"] == {"dense": "sdpa", "neighborhood2d": "sdpa"}
    assert base["peak_rss_total"] > 0 and base["decode_s_per_image"] > 0
    markdown = (tmp_cwd / "out" / "m.md").read_text()
    assert "| tiny | 2 | markov/neighborhood:kernel_size=3/none |" in markdown and "random" in markdown.lower()
    assert f"{MVAR_K3_PAIRS / FULL_PAIRS:.2f}x" in markdown
    assert "1 torch threads per cell" in markdown  # --threads 1, not the parent's count
    with Image.open(tmp_cwd / "out" / "m.png") as chart:
        assert chart.format == "PNG" and chart.width >= 640
    assert "| model | batch |" in captured.out and "wrote out/m.json" in captured.out
    assert "[2/2]" in captured.err


def test_failed_cell_is_a_row_and_the_run_goes_on(tmp_cwd, capsys):
    argv = ["bench", "matrix", "--models", "tiny", "--batches", "1", "--configs", "full/dense/full,markov/dense/none",
            "--timeout-s", "0.01", "--no-table", "--output", "f.json"]
    assert main(argv) == 1
    data = json.loads((tmp_cwd / "f.json").read_text())
    assert [r["status"] for r in data["results"]] == ["error", "error"]
    assert "timed out" in data["results"][1]["reason"] and data["results"][1]["memory_ratio"] is None
    assert (tmp_cwd / "f.md").exists() and (tmp_cwd / "f.png").exists()


def _row(model, batch, config, peak, seconds, gflops):
    return {"status": "ok", "model": model, "batch": batch, "config": config, "cfg": 1.5, "peak_rss_total": peak,
            "peak_rss_transformer": peak, "working_memory": peak - 100, "working_memory_transformer": peak - 100,
            "transformer_s_per_image": seconds,
            "attention_gflops": gflops}


def test_ratios_and_targets():
    rows = [_row("d16-256", 32, bm.BASELINE, 1000, 2.0, 40.0), _row("d16-256", 32, bm.MVAR, 250, 1.5, 10.0),
            _row("d16-512", 2, bm.BASELINE, 900, 3.0, 200.0), _row("d16-512", 2, bm.MVAR, 400, 3.0, 100.0),
            _row("d16-512", 4, bm.MVAR, 400, 3.0, 100.0)]
    bm.add_ratios(rows, bm.BASELINE)
    assert rows[1]["memory_ratio"] == 0.25 and rows[1]["time_ratio"] == 0.75 and rows[1]["flops_ratio"] == 0.25
    assert rows[1]["working_memory_ratio"] == pytest.approx(150 / 900)
    assert rows[4]["memory_ratio"] is None  # no baseline at batch 4
    checks = {(t["model"], t["metric"]): t for t in bm.target_checks(rows)}
    memory = checks[("d16-256", "transformer_memory_ratio")]
    assert memory["reduction"] == 4.0 and memory["met"] and memory["working_reduction"] == 6.0
    assert memory["total_reduction"] == 4.0
    assert checks[("d16-256", "time_ratio")]["reduction"] == pytest.approx(4 / 3)
    assert checks[("d16-256", "time_ratio")]["at_target_batch"]
    assert checks[("d16-512", "transformer_memory_ratio")]["met"] is False and checks[("d16-512", "flops_ratio")]["met"]
    assert not checks[("d16-512", "flops_ratio")]["at_target_batch"]
    lines = bm.target_lines({"targets": bm.target_checks(rows)})
    assert any("NOT met" in line and "target setting: batch 8" in line for line in lines)


def test_presets_and_cells():
    assert bm.MatrixConfig(preset="target").cells() == [(bm.model_spec("d16-256"), 32), (bm.model_spec("d16-512"), 8)]
    config = bm.MatrixConfig(models=("d16-256", "tiny"), batches=(1, 3))
    assert [(m.id, b) for m, b in config.cells()] == [("d16-256", 1), ("d16-256", 3), ("tiny", 1), ("tiny", 3)]
    assert [c.text for c in bm.MatrixConfig(preset="paper").combos()] == [bm.BASELINE, bm.MVAR]
    pinned = bm.MatrixConfig(preset="target", cells_=("d16-256:8", "d16-512:2"), batches=(5,))
    assert [(m.id, b) for m, b in pinned.cells()] == [("d16-256", 8), ("d16-512", 2)]
    assert "matrix" in load_commands().groups["bench"]


@pytest.mark.parametrize("argv, needle", [
    (["--models", "tiny,d99-300"], "unknown model 'd99-300' (available: d16-256"),
    (["--configs", "full/dense"], "configuration 'full/dense' is not trajectory/attention/cache"),
    (["--configs", "full/dense/full/none"], "configuration 'full/dense/full/none' is not trajectory/attention/cache"),
    (["--configs", "full/dense/full,full/bogus/full"], "configuration 'full/bogus/full': unknown attention pattern 'bogus'"),
    (["--configs", "markov/neighborhood/full"], "makes no sense under trajectory 'markov'"),
    (["--configs", "markov/neighborhood:kernel_size=zero/none"], "configuration 'markov/neighborhood:kernel_size=zero/none'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--output", "m.txt"], "give a .json path"),
    (["--cells", "tiny:2,tiny"], "cell 'tiny' is not MODEL:BATCH"),
    (["--batches", "0"], "--batches: expected comma-separated positive integers"),
    (["--warmup", "-1"], "--warmup at least 0"),
    (["--cells", "raster-tiny:1", "--configs", "full/dense/full"],
     "model 'raster-tiny' (next-token) has no configuration of its family"),
    (["--cells", "tiny:1", "--configs", "raster/dense/full"], "model 'tiny' (next-scale) has no configuration"),
    (["--configs", "raster/dense/ssd:bogus=1"], "configuration 'raster/dense/ssd:bogus=1'"),
    (["--configs", "raster/neighborhood/full"], "configuration 'raster/neighborhood/full': attention 'neighborhood' describes next-scale steps"),
    (["--configs", "warp/dense/full"], "configuration 'warp/dense/full': unknown trajectory 'warp'"),
    (["--calibration-images", "0"], "--calibration-images must be at least 1"),
])
def test_bad_input_is_one_line(tmp_cwd, argv, needle, capsys):
    assert main(["bench", "matrix", "--models", "tiny", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_cwd / "bench-matrix.json").exists()


# -- the raster (next-token) family ----------------------------------------------------------------------
RASTER_TINY_CELL = {"model": "raster-tiny", "batch": 2, "backend": "sdpa", "device": "cpu", "dtype": "float32",
                    "cfg": 1.5, "seed": 0, "repeats": 1, "warmup": 1, "decode_chunk": 1, "threads": 1}
RASTER_TINY_UNIT = 4 * 4 * 2 * 16 * 2  # rows 4 (batch 2 with CFG), heads 2, head_dim 16, depth 2


def _raster_pairs(budget: int | None, prefix: int = 1, tokens: int = 9) -> int:
    """Prefill: the prefix attends causally to itself; then each of the other ``tokens - 1`` steps one
    query over the keys held (all of them, or ``budget``)."""
    held = [prefix + t for t in range(1, tokens)]
    return prefix * (prefix + 1) // 2 + sum(h if budget is None else min(h, budget) for h in held)


@pytest.mark.parametrize("config, budget", [
    ("raster/dense/full", None), ("raster/dense/window:budget=4", 4), ("raster/dense/sink:budget=3", 3),
    ("raster/dense/h2o:budget=5", 5), ("raster/dense/window:budget=0.5", 5),
])
def test_raster_cell_counts_flops_bytes_and_budget(config, budget):
    row = bm.run_cell({**RASTER_TINY_CELL, "config": config})
    assert row["status"] == "ok" and row["family"] == "next-token" and row["rows"] == 4
    assert row["attention_gflops"] * 1e9 == pytest.approx(RASTER_TINY_UNIT * _raster_pairs(budget))
    assert row["sequence_length"] == 10 and row["tokens_per_image"] == 9 and row["grid"] == [3, 3]
    # key/value buffers: 2 layers x k and v x 4 rows x 2 heads x head_dim 16 x float32 per stored token
    per_token = 2 * 2 * 4 * 2 * 16 * 4
    assert row["kv_bytes"] == per_token * (10 if budget is None else budget)
    assert row["budget_tokens"] == (10 if budget is None else budget)
    assert row["cache_peak_bytes"] == row["kv_bytes"] + row["cache_bookkeeping_bytes"]
    assert row["decode_s_per_image"] > 0 and row["peak_rss_decode"] > 0
    # prefill and growing caches are causal; a step whose every held key is visible is dense
    assert row["backends_used"] in ({"causal": "sdpa"}, {"causal": "sdpa", "dense": "sdpa"})


def test_raster_cell_counts_the_flops_of_scored_steps(monkeypatch):
    """bf16 h2o on the CPU takes the backend's scores (``attend_and_score``): its steps count too.
    The engine refuses bf16 on a CPU without native bf16 (emulated: slow, not wrong); a FLOP count
    needs no speed, so the override lets it run on any x86-64 CPU."""
    monkeypatch.setenv("MVAR_ENGINE_CPU_BF16", "1")
    row = bm.run_cell({**RASTER_TINY_CELL, "config": "raster/dense/h2o:budget=5", "dtype": "bfloat16"})
    assert row["status"] == "ok"
    assert row["attention_gflops"] * 1e9 == pytest.approx(RASTER_TINY_UNIT * _raster_pairs(5))


def test_a_cache_option_may_be_a_path_with_slashes():
    """The matrix's head_map= takes a precomputed map by path (it used to split the path as the triple)."""
    combo = bm.parse_combo("raster/dense/ssd:head_map=maps/llamagen/b.json:budget=0.2@bfloat16")
    assert (combo.trajectory, combo.attention, combo.cache, combo.dtype) == ("raster", "dense", "ssd", "bfloat16")
    assert combo.options == {"cache": {"head_map": "maps/llamagen/b.json", "budget": 0.2}}


def test_raster_cell_without_guidance_runs_conditional_rows_only():
    row = bm.run_cell({**RASTER_TINY_CELL, "config": "raster/dense/full", "cfg": 0.0})
    assert row["rows"] == 2 and row["cfg"] == 1.0
    assert row["attention_gflops"] * 1e9 == pytest.approx(RASTER_TINY_UNIT / 2 * _raster_pairs(None))


def test_model_ids_raster():
    spec = bm.model_spec("llamagen-b")
    assert (spec.family, spec.depth, spec.tokens_per_image, spec.resolution) == ("next-token", 12, 576, 384)
    assert bm.model_spec("raster-tiny").family == "next-token"
    assert bm.combo_family(bm.parse_combo("raster/dense/ssd:budget=0.2")) == "next-token"
    assert bm.combo_family(bm.parse_combo(bm.MVAR)) == "next-scale"
    assert [c.text for c in bm.MatrixConfig(preset="raster").combos()][0] == bm.RASTER_BASELINE


def test_matrix_mixes_families_and_calibrates_ssd(tmp_cwd, capsys):
    argv = ["bench", "matrix", "--cells", "tiny:1,raster-tiny:2", "--configs",
            "full/dense/full,raster/dense/full,raster/dense/ssd:budget=0.2,markov/neighborhood:kernel_size=3/none",
            "--repeats", "1", "--warmup", "0", "--backend", "sdpa", "--threads", "1", "--output", "mix.json"]
    assert main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    data = json.loads((tmp_cwd / "mix.json").read_text())
    assert data["baselines"] == {"next-scale": "full/dense/full", "next-token": "raster/dense/full"}
    assert [(r["model"], r["config"]) for r in data["results"]] == [
        ("tiny", "full/dense/full"), ("tiny", "markov/neighborhood:kernel_size=3/none"),
        ("raster-tiny", "raster/dense/full"), ("raster-tiny", "raster/dense/ssd:budget=0.2")]
    _, mvar, full, ssd = data["results"]
    assert mvar["flops_ratio"] == pytest.approx(MVAR_K3_PAIRS / FULL_PAIRS)
    assert full["memory_ratio"] == full["time_ratio"] == 1.0
    budget = 2  # 20% of the 10-token sequence
    assert ssd["flops_ratio"] == pytest.approx(_raster_pairs(budget) / _raster_pairs(None))
    head_map = data["head_maps"]["raster-tiny"]
    assert head_map["calibrated"] and (tmp_cwd / "mix.raster-tiny.head_map.json").exists()
    assert ssd["options"]["cache"]["head_map"] == head_map["path"]
    kv_target = [t for t in data["targets"] if t["metric"] == "kv_ratio"]
    assert len(kv_target) == 1 and kv_target[0]["reduction"] == pytest.approx(5.0) and kv_target[0]["met"]
    assert "KV-cache bytes 5.00x lower with raster/dense/ssd:budget=0.2" in captured.out
    assert "| raster-tiny | 2 | raster/dense/ssd:budget=0.2 |" in (tmp_cwd / "mix.md").read_text()
    with Image.open(tmp_cwd / "mix.png") as chart:
        assert chart.format == "PNG"


def test_matrix_runs_janus_cells_and_calibrates_their_heads(tmp_cwd, capsys):
    """The janus family in the matrix (janus-tiny: the plumbing janus-pro-1b uses): full vs ssd with a
    calibrated head map; the ssd cell holds its budget's share of the key/value bytes."""
    pytest.importorskip("transformers")
    argv = ["bench", "matrix", "--cells", "janus-tiny:1", "--configs", "raster/dense/full,raster/dense/ssd:budget=0.8",
            "--cfg", "5", "--repeats", "1", "--warmup", "0", "--backend", "sdpa", "--threads", "1", "--output", "j.json"]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads((tmp_cwd / "j.json").read_text())
    full, ssd = data["results"]
    assert full["status"] == ssd["status"] == "ok", (full["reason"], ssd["reason"])
    assert full["sequence_length"] == 16 + 16 and full["rows"] == 2
    from mvar_engine.plugins.budget_cache import budget_tokens

    kept = budget_tokens(0.8, 32)
    assert ssd["budget_tokens"] == kept and ssd["kv_bytes"] == pytest.approx(full["kv_bytes"] * kept / 32)
    assert data["head_maps"]["janus-tiny"]["calibrated"]


def test_compile_is_a_configuration_suffix_beside_the_dtype():
    for text, dtype in (("raster/dense/full@compile", None), ("raster/dense/full@bfloat16@compile", "bfloat16"),
                        ("raster/dense/full@compile@bfloat16", "bfloat16")):
        combo = bm.parse_combo(text)
        assert combo.compile and combo.dtype == dtype and combo.text.endswith("@compile")
    assert not bm.parse_combo("raster/dense/full@bfloat16").compile
    for bad in ("raster/dense/full@compile@compile", "raster/dense/full@jit"):
        with pytest.raises(bm.UsageError, match="is not an autocast dtype or @compile"):
            bm.parse_combo(bad)


def test_compile_rows_a_configuration_cannot_run_are_refused_in_the_parent(refused):
    refused(["bench", "matrix", "--cells", "tiny:1", "--configs", "full/dense/full,full/dense/window@compile"],
            "cache 'window' does not keep every earlier scale in place")


def test_raster_cells_count_calls_and_syncs_and_compiled_rows_run():
    """``--count-calls``: the steady steps' aten calls (per layer too) and host syncs (none); an
    ``@compile`` row generates through the compiled step (its FLOPs are not counted)."""
    eager = bm.run_cell({**RASTER_TINY_CELL, "config": "raster/dense/full", "count_calls": True})
    assert eager["status"] == "ok" and eager["host_syncs_per_step"] == 0
    assert 0 < eager["aten_calls_per_layer_step"] * 2 == eager["aten_calls_per_step"]  # 2 layers
    compiled = bm.run_cell({**RASTER_TINY_CELL, "config": "raster/dense/full@compile", "count_calls": True})
    assert compiled["status"] == "ok" and compiled["attention_gflops"] is None
    assert "aten_calls_per_step" not in compiled and compiled["transformer_s_per_image"] > 0
