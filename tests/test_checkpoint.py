"""Checkpoint formats and the readable errors of the loader."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import read_keys_tsv, shared_reference, small_models
from mvar_engine.models.checkpoint import read_state_dict, save_state_dict
from mvar_engine.core.errors import CheckpointError, UsageError
from mvar_engine.models.var import VAR, VARConfig, infer_var_config
from mvar_engine.apps.pipeline import load_tokenizer, load_var


def test_var_d16_state_dict_matches_the_released_keys():
    path = shared_reference("var_d16.keys.tsv")
    if path is None:
        pytest.skip("../shared/reference/var_d16.keys.tsv is not present")
    with torch.device("meta"):
        model = VAR(VARConfig(depth=16))
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == read_keys_tsv(path)


@pytest.mark.parametrize("depth,width,params_m", [(16, 1024, 310), (20, 1280, 600)])
def test_published_sizes(depth, width, params_m):
    with torch.device("meta"):
        model = VAR(VARConfig(depth=depth))
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert model.config.width == width and abs(n - params_m) / params_m < 0.05


def _wrap(state, layout):
    return {
        "flat": state,
        "trainer": {"trainer": {"var_wo_ddp": state, "optimizer": {}}, "args": {"depth": 2}},
        "mvar": {"mvar_wo_ddp": state, "epoch": 3},
        "ddp": {f"module.{k}": v for k, v in state.items()},
        "no-mask-buffers": {k: v for k, v in state.items() if k not in ("lvl_1L", "attn_bias_for_masking")},
    }[layout]


@given(layout=st.sampled_from(["flat", "trainer", "mvar", "ddp", "no-mask-buffers"]),
       suffix=st.sampled_from([".pth", ".safetensors"]), depth=st.integers(1, 3))
def test_every_format_loads_back_identically(tmp_path_factory, layout, suffix, depth):
    if suffix == ".safetensors" and layout in ("trainer", "mvar"):
        suffix = ".pth"  # safetensors holds flat dicts only
    model, _ = small_models((1, 2, 3), depth=depth)
    path = tmp_path_factory.mktemp("ckpt") / f"var{suffix}"
    wrapped = _wrap(model.state_dict(), layout)
    if suffix == ".safetensors":
        save_state_dict(wrapped, path)
    else:
        torch.save(wrapped, path)
    loaded = load_var(path, patch_nums=(1, 2, 3))
    assert loaded.config.depth == depth  # inferred from the file
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_infers_the_256px_schedule_and_heads(tmp_path):
    with torch.device("meta"):
        model = VAR(VARConfig(depth=4, embed_dim=128, num_heads=4, num_classes=7, vocab_size=64, z_channels=8))
    state = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    config = infer_var_config(state)
    assert (config.depth, config.width, config.heads, config.num_classes, config.vocab_size, config.z_channels) == (4, 128, 4, 7, 64, 8)
    assert config.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def test_mismatch_report_names_missing_unexpected_and_misshaped_keys(tmp_path):
    model, _ = small_models((1, 2, 3), depth=2)
    state = dict(model.state_dict())
    del state["blocks.1.attn.q_bias"]
    state["blocks.1.extra.weight"] = torch.zeros(3)
    state["blocks.0.attn.proj.bias"] = torch.zeros(33)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_var(path, patch_nums=(1, 2, 3))
    message = str(info.value)
    assert "\n" not in message
    assert "1 missing (blocks.1.attn.q_bias)" in message
    assert "1 unexpected (blocks.1.extra.weight)" in message
    assert "blocks.0.attn.proj.bias: file [33] vs model [32]" in message
    loose = load_var(path, patch_nums=(1, 2, 3), strict=False)  # non-strict loads what matches
    assert torch.equal(loose.blocks[0].attn.q_bias, model.blocks[0].attn.q_bias)


def test_depth_flag_that_disagrees_with_the_file_is_reported(tmp_path):
    model, _ = small_models((1, 2, 3), depth=2)
    path = tmp_path / "var.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(UsageError, match=r"--depth 3: .*var.pth holds --depth 2 \(drop --depth, or add --no-strict"):
        load_var(path, depth=3, patch_nums=(1, 2, 3))
    grown = load_var(path, depth=3, patch_nums=(1, 2, 3), strict=False)  # --no-strict: what matches, loaded
    assert len(grown.blocks) == 3 and torch.equal(grown.blocks[0].attn.mat_qkv.weight, model.blocks[0].attn.mat_qkv.weight)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"\x80\x04K\x01."])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert "\n" not in str(info.value) and "junk.pth" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")


def test_tokenizer_round_trip_and_architecture_inference(tmp_path):
    _, tok = small_models((1, 2, 4))
    path = tmp_path / "vae.safetensors"
    save_state_dict(tok.state_dict(), path)
    loaded = load_tokenizer(path, (1, 2, 4))
    assert loaded.config.ch == 32 and loaded.config.ch_mult == (1, 1) and loaded.config.num_res_blocks == 1
    for (k, a), (_, b) in zip(tok.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_released_tokenizer_architecture_is_inferred():
    path = shared_reference("vae_ch160v4096z32.keys.tsv")
    if path is None:
        pytest.skip("../shared/reference/vae_ch160v4096z32.keys.tsv is not present")
    from mvar_engine.apps.pipeline import infer_tokenizer_config

    state = {k: torch.empty(shape) for k, shape in read_keys_tsv(path)}
    config = infer_tokenizer_config(state, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert (config.ch, config.ch_mult, config.num_res_blocks, config.vocab_size, config.z_channels,
            config.share_quant_resi, config.using_sa, config.using_mid_sa) == (160, (1, 1, 2, 2, 4), 2, 4096, 32, 4, True, True)


def test_atomic_write_keeps_the_old_file_on_failure_and_uses_normal_permissions(tmp_path):
    """Regression: files came out 0600 (mkstemp's mode) instead of honouring the umask."""
    import os

    from mvar_engine.models.checkpoint import atomic_write

    path = tmp_path / "out.bin"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"first"))
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask

    def broken(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_export_weights_halves_the_file_and_keeps_metadata(tmp_path, capsys):
    import json

    from safetensors import safe_open

    from mvar_engine.apps.cli import main

    state = {"w": torch.randn(64, 64), "steps": torch.arange(3)}
    source = save_state_dict(state, tmp_path / "a.safetensors", metadata={"mvar_engine": json.dumps({"kind": "var"})})
    target = tmp_path / "b.safetensors"
    assert main(["export-weights", str(source), str(target)]) == 0
    with safe_open(str(target), framework="pt") as handle:
        meta = json.loads(handle.metadata()["mvar_engine"])
        assert handle.get_tensor("w").dtype == torch.float16 and handle.get_tensor("steps").dtype == torch.int64
    assert meta["kind"] == "var" and meta["exported"] == {"from": "a.safetensors", "dtype": "float16"}
    assert target.stat().st_size < 0.6 * source.stat().st_size
    assert main(["export-weights", str(source), str(tmp_path / "c.pth")]) == 2
    assert "change the suffix" in capsys.readouterr().err
