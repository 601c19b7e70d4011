"""Shared helpers: small random VAR models and tokenizers, and engines built through the registry."""

from __future__ import annotations

import os
import socket
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


def read_keys_tsv(path: Path, *, dtypes: bool = False) -> list[tuple]:
    """``(key, shape)`` per entry of a reference key list (``key<TAB>[shape]<TAB>dtype``), in order;
    ``dtypes``: ``(key, shape, dtype)``."""
    rows = []
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        dims = [int(x) for x in shape.strip("[]").split(",") if x.strip()]
        rows.append((key, dims, dtype.strip()) if dtypes else (key, dims))
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


class ModelWouldBeBuilt(BaseException):
    """Raised where a model would be built or a training run would start: a bad input that gets
    here was checked too late (a BaseException, so the CLI's error handling cannot swallow it)."""


def _tree(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files}


@pytest.fixture
def no_model_built(monkeypatch):
    """Every model constructor the CLI reaches (the built-in families' builders, the trainers' models)
    raises :class:`ModelWouldBeBuilt`."""
    from mvar_engine.apps import model_families
    from mvar_engine.apps.training import raster_trainer, tokenizer_trainer, var_trainer

    def reached(*args, **kwargs):
        raise ModelWouldBeBuilt("a model would be built")

    for family in (model_families.VarFamily, model_families.RasterFamily):
        monkeypatch.setattr(family, "builder", staticmethod(reached))
    monkeypatch.setattr(var_trainer, "VAR", reached)
    monkeypatch.setattr(raster_trainer, "RasterGPT", reached)
    monkeypatch.setattr(tokenizer_trainer, "MultiScaleVQVAE", reached)
    return ModelWouldBeBuilt


@pytest.fixture
def refused(capsys, tmp_cwd, no_model_built):
    """``refused(argv, needle)``: ``mvar-engine argv`` (run in ``tmp_cwd``) exits 2 with exactly one
    stderr line, ``mvar-engine: error: ...`` containing ``needle``, no traceback, no warning, no file
    created under ``tmp_cwd`` and no model built. Returns the line."""
    from mvar_engine.apps.cli import main

    def check(argv, needle: str = "") -> str:
        capsys.readouterr()
        before = _tree(tmp_cwd)
        status = main([str(a) for a in argv])
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert status == 2, (status, err)
        assert len(err) == 1 and err[0].startswith("mvar-engine: error: ") and needle in err[0], err
        assert "Traceback" not in captured.err + captured.out
        assert _tree(tmp_cwd) == before, f"a bad input created files: {_tree(tmp_cwd) - before}"
        return err[0]

    return check


def number_meaning(text: str, *, integer: bool = False):
    """The number a CLI flag reads from ``text``: an int, else (unless ``integer``) a finite float;
    None when the flag must refuse it (not a number of that type, inf, nan)."""
    import math

    try:
        return int(text)
    except ValueError:
        if integer:
            return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def cli_text(value) -> str:
    """A drawn number (or string) as it is typed on a command line."""
    return value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)


def free_port() -> int:
    """A TCP port free on this machine now (torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> dict[str, str]:
    """The environment of a torchrun test: one thread per rank, faulthandler on, and this very
    mvar_engine importable by the workers."""
    import mvar_engine

    package_parent = Path(mvar_engine.__path__[0]).parent
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",  # a native abort prints every stack
            "PYTHONPATH": os.pathsep.join([str(package_parent), os.environ.get("PYTHONPATH", "")])}
