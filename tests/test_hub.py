"""Issue 30, Hub loading: ``Pipeline.from_pretrained("FoundationVision/var", variant="d16")`` and the other
known ids through the real ``huggingface_hub`` client against a loopback Hub (:mod:`hub_server`),
in fresh interpreters (the client reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` at import): the
download equals the local files, the cache serves offline runs, and offline-uncached, unknown
files and a corrupted download are one-line errors that leave no file behind."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mvar_engine
from hub_server import FakeHub

pytest.importorskip("huggingface_hub")

WEIGHTS = Path(mvar_engine.__file__).parent / "models" / "weights"
SCHEDULE = (1, 2, 3, 4, 6, 8)
RUN = """
import json, sys, torch, mvar_engine
args = json.loads(sys.argv[1])
try:
    pipe = mvar_engine.Pipeline.from_pretrained(**args["load"])
    out = pipe(labels=args.get("labels", [3, 7]), images_per_label=2, seed=0, output_type="pt", **args.get("call", {}))
    torch.save(out.images, args["save"])
    print(json.dumps({"ok": True, "model": pipe.components.names["model"]}))
except mvar_engine.UsageError as error:
    print(json.dumps({"ok": False, "error": str(error)}))
"""


def to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """VAR's two files as released, in miniature: a random d2 VAR in the training-checkpoint layout and
    a tokenizer state dict (the shipped digits tokenizer's weights) as a plain ``.pth``."""
    from mvar_engine.models.var import VAR, VARConfig

    folder = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    var = VAR(VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10, vocab_size=512, z_channels=16,
                        patch_nums=SCHEDULE))
    (folder / "var_d16.pth").write_bytes(to_bytes({"trainer": {"var_wo_ddp": var.state_dict()}}))
    tokenizer = {k: v.float() for k, v in load_file(str(WEIGHTS / "tokenizer-digits.safetensors")).items()}
    (folder / "vae_ch160v4096z32.pth").write_bytes(to_bytes(tokenizer))
    return folder


