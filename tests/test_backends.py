"""Every attention backend against the float64 reference, for every spec kind (property-based).

Random batch, heads, head_dim, sequence lengths, map height and width (non-square), kernel sizes
(odd and even), dilation, causal flag; forward and, where the backend declares it, backward.
CUDA cases are marked ``cuda`` and skip with the reason on a machine without one. ``flex`` on CPU
compiles per shape, so its CPU cases live in ``test_flex.py`` with a fixed pool of shapes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from mvar_engine.backends.natten_backend import NattenBackend
from mvar_engine.backends.reference import ReferenceBackend
from mvar_engine.backends.sdpa import SdpaBackend, SdpaOptions
from mvar_engine.backends.tiling import map_tiles
from mvar_engine.core.attention import (SPEC_KINDS, BlockCausal, BlockDiagonal, Causal, Dense, Masked, Neighborhood2D,
                                        SlidingWindow1D, check_inputs)
from mvar_engine.core.backend_selection import BackendSelector, Candidate, attention, selector_for
from mvar_engine.core.errors import BackendUnsupportedError, UsageError
from mvar_engine.core.registry import get_registry

REFERENCE = ReferenceBackend()
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 1e-2}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is available here")


# -- strategies --------------------------------------------------------------------------------------
@st.composite
def random_masks(draw, q_len: int, kv_len: int) -> torch.Tensor:
    seed = draw(st.integers(0, 2**16))
    density = draw(st.sampled_from([0.1, 0.5, 0.9]))
    mask = torch.rand(q_len, kv_len, generator=torch.Generator().manual_seed(seed)) < density
    mask[torch.arange(q_len), torch.randint(0, kv_len, (q_len,), generator=torch.Generator().manual_seed(seed + 1))] = True
    return mask


@st.composite
def cross_scale_neighborhoods(draw) -> Masked:
    """The ``neighborhood`` pattern under the ``full`` trajectory: windows on every earlier scale."""
    from mvar_engine.core.layout import SequenceLayout
    from mvar_engine.plugins.patterns import NeighborhoodOptions, NeighborhoodPattern
    from mvar_engine.plugins.trajectories import FullTrajectory

    sides = sorted(draw(st.lists(st.integers(1, 7), min_size=2, max_size=4)))
    layout = SequenceLayout.from_patch_nums(tuple(sides))
    pattern = NeighborhoodPattern(NeighborhoodOptions(kernel_size=draw(st.integers(1, 4)), apply_from=1))
    everything = ((0, layout.length),)
    spec = pattern.spec(layout, everything, everything, FullTrajectory().visible)
    assume(isinstance(spec, Masked))
    return spec


@st.composite
def specs(draw, kinds=SPEC_KINDS, max_len: int = 40, max_side: int = 13, kernel_fits_map: bool = False):
    """(spec, q_len, kv_len) of one of ``kinds`` (``kernel_fits_map``: neighbourhoods with
    kernel_size * dilation <= each side, NATTEN's domain)."""
    kind = draw(st.sampled_from(kinds))
    if kind in ("dense", "causal", "window1d"):
        kv_len = draw(st.integers(1, max_len))
        q_len = draw(st.integers(1, kv_len)) if kind != "dense" else draw(st.integers(1, max_len))
        if kind == "dense":
            return Dense(), q_len, kv_len
        if kind == "causal":
            return Causal(), q_len, kv_len
        return SlidingWindow1D(draw(st.integers(0, 12)), draw(st.integers(0, 3))), q_len, kv_len
    if kind in ("block-causal", "block-diagonal"):
        blocks = tuple(draw(st.lists(st.integers(1, 12), min_size=1, max_size=5)))
        spec = BlockCausal(blocks) if kind == "block-causal" else BlockDiagonal(blocks)
        return spec, sum(blocks), sum(blocks)
    if kind == "neighborhood2d":
        k, d = draw(st.integers(1, 9)), draw(st.integers(1, 3))
        low = k * d if kernel_fits_map else 1
        h, w = draw(st.integers(low, max(max_side, low))), draw(st.integers(low, max(max_side, low)))
        spec = Neighborhood2D(h, w, k, d, draw(st.booleans()))
        return spec, h * w, h * w
    if draw(st.booleans()):
        spec = draw(cross_scale_neighborhoods())
        n = spec.allowed.shape[0]
        return spec, n, n
    q_len, kv_len = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    return Masked(draw(random_masks(q_len, kv_len)), "random"), q_len, kv_len


def inputs(spec_q_kv, batch, heads, head_dim, dtype, device, seed, value_dim=None):
    _, q_len, kv_len = spec_q_kv
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, q_len, head_dim), (batch, heads, kv_len, head_dim), (batch, heads, kv_len, value_dim or head_dim)]
    return [torch.randn(*s, generator=g).to(device=device, dtype=dtype) for s in shapes]


