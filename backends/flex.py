"""``flex``: compiled FlexAttention (``torch.nn.attention.flex_attention``) with a BlockMask per spec.

Contract: any spec kind runs through its ``mask_mod`` (index arithmetic or a lookup into the
materialised mask), ``neighborhood2d`` through the interval lookups below, ``dense`` without a
mask. ``attend`` takes ``q [B, H, Lq, D]``,
``k [B, H, Lk, D]``, ``v [B, H, Lk, Dv]`` and returns ``[B, H, Lq, Dv]`` in the inputs' dtype; it
never modifies its inputs.

Compilation and caching:

- ``flex_attention`` is wrapped once per process in ``torch.compile(..., dynamic=False)``; every new
  shape (B, H, L, D, dtype, block size) compiles a new kernel (about 20 s for the first, 3 s for
  each further one on a 2-core CPU). On first use dynamo's recompile limit is raised to
  :data:`RECOMPILE_LIMIT` so that a run over many shapes does not fall back to (slow) eager flex.
- BlockMasks are cached in an LRU of :data:`MASK_CACHE_SIZE` entries keyed by (spec, Lq, Lk,
  device, block size, token permutation); specs are hashable (``Masked`` by identity, so the cache
  keeps a ``Masked`` spec alive until it is evicted). Building a BlockMask evaluates ``mask_mod`` on
  every (query, key) pair once; later calls only look it up.

Neighbourhood permutation (``neighborhood2d`` with ``permute=True``, the default): a window only
touches nearby rows, so in row-major order every block of 128 queries (two map rows) needs many
key blocks. The tokens are gathered into tile-major order instead: each axis is split into its
dilation groups, each group cut into tiles of ``tile`` positions (a ragged last tile is padded);
``tile_h x tile_w`` 2-D tiles are laid out tile after tile (row-major over tiles, row-major inside a
tile). With ``BLOCK_SIZE = tile_h * tile_w`` each BlockMask block is one tile and only the few key
tiles of its halo are visited. The mask_mod maps a slot back to its (row, col) through lookup
tensors captured in the closure and tests the spec's window rule, precomputed per axis from
:func:`mvar_engine.core.neighborhood.axis_allowed` as one interval of ranks per position (four
comparisons per pair instead of the rule's divisions: half the kernel time). Padded key slots are
never visible; padded query slots repeat a real token and their outputs are dropped when the
output is un-permuted. Small tiles win on the CPU (4x4 tiles with BLOCK_SIZE 16 over 8x8 tiles and
row-major order: docs/measurements.md).

CPU limitations (torch 2.13): compiled flex on CPU takes float32, bfloat16 and float16
(not float64), any head_dim (1, 3, 12, 24, 1024 and ``Dv != D`` all work) and any length >= 1, but
needs an x86 CPU with AVX2 and has no backward pass (``NotImplementedError``: "torch.compile on CPU
only supports inference"). ``compile=False`` runs eager flex, which materialises the scores:
correct and slow, for debugging only. On CUDA the Triton kernel's tiles (BLOCK_M/BLOCK_N, 64 or
128) must divide the BlockMask block size, so there the automatic block size is a multiple of 128
(several tiles per block). The CUDA path has not been run on a GPU yet.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..core.attention import AttentionBackend, AttentionSpec, BackendCapabilities, Dense, Neighborhood2D
from ..core.neighborhood import axis_allowed
from ..core.records import Availability
from .tiling import default_tile

RECOMPILE_LIMIT = 64
"""Dynamo recompile limit set on first use: each new shape compiles flex anew; past the default (8)
dynamo silently runs flex eagerly, which on CPU is orders of magnitude slower."""

MASK_CACHE_SIZE = 64
"""BlockMasks kept (least recently used evicted first)."""

GENERAL_BLOCK_SIZE = 128
"""Block size of row-major (unpermuted) BlockMasks: FlexAttention's default."""

CUDA_BLOCK_MULTIPLE = 128
"""On CUDA the automatic block size is rounded up to this (the Triton kernel's tiles must divide it)."""


def flex_availability() -> Availability:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except Exception:  # ImportError on old torch; anything else means it is unusable too
        return Availability.no(f"flex needs torch >= 2.5 (torch.nn.attention.flex_attention), this is torch "
                               f"{torch.__version__}; use --backend sdpa")
    return Availability.yes()


