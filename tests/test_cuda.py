"""End to end on CUDA (marked ``cuda``; skipped with the reason elsewhere): the shipped models on the
GPU keep the CPU's greedy tokens (teacher-forced, float32 and bf16 autocast), a cached raster run
equals its uncached replay there, one training step runs (and bf16/fp16 mixed-precision ones),
and `sample` writes the same npz at any batch size there."""

from __future__ import annotations

import pytest
import torch

from mvar_engine.apps.config import EngineConfig
from mvar_engine.apps.pipeline import Pipeline

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is available here")]


def agreement(reference: Pipeline, candidate: Pipeline, labels: torch.Tensor) -> float:
    """Share of positions where ``candidate``'s argmax, teacher-forced on ``reference``'s greedy
    tokens, equals them."""
    ref = reference.engine.generate(labels.to(reference.device), reference.components.cache, cfg=0, top_k=1, top_p=0)
    forced = [t.to(candidate.device) for t in ref.tokens] if isinstance(ref.tokens, list) else ref.tokens.to(candidate.device)
    replay = candidate.engine.generate(labels.to(candidate.device), candidate.components.cache, cfg=0, top_k=1, top_p=0,
                                       forced_tokens=forced, return_logits=True)
    pairs = list(zip(replay.logits, forced))
    equal = sum(int((logits.argmax(-1) == tokens).sum()) for logits, tokens in pairs)
    return equal / sum(tokens.numel() for _, tokens in pairs)


@pytest.mark.parametrize("trajectory", ["markov", "full", "raster"])
@pytest.mark.parametrize("dtype, least", [("float32", 0.995), ("bfloat16", 0.97)])
def test_the_gpu_keeps_the_cpu_greedy_tokens(trajectory, dtype, least):
    cpu = Pipeline.from_config(EngineConfig(trajectory=trajectory, device="cpu"))
    gpu = Pipeline.from_config(EngineConfig(trajectory=trajectory, device="cuda", dtype=dtype))
    assert agreement(cpu, gpu, torch.arange(10).repeat_interleave(2)) >= least


def test_raster_cached_equals_uncached_on_cuda():
    from mvar_engine.core.registry import get_registry

    pipe = Pipeline.from_config(EngineConfig(trajectory="raster", device="cuda"))
    labels = torch.arange(4, device="cuda")
    cached = pipe.engine.generate(labels, pipe.components.cache, cfg=4.0, top_k=1, top_p=0, return_logits=True)
    none = get_registry().create("cache", "none")
    replay = pipe.engine.generate(labels, none, cfg=4.0, top_k=1, top_p=0, forced_tokens=cached.tokens,
                                  return_logits=True)
    assert torch.allclose(torch.stack(list(cached.logits)), torch.stack(list(replay.logits)), atol=2e-3, rtol=1e-3)


def test_one_training_step_on_cuda(tmp_path, capsys):
    from mvar_engine.apps.cli import main
    from mvar_engine.models.default_models import default_checkpoints

    argv = ["train", "--tokenizer", str(default_checkpoints("markov")[1]), "--steps", "2", "--batch-size", "8",
            "--max-images", "16", "--depth", "2", "--embed-dim", "64", "--num-heads", "2", "--device", "cuda",
            "--no-progress", "--output", str(tmp_path / "run")]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(precision, tmp_path, capsys):
    """Autocast training on CUDA (fp16 with its gradient scaler, saved in the checkpoint) keeps
    float32 weights, a finite loss and resumes."""
    import json

    from safetensors.torch import load_file

    from mvar_engine.apps.cli import main
    from mvar_engine.models.default_models import default_checkpoints

    argv = ["train", "--tokenizer", str(default_checkpoints("markov")[1]), "--batch-size", "8", "--grad-accum", "2",
            "--max-images", "32", "--depth", "2", "--embed-dim", "64", "--num-heads", "2", "--device", "cuda",
            "--precision", precision, "--save-every", "2", "--log-every", "1", "--no-progress",
            "--output", str(tmp_path / "run")]
    assert main(argv + ["--steps", "2"]) == 0, capsys.readouterr().err
    assert main(argv + ["--steps", "4", "--resume"]) == 0, capsys.readouterr().err
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    losses = [json.loads(line).get("loss") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(loss is None or loss == loss for loss in losses) and sum(loss is not None for loss in losses) == 4


@pytest.mark.parametrize("trajectory", ["markov", "raster"])
def test_cuda_samples_do_not_depend_on_the_batch_size(trajectory, tmp_path, capsys):
    """``sample`` on the GPU: batch 1 and batch 7 write the same npz (per-image CUDA generators;
    cuBLAS may round other row counts differently, which this measures)."""
    import hashlib

    from mvar_engine.apps.cli import main

    digests = []
    for batch in (1, 7):
        folder = tmp_path / f"b{batch}"
        assert main(["sample", "--trajectory", trajectory, "--device", "cuda", "--per-class", "2", "--labels", "0,3,5,9",
                     "--batch-size", str(batch), "--no-progress", "--output-dir", str(folder)]) == 0
        digests.append(hashlib.sha256((folder / "samples.npz").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