# -- backends under test -----------------------------------------------------------------------------
def cpu_backends():
    """Every backend variant that runs on this CPU, by name (flex: see test_flex.py)."""
    found = {
        "sdpa": SdpaBackend(),
        "sdpa-tiled": SdpaBackend(SdpaOptions(tiled="always")),
        "sdpa-tile-3": SdpaBackend(SdpaOptions(tiled="always", tile=3)),
        "sdpa-fused": SdpaBackend(SdpaOptions(short_queries="fused")),
        "sdpa-materialised": SdpaBackend(SdpaOptions(short_queries="materialised")),
        "reference-input-precision": ReferenceBackend(ReferenceBackend().options.model_copy(update={"precision": "input"})),
    }
    if get_registry().get("backend", "natten").availability.ok:
        found["natten"] = NattenBackend()
    return found


CPU_BACKENDS = cpu_backends()


def compare(backend, spec_q_kv, *, batch, heads, head_dim, dtype, device, seed, grad):
    spec = spec_q_kv[0]
    q, k, v = inputs(spec_q_kv, batch, heads, head_dim, dtype, device, seed)
    reason = backend.supports(spec, device=q.device, dtype=dtype, head_dim=head_dim, needs_grad=grad)
    assume(reason is None)
    scale = head_dim ** -0.5
    tol = TOLERANCE[dtype]
    if not grad:
        with torch.no_grad():
            got = backend.attend(q, k, v, spec, scale=scale)
        want = REFERENCE.attend(q, k, v, spec, scale=scale)
        assert got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        return
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = backend.attend(q, k, v, spec, scale=scale)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 7)).to(device=device, dtype=dtype)
    got = torch.autograd.grad(out, (q, k, v), upstream)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want = torch.autograd.grad(REFERENCE.attend(q64, k64, v64, spec, scale=scale), (q64, k64, v64), upstream.double())
    gtol = GRAD_TOLERANCE[dtype]
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, atol=gtol, rtol=gtol, msg=lambda m, n=name: f"d{n}: {m}")


common = dict(batch=st.integers(1, 3), heads=st.integers(1, 4), head_dim=st.sampled_from([4, 8, 12, 16, 32]),
              seed=st.integers(0, 1000))


def domain(backend) -> dict:
    """Strategy arguments that stay inside what ``backend`` declares (so few examples are filtered)."""
    kinds = backend.capabilities.kinds
    natten = isinstance(backend, NattenBackend)
    return dict(kinds=tuple(k for k in SPEC_KINDS if kinds is None or k in kinds), kernel_fits_map=natten,
                head_dims=[8, 16, 32] if natten else [4, 8, 12, 16, 32])


@pytest.mark.parametrize("name", sorted(CPU_BACKENDS))
@given(data=st.data(), batch=st.integers(1, 3), heads=st.integers(1, 4), seed=st.integers(0, 1000))
def test_cpu_backend_equals_reference_float32(name, data, batch, heads, seed):
    backend = CPU_BACKENDS[name]
    allowed = domain(backend)
    case = data.draw(specs(kinds=allowed["kinds"], kernel_fits_map=allowed["kernel_fits_map"]), label="case")
    head_dim = data.draw(st.sampled_from(allowed["head_dims"]), label="head_dim")
    compare(backend, case, batch=batch, heads=heads, head_dim=head_dim, dtype=torch.float32, device="cpu", seed=seed,
            grad=False)


