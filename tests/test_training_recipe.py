"""Issue 29, the recipe's knobs: gradient accumulation is the larger batch, activation checkpointing
changes nothing but memory, precisions are run or refused with the reason, VAR's learning-rate
scaling, AdamW betas and label smoothing reach the step, and every job goes through the one loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mvar_engine
from mvar_engine.apps.training.raster_trainer import RasterTrainSettings, train_raster
from mvar_engine.apps.training.stepper import micro_batches
from mvar_engine.apps.training.tokenizer_trainer import TokenizerTrainSettings, train_tokenizer
from mvar_engine.apps.training.var_trainer import VarTrainSettings, train_var

WEIGHTS = Path(mvar_engine.__file__).parent / "models" / "weights"
COMMON = dict(max_images=64, lr_schedule="constant", warmup_steps=0, lr=3e-3, progress=False, save_every=1,
              log_every=1, split="all")


def var_run(out: Path, **kw):
    tiny = dict(depth=1, embed_dim=32, num_heads=2, attention_options={"kernel_size": 3})
    s = VarTrainSettings(tokenizer=str(WEIGHTS / "tokenizer-digits.safetensors"), output=str(out),
                         **{**tiny, **COMMON, **kw})
    return train_var(s)


def raster_run(out: Path, **kw):
    s = RasterTrainSettings(tokenizer=str(WEIGHTS / "tokenizer-raster-digits.safetensors"), depth=1, embed_dim=32,
                            num_heads=2, multiple_of=32, output=str(out), **{**COMMON, **kw})
    return train_raster(s)


def tokenizer_run(out: Path, **kw):
    s = TokenizerTrainSettings(resolution=16, patch_nums=(1, 2, 4), vocab_size=32, z_channels=8, ch=32,
                               ch_mult=(1, 1, 1), num_res_blocks=1, output=str(out), **{**COMMON, **kw})
    return train_tokenizer(s)


RUNS = {"var": var_run, "raster": raster_run, "tokenizer": tokenizer_run}


def weights(summary) -> dict[str, torch.Tensor]:
    return load_file(str(summary.weights))


def assert_close_weights(a, b, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, worst


TOLERANCE = {"var": 2e-6, "raster": 2e-6, "tokenizer": 2e-4}
"""Adam's first step moves each weight by about lr x g / |g|: a conv bias followed by GroupNorm has
a gradient of float noise (~1e-9), so the tokenizer's such biases move by noise-sized fractions of lr."""


@pytest.mark.parametrize("job", sorted(RUNS))
def test_grad_accum_4_at_batch_8_is_batch_32(job, tmp_path):
    """One optimizer step over 4 micro-batches of 8 lands where one batch of 32 does (the same 32
    images, class dropout included), for every job; the logged loss and the gradient norm (which
    Adam's scale invariance would hide from the weights) are the batch's."""
    whole = RUNS[job](tmp_path / "whole", steps=1, batch_size=32)
    accumulated = RUNS[job](tmp_path / "accumulated", steps=1, batch_size=8, grad_accum=4)
    counts = ("ema_vocab_hit_SV",)  # a usage statistic updated per forward, not a trained weight
    assert_close_weights(*({k: v for k, v in weights(run).items() if not k.endswith(counts)}
                           for run in (whole, accumulated)), atol=TOLERANCE[job])
    assert accumulated.metrics["loss"] == pytest.approx(whole.metrics["loss"], rel=1e-5)
    assert accumulated.metrics["grad_norm"] == pytest.approx(whole.metrics["grad_norm"], rel=1e-4)
    alone, reference = weights(RUNS[job](tmp_path / "other", steps=1, batch_size=8)), weights(whole)
    moved = max(float((reference[k].float() - alone[k].float()).abs().max()) for k in reference)
    assert moved > 1e-4  # a batch of 8 alone lands elsewhere: the comparison can fail


@pytest.mark.parametrize("job", ["var", "raster"])
def test_checkpointed_activations_train_the_same_weights(job, tmp_path):
    plain = RUNS[job](tmp_path / "plain", steps=2, batch_size=16)
    recomputed = RUNS[job](tmp_path / "recomputed", steps=2, batch_size=16, checkpoint_activations=True)
    assert_close_weights(weights(plain), weights(recomputed), atol=1e-6)


