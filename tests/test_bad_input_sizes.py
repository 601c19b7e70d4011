"""Sizes that cannot fit are refused before any build: ``minimum_elements()`` is a true lower bound
on every architecture's parameters and buffers (so a refusal is never wrong), and absurd size flags
in generate, train, train-tokenizer and bench train are one-line usage errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mvar_engine.apps.memory_fit import format_bytes, refuse_unfitting
from mvar_engine.core.errors import UsageError
from mvar_engine.models.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig
from mvar_engine.models.raster_gpt import RasterGPT, RasterGPTConfig
from mvar_engine.models.tokenizer import MultiScaleVQVAE, TokenizerConfig
from mvar_engine.models.var import VAR, VARConfig

HUGE = "99999999999999999999999"


def elements(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def built_on_meta(cls, config) -> int:
    with torch.device("meta"):
        return elements(cls(config))


def assert_tight_lower_bound(bound: int, actual: int) -> None:
    """Below the real count, and not vacuous: at least a fifth of it."""
    assert bound <= actual, (bound, actual)
    assert bound >= actual / 5, (bound, actual)


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(1, 4), width=st.sampled_from([None, 32, 64]), mlp_ratio=st.floats(0.5, 6),
       vocab=st.integers(2, 300), patch_nums=st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_var_bound(depth, width, mlp_ratio, vocab, patch_nums):
    config = VARConfig(depth=depth, embed_dim=width, num_heads=2 if width else None, mlp_ratio=mlp_ratio,
                       vocab_size=vocab, num_classes=3, patch_nums=tuple(sorted(patch_nums)))
    assert_tight_lower_bound(config.minimum_elements(), built_on_meta(VAR, config))


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(0, 3), heads=st.sampled_from([1, 2, 4]), vocab=st.integers(2, 300),
       side=st.integers(1, 5), multiplier=st.sampled_from([None, 0.5, 2.0]))
def test_raster_gpt_bound(depth, heads, vocab, side, multiplier):
    config = RasterGPTConfig.tiny(depth=depth, width=16 * heads, heads=heads, vocab_size=vocab, grid=(side, side),
                                  ffn_dim_multiplier=multiplier)
    assert_tight_lower_bound(config.minimum_elements(), built_on_meta(RasterGPT, config))


@settings(max_examples=15, deadline=None)
@given(vocab=st.integers(1, 5000), ch=st.sampled_from([32, 64]), ch_mult=st.sampled_from([(1,), (1, 2), (1, 1, 2)]),
       blocks=st.integers(1, 2), attention=st.booleans())
def test_tokenizer_bounds(vocab, ch, ch_mult, blocks, attention):
    side = 2 ** (len(ch_mult) - 1)
    tokenizer = TokenizerConfig(vocab_size=vocab, z_channels=8, ch=ch, ch_mult=ch_mult, num_res_blocks=blocks,
                                using_sa=attention, using_mid_sa=attention, patch_nums=(1, side))
    assert tokenizer.minimum_elements() <= built_on_meta(MultiScaleVQVAE, tokenizer)
    vq = LlamaGenVQConfig(codebook_size=vocab, ch=ch, ch_mult=ch_mult, num_res_blocks=blocks, z_channels=32)
    assert vq.minimum_elements() <= built_on_meta(LlamaGenVQ, vq)


def test_released_sizes_are_counted_almost_exactly():
    """The big matrices are nearly all of a transformer: VAR-d16 and LlamaGen-B within 2%."""
    for cls, config in ((VAR, VARConfig(depth=16)), (RasterGPT, RasterGPTConfig.llamagen_b())):
        bound, actual = config.minimum_elements(), built_on_meta(cls, config)
        assert 0.98 * actual <= bound <= actual


def test_refusal_names_the_flags_and_both_sizes():
    config = VARConfig(depth=2)
    need = config.minimum_elements() * 4
    refuse_unfitting({"transformer": config}, torch.device("cpu"), "--depth", available=need)  # fits exactly
    with pytest.raises(UsageError) as error:
        refuse_unfitting({"transformer": config}, torch.device("cpu"), "--depth", available=need - 1)
    text = str(error.value)
    assert text.startswith("--depth: the model needs at least") and format_bytes(need) in text and "free on cpu" in text
    with pytest.raises(UsageError, match="gradients and optimizer state"):
        refuse_unfitting({"transformer": config}, torch.device("cpu"), "--depth", copies=4, available=need)


@pytest.mark.parametrize("value, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (3 * 2**30, "3 GiB"),
                                         (2**70, "1.02e+03 EiB")])
def test_format_bytes(value, text):
    assert format_bytes(value) == text


GENERATE = ["--labels", "1", "--samples-per-label", "1", "--no-progress"]


@pytest.mark.parametrize("argv", [
    ["--random-weights", "--depth", "1", "--patch-nums", f"1,{HUGE}"],
    ["--random-weights", "--depth", "1", "--patch-nums", "1,100000"],  # the [L, L] mask alone: 347 EiB
    ["--random-weights", "--patch-nums", "1,2", "--depth", "100000"],
    ["--trajectory", "raster", "--random-weights", "--depth", "100000"],
    ["--trajectory", "raster", "--random-weights", "--patch-nums", "1000000"],
])
def test_generate_refuses_models_that_cannot_fit(argv, refused):
    line = refused(GENERATE + argv, "the model needs at least")
    assert "free on cpu" in line


@pytest.fixture
def tokenizer_file():
    from mvar_engine.models.default_models import default_checkpoints

    return str(default_checkpoints("markov")[1])


TRAIN = ["train", "--steps", "1", "--batch-size", "4", "--max-images", "8", "--no-progress", "--output", "run"]


@pytest.mark.parametrize("extra", [["--depth", HUGE, "--embed-dim", "32", "--num-heads", "2"],
                                   ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--mlp-ratio", "1e23"]])
def test_training_refuses_models_that_cannot_fit(extra, refused, tokenizer_file):
    line = refused(TRAIN + ["--tokenizer", tokenizer_file] + extra, "gradients and optimizer state")
    assert "--depth, --embed-dim" in line


def test_tokenizer_training_refuses_a_huge_codebook(refused):
    refused(["train-tokenizer", "--steps", "1", "--no-progress", "--output", "tok", "--vocab-size", HUGE],
            "the model needs at least")


def test_bench_train_refuses_a_huge_depth(refused):
    refused(["bench", "train", "--depth", "99999999999", "--output", "bt.json"], "the model needs at least")