@pytest.mark.parametrize("name", ["sdpa", "sdpa-tiled", "sdpa-materialised"])
@given(case=specs(), **common)
def test_cpu_backend_gradients_equal_reference(name, case, batch, heads, head_dim, seed):
    compare(CPU_BACKENDS[name], case, batch=batch, heads=heads, head_dim=head_dim, dtype=torch.float32, device="cpu",
            seed=seed, grad=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["sdpa", "sdpa-tiled", "sdpa-fused", "sdpa-materialised"])
@given(case=specs(kinds=("dense", "causal", "block-causal", "neighborhood2d")), **common)
def test_cpu_half_precision_within_tolerance(name, dtype, case, batch, heads, head_dim, seed):
    compare(CPU_BACKENDS[name], case, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device="cpu", seed=seed,
            grad=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@given(spec_q_kv=specs(kinds=("dense", "causal", "window1d"), max_len=24), seed=st.integers(0, 1000),
       strided=st.booleans())
def test_sdpa_short_16_bit_cpu_queries_take_the_materialised_path(dtype, spec_q_kv, seed, strided):
    """auto: 16-bit CPU calls of at most SHORT_QUERY_ROWS queries equal the materialised path over
    contiguous keys and values bit for bit, also when given strided ones (a prefix view of a larger
    buffer, as a growing cache returns); longer ones, and float32, equal the fused kernel."""
    from mvar_engine.backends.reference import materialised_attention
    from mvar_engine.backends.sdpa import SHORT_QUERY_ROWS

    spec, q_len, kv_len = spec_q_kv
    q, k, v = inputs(spec_q_kv, 2, 3, 16, dtype, "cpu", seed)
    if strided:
        k, v = (torch.cat([t, t[:, :, :2]], dim=2)[:, :, :kv_len] for t in (k, v))
    got = SdpaBackend().attend(q, k, v, spec, scale=0.25)
    fused = SdpaBackend(SdpaOptions(short_queries="fused")).attend(q, k, v, spec, scale=0.25)
    materialised = materialised_attention(q, k.contiguous(), v.contiguous(), spec.mask(q_len, kv_len, "cpu"),
                                          scale=0.25, compute_dtype=dtype, softmax_dtype=torch.float32)
    short = dtype != torch.float32 and q_len <= SHORT_QUERY_ROWS
    if short and strided:  # staged keys are zero-padded (masked out): equal up to summation order
        torch.testing.assert_close(got, materialised, atol=TOLERANCE[dtype] / 10, rtol=TOLERANCE[dtype] / 10)
    else:
        assert torch.equal(got, materialised if short else fused)
    assert SdpaBackend().materialises(spec, q_len=q_len, dtype=dtype, device=torch.device("cpu")) == short
    assert not SdpaBackend().materialises(spec, q_len=q_len, dtype=dtype, device=torch.device("cuda"))


@pytest.mark.parametrize("name", ["sdpa", "sdpa-fused", "sdpa-materialised", "reference-input-precision", "reference"])
@given(dtype=st.sampled_from([torch.bfloat16, torch.float32]), spec_q_kv=specs(kinds=("dense", "causal", "window1d"),
       max_len=24), seed=st.integers(0, 1000), strided=st.booleans())
def test_attend_and_score_gives_attend_s_output_and_the_received_mass(name, dtype, spec_q_kv, seed, strided):
    """Where a backend materialises the probabilities (sdpa's short 16-bit CPU path or forced
    materialised, reference) ``attend_and_score`` returns exactly ``attend``'s output and the
    attention mass each key received, as the scoring caches compute it themselves (within the
    inputs' rounding); elsewhere it returns None. Strided keys: the staging padding is left out."""
    from mvar_engine.plugins.budget_cache import received_attention

    backend = CPU_BACKENDS.get(name, REFERENCE)
    spec, q_len, kv_len = spec_q_kv
    q, k, v = inputs(spec_q_kv, 2, 3, 16, dtype, "cpu", seed)
    if strided:
        k, v = (torch.cat([t, t[:, :, :2]], dim=2)[:, :, :kv_len] for t in (k, v))
    scored = backend.attend_and_score(q, k, v, spec, scale=0.25)
    materialises = not isinstance(backend, SdpaBackend) or backend.materialises(spec, q_len=q_len, dtype=dtype,
                                                                               device=q.device)
    assert (scored is not None) == materialises
    if scored is None:
        return
    out, received = scored
    assert torch.equal(out, backend.attend(q, k, v, spec, scale=0.25))
    assert received.shape == (2, 3, kv_len) and received.dtype == torch.float32
    want = received_attention(q, k, spec, 0.25)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # 16 bits: the caches' logits are rounded products
    torch.testing.assert_close(received, want, atol=tol * q_len, rtol=tol)
    torch.testing.assert_close(received.sum(-1), torch.full((2, 3), float(q_len)), atol=tol * q_len, rtol=0)


def test_the_selector_scores_where_the_picked_backend_materialises():
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.bfloat16) for n in (1, 5, 5))
    out, received = BackendSelector([("sdpa", SdpaBackend())], forced=True).attend_and_score(q, k, v, Dense(), scale=0.3)
    assert received is not None and torch.equal(out, SdpaBackend().attend(q, k, v, Dense(), scale=0.3))
    out, received = BackendSelector([("fused", SdpaBackend(SdpaOptions(short_queries="fused")))], forced=True) \
        .attend_and_score(q, k, v, Dense(), scale=0.3)
    assert received is None and torch.equal(out, SdpaBackend(SdpaOptions(short_queries="fused")).attend(q, k, v, Dense(), scale=0.3))
    with pytest.raises(UsageError, match="share a dtype"):
        BackendSelector([("sdpa", SdpaBackend())], forced=True).attend_and_score(q, k.float(), v, Dense(), scale=0.3)