def test_base_lr_is_scaled_as_var_scales_it(tmp_path):
    """peak lr = base_lr x batch x grad_accum / 256 (VAR's tlr = ac * tblr * bs / 256)."""
    summary = var_run(tmp_path / "run", steps=1, batch_size=8, grad_accum=2, base_lr=1e-3)
    assert summary.metrics["lr"] == pytest.approx(1e-3 * 8 * 2 / 256)


def test_betas_and_label_smoothing_reach_the_step(tmp_path):
    base = var_run(tmp_path / "base", steps=2, batch_size=16)
    smoothed = var_run(tmp_path / "smoothed", steps=2, batch_size=16, label_smoothing=0.3)
    assert smoothed.metrics["loss"] != pytest.approx(base.metrics["loss"], rel=1e-4)
    betas = var_run(tmp_path / "betas", steps=2, batch_size=16, betas=(0.5, 0.6))
    a, b = weights(base), weights(betas)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst > 1e-5


@pytest.mark.parametrize("job", sorted(RUNS))
def test_bf16_trains_where_the_cpu_has_it(job, tmp_path, monkeypatch):
    """bf16 on a CPU with native bf16 (forced here: the check, not the speed, is under test) trains
    float32 master weights through bf16 autocast, to the float32 run's loss within bf16's precision."""
    monkeypatch.setenv("MVAR_ENGINE_CPU_BF16", "1")
    summary = RUNS[job](tmp_path / "bf16", steps=2, batch_size=16, precision="bf16")
    assert {t.dtype for t in weights(summary).values() if t.is_floating_point()} == {torch.float32}
    full = RUNS[job](tmp_path / "fp32", steps=2, batch_size=16)
    # the tokenizer's nearest-code choices flip under bf16 distances: a looser match there
    assert summary.metrics["loss"] == pytest.approx(full.metrics["loss"], rel=0.1 if job == "tokenizer" else 2e-2)
    assert summary.metrics["loss"] != full.metrics["loss"]  # autocast did run in bf16 (step 1 of a raster GPT is
    # log V in any precision: its output layer starts at zero)


def test_micro_batches_cover_every_row_once():
    labels, inputs = torch.arange(10), torch.arange(20).view(10, 2)
    parts = micro_batches((labels, None, inputs), 4)
    assert [len(p[0]) for p in parts] == [3, 3, 2, 2] and all(p[1] is None for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), labels)
    assert [len(p[0]) for p in micro_batches((labels[:2],), 4)] == [1, 1]  # empty slices dropped


@pytest.mark.parametrize("argv, needle", [
    (["--precision", "fp16"], "--precision fp16 trains on CUDA only"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--betas", "0.9,1.5"], "--betas must be two numbers in [0, 1)"),
    (["--betas", "0.9"], "expected two comma-separated numbers"),
    (["--lr", "1e-3", "--base-lr", "1e-4"], "not allowed with argument"),
    (["--label-smoothing", "1"], "--label-smoothing must lie in [0, 1)"),
    (["--grad-accum", "4", "--batch-size", "32", "--max-images", "100"], "--batch-size 32 x --grad-accum 4 exceeds"),
])
def test_recipe_bad_input(argv, needle, refused):
    tok = str(WEIGHTS / "tokenizer-digits.safetensors")
    refused(["train", "--tokenizer", tok, "--depth", "1", "--embed-dim", "32", "--num-heads", "2", *argv], needle)


def test_bf16_refused_without_native_bf16(refused, monkeypatch):
    monkeypatch.setenv("MVAR_ENGINE_CPU_BF16", "0")
    refused(["train-tokenizer", "--precision", "bf16", "--device", "cpu"], "--precision bf16 on this CPU")


# -- --finetune-from --------------------------------------------------------------------------------
def official_layout_checkpoint(path: Path, depth: int, num_classes: int = 10) -> Path:
    """A random VAR in the official code's training-checkpoint layout (``['trainer']['var_wo_ddp']``,
    DDP's ``module.`` prefix) for the shipped digits tokenizer's schedule."""
    from mvar_engine.models.var import VAR, VARConfig

    torch.manual_seed(3)
    model = VAR(VARConfig(depth=depth, embed_dim=64, num_heads=4, num_classes=num_classes, vocab_size=512,
                          z_channels=16, patch_nums=(1, 2, 3, 4, 6, 8)))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"trainer": {"var_wo_ddp": state, "optimizer": {}}, "epoch": 3}, path)
    return path