def run(tmp_path: Path, hub: FakeHub | None, load: dict, name: str, offline: bool = False, home: str = "hf",
        call: dict | None = None, labels: list[int] | None = None) -> dict:
    env = {**os.environ, "HF_HOME": str(tmp_path / home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10"}
    env.pop("HF_HUB_CACHE", None)
    env["HF_ENDPOINT"] = hub.endpoint if hub is not None else "http://127.0.0.1:9"  # nothing listens on port 9
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    args = {"load": load, "save": str(tmp_path / f"{name}.pt"), "call": call or {}, "labels": labels or [3, 7]}
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cache_files(tmp_path: Path, home: str = "hf") -> list[str]:
    root = tmp_path / home / "hub"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "/blobs/" in str(p)) \
        if root.exists() else []


VAR_D16 = {"name_or_path": "FoundationVision/var", "variant": "d16", "trajectory": "markov",
           "model": {"patch_nums": list(SCHEDULE)}}


def test_var_from_the_hub_equals_the_local_files_and_the_cache_serves_offline(released, tmp_path):
    with FakeHub() as hub:
        for name in ("var_d16.pth", "vae_ch160v4096z32.pth"):
            hub.add_file("FoundationVision/var", name, (released / name).read_bytes())
        assert run(tmp_path, hub, VAR_D16, "hub")["ok"]
        fetched = [r for r in hub.requests if r.startswith("GET")]
        assert sorted(r.rsplit("/", 1)[1] for r in fetched) == ["vae_ch160v4096z32.pth", "var_d16.pth"]
    # the same files given as local paths, in the same kind of fresh interpreter (same threads, same sums)
    assert run(tmp_path, None, {"name_or_path": str(released / "var_d16.pth"), "trajectory": "markov",
                                "tokenizer": str(released / "vae_ch160v4096z32.pth"),
                                "model": {"patch_nums": list(SCHEDULE)}}, "local", offline=True)["ok"]
    expected = torch.load(tmp_path / "local.pt")
    assert torch.equal(torch.load(tmp_path / "hub.pt"), expected)
    # the Hub is gone: the cache answers (offline), with the same pixels
    assert run(tmp_path, None, VAR_D16, "offline", offline=True)["ok"]
    assert torch.equal(torch.load(tmp_path / "offline.pt"), expected)


def test_the_cli_takes_a_hub_id_and_gives_the_api_s_bytes(released, tmp_path):
    """``mvar-engine --model FoundationVision/var --variant d16`` downloads what
    ``from_pretrained("FoundationVision/var", variant="d16")`` does and draws the same pixels (one PNG
    per image against the API's uint8 images)."""
    import numpy as np
    from PIL import Image

    from mvar_engine.apps.images import to_uint8

    with FakeHub() as hub:
        for name in ("var_d16.pth", "vae_ch160v4096z32.pth"):
            hub.add_file("FoundationVision/var", name, (released / name).read_bytes())
        assert run(tmp_path, hub, VAR_D16, "api")["ok"]
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        argv = ["--model", "FoundationVision/var", "--variant", "d16", "--trajectory", "markov", "--patch-nums",
                ",".join(map(str, SCHEDULE)), "--labels", "3,7", "--samples-per-label", "2", "--seed", "0",
                "--device", "cpu", "--output", str(tmp_path / "cli" / "grid.png"), "--per-image", "--no-progress"]
        proc = subprocess.run([sys.executable, "-m", "mvar_engine.apps.cli", *argv], env=env, capture_output=True,
                              text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    api = to_uint8(torch.load(tmp_path / "api.pt"))
    cli = [np.asarray(Image.open(path)) for path in sorted((tmp_path / "cli" / "grid").glob("*.png"))]
    assert len(cli) == len(api) == 4 and all(np.array_equal(a, b) for a, b in zip(api, cli))


@pytest.mark.parametrize("argv, needle", [
    (["--model", "FoundationVision/var", "--variant", "d17"], "FoundationVision/var has no variant 'd17' (known: d16"),
    (["--model", "nobody/nothing"], "nobody/nothing: not a Hub id this engine knows"),
    (["--variant", "d16"], "--variant picks a model of a Hub repository: give --model ORG/NAME"),
    (["--model", "deepseek-ai/Janus-Pro-1B"], "use deepseek-community/Janus-Pro-1B"),
])
def test_hub_mistakes_on_the_command_line_are_one_line(argv, needle, refused):
    refused(argv, needle)


def test_offline_and_not_cached_is_one_line(tmp_path):
    out = run(tmp_path, None, VAR_D16, "x", offline=True, home="empty")
    assert not out["ok"] and "is not in the Hugging Face cache" in out["error"] and "run once online" in out["error"]
    assert "\n" not in out["error"] and cache_files(tmp_path, "empty") == []


def test_a_corrupted_download_is_refused_and_deleted(released, tmp_path):
    with FakeHub() as hub:
        for name in ("var_d16.pth", "vae_ch160v4096z32.pth"):
            hub.add_file("FoundationVision/var", name, (released / name).read_bytes())
        hub.corrupt.add(("FoundationVision/var", "var_d16.pth"))
        out = run(tmp_path, hub, VAR_D16, "x")
    assert not out["ok"] and "FoundationVision/var/var_d16.pth: the downloaded file's SHA-256" in out["error"]
    assert not any("incomplete" in f for f in cache_files(tmp_path))
    stated = __import__("hashlib").sha256((released / "var_d16.pth").read_bytes()).hexdigest()
    assert not any(f.endswith(stated) for f in cache_files(tmp_path))  # the bad bytes were not kept under that name


def test_a_file_the_hub_lacks_is_one_line(released, tmp_path):
    with FakeHub() as hub:
        hub.add_file("FoundationVision/var", "vae_ch160v4096z32.pth", (released / "vae_ch160v4096z32.pth").read_bytes())
        out = run(tmp_path, hub, {**VAR_D16, "variant": "d20"}, "x")
    assert not out["ok"] and "FoundationVision/var/var_d20.pth: not found on the Hub" in out["error"]


def test_janus_pro_folder_from_the_hub(tmp_path):
    pytest.importorskip("transformers")
    from test_janus import save_tiny

    folder = save_tiny(tmp_path / "janus", kv_heads=2, seed=1)
    with FakeHub() as hub:
        hub.add_folder("deepseek-community/Janus-Pro-1B", folder)
        out = run(tmp_path, hub, {"name_or_path": "deepseek-community/Janus-Pro-1B", "model": {"prompt": "a cat"}},
                  "janus", call={"cfg": 5.0}, labels=[0])
    assert out["ok"] and out["model"] == "janus", out
    assert run(tmp_path, None, {"name_or_path": str(folder), "model": {"prompt": "a cat"}}, "local", offline=True,
               call={"cfg": 5.0}, labels=[0])["ok"]
    assert torch.equal(torch.load(tmp_path / "janus.pt"), torch.load(tmp_path / "local.pt"))


def test_llamagen_from_the_hub(tmp_path):
    """``FoundationVision/LlamaGen`` variant ``B-256``: the GPT and VQ-16 files (tiny stand-ins, so the
    grid and heads are given: the variant's own is 16x16)."""
    import argparse

    from mvar_engine.models.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig
    from mvar_engine.models.raster_gpt import RasterGPT, RasterGPTConfig

    torch.manual_seed(0)
    gpt = RasterGPT(RasterGPTConfig.tiny(vocab_size=64, grid=(4, 4), num_classes=10))
    vq = LlamaGenVQ(LlamaGenVQConfig.tiny(codebook_size=64))
    with FakeHub() as hub:
        hub.add_file("FoundationVision/LlamaGen", "c2i_B_256.pt",
                     to_bytes({"model": gpt.state_dict(), "args": argparse.Namespace(gpt_model="GPT-B")}))
        hub.add_file("FoundationVision/LlamaGen", "vq_ds16_c2i.pt", to_bytes({"model": vq.state_dict()}))
        out = run(tmp_path, hub, {"name_or_path": "FoundationVision/LlamaGen", "variant": "B-256",
                                  "model": {"patch_nums": [4], "num_heads": 2}}, "llamagen")
    assert out["ok"] and out["model"] == "raster-gpt", out
    assert torch.load(tmp_path / "llamagen.pt").shape == (4, 3, 8, 8)