def cuda_backend_names():
    return ["sdpa", "flex", "natten", "xformers", "flash-attn", "reference"]


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", cuda_backend_names())
@given(case=specs(), batch=st.integers(1, 3), heads=st.integers(1, 4), head_dim=st.sampled_from([16, 32, 64]),
       seed=st.integers(0, 1000))
def test_cuda_backend_equals_reference(name, dtype, grad, case, batch, heads, head_dim, seed):
    entry = get_registry().get("backend", name)
    if not entry.availability.ok:
        pytest.skip(entry.availability.reason)
    backend = get_registry().create("backend", name)
    allowed = domain(backend)
    assume(case[0].kind in allowed["kinds"])
    compare(backend, case, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device="cuda", seed=seed, grad=grad)


# -- spec invariants ---------------------------------------------------------------------------------
@given(case=specs())
def test_mask_mod_pair_count_and_mask_agree(case):
    spec, q_len, kv_len = case
    mask = spec.mask(q_len, kv_len, "cpu")
    full = torch.ones(q_len, kv_len, dtype=torch.bool) if mask is None else mask
    assert bool(full.any(dim=1).all()), "a query sees no key"
    qi = torch.arange(q_len)[:, None].expand(q_len, kv_len)
    ki = torch.arange(kv_len)[None, :].expand(q_len, kv_len)
    zero = torch.zeros((), dtype=torch.long)
    assert torch.equal(spec.mask_mod(q_len, kv_len, "cpu")(zero, zero, qi, ki).expand(q_len, kv_len), full)
    assert spec.pair_count(q_len, kv_len) == int(full.sum())


@given(h=st.integers(1, 20), w=st.integers(1, 20), k=st.integers(1, 9), d=st.integers(1, 3), causal=st.booleans(),
       tile_h=st.integers(1, 8), tile_w=st.integers(1, 8))
def test_tiles_cover_every_window(h, w, k, d, causal, tile_h, tile_w):
    spec = Neighborhood2D(h, w, k, d, causal)
    tiles = map_tiles(spec, tile_h, tile_w, "cpu")
    mask = spec.mask(h * w, h * w, "cpu")
    assert sorted(set(tiles.queries.flatten().tolist())) == list(range(h * w))
    assert torch.equal(tiles.queries.flatten()[tiles.inverse], torch.arange(h * w))
    for t in range(tiles.queries.shape[0]):
        for slot, query in enumerate(tiles.queries[t].tolist()):
            seen = set(tiles.keys[t][tiles.mask[t, 0, slot]].tolist())
            assert seen == set(torch.nonzero(mask[query]).flatten().tolist())
            assert int(tiles.mask[t, 0, slot].sum()) == len(seen), "a key counted twice inside a halo"


