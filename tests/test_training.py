"""Training: tokenizer and VAR/MVAR trainers, checkpoints, resume, parallel groups, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import free_port, make_engine, small_models, torchrun_env
from mvar_engine.apps.cli import main
from mvar_engine.core.errors import CheckpointError, UsageError
from mvar_engine.core.files import file_sha256
from mvar_engine.models.tokenizer import MultiScaleVQVAE, TokenizerConfig
from mvar_engine.models.checkpoint import read_weights_metadata
from mvar_engine.apps.training import checkpointing
from mvar_engine.apps.training.batches import ShardedBatches
from mvar_engine.apps.training.grouped_forward import (grouped_logits, parallel_groups, parse_ratio, scales_isolated,
                                                       token_positions)
from mvar_engine.apps.training.loop import TrainingInterrupted
from mvar_engine.apps.training.tokenizer_trainer import TokenizerTrainSettings, train_tokenizer
from mvar_engine.apps.training.var_trainer import VarTrainSettings, train_var

TINY_TOKENIZER = dict(resolution=16, patch_nums=(1, 2, 4), vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1, 1),
                      num_res_blocks=1, max_images=96, batch_size=32, progress=False)
TINY_VAR = dict(depth=1, embed_dim=32, num_heads=2, max_images=96, batch_size=32, lr=3e-3, warmup_steps=2,
                attention_options={"kernel_size": 3}, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest (and most reproducibly) on one thread, even on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def steps_of(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "event" not in r]


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tok")
    summary = train_tokenizer(TokenizerTrainSettings(**TINY_TOKENIZER, steps=40, lr=2e-3, save_every=20, log_every=5,
                                                     output=str(run)))
    return run, summary


def var_settings(tokenizer_run, output: Path, **kw) -> VarTrainSettings:
    return VarTrainSettings(tokenizer=str(tokenizer_run[0] / "tokenizer.safetensors"), output=str(output),
                            **{**TINY_VAR, **kw})


# -- tokenizer ------------------------------------------------------------------------------------
def test_tokenizer_training_reduces_loss_and_exports_metadata(tokenizer_run):
    run, summary = tokenizer_run
    records = steps_of(run)
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    assert records[-1]["loss"] < 0.75 * records[0]["loss"]
    assert records[-1]["psnr"] > records[0]["psnr"]
    meta = read_weights_metadata(run / "tokenizer.safetensors")
    assert meta["kind"] == "tokenizer" and meta["resolution"] == 16 and meta["patch_nums"] == [1, 2, 4]
    assert meta["class_names"] == [str(d) for d in range(10)] and meta["training"]["steps"] == 40
    model = MultiScaleVQVAE(TokenizerConfig(**meta["architecture"]))
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(run / "tokenizer.safetensors")))  # strict: the architecture round-trips
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 40


def test_schedule_not_dividing_the_image_is_one_line(tmp_path, capsys):
    code = main(["train-tokenizer", "--resolution", "32", "--patch-nums", "1,2,4", "--ch-mult", "1,2,2",
                 "--output", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "does not divide the image size 32" in err and "--resolution 16" in err


# -- VAR: strategies ------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["sequence", "parallel"])
def test_var_training_reduces_loss(tokenizer_run, tmp_path, strategy):
    seen: list[dict] = []
    summary = train_var(var_settings(tokenizer_run, tmp_path / strategy, strategy=strategy, steps=36, save_every=36,
                                     log_every=4), callbacks=(lambda step, m: seen.append(m),))
    assert summary.step == 36 and len(seen) == 36
    by_group: dict[str, list[float]] = {}
    for m in seen:
        by_group.setdefault(m["group"], []).append(m["ce"])
    expected = {"0-2"} if strategy == "sequence" else {"0", "1", "2"}
    assert set(by_group) == expected
    for group, ces in by_group.items():
        if group != "0":  # scale 0 is one token per image: its CE falls too, but noisily
            head, tail = sum(ces[:3]) / 3, sum(ces[-3:]) / 3
            assert tail < head - 0.2, (group, ces)
    meta = read_weights_metadata(tmp_path / strategy / "model.safetensors")
    assert meta["training"]["strategy"] == strategy and meta["trajectory"]["name"] == "markov"
    assert meta["attention"]["name"] == "neighborhood" and meta["attention"]["options"]["kernel_size"] == 3
    assert meta["architecture"]["patch_nums"] == [1, 2, 4] and meta["num_classes"] == 10
    assert meta["tokenizer"]["sha256"] == file_sha256(tokenizer_run[0] / "tokenizer.safetensors")
    assert meta["training"]["final_loss"] == pytest.approx(steps_of(tmp_path / strategy)[-1]["loss"])


def test_parallel_groups_and_ratio():
    assert parallel_groups(10, 8) == [tuple(range(8)), (8,), (9,)]
    assert parse_ratio(None, parallel_groups(10, 8)) == (8, 1, 1)  # MVAR's 8:1:1
    assert parse_ratio("2:1", parallel_groups(3, 2)) == (2, 1)
    with pytest.raises(UsageError, match="has 3 entries but the parallel strategy forms 2 groups") as err:
        parse_ratio("8:1:1", parallel_groups(3, 2))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="positive"):
        parse_ratio("1:0", parallel_groups(3, 2))


@given(data=st.data())
def test_grouped_logits_equal_teacher_forced_slices_under_markov(data):
    """Under markov (order 1) any set of scales trained alone gives the full sequence's logits."""
    sides = data.draw(st.lists(st.integers(1, 4), min_size=2, max_size=4, unique=True).map(sorted))
    attention = data.draw(st.sampled_from(["dense", "neighborhood"]))
    options = {"kernel_size": data.draw(st.sampled_from([1, 3])), "apply_from": data.draw(st.integers(-2, 1))} \
        if attention == "neighborhood" else {}
    scales = data.draw(st.sets(st.integers(0, len(sides) - 1), min_size=1).map(sorted))
    model, tokenizer = small_models(tuple(sides), depth=2, width=32, heads=2, vocab=16, z=8,
                                    seed=data.draw(st.integers(0, 3)))
    engine = make_engine(model, tokenizer, trajectory="markov", attention=attention, cache="none",
                         attention_options=options)
    g = torch.Generator().manual_seed(1)
    idx = [torch.randint(16, (3, s * s), generator=g) for s in sides]
    var_input = tokenizer.indices_to_var_input(idx)
    labels = torch.tensor([0, 4, 5])  # 5 = the null class
    with torch.no_grad():
        full = engine.teacher_forced_logits(labels, var_input)
        part = grouped_logits(model, engine.trajectory, engine.pattern, engine.backends, labels, var_input, scales)
    expected = full[:, token_positions(model.layout, scales)]
    torch.testing.assert_close(part, expected, rtol=1e-4, atol=1e-5)


