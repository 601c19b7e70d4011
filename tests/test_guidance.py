"""Issue 13, guidance semantics: ``--cfg 0`` is no guidance in every family (the conditional rows
alone, no unconditional rows computed); raster models follow LlamaGen (guide only when cfg > 1,
``uncond + cfg (cond - uncond)``); VAR ramps ``(1 + t) cond - t uncond``. Checked against logits
computed by hand from teacher-forced passes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_engine, small_models
from mvar_engine.core.backend_selection import selector_for
from mvar_engine.models.raster_adapter import RasterEngine
from mvar_engine.plugins.caches import FullCache
from mvar_engine.plugins.patterns import CausalPattern
from mvar_engine.plugins.raster import RasterTrajectory
from mvar_engine.testing import tiny_raster_model


def _raster_engine(model):
    return RasterEngine(model, None, RasterTrajectory(), FullCache(), selector_for("sdpa"), pattern=CausalPattern())


class RowCounter:
    """Wraps an engine's adapter and records the rows of every forward pass."""

    def __init__(self, adapter):
        self.rows: list[int] = []
        real = adapter.run

        def run(state, steps, spans, attend):
            hidden = real(state, steps, spans, attend)
            self.rows.append(hidden.shape[0])
            return hidden

        adapter.run = run


@given(cfg=st.sampled_from([0.0, 0.25, 0.5, 1.0]), seed=st.integers(0, 4))
def test_raster_at_cfg_up_to_1_runs_the_conditional_rows_alone(cfg, seed):
    model = tiny_raster_model((2, 3), seed=seed)
    labels = torch.tensor([1, 3])
    eng = _raster_engine(model)
    counter = RowCounter(eng.model)
    out = eng.generate(labels, cfg=cfg, top_k=1, top_p=1.0, return_logits=True)
    assert set(counter.rows) == {2}, "unconditional rows were computed"
    by_hand = eng.teacher_forced_logits(labels, out.tokens)  # the conditional rows' logits
    torch.testing.assert_close(out.logits, by_hand, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.tokens, by_hand.argmax(-1))


@given(cfg=st.sampled_from([1.5, 4.0]), seed=st.integers(0, 4))
def test_raster_above_1_guides_as_llamagen(cfg, seed):
    model = tiny_raster_model((2, 3), seed=seed)
    labels = torch.tensor([1, 3])
    eng = _raster_engine(model)
    counter = RowCounter(eng.model)
    out = eng.generate(labels, cfg=cfg, top_k=1, top_p=1.0)
    assert set(counter.rows) == {4}
    cond = eng.teacher_forced_logits(labels, out.tokens)
    uncond = eng.teacher_forced_logits(torch.full_like(labels, model.null_class), out.tokens)
    assert torch.equal(out.tokens, (uncond + cfg * (cond - uncond)).argmax(-1))


def test_raster_guidance_changes_the_tokens():
    """Not vacuous: some seed's guided tokens differ from the conditional ones."""
    differs = []
    for seed in range(6):
        model = tiny_raster_model((2, 3), seed=seed)
        eng = _raster_engine(model)
        labels = torch.tensor([1, 3])
        differs.append(not torch.equal(eng.generate(labels, cfg=4.0, top_k=1, top_p=1.0).tokens,
                                       eng.generate(labels, cfg=0.0, top_k=1, top_p=1.0).tokens))
    assert any(differs)


@given(seed=st.integers(0, 4))
def test_var_at_cfg_0_runs_the_conditional_rows_alone(seed):
    model, tok = small_models(patch_nums=(1, 2), seed=seed)
    eng = make_engine(model, tok, "full", "dense", "full")
    labels = torch.tensor([0, 2])
    counter = RowCounter(eng.model)
    out = eng.generate(labels, cfg=0.0, top_k=1, top_p=0.0, return_logits=True)
    assert set(counter.rows) == {2}
    var_input = tok.indices_to_var_input(out.tokens)
    by_hand = eng.teacher_forced_logits(labels, var_input)
    torch.testing.assert_close(torch.cat(out.logits, dim=1), by_hand, atol=1e-5, rtol=1e-5)


def test_var_guidance_formula_by_hand():
    from mvar_engine.core.sampling import guided_logits_var

    logits = torch.tensor([[[1.0, 3.0]], [[2.0, 0.0]]])  # rows [cond; uncond]
    t = 2.0 * 1 / 2  # cfg 2 at scale 1 of 3
    assert torch.equal(guided_logits_var(logits, 1, 2.0, 1, 3), (1 + t) * logits[:1] - t * logits[1:])
    assert torch.equal(guided_logits_var(logits, 1, 0.0, 2, 3), logits[:1])


@pytest.mark.parametrize("cfg, guided", [(0.0, False), (0.5, False), (1.0, False), (1.0001, True), (4.0, True)])
def test_the_raster_rule(cfg, guided):
    from mvar_engine.core.sampling import raster_guided

    assert raster_guided(cfg) is guided