def test_tiled_sdpa_never_materialises_an_n_by_n_mask(monkeypatch):
    import mvar_engine.backends.sdpa as sdpa_module

    seen = []
    original = sdpa_module.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(0 if attn_mask is None else attn_mask.shape[-1] * attn_mask.shape[-2])
        return original(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(sdpa_module.F, "scaled_dot_product_attention", spy)
    spec = Neighborhood2D(32, 32, 7)
    q = torch.randn(1, 2, 1024, 8)
    out = SdpaBackend().attend(q, q, q, spec, scale=0.3)
    assert seen and max(seen) <= 16 * 100, "tiled path should only see tile x halo masks"
    torch.testing.assert_close(out, REFERENCE.attend(q, q, q, spec, scale=0.3), atol=1e-5, rtol=1e-5)
    assert SdpaBackend().uses_tiles(spec) and not SdpaBackend().uses_tiles(Neighborhood2D(12, 12, 7))


# -- selection and errors ----------------------------------------------------------------------------
def test_auto_prefers_the_documented_order_on_cpu():
    selector = selector_for("auto")
    q = torch.randn(1, 2, 64, 16)
    assert selector.ranked(Neighborhood2D(8, 8, 3), q.device)[0].name == "sdpa"
    selector.attend(q, q, q, Neighborhood2D(8, 8, 3), scale=0.25)
    assert selector.used["neighborhood2d"] == "sdpa"
    names = [c.name for c in selector.ranked(Neighborhood2D(8, 8, 3), q.device)]
    assert names[-1] == "reference"
    if "natten" in names:
        assert names.index("natten") > names.index("sdpa")


def test_selector_falls_through_to_a_backend_that_supports_the_spec():
    natten, sdpa = Candidate("natten", NattenBackend(), 100), Candidate("sdpa", SdpaBackend(), 50)
    selector = BackendSelector([natten, sdpa], forced=False)
    q = torch.randn(1, 2, 10, 8)
    selector.attend(q, q, q, Causal(), scale=1.0)
    assert selector.used["causal"] == "sdpa"


def test_forced_backend_that_cannot_run_the_spec_is_one_line():
    selector = BackendSelector([Candidate("natten", NattenBackend())], forced=True)
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(BackendUnsupportedError) as err:
        selector.attend(q, q, q, Dense(), scale=1.0)
    message = str(err.value)
    assert "\n" not in message and "natten" in message and "dense" in message and "--backend" in message


@pytest.mark.skipif(not get_registry().get("backend", "natten").availability.ok, reason="natten is not installed")
@pytest.mark.parametrize("spec, head_dim, needs_grad, words", [
    (Neighborhood2D(4, 4, 5), 8, False, ["kernel_size * dilation", "4", "--backend sdpa"]),
    (Neighborhood2D(8, 8, 3), 12, False, ["head_dim", "12", "--backend sdpa"]),
    (Neighborhood2D(8, 8, 3), 8, True, ["backward", "cpu"]),
    (Neighborhood2D(8, 8, 1), 8, False, ["kernel_size >= 2", "--backend sdpa"]),
    (Neighborhood2D(8, 8, 3), 8, False, []),
])
def test_natten_reasons_name_the_constraint_and_the_way_out(spec, head_dim, needs_grad, words):
    reason = NattenBackend().supports(spec, device=torch.device("cpu"), dtype=torch.float32, head_dim=head_dim,
                                      needs_grad=needs_grad)
    if not words:
        assert reason is None
        return
    assert reason is not None and "\n" not in reason
    for word in words:
        assert word in reason


def test_a_kernel_larger_than_the_map_is_dense_on_sdpa():
    q, k, v = (torch.randn(2, 3, 20, 8) for _ in range(3))
    got = SdpaBackend(SdpaOptions(tiled="always")).attend(q, k, v, Neighborhood2D(4, 5, 9), scale=0.3)
    torch.testing.assert_close(got, SdpaBackend().attend(q, k, v, Dense(), scale=0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shapes, spec, words", [
    (((1, 2, 9, 8), (1, 2, 9, 4), (1, 2, 9, 8)), Dense(), ["head_dim", "[1, 2, 9, 8]", "[1, 2, 9, 4]"]),
    (((1, 2, 9, 8), (1, 3, 9, 8), (1, 3, 9, 8)), Dense(), ["batch and heads"]),
    (((1, 2, 9, 8), (1, 2, 9, 8), (1, 2, 7, 8)), Dense(), ["same number of tokens"]),
    (((2, 9, 8), (2, 9, 8), (2, 9, 8)), Dense(), ["4-D", "[B, H, L, D]"]),
    (((1, 2, 9, 8),) * 3, Neighborhood2D(4, 4, 3), ["4x4", "16", "9"]),
    (((1, 2, 9, 8), (1, 2, 5, 8), (1, 2, 5, 8)), Causal(), ["at least as many keys"]),
])
def test_bad_inputs_are_one_line(shapes, spec, words):
    q, k, v = (torch.randn(*s) for s in shapes)
    problem = check_inputs(q, k, v, spec)
    assert problem is not None and "\n" not in problem
    for word in words:
        assert word in problem
    with pytest.raises(UsageError):
        attention(q, k, v, spec, backend="sdpa")


def test_functional_attention_matches_reference_and_picks_a_default_scale():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    spec = Neighborhood2D(4, 4, 3)
    torch.testing.assert_close(attention(q, k, v, spec), REFERENCE.attend(q, k, v, spec, scale=8 ** -0.5),
                               atol=1e-5, rtol=1e-5)


def test_block_structures_come_from_the_dense_pattern():
    from mvar_engine.core.layout import SequenceLayout
    from mvar_engine.plugins.patterns import DensePattern
    from mvar_engine.plugins.trajectories import FullTrajectory, MarkovTrajectory

    layout = SequenceLayout.from_patch_nums((1, 2, 3))
    everything = ((0, layout.length),)
    assert DensePattern().spec(layout, everything, everything, FullTrajectory().visible) == BlockCausal((1, 4, 9))
    assert DensePattern().spec(layout, everything, everything, MarkovTrajectory().visible) == BlockDiagonal((1, 4, 9))


def test_every_builtin_backend_declares_capabilities():
    for entry in get_registry().components("backend"):
        capabilities = entry.record.factory.capabilities
        assert capabilities.summary()
        assert capabilities.devices


def test_sdpa_materialised_path_keeps_the_gradients_of_earlier_calls():
    """Two bf16 decoding calls over strided keys that need gradients, then one backward: the second
    call must not overwrite what the first one's backward needs (no reused staging buffer there),
    and the gradients match the fused kernel's."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 1, 16, generator=g).bfloat16()
    kv = torch.randn(2, 3, 12, 16, generator=g).bfloat16()

    def gradients(backend):
        leaves = [t.clone().requires_grad_(True) for t in (q, kv)]
        outs = [backend.attend(leaves[0], leaves[1][:, :, :n], leaves[1][:, :, :n] * 2, Causal(), scale=0.25)
                for n in (5, 9)]
        sum(o.float().sum() for o in outs).backward()
        return [t.grad.float() for t in leaves]

    got = gradients(SdpaBackend())
    want = gradients(SdpaBackend(SdpaOptions(short_queries="fused")))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=GRAD_TOLERANCE[torch.bfloat16], rtol=GRAD_TOLERANCE[torch.bfloat16])


def test_the_documented_ranks_are_the_backends_own():
    """docs/plugins.md's rank table reads what each built-in's ``preference`` says on the CPU (the one
    place the order is set; the records carry no priority)."""
    import re
    from pathlib import Path

    from mvar_engine.core.registry import load_registry

    text = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    table = dict(re.findall(r"^\| `([a-z-]+)`(?: \([^)]*\))? \| (\d+) \|$", text, re.M))
    registry = load_registry(entry_points=[])
    assert set(table) == {e.name for e in registry.components("backend")}
    for entry in registry.components("backend"):
        assert entry.record.priority == 0
        assert entry.record.factory().preference(Dense(), torch.device("cpu")) == int(table[entry.name]), entry.name