def test_all_scales_equal_teacher_forcing_and_isolation_rule():
    model, tokenizer = small_models((1, 2, 3))
    engine = make_engine(model, tokenizer, trajectory="full", attention="dense", cache="full")
    idx = [torch.randint(16, (2, s * s), generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    var_input = tokenizer.indices_to_var_input(idx)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        full = engine.teacher_forced_logits(labels, var_input)
        torch.testing.assert_close(grouped_logits(model, engine.trajectory, engine.pattern, engine.backends, labels,
                                                  var_input, [0, 1, 2]), full)
        alone = grouped_logits(model, engine.trajectory, engine.pattern, engine.backends, labels, var_input, [2])
    assert not torch.allclose(alone, full[:, 5:])  # under full, scale 2 alone loses its context
    assert not scales_isolated(engine.trajectory, 3)
    markov2 = make_engine(model, tokenizer, trajectory="markov", attention="dense", cache="none",
                          trajectory_options={"order": 2})
    assert not scales_isolated(markov2.trajectory, 3)
    assert scales_isolated(make_engine(model, tokenizer, trajectory="markov", attention="dense", cache="none").trajectory, 3)


def test_shards_are_disjoint_and_cover_the_global_batch():
    shards = [ShardedBatches(50, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in (0, 5, 6, 13):
        a, b = (s.indices(step) for s in shards)
        assert set(a.tolist()).isdisjoint(b.tolist())
        assert torch.equal(torch.cat([a, b]), ShardedBatches(50, 8, seed=3).indices(step))
        assert torch.equal(torch.cat([s.uniform(step, 1) for s in shards]), ShardedBatches(50, 8, seed=3).uniform(step, 1))
    with pytest.raises(UsageError, match="not divisible by the 3 processes"):
        ShardedBatches(50, 8, seed=0, rank=0, world_size=3)


# -- checkpoints -------------------------------------------------------------------------------------
def _tiny_training_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model, opt = _tiny_training_state()
    kw = dict(kind="var", model=model, optimizer=opt, scheduler=None, architecture={"a": 1}, config={})
    checkpointing.save_training_checkpoint(tmp_path, step=1, **kw)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # bytes on disk, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpointing.save_training_checkpoint(tmp_path, step=2, **kw)
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pt").read_bytes() == good  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left behind

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        checkpointing.export_weights(tmp_path / "model.safetensors", model.state_dict(), {"kind": "var"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_checkpoint_round_trip_restores_optimizer_and_rng(tmp_path):
    model, opt = _tiny_training_state()
    torch.manual_seed(123)
    checkpointing.save_training_checkpoint(tmp_path, kind="var", step=7, model=model, optimizer=opt, scheduler=None,
                                           architecture={"depth": 1}, config={"lr": 0.1})
    expected = torch.rand(4)
    with pytest.raises(CheckpointError, match=r"depth: 1 in the checkpoint, 2 now"):
        checkpointing.load_training_checkpoint(tmp_path, kind="var", architecture={"depth": 2})
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    ckpt = checkpointing.load_training_checkpoint(tmp_path, kind="var", architecture={"depth": 1})
    torch.manual_seed(0)
    assert checkpointing.restore_training_state(ckpt, fresh, fresh_opt, None) == 7
    assert torch.equal(torch.rand(4), expected)
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


# -- resume equivalence ----------------------------------------------------------------------------------
def _interrupt_at(step_to_stop: int, graceful: bool):
    def callback(step, metrics):
        if step == step_to_stop:
            if graceful:
                os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag
            else:
                raise KeyboardInterrupt  # a hard stop mid-run: no checkpoint is written
    return callback


@pytest.mark.parametrize("graceful", [True, False])
def test_interrupted_var_run_resumes_to_the_uninterrupted_result(tokenizer_run, tmp_path, graceful):
    settings = var_settings(tokenizer_run, tmp_path / "straight", strategy="parallel", steps=8, save_every=3,
                            log_every=1, class_dropout=0.5)
    straight = train_var(settings)
    broken = replace(settings, output=str(tmp_path / "broken"))
    with pytest.raises(KeyboardInterrupt) as stop:
        train_var(broken, callbacks=(_interrupt_at(5, graceful),))
    ckpt = torch.load(tmp_path / "broken" / "checkpoint.pt", weights_only=True)
    if graceful:
        assert isinstance(stop.value, TrainingInterrupted) and stop.value.step == 5 and ckpt["step"] == 5
    else:
        assert not isinstance(stop.value, TrainingInterrupted) and ckpt["step"] == 3  # lost only since the last save
    assert ckpt["optimizer"]["state"] and len(ckpt["rng"]) == 1
    resumed = train_var(replace(broken, resume=True))
    assert resumed.state_sha256 == straight.state_sha256  # bit-identical weights
    a, b = steps_of(tmp_path / "straight"), steps_of(tmp_path / "broken")
    assert [r["step"] for r in b] == list(range(1, 9))  # no duplicates after the resume
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_tokenizer_resume_is_exact(tmp_path):
    settings = TokenizerTrainSettings(**{**TINY_TOKENIZER, "max_images": 64}, steps=4, save_every=10, log_every=1,
                                      output=str(tmp_path / "a"))
    straight = train_tokenizer(settings)
    broken = replace(settings, output=str(tmp_path / "b"))
    with pytest.raises(TrainingInterrupted):
        train_tokenizer(broken, callbacks=(_interrupt_at(2, graceful=True),))
    resumed = train_tokenizer(replace(broken, resume=True))
    assert resumed.step == 4 and [r["step"] for r in steps_of(tmp_path / "b")] == [1, 2, 3, 4]
    assert resumed.state_sha256 == straight.state_sha256


# -- bad input -------------------------------------------------------------------------------------------
def test_init_from_other_architecture_is_one_line(tokenizer_run, tmp_path, capsys):
    train_var(var_settings(tokenizer_run, tmp_path / "d1", steps=1, save_every=1))
    tok = str(tokenizer_run[0] / "tokenizer.safetensors")
    code = main(["train", "--tokenizer", tok, "--depth", "2", "--embed-dim", "32", "--num-heads", "2",
                 "--init-from", str(tmp_path / "d1" / "model.safetensors"), "--max-images", "96", "--batch-size", "32",
                 "--steps", "1", "--output", str(tmp_path / "d2"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "missing (blocks.1." in err, err
    # the same architecture loads, from the weights and from the training checkpoint
    for source in ("model.safetensors", "checkpoint.pt"):
        train_var(var_settings(tokenizer_run, tmp_path / f"init-{source}", steps=1, save_every=1,
                               init_from=str(tmp_path / "d1" / source)))


@pytest.mark.parametrize("case", ["resume-missing", "parallel-full", "bad-ratio", "existing-run", "empty-folder",
                                  "resolution", "unreadable-image", "no-image-readable"])
def test_bad_input_is_one_line(tokenizer_run, tmp_path, capsys, case):
    tok = str(tokenizer_run[0] / "tokenizer.safetensors")
    base = ["train", "--tokenizer", tok, "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--steps", "1",
            "--max-images", "96", "--batch-size", "32", "--output", str(tmp_path / "run"), "--no-progress"]
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not a png")
    extra, expected = {
        "resume-missing": (["--resume"], "no checkpoint at"),
        "parallel-full": (["--strategy", "parallel", "--trajectory", "full"], "needs each scale to see only itself"),
        "bad-ratio": (["--strategy", "parallel", "--ratio", "8:1"], "has 2 entries but the parallel strategy forms 3"),
        "existing-run": ([], "already holds a run"),
        "empty-folder": (["--data", str(tmp_path / "empty")], "no images found"),
        "resolution": (["--resolution", "32"], "does not match the tokenizer"),
        "unreadable-image": (["--data", str(tmp_path / "bad"), "--batch-size", "1", "--on-bad-image", "fail"],
                             "cannot read image"),
        "no-image-readable": (["--data", str(tmp_path / "bad"), "--batch-size", "1"], "no image of step 1's batch"),
    }[case]
    if case == "existing-run":
        assert main(base) == 0
        capsys.readouterr()
    code = main(base + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and expected in err, err


# -- torchrun -----------------------------------------------------------------------------------------
def test_torchrun_two_processes_train_checkpoint_and_resume(tokenizer_run, tmp_path):
    """2 CPU ranks (gloo, DDP) train 4 steps, checkpoint, resume for 3 more; the ranks stay identical
    and the result equals one process training the same 7 steps (sharded batches, averaged gradients)."""
    env = torchrun_env()
    run = tmp_path / "ddp"
    flags = ["--tokenizer", str(tokenizer_run[0] / "tokenizer.safetensors"), "--depth", "1", "--embed-dim", "32",
             "--num-heads", "2", "--max-images", "96", "--batch-size", "32", "--lr", "3e-3", "--lr-schedule", "constant",
             "--warmup-steps", "0", "--strategy", "parallel", "--attention-kernel-size", "3", "--save-every", "2",
             "--log-every", "1", "--no-progress", "--output", str(run)]
    for steps, resume in ((4, []), (7, ["--resume"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "mvar_engine.apps.cli", "train", *flags, "--steps", str(steps), *resume]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-12000:]
    records = read_metrics(run)
    ends = [r for r in records if r.get("event") == "end"]
    assert [e["step"] for e in ends] == [4, 7] and all(e["world_size"] == 2 for e in ends)
    assert all(len(set(e["state_sha256"])) == 1 for e in ends)  # both ranks hold the same weights
    assert [r["step"] for r in records if "event" not in r] == list(range(1, 8))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 7
    train_var(var_settings(tokenizer_run, tmp_path / "single", strategy="parallel", steps=7, save_every=7,
                                    lr_schedule="constant", warmup_steps=0, log_every=1))
    from safetensors.torch import load_file

    a, b = load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "single" / "model.safetensors"))
    for key in a:
        if a[key].is_floating_point() and key != "attn_bias_for_masking":
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    losses = [r["loss"] for r in records if "event" not in r]
    assert losses == pytest.approx([r["loss"] for r in steps_of(tmp_path / "single")], rel=1e-4)
