"""Shared helpers: small random VAR models and tokenizers, and engines built through the registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("MVAR_ENGINE_DISABLE_PLUGIN_AUTOLOAD", "1")  # tests see the built-ins only

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]


def shared_reference(name: str) -> Path | None:
    """The reference file ``name``: ../shared/reference/ (the design's copy) or tests/data/ (ours)."""
    for path in (REPO.parent / "shared" / "reference" / name, REPO / "tests" / "data" / name):
        if path.is_file():
            return path
    return None


def read_keys_tsv(path: Path) -> list[tuple[str, list[int]]]:
    rows = []
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, _dtype = line.split("\t")
        rows.append((key, [int(x) for x in shape.strip("[]").split(",") if x.strip()]))
    return rows


def small_models(patch_nums=(1, 2, 3), *, depth=2, width=32, heads=2, num_classes=5, vocab=16, z=8, seed=0):
    """A random VAR and a matching small tokenizer (eval mode)."""
    from mvar_engine.models.tokenizer import MultiScaleVQVAE, TokenizerConfig
    from mvar_engine.models.var import VAR, VARConfig

    torch.manual_seed(seed)
    model = VAR(VARConfig(depth=depth, embed_dim=width, num_heads=heads, num_classes=num_classes, vocab_size=vocab,
                          z_channels=z, patch_nums=tuple(patch_nums)))
    # make the learned attention temperatures and AdaLN gates non-trivial
    with torch.no_grad():
        for block in model.blocks:
            block.ada_lin[1].weight.normal_(0, 0.2)
            block.attn.q_bias.normal_(0, 0.5)
    tokenizer = MultiScaleVQVAE(TokenizerConfig(vocab_size=vocab, z_channels=z, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                                using_sa=False, using_mid_sa=False, patch_nums=tuple(patch_nums)))
    return model.eval(), tokenizer.eval()


def make_engine(model, tokenizer, trajectory="full", attention="dense", cache="full", backend="sdpa",
                trajectory_options=None, attention_options=None, cache_options=None):
    from mvar_engine.apps.config import EngineConfig
    from mvar_engine.models.var_adapter import NextScaleEngine
    from mvar_engine.apps.pipeline import resolve_components

    config = EngineConfig(trajectory={"name": trajectory, "options": trajectory_options or {}},
                          attention={"name": attention, "options": attention_options or {}},
                          cache={"name": cache, "options": cache_options or {}}, backend=backend)
    c = resolve_components(config)
    return NextScaleEngine(model, tokenizer, c.trajectory, c.pattern, c.cache, c.backends)


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