def test_finetune_from_an_official_var_checkpoint_into_mvar(tmp_path):
    """A random d4 VAR in the official layout loads strictly into markov/neighborhood, trains with the
    parallel strategy, and the result generates."""
    from mvar_engine.apps.cli import main

    source = official_layout_checkpoint(tmp_path / "var_d4.pth", depth=4)
    summary = var_run(tmp_path / "mvar", steps=3, batch_size=8, depth=4, embed_dim=64, num_heads=4,
                      trajectory="markov", strategy="parallel", finetune_from=str(source))
    from mvar_engine.models.checkpoint import read_state_dict

    start = read_state_dict(source)
    tuned = weights(summary)
    assert tuned["head.weight"].shape == start["head.weight"].shape
    unchanged = [k for k in start if k in tuned and start[k].dtype.is_floating_point and torch.equal(start[k], tuned[k])]
    assert "blocks.0.attn.mat_qkv.weight" not in unchanged  # it trained from the loaded weights
    assert float((tuned["blocks.0.ffn.fc1.weight"] - start["blocks.0.ffn.fc1.weight"]).abs().max()) < 0.05  # near them
    assert main(["--trajectory", "markov", "--var-checkpoint", str(summary.weights), "--vae-checkpoint",
                 str(WEIGHTS / "tokenizer-digits.safetensors"), "--labels", "0,1", "--output",
                 str(tmp_path / "out.png"), "--seed", "0"]) == 0
    assert (tmp_path / "out.png").stat().st_size > 0


@pytest.mark.parametrize("extra, needle", [
    (["--depth", "2"], "is a VAR of --depth 4 --embed-dim 64 --num-heads 4 --mlp-ratio 4, the model here has --depth 2"),
    (["--depth", "4", "--init-from", "{src}"], "--init-from and --finetune-from both name starting weights"),
])
def test_finetune_from_another_size_is_refused(extra, needle, refused, tmp_path_factory):
    source = official_layout_checkpoint(tmp_path_factory.mktemp("ft") / "var_d4.pth", depth=4)
    extra = [e.format(src=source) for e in extra]
    refused(["train", "--tokenizer", str(WEIGHTS / "tokenizer-digits.safetensors"), "--embed-dim", "64",
             "--num-heads", "4", "--finetune-from", str(source), *extra], needle)


def test_finetune_from_another_family_is_refused(refused):
    refused(["train", "--tokenizer", str(WEIGHTS / "tokenizer-digits.safetensors"), "--finetune-from",
             str(WEIGHTS / "raster-digits.safetensors")], "holds raster weights")


# -- --shard (FSDP2) --------------------------------------------------------------------------------
def test_shard_under_torchrun_trains_as_one_process_and_resumes_exactly(tmp_path):
    """torchrun, 2 CPU processes (gloo), --shard: FSDP2 units per block; 4 steps land on the single
    process's weights (float tolerance: reduce-scatter sums in another order), and a run saved at
    step 2 and resumed (--shard) ends on the uninterrupted sharded run's exact weights."""
    import subprocess
    import sys

    from conftest import free_port, torchrun_env

    flags = ["train", "--tokenizer", str(WEIGHTS / "tokenizer-digits.safetensors"), "--depth", "2", "--embed-dim", "32",
             "--num-heads", "2", "--attention-kernel-size", "3", "--max-images", "64", "--split", "all",
             "--batch-size", "8", "--grad-accum", "2", "--lr", "3e-3", "--lr-schedule", "constant", "--warmup-steps",
             "0", "--save-every", "2", "--log-every", "1", "--no-progress", "--shard"]

    def torchrun(output: str, steps: int, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "mvar_engine.apps.cli", *flags, "--output", output, "--steps", str(steps), *extra]
        proc = subprocess.run(cmd, cwd=tmp_path, env=torchrun_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-6000:]

    torchrun("whole", 4)
    torchrun("cut", 2)
    torchrun("cut", 4, "--resume")
    single = var_run(tmp_path / "single", steps=4, batch_size=8, grad_accum=2, depth=2, max_images=64, save_every=2)
    sharded, resumed = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert all(torch.equal(sharded[k], resumed[k]) for k in sharded)
    assert_close_weights(weights(single), sharded, atol=1e-5)
    import json

    ends = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in ends if e.get("event") == "end"][-1]["world_size"] == 2


def test_shard_needs_torchrun(refused):
    refused(["train", "--tokenizer", str(WEIGHTS / "tokenizer-digits.safetensors"), "--shard"], "--shard splits the model")
