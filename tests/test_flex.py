"""The ``flex`` backend against the float64 reference, its token permutation, BlockMask cache,
declared limits and options.

Compiling flex costs ~20 s for the first kernel and ~3 s for each new shape on a small CPU, so the
compiled tests draw from a few fixed shapes (every neighbourhood map below permutes to 64 slots:
one kernel for all of them, whatever the kernel size, dilation or causality) and vary the specs and
seeds. Arbitrary map shapes go through eager flex (``compile=False``) and the permutation tests,
which compile nothing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mvar_engine.backends.flex import (BLOCK_MASKS, FlexBackend, FlexOptions, flex_availability,
                                       neighborhood_mask_mod, token_tiles)
from mvar_engine.backends.reference import ReferenceBackend
from mvar_engine.core.attention import (BlockCausal, BlockDiagonal, Causal, Dense, Masked, Neighborhood2D,
                                        SlidingWindow1D, check_inputs)
from mvar_engine.core.errors import ConfigError
from mvar_engine.core.registry import load_registry

pytestmark = [
    pytest.mark.skipif(not flex_availability().ok, reason="torch.nn.attention.flex_attention is unavailable"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # eager flex warns that it is not compiled
]

REFERENCE = ReferenceBackend()
BATCH, HEADS, DIM = 2, 2, 16
LENGTH = 48
SCALE = DIM ** -0.5
# maps that permute (4x4 tiles, padded ragged sides) to 8 x 8 = 64 slots with dilation 1 ...
MAPS_64 = [(8, 8), (6, 8), (8, 6), (7, 7), (5, 8), (7, 5), (6, 6)]
# ... and with dilation 2 (each group padded to 4 positions)
DILATED_MAPS_64 = [(8, 8), (7, 7), (7, 8), (8, 7)]
COMPILED = settings(deadline=None)


def qkv(lq: int, lk: int, seed: int, dv: int = DIM):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, HEADS, lq, DIM, generator=g), torch.randn(BATCH, HEADS, lk, DIM, generator=g),
            torch.randn(BATCH, HEADS, lk, dv, generator=g))


def assert_matches_reference(backend: FlexBackend, spec, lq: int, lk: int, seed: int, dv: int = DIM) -> None:
    q, k, v = qkv(lq, lk, seed, dv)
    assert check_inputs(q, k, v, spec) is None
    assert backend.supports(spec, device=q.device, dtype=q.dtype, head_dim=DIM) is None
    originals = [t.clone() for t in (q, k, v)]
    out = backend.attend(q, k, v, spec, scale=SCALE)
    assert out.shape == (BATCH, HEADS, lq, dv) and out.dtype == q.dtype
    torch.testing.assert_close(out, REFERENCE.attend(q, k, v, spec, scale=SCALE), atol=1e-5, rtol=1e-5)
    for before, after in zip(originals, (q, k, v)):
        assert torch.equal(before, after), "attend modified its inputs"


@st.composite
def blocks(draw, total: int = LENGTH) -> tuple[int, ...]:
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), max_size=6)))
    edges = [0, *cuts, total]
    return tuple(b - a for a, b in zip(edges, edges[1:]))


GENERAL_KINDS = ["dense", "causal", "window1d", "block-causal", "block-diagonal", "masked"]


def general_spec(kind: str, data):
    """(spec, Lq, Lk) of ``kind`` over the fixed lengths."""
    if kind == "dense":
        return Dense(), LENGTH, LENGTH
    if kind == "causal":
        return Causal(), data.draw(st.sampled_from([LENGTH, LENGTH - 8])), LENGTH  # also bottom-right Lq < Lk
    if kind == "window1d":
        left, right = data.draw(st.sampled_from([(5, 0), (3, 2)]))  # the window sizes are baked into the kernel
        return SlidingWindow1D(left, right), LENGTH, LENGTH
    if kind == "block-causal":
        return BlockCausal(data.draw(blocks())), LENGTH, LENGTH
    if kind == "block-diagonal":
        return BlockDiagonal(data.draw(blocks())), LENGTH, LENGTH
    assert kind == "masked"
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    allowed = torch.rand(LENGTH, LENGTH, generator=g) < data.draw(st.sampled_from([0.05, 0.3, 0.9]))
    allowed[torch.arange(LENGTH), torch.randint(0, LENGTH, (LENGTH,), generator=g)] = True  # every query sees a key
    return Masked(allowed, structure="random"), LENGTH, LENGTH


@pytest.mark.parametrize("kind", GENERAL_KINDS)
@COMPILED
@given(data=st.data(), seed=st.integers(0, 100))
def test_compiled_flex_matches_reference_for_every_general_kind(kind, data, seed):
    spec, lq, lk = general_spec(kind, data)
    assert spec.kind == kind
    assert_matches_reference(FlexBackend(), spec, lq, lk, seed)


@st.composite
def tiled_neighborhoods(draw) -> Neighborhood2D:
    dilation = draw(st.sampled_from([1, 1, 2]))
    height, width = draw(st.sampled_from(MAPS_64 if dilation == 1 else DILATED_MAPS_64))
    return Neighborhood2D(height, width, kernel_size=draw(st.integers(1, 9)), dilation=dilation,
                          causal=draw(st.booleans()))


@COMPILED
@given(spec=tiled_neighborhoods(), seed=st.integers(0, 100))
def test_compiled_flex_matches_reference_on_neighbourhoods(spec, seed):
    backend = FlexBackend()
    tiles = backend.tiles_for(spec, "cpu")
    assert tiles is not None and tiles.slots == 64 and (tiles.tile_h, tiles.tile_w) == (4, 4)
    assert backend.block_size_for(tiles, "cpu") == tiles.tile_area  # one tile per block
    n = spec.height * spec.width
    assert_matches_reference(backend, spec, n, n, seed)


@COMPILED
@given(spec=tiled_neighborhoods(), seed=st.integers(0, 100))
def test_compiled_flex_row_major_neighbourhoods(spec, seed):
    """permute=False: the interval mask_mod over row-major indices, BLOCK_SIZE 128 (one shape: 8x8)."""
    spec = Neighborhood2D(8, 8, spec.kernel_size, spec.dilation, spec.causal)
    backend = FlexBackend(FlexOptions(permute=False))
    assert backend.tiles_for(spec, "cpu") is None and backend.block_size_for(None, "cpu") == 128
    assert_matches_reference(backend, spec, 64, 64, seed)


@COMPILED
@given(height=st.integers(1, 13), width=st.integers(1, 13), k=st.integers(1, 8), d=st.integers(1, 3),
       causal=st.booleans(), tile=st.sampled_from([0, 2, 3, 8]), permute=st.booleans(), seed=st.integers(0, 100))
def test_eager_flex_matches_reference_on_any_map(height, width, k, d, causal, tile, permute, seed):
    """Arbitrary (ragged, tiny, dilated) maps, tiles and head dims through uncompiled flex."""
    spec = Neighborhood2D(height, width, k, d, causal)
    backend = FlexBackend(FlexOptions(compile=False, tile=tile, permute=permute))
    n = height * width
    assert_matches_reference(backend, spec, n, n, seed, dv=7)


# ------------------------------------------------------------------------ token permutation


@given(height=st.integers(1, 20), width=st.integers(1, 20), d=st.integers(1, 4), tile_h=st.integers(1, 8),
       tile_w=st.integers(1, 8))
def test_token_tiles_is_a_padded_tile_major_permutation(height, width, d, tile_h, tile_w):
    tiles = token_tiles(height, width, d, tile_h, tile_w, "cpu")
    n = height * width
    assert int(tiles.valid.sum()) == n and tiles.slots % tiles.tile_area == 0
    assert torch.equal(tiles.gather[tiles.inverse], torch.arange(n))  # every token once, at its slot
    assert tiles.valid[tiles.inverse].all()
    assert torch.equal(tiles.gather, tiles.rows * width + tiles.cols)
    # a tile holds tile_h x tile_w consecutive group-local positions of one dilation group per axis
    rows = tiles.rows.view(-1, tile_h, tile_w)
    cols = tiles.cols.view(-1, tile_h, tile_w)
    valid = tiles.valid.view(-1, tile_h, tile_w)
    for r, c, ok in zip(rows, cols, valid):
        r, c = r[ok], c[ok]
        assert len(set((r % d).tolist())) <= 1 and len(set((c % d).tolist())) <= 1
        assert int(r.max() - r.min()) <= d * (tile_h - 1) and int(c.max() - c.min()) <= d * (tile_w - 1)


@given(height=st.integers(1, 14), width=st.integers(1, 14), k=st.integers(1, 10), d=st.integers(1, 3),
       causal=st.booleans(), tile=st.integers(1, 6), permute=st.booleans())
def test_neighbourhood_mask_mod_equals_the_spec_mask(height, width, k, d, causal, tile, permute):
    """The BlockMask's rule, evaluated eagerly on every pair of slots, is the spec's mask permuted
    (padded key slots never visible)."""
    spec = Neighborhood2D(height, width, k, d, causal)
    tiles = token_tiles(height, width, d, min(tile, height), min(tile, width), "cpu") if permute else None
    mask_mod = neighborhood_mask_mod(spec, tiles, "cpu")
    n = height * width
    slots = torch.arange(tiles.slots if permute else n)
    got = mask_mod(None, None, slots[:, None], slots[None, :])
    expected = spec.mask(n, n, "cpu")
    if permute:
        assert not got[:, ~tiles.valid].any()
        expected = expected[tiles.gather][:, tiles.gather] & tiles.valid[None, :]
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------ BlockMask cache


def test_second_call_with_the_same_shape_reuses_the_cached_block_mask(monkeypatch):
    import torch.nn.attention.flex_attention as flex_module

    built = []
    real = flex_module.create_block_mask

    def counting(*args, **kwargs):
        built.append(kwargs.get("Q_LEN"))
        return real(*args, **kwargs)

    monkeypatch.setattr(flex_module, "create_block_mask", counting)
    BLOCK_MASKS.clear()
    backend, spec = FlexBackend(), Neighborhood2D(7, 7, 3)  # a compiled shape of the tests above
    q, k, v = qkv(49, 49, 0)
    first = backend.attend(q, k, v, spec, scale=SCALE)
    mask = backend.block_mask(spec, 49, 49, "cpu")
    second = FlexBackend().attend(q * 2, k, v, spec, scale=SCALE)  # a new instance shares the cache
    assert built == [64] and (BLOCK_MASKS.misses, BLOCK_MASKS.hits) == (1, 2)
    assert backend.block_mask(spec, 49, 49, "cpu") is mask
    assert not torch.equal(first, second)  # the cached mask was used with the new inputs

    # an equal spec is the same entry; another spec, block size or permutation is not
    assert backend.block_mask(Neighborhood2D(7, 7, 3), 49, 49, "cpu") is mask
    assert backend.block_mask(Neighborhood2D(7, 7, 5), 49, 49, "cpu") is not mask
    assert FlexBackend(FlexOptions(permute=False)).block_mask(spec, 49, 49, "cpu") is not mask
    assert FlexBackend(FlexOptions(block_size=32)).block_mask(spec, 49, 49, "cpu").BLOCK_SIZE == (32, 32)
    assert built == [64, 64, 49, 64]


def test_masked_specs_are_cached_by_identity():
    BLOCK_MASKS.clear()
    allowed = torch.ones(5, 6, dtype=torch.bool).tril(1)
    a, b = Masked(allowed), Masked(allowed.clone())
    backend = FlexBackend()
    assert backend.block_mask(a, 5, 6, "cpu") is backend.block_mask(a, 5, 6, "cpu")
    assert backend.block_mask(a, 5, 6, "cpu") is not backend.block_mask(b, 5, 6, "cpu")
    assert (BLOCK_MASKS.misses, BLOCK_MASKS.hits) == (2, 2)


def test_caches_filled_under_inference_mode_hold_ordinary_tensors():
    """The engine samples under inference_mode; a cached inference tensor would break a later
    backward ("Inference tensors cannot be saved for backward")."""
    BLOCK_MASKS.clear()
    token_tiles.cache_clear()
    backend, spec = FlexBackend(), Neighborhood2D(9, 5, 3)
    with torch.inference_mode():
        tiles = backend.tiles_for(spec, "cpu")
        mask = backend.block_mask(spec, 45, 45, "cpu")
    captured = [cell.cell_contents for cell in mask.mask_mod.__closure__ or ()]
    tensors = [*vars(tiles).values(), *mask.as_tuple(flatten=True), *captured]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    assert len(tensors) > 10 and not any(t.is_inference() for t in tensors)


def test_block_mask_cache_evicts_least_recently_used():
    from mvar_engine.backends.flex import BlockMaskCache

    cache = BlockMaskCache(maxsize=2)
    cache.get("a", lambda: 1), cache.get("b", lambda: 2), cache.get("a", lambda: 0), cache.get("c", lambda: 3)
    assert cache.get("a", lambda: -1) == 1 and cache.get("b", lambda: -2) == -2  # b was evicted, a kept
    assert len(cache) == 2


# ------------------------------------------------------------------------ declared limits, ranking, options


def test_no_backward_on_cpu():
    reason = FlexBackend().supports(Dense(), device=torch.device("cpu"), dtype=torch.float32, head_dim=16,
                                    needs_grad=True)
    assert reason is not None and "backward" in reason and "\n" not in reason
    assert FlexBackend().supports(Dense(), device=torch.device("cpu"), dtype=torch.float32, head_dim=16) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_supported_dtypes(dtype):
    assert FlexBackend().supports(Causal(), device=torch.device("cpu"), dtype=dtype, head_dim=12) is None


def test_float64_is_refused_with_a_reason():
    reason = FlexBackend().supports(Causal(), device=torch.device("cpu"), dtype=torch.float64, head_dim=16)
    assert reason is not None and "float64" in reason and "sdpa" in reason


def test_preference_below_sdpa_on_cpu_and_by_kind_on_cuda():
    from mvar_engine.backends.sdpa import SdpaBackend

    backend, cpu, cuda = FlexBackend(), torch.device("cpu"), torch.device("cuda")
    nbhd = Neighborhood2D(4, 4, 3)
    assert backend.preference(nbhd, cpu) == 40 < SdpaBackend().preference(nbhd, cpu)
    assert backend.preference(nbhd, cuda) == 65
    for spec in (Causal(), SlidingWindow1D(3), BlockCausal((1, 4)), BlockDiagonal((1, 4)),
                 Masked(torch.ones(2, 2, dtype=torch.bool))):
        assert backend.preference(spec, cuda) == 55, spec.kind
    assert backend.preference(Dense(), cuda) == 45


def test_cuda_block_size_is_a_multiple_of_128():
    backend = FlexBackend()
    tiles = backend.tiles_for(Neighborhood2D(16, 16, 7), "cpu")
    assert backend.block_size_for(tiles, "cpu") == 16
    assert backend.block_size_for(tiles, "cuda") == 128
    assert FlexBackend(FlexOptions(block_size=48)).block_size_for(tiles, "cuda") == 48  # an explicit size is kept


def test_registered_with_options_that_reject_unknown_names():
    registry = load_registry(entry_points=[])
    entry = registry.get("backend", "flex")
    assert entry.availability.ok and FlexBackend().preference(Dense(), torch.device("cpu")) == 40 and entry.record.options is FlexOptions
    backend = registry.create("backend", "flex", {"tile": 8, "block_size": 64, "permute": False, "compile": False})
    assert isinstance(backend, FlexBackend)
    assert backend.options == FlexOptions(tile=8, block_size=64, permute=False, compile=False)
    with pytest.raises(ConfigError, match="tiles"):
        registry.create("backend", "flex", {"tiles": 8})
    with pytest.raises(ConfigError, match="block_size"):
        registry.create("backend", "flex", {"block_size": -1})
    with pytest.raises(Exception):
        backend.options.tile = 4  # frozen
    assert all(field.description for field in FlexOptions.model_fields.values())


def test_explicit_tile_option_sets_the_tile_and_block():
    spec = Neighborhood2D(20, 12, 3)
    backend = FlexBackend(FlexOptions(tile=8))
    tiles = backend.tiles_for(spec, "cpu")
    assert (tiles.tile_h, tiles.tile_w) == (8, 8) and backend.block_size_for(tiles, "cpu") == 64
    assert FlexBackend().tiles_for(Neighborhood2D(20, 12, 11), "cpu").tile_area == 64  # auto: 8 for k > 9
    assert FlexBackend().tiles_for(spec, "cpu").tile_area == 16  # auto: 4 for k <= 9


def test_recompile_limit_is_raised_on_first_use():
    import torch._dynamo

    from mvar_engine.backends.flex import RECOMPILE_LIMIT, compiled_flex_attention

    compiled_flex_attention()
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    assert getattr(config, name) >= RECOMPILE_LIMIT


def test_engine_uses_flex_when_forced():
    """End to end through the selector: a forced flex backend computes the engine's attention."""
    from mvar_engine.core.backend_selection import BackendSelector, Candidate

    selector = BackendSelector([Candidate("flex", FlexBackend(), 40)], forced=True)
    spec = Neighborhood2D(8, 6, 5, causal=True)
    q, k, v = qkv(48, 48, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = selector.pick(spec, q).attend(q, k, v, spec, scale=SCALE)
    torch.testing.assert_close(out, REFERENCE.attend(q, k, v, spec, scale=SCALE), atol=1e-5, rtol=1e-5)
    assert selector.used == {"neighborhood2d": "flex"}


def test_new_window_sizes_and_offsets_do_not_recompile():
    """Causal / window1d mask_mods capture tensors, so specs differing only in offset or window reuse
    the compiled kernel (with captured ints dynamo guards on their values and compiles again)."""
    from torch._dynamo.utils import counters

    backend = FlexBackend()
    q = torch.randn(1, 2, 32, 16)
    kv = torch.randn(1, 2, 64, 16)
    backend.attend(q, kv, kv, SlidingWindow1D(3, 0), scale=0.25)  # compile once for these shapes
    before = counters["stats"]["unique_graphs"]
    for left, right in ((5, 0), (9, 2), (17, 1)):
        got = backend.attend(q, kv, kv, SlidingWindow1D(left, right), scale=0.25)
        torch.testing.assert_close(got, ReferenceBackend().attend(q, kv, kv, SlidingWindow1D(left, right), scale=0.25),
                                   atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == before