def cpu_flex_supported() -> bool:
    """Whether compiled flex has a CPU kernel here (inductor's own test: x86 with AVX2, not macOS)."""
    try:
        from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported
    except Exception:
        return (torch.cpu._is_avx2_supported() and os.getenv("ATEN_CPU_CAPABILITY") != "default"
                and sys.platform != "darwin")
    return bool(check_cpu_supported())


class FlexOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(0, ge=0, description="BlockMask block size (0 = auto: the tile area for permuted "
                                                 "neighbourhoods, else 128; on CUDA rounded up to a multiple of 128)")
    tile: int = Field(0, ge=0, description="query tile side for the neighbourhood token permutation "
                                           "(0 = 4 for kernel_size <= 9, else 8)")
    permute: bool = Field(True, description="permute neighbourhood tokens into 2-D tiles so that each BlockMask "
                                            "block is one tile (False = row-major order)")
    compile: bool = Field(True, description="torch.compile flex_attention (False = eager flex: materialises the "
                                            "scores, slow, for debugging)")


_RECOMPILE_LOCK = threading.Lock()


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's recompile limit (``recompile_limit``, or ``cache_size_limit`` on older torch) to ``limit``."""
    import torch._dynamo

    config = torch._dynamo.config
    with _RECOMPILE_LOCK:
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, name):
                setattr(config, name, max(int(getattr(config, name)), limit))
                return


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """``torch.compile(flex_attention, dynamic=False)``, built once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    raise_recompile_limit()
    return torch.compile(flex_attention, dynamic=False)


def eager_flex_attention() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


# --------------------------------------------------------------------------- token permutation


@dataclass(frozen=True)
class TokenTiles:
    """Tile-major order of a ``height x width`` map with ``slots`` >= N positions (ragged tiles padded).

    ``gather [P]``: the row-major token each slot reads (padding repeats a real token);
    ``inverse [N]``: the slot holding each token; ``rows``/``cols [P]``: the slot's map coordinates;
    ``valid [P]``: False on padding.
    """

    gather: torch.Tensor
    inverse: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    valid: torch.Tensor
    tile_h: int
    tile_w: int

    @property
    def slots(self) -> int:
        return self.gather.numel()

    @property
    def tile_area(self) -> int:
        return self.tile_h * self.tile_w


def _axis_slots(length: int, tile: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis in tile order: its dilation groups one after another, each padded to whole tiles.

    Returns ``(coords, valid)``: the axis position of each slot (padding repeats the group's last
    position) and whether the slot is real.
    """
    coords: list[int] = []
    valid: list[bool] = []
    for group in range(min(dilation, length)):
        members = list(range(group, length, dilation))
        pad = -len(members) % tile
        coords += members + [members[-1]] * pad
        valid += [True] * len(members) + [False] * pad
    return torch.tensor(coords, dtype=torch.long), torch.tensor(valid, dtype=torch.bool)


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)  # cached: an inference tensor could never be saved for a later backward
def token_tiles(height: int, width: int, dilation: int, tile_h: int, tile_w: int, device: str) -> TokenTiles:
    """The tile-major permutation of a row-major ``height x width`` map (see the module docstring)."""
    rows_axis, rows_valid = _axis_slots(height, tile_h, dilation)
    cols_axis, cols_valid = _axis_slots(width, tile_w, dilation)
    tiles_r, tiles_c = rows_axis.numel() // tile_h, cols_axis.numel() // tile_w

    def tile_major(axis_r: torch.Tensor, axis_c: torch.Tensor, combine) -> torch.Tensor:
        # [tiles_r, tile_h] x [tiles_c, tile_w] -> [tiles_r, tiles_c, tile_h, tile_w] -> flat
        r = axis_r.view(tiles_r, 1, tile_h, 1)
        c = axis_c.view(1, tiles_c, 1, tile_w)
        return combine(r, c).flatten()

    rows = tile_major(rows_axis, cols_axis, lambda r, c: r.expand(-1, tiles_c, -1, tile_w))
    cols = tile_major(rows_axis, cols_axis, lambda r, c: c.expand(tiles_r, -1, tile_h, -1))
    valid = tile_major(rows_valid, cols_valid, lambda r, c: r & c)
    gather = rows * width + cols
    inverse = torch.empty(height * width, dtype=torch.long)
    inverse[gather[valid]] = torch.nonzero(valid).flatten()
    return TokenTiles(*(t.to(device) for t in (gather, inverse, rows, cols, valid)), tile_h=tile_h, tile_w=tile_w)


def axis_windows(length: int, kernel_size: int, dilation: int,
                 causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One axis's window rule as intervals: ``(rank, lo, hi)``, each LongTensor[length].

    ``rank[x]`` is position ``x``'s index in group-major order (dilation group ``x mod d`` first,
    then ``x // d``); the keys position ``x`` may see (:func:`axis_allowed`) are exactly the
    positions whose rank lies in ``lo[x] .. hi[x]`` (a window never leaves its dilation group and
    is contiguous inside it; checked here).
    """
    x = torch.arange(length)
    allowed = axis_allowed(x[:, None], x[None, :], length, kernel_size, dilation, causal)
    order = torch.argsort(torch.remainder(x, dilation) * length + torch.div(x, dilation, rounding_mode="floor"))
    rank = torch.empty_like(x)
    rank[order] = x
    by_rank = allowed[:, order]  # column j: the key of rank j
    lo = by_rank.to(torch.int8).argmax(1)
    hi = lo + by_rank.sum(1) - 1
    if not torch.equal(by_rank, (x[None, :] >= lo[:, None]) & (x[None, :] <= hi[:, None])):
        raise AssertionError(f"neighbourhood window on an axis of {length} (k={kernel_size}, d={dilation}) "
                             "is not an interval")
    return rank, lo, hi


def neighborhood_mask_mod(spec: Neighborhood2D, tiles: TokenTiles | None, device: torch.device | str):
    """``spec``'s window rule over token indices in ``tiles``' order (row-major when None).

    Each slot's window is looked up as a rank interval per axis (:func:`axis_windows`), so the
    kernel evaluates four comparisons per pair instead of the division-heavy rule. Padded key slots get rank -1, below every window. The lookup
    tensors are captured in the closure: dynamo guards on their shapes only, so specs over the same
    number of slots share one compiled kernel.
    """
    rank_r, lo_r, hi_r = axis_windows(spec.height, spec.kernel_size, spec.dilation, spec.causal)
    rank_c, lo_c, hi_c = axis_windows(spec.width, spec.kernel_size, spec.dilation, spec.causal)
    if tiles is None:
        index = torch.arange(spec.height * spec.width)
        rows, cols, valid = index // spec.width, index % spec.width, torch.ones(index.shape, dtype=torch.bool)
    else:
        rows, cols, valid = tiles.rows.cpu(), tiles.cols.cpu(), tiles.valid.cpu()
    key_r, key_c, first_r, last_r, first_c, last_c = (
        t.to(device=device, dtype=torch.int32)
        for t in (torch.where(valid, rank_r[rows], -1), rank_c[cols], lo_r[rows], hi_r[rows], lo_c[cols], hi_c[cols]))

    def window(b, h, q_idx, kv_idx):
        r, c = key_r[kv_idx], key_c[kv_idx]
        return (r >= first_r[q_idx]) & (r <= last_r[q_idx]) & (c >= first_c[q_idx]) & (c <= last_c[q_idx])

    return window


# --------------------------------------------------------------------------- BlockMask cache


class BlockMaskCache:
    """A small thread-safe LRU of BlockMasks with hit/miss counters."""

    def __init__(self, maxsize: int = MASK_CACHE_SIZE) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            self.misses += 1
        value = build()  # outside the lock: building can take a while
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


BLOCK_MASKS = BlockMaskCache()
"""Process-wide BlockMask cache shared by every ``FlexBackend`` instance."""


# --------------------------------------------------------------------------- the backend


class FlexBackend(AttentionBackend):
    """Any spec through FlexAttention's BlockMask; neighbourhoods in tile-major token order."""

    name = "flex"
    # float64: inductor's CPU flex template rejects it, so it is left out everywhere
    capabilities = BackendCapabilities(
        kinds=None, devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        backward=frozenset({"cuda"}))  # CPU: "torch.compile on CPU only supports inference"

    def __init__(self, options: FlexOptions | None = None) -> None:
        self.options = options or FlexOptions()

    def preference(self, spec, device):
        device = torch.device(device)
        if not self.options.compile:
            return 10  # eager flex materialises every score: slower than sdpa everywhere
        if device.type == "cpu":
            return 40  # below sdpa: every new shape costs a compile
        if device.type == "cuda":
            if spec.kind == "neighborhood2d":
                return 65
            if spec.kind in ("block-causal", "block-diagonal", "masked", "window1d", "causal"):
                return 55
            return 45
        return 40

    def check(self, spec, *, device, dtype, head_dim):
        available = flex_availability()
        if not available.ok:
            return available.reason
        if device.type == "cpu" and self.options.compile and not cpu_flex_supported():
            return (f"flex on CPU needs an x86 CPU with AVX2 (compiled flex has no CPU kernel on this {sys.platform} "
                    "machine); use --backend sdpa")
        return None

    # ----------------------------------------------------------------- layout decisions

    def tiles_for(self, spec: AttentionSpec, device: torch.device | str) -> TokenTiles | None:
        """The token permutation ``spec`` runs in, or None for row-major order."""
        if not (self.options.permute and isinstance(spec, Neighborhood2D)):
            return None
        side = self.options.tile or default_tile(spec.kernel_size)
        longest_group = lambda n: -(-n // min(spec.dilation, n))  # noqa: E731
        tile_h, tile_w = min(side, longest_group(spec.height)), min(side, longest_group(spec.width))
        return token_tiles(spec.height, spec.width, spec.dilation, tile_h, tile_w, str(torch.device(device)))

    def block_size_for(self, tiles: TokenTiles | None, device: torch.device | str) -> int:
        """The BlockMask block size: the option, else one tile (permuted) or 128; on CUDA a multiple of 128."""
        if self.options.block_size:
            return self.options.block_size
        size = tiles.tile_area if tiles is not None else GENERAL_BLOCK_SIZE
        if torch.device(device).type == "cuda":
            size = -(-size // CUDA_BLOCK_MULTIPLE) * CUDA_BLOCK_MULTIPLE
        return size

    def block_mask(self, spec: AttentionSpec, q_len: int, kv_len: int, device: torch.device | str):
        """The (cached) BlockMask ``attend`` uses for ``spec``: over permuted slots when ``spec`` is permuted."""
        from torch.nn.attention.flex_attention import create_block_mask

        device = torch.device(device)
        tiles = self.tiles_for(spec, device)
        block = self.block_size_for(tiles, device)
        layout = None if tiles is None else (tiles.tile_h, tiles.tile_w)
        key = (spec, q_len, kv_len, str(device), block, layout)

        @torch.inference_mode(False)  # cached across modes: no inference tensors (see token_tiles)
        def build():
            if isinstance(spec, Neighborhood2D):
                mask_mod = neighborhood_mask_mod(spec, tiles, device)
            else:
                mask_mod = spec.mask_mod(q_len, kv_len, device)
            lq, lk = (q_len, kv_len) if tiles is None else (tiles.slots, tiles.slots)
            return create_block_mask(mask_mod, B=None, H=None, Q_LEN=lq, KV_LEN=lk, device=device, BLOCK_SIZE=block)

        return BLOCK_MASKS.get(key, build)

    # ----------------------------------------------------------------- compute

    def attend(self, q, k, v, spec, *, scale):
        flex = compiled_flex_attention() if self.options.compile else eager_flex_attention()
        tiles = self.tiles_for(spec, q.device)
        if tiles is None:
            block_mask = None if isinstance(spec, Dense) else self.block_mask(spec, q.shape[-2], k.shape[-2], q.device)
            return flex(q, k, v, block_mask=block_mask, scale=scale)
        block_mask = self.block_mask(spec, q.shape[-2], k.shape[-2], q.device)
        qp, kp, vp = (t.index_select(2, tiles.gather) for t in (q, k, v))
        out = flex(qp, kp, vp, block_mask=block_mask, scale=scale)
        return out.index_select(2, tiles.inverse)
