"""Attention patterns, the specs they produce, and the backends that compute them.

Layout of every attention tensor: ``q: [B, H, Lq, D]``, ``k: [B, H, Lk, D]``, ``v: [B, H, Lk, Dv]``
(batch, heads, tokens, head dim), output ``[B, H, Lq, Dv]``. ``scale`` multiplies ``q @ k^T``
before the softmax (VAR with ``attn_l2_norm`` uses 1.0).

A pattern describes itself once as an :class:`AttentionSpec`; each backend materialises the spec
its own way (a boolean mask, a BlockMask, a NATTEN call, an xformers bias, a flash-attn window) or
says why it cannot. Spec kinds:

============================  ==================================================================
``dense``                     every query sees every key
``causal``                    query ``i`` sees keys ``j <= i + (Lk - Lq)`` (bottom-right aligned)
``window1d``                  query at ``p = i + (Lk - Lq)`` sees keys ``p - left .. p + right``
``block-causal``              equal-length q/k made of blocks; a block sees itself and earlier ones
``block-diagonal``            a block sees only itself
``neighborhood2d``            one row-major ``height x width`` map, NATTEN's window rule
``masked``                    anything else, as an explicit mask (``structure`` names it, e.g.
                              ``cross-scale-neighborhood``)
============================  ==================================================================

A plugin may define a kind of its own: an :class:`AttentionSpec` subclass with a new ``kind`` and its
``mask()`` (and ``mask_mod()`` for FlexAttention). Every backend that computes any kind through the
mask (``capabilities.kinds`` None: ``sdpa``, ``reference``, ``flex``) runs it as it is; a backend
that declares the kind in its ``capabilities.kinds`` (and ranks itself first for it in
``preference``) computes it its own faster way.
"""

from __future__ import annotations

import functools
import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from .errors import setting
from .layout import SequenceLayout, Spans, spans_to_positions
from .neighborhood import axis_allowed, neighborhood_mask_2d
from .trajectory import Visibility

VisibilityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``visible(q_scale, k_scale) -> BoolTensor``: the trajectory's scale-level rule (broadcasting).
The engine passes a :class:`~mvar_engine.core.trajectory.Visibility`, which is such a callable and
also gives the token-level rule (:func:`visible_positions`)."""

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> BoolTensor`` (pure index arithmetic or lookups)."""


class AttentionSpec(ABC):
    """What a backend must compute: which of the ``Lk`` keys each of the ``Lq`` queries may see.

    Every query sees at least one key. ``mask()`` is the universal fallback every backend can use;
    ``mask_mod()`` is the same rule as index arithmetic (FlexAttention); structured subclasses let
    specialised backends do better. Specs are immutable and hashable (backends cache per spec).
    """

    kind: ClassVar[str]

    def check_lengths(self, q_len: int, kv_len: int) -> str | None:
        """None if the spec is defined for ``q_len`` queries over ``kv_len`` keys, else why not."""
        return None

    @abstractmethod
    def mask(self, q_len: int, kv_len: int, device: torch.device | str) -> torch.Tensor | None:
        """BoolTensor[Lq, Lk] (True = may attend), or None when every query sees every key."""

    def mask_mod(self, q_len: int, kv_len: int, device: torch.device | str) -> MaskMod:
        """``mask_mod(b, h, q_idx, kv_idx) -> BoolTensor`` equal to ``mask()``; the default looks the
        materialised mask up, subclasses use index arithmetic."""
        mask = self.mask(q_len, kv_len, device)
        if mask is None:
            return lambda b, h, q_idx, kv_idx: q_idx >= 0
        return lambda b, h, q_idx, kv_idx: mask[q_idx, kv_idx]

    def pair_count(self, q_len: int, kv_len: int) -> int:
        """Number of (query, key) pairs the spec allows: the FLOP count is ``4 * B * H * D`` times this."""
        mask = self.mask(q_len, kv_len, "cpu")
        return q_len * kv_len if mask is None else int(mask.sum())

    def describe(self) -> str:
        """A short human-readable form for messages and benchmark tables."""
        return self.kind


def _require_lengths(spec: AttentionSpec, q_len: int, kv_len: int) -> None:
    problem = spec.check_lengths(q_len, kv_len)
    if problem is not None:
        raise ValueError(problem)


def _too_few_keys(kind: str, q_len: int, kv_len: int) -> str | None:
    """Why ``q_len`` queries cannot be the last positions of ``kv_len`` keys (bottom-right
    alignment), or None when they can."""
    if q_len > kv_len:
        return f"{kind} attention needs at least as many keys as queries, got {q_len} queries and {kv_len} keys"
    return None


@dataclass(frozen=True)
class Dense(AttentionSpec):
    """Every query sees every key."""

    kind: ClassVar[str] = "dense"

    def mask(self, q_len, kv_len, device):
        return None

    def pair_count(self, q_len, kv_len):
        return q_len * kv_len


@dataclass(frozen=True)
class Causal(AttentionSpec):
    """Query ``i`` sees keys ``j <= i + (Lk - Lq)``: the queries are the last ``Lq`` positions of
    the key sequence (flash-attn's bottom-right alignment; ``Lq == Lk`` is ordinary causal)."""

    kind: ClassVar[str] = "causal"

    def check_lengths(self, q_len, kv_len):
        return _too_few_keys(self.kind, q_len, kv_len)

    def mask(self, q_len, kv_len, device):
        _require_lengths(self, q_len, kv_len)
        if q_len == 1:
            return None
        offset = kv_len - q_len
        q = torch.arange(q_len, device=device)[:, None]
        return torch.arange(kv_len, device=device)[None, :] <= q + offset

    def mask_mod(self, q_len, kv_len, device):
        # a captured tensor, not an int: compiled flex guards on ints by value and would recompile
        # for every new offset (every decode step), but on tensors only by shape
        offset = torch.tensor(kv_len - q_len, device=device)
        return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + offset

    def pair_count(self, q_len, kv_len):
        offset = kv_len - q_len
        return q_len * offset + q_len * (q_len + 1) // 2


@dataclass(frozen=True)
class SlidingWindow1D(AttentionSpec):
    """1-D window: query ``i`` at position ``p = i + (Lk - Lq)`` sees keys ``max(p - left, 0) ..
    min(p + right, Lk - 1)`` (``right = 0``: causal sliding window, flash-attn's ``window_size``)."""

    kind: ClassVar[str] = "window1d"
    left: int
    right: int = 0

    def __post_init__(self):
        if self.left < 0 or self.right < 0:
            raise ValueError(f"window1d needs left >= 0 and right >= 0, got ({self.left}, {self.right})")

    def check_lengths(self, q_len, kv_len):
        return _too_few_keys(self.kind, q_len, kv_len)

    def mask(self, q_len, kv_len, device):
        _require_lengths(self, q_len, kv_len)
        pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        key = torch.arange(kv_len, device=device)[None, :]
        return (key >= pos - self.left) & (key <= pos + self.right)

    def mask_mod(self, q_len, kv_len, device):
        offset, left, right = (torch.tensor(x, device=device) for x in (kv_len - q_len, self.left, self.right))

        def window(b, h, q_idx, kv_idx):
            pos = q_idx + offset
            return (kv_idx >= pos - left) & (kv_idx <= pos + right)

        return window

    def describe(self):
        return f"window1d(left={self.left}, right={self.right})"


@dataclass(frozen=True)
class _Blocks(AttentionSpec):
    """Queries and keys are the same sequence, cut into consecutive blocks of ``blocks`` tokens."""

    blocks: tuple[int, ...]

    def __post_init__(self):
        if not self.blocks or min(self.blocks) < 1:
            raise ValueError(f"{self.kind} needs positive block lengths, got {self.blocks}")

    @property
    def length(self) -> int:
        return sum(self.blocks)

    def check_lengths(self, q_len, kv_len):
        if q_len != self.length or kv_len != self.length:
            return (f"{self.kind} over blocks {list(self.blocks)} needs {self.length} queries and keys, "
                    f"got {q_len} and {kv_len}")
        return None

    def block_ids(self, device) -> torch.Tensor:
        return _block_ids(self.blocks, str(device))

    def sees_block(self, q_block: torch.Tensor, k_block: torch.Tensor) -> torch.Tensor:
        """BoolTensor: may a query of block ``q_block`` see a key of block ``k_block`` (broadcasts)."""
        raise NotImplementedError

    def mask(self, q_len, kv_len, device):
        _require_lengths(self, q_len, kv_len)
        ids = self.block_ids(device)
        return self.sees_block(ids[:, None], ids[None, :])

    def mask_mod(self, q_len, kv_len, device):
        ids = self.block_ids(device)
        sees_block = self.sees_block
        return lambda b, h, q_idx, kv_idx: sees_block(ids[q_idx], ids[kv_idx])

    def describe(self):
        return f"{self.kind}({'+'.join(map(str, self.blocks))})"


@functools.lru_cache(maxsize=64)
def _block_ids(blocks: tuple[int, ...], device: str) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(blocks), device=device), torch.tensor(blocks, device=device))


@dataclass(frozen=True)
class BlockCausal(_Blocks):
    """A query sees every key of its own block and of earlier blocks (VAR's scale-causal mask)."""

    kind: ClassVar[str] = "block-causal"

    def sees_block(self, q_block, k_block):
        return q_block >= k_block

    def pair_count(self, q_len, kv_len):
        return sum(n * m for n, m in zip(self.blocks, itertools.accumulate(self.blocks)))


@dataclass(frozen=True)
class BlockDiagonal(_Blocks):
    """A query sees only the keys of its own block (MVAR's scale-Markov teacher forcing)."""

    kind: ClassVar[str] = "block-diagonal"

    def sees_block(self, q_block, k_block):
        return q_block == k_block

    def pair_count(self, q_len, kv_len):
        return sum(n * n for n in self.blocks)


@dataclass(frozen=True)
class Neighborhood2D(AttentionSpec):
    """Queries and keys are the same row-major ``height x width`` map; NATTEN's window rule.

    See :mod:`mvar_engine.core.neighborhood` (a kernel larger than the map covers the map).
    """

    kind: ClassVar[str] = "neighborhood2d"
    height: int
    width: int
    kernel_size: int
    dilation: int = 1
    causal: bool = False

    def __post_init__(self):
        if min(self.height, self.width, self.kernel_size, self.dilation) < 1:
            raise ValueError(f"neighborhood2d needs positive height, width, kernel_size and dilation, got {self}")

    def check_lengths(self, q_len, kv_len):
        n = self.height * self.width
        if q_len != n or kv_len != n:
            return f"neighborhood2d over {self.height}x{self.width} needs {n} queries and keys, got {q_len} and {kv_len}"
        return None

    def mask(self, q_len, kv_len, device):
        _require_lengths(self, q_len, kv_len)
        return _neighborhood_mask(self, str(device))

    def mask_mod(self, q_len, kv_len, device):
        width, height, k, d, causal = self.width, self.height, self.kernel_size, self.dilation, self.causal

        def window(b, h, q_idx, kv_idx):
            rows = axis_allowed(q_idx // width, kv_idx // width, height, k, d, causal)
            return rows & axis_allowed(q_idx % width, kv_idx % width, width, k, d, causal)

        return window

    def axis_counts(self, length: int) -> torch.Tensor:
        """Keys each query index sees along one axis of ``length`` (LongTensor[length])."""
        idx = torch.arange(length)
        return axis_allowed(idx[:, None], idx[None, :], length, self.kernel_size, self.dilation, self.causal).sum(1)

    def pair_count(self, q_len, kv_len):
        return int(self.axis_counts(self.height).sum()) * int(self.axis_counts(self.width).sum())

    def describe(self):
        extra = (f", dilation={self.dilation}" if self.dilation != 1 else "") + (", causal" if self.causal else "")
        return f"neighborhood2d({self.height}x{self.width}, k={self.kernel_size}{extra})"


@functools.lru_cache(maxsize=32)
def _neighborhood_mask(spec: Neighborhood2D, device: str) -> torch.Tensor:
    return neighborhood_mask_2d(spec.height, spec.width, spec.kernel_size, spec.dilation, spec.causal, device)


@dataclass(frozen=True, eq=False)
class Masked(AttentionSpec):
    """An explicit BoolTensor[Lq, Lk] mask; ``structure`` names it for messages and backends
    (``cross-scale-neighborhood``, ``scale-mask``, ...). Hashes by identity."""

    kind: ClassVar[str] = "masked"
    allowed: torch.Tensor = field(repr=False)
    structure: str = "mask"

    def check_lengths(self, q_len, kv_len):
        if tuple(self.allowed.shape) != (q_len, kv_len):
            return f"mask of shape {tuple(self.allowed.shape)} does not fit {q_len} queries x {kv_len} keys"
        return None

    def mask(self, q_len, kv_len, device):
        _require_lengths(self, q_len, kv_len)
        return self.allowed.to(device)

    def pair_count(self, q_len, kv_len):
        return int(self.allowed.sum())

    def describe(self):
        return f"masked({self.structure})"


SPEC_KINDS: tuple[str, ...] = ("dense", "causal", "window1d", "block-causal", "block-diagonal", "neighborhood2d", "masked")
"""Every built-in spec kind, in the order documentation and benchmarks list them."""


def visible_positions(layout: SequenceLayout, queries: Spans, keys: Spans, visible: VisibilityFn | Visibility
                      ) -> torch.Tensor:
    """BoolTensor[Lq, Lk]: what the trajectory lets the queries at ``queries`` see of the keys at
    ``keys`` (token level when ``visible`` is a :class:`Visibility`, else its scale-level rule)."""
    q_pos, k_pos = spans_to_positions(queries), spans_to_positions(keys)
    if isinstance(visible, Visibility):
        return visible.tokens(layout, q_pos, k_pos)
    scale = layout.coords().scale
    return visible(scale[q_pos][:, None], scale[k_pos][None, :])


class AttentionPattern(ABC):
    """Decides which keys a query may see, at token level, within what the trajectory makes visible.

    Contract: ``spec`` is pure (same inputs, same spec) and cheap enough to call once per step;
    it must not look at tensor values, only at positions.

    Traits (class attributes the engine checks): ``families`` (the trajectory families whose steps
    it can describe); ``sees_every_visible_key`` (it never hides a key the trajectory shows, as
    ``dense`` and ``causal``: a cache with stand-in spans, whose kept keys stand in by their count, needs it).
    """

    name: ClassVar[str] = "pattern"
    families: ClassVar[tuple[str, ...]] = ("next-scale",)
    sees_every_visible_key: ClassVar[bool] = False

    def check_layout(self, layout: SequenceLayout) -> None:
        """Raise a one-line ``UsageError`` when the options do not fit ``layout`` (a window wider than
        the maps it applies to, a scale index outside the schedule). The CLI calls it before any
        model is built, the engine before each generation. Default: nothing to check."""

    @abstractmethod
    def spec(self, layout: SequenceLayout, queries: Spans, keys: Spans, visible: VisibilityFn) -> AttentionSpec:
        """The spec for queries at positions ``queries`` over keys at positions ``keys``.

        ``visible`` is the trajectory's rule (:class:`Visibility`; :func:`visible_positions` gives
        its token-level mask); the result must never let a query see a key the trajectory hides.
        Keys come in the order given (a cache may return kept keys in slot order).
        """


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend declares it can compute; :meth:`AttentionBackend.supports` checks these first.

    ``kinds``: spec kinds (None = every kind, through ``mask()``/``mask_mod()``); ``devices``:
    device types (``cpu``, ``cuda``, ...); ``dtypes``: input dtypes; ``max_head_dim`` and
    ``head_dim_multiple``: head-dim limits; ``backward``: device types where gradients flow.
    """

    kinds: frozenset[str] | None
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    backward: frozenset[str] = frozenset()
    max_head_dim: int | None = None
    head_dim_multiple: int = 1

    def problem(self, backend: str, spec: AttentionSpec, *, device: torch.device, dtype: torch.dtype, head_dim: int,
                needs_grad: bool) -> str | None:
        """The first declared constraint that ``spec`` on ``device``/``dtype`` breaks, as one line."""
        device_type = torch.device(device).type
        if self.kinds is not None and spec.kind not in self.kinds:
            return (f"{backend} computes {', '.join(sorted(self.kinds))} attention, not '{spec.kind}' "
                    f"(use {setting('backend', 'auto')} or sdpa)")
        if device_type not in self.devices:
            return (f"{backend} runs on {'/'.join(sorted(self.devices))} only, not {device_type} "
                    f"(use {setting('backend', 'auto')} or sdpa)")
        if dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            return (f"{backend} takes {names} inputs, not {str(dtype).removeprefix('torch.')} (change "
                    f"{setting('dtype')} or use {setting('backend', 'sdpa')})")
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            return f"{backend} supports head_dim <= {self.max_head_dim}, got {head_dim} (use {setting('backend', 'sdpa')})"
        if head_dim % self.head_dim_multiple:
            return (f"{backend} needs head_dim divisible by {self.head_dim_multiple}, got {head_dim} "
                    f"(use {setting('backend', 'sdpa')})")
        if needs_grad and device_type not in self.backward:
            where = "/".join(sorted(self.backward)) or "no device"
            return (f"{backend} has no backward pass on {device_type} (it has one on {where}); use "
                    f"{setting('backend', 'sdpa')} for training")
        return None

    def summary(self) -> str:
        """One line for ``mvar-engine plugins``."""
        own = sorted(set(self.kinds or ()) - set(SPEC_KINDS))  # kinds that plugins define, after the built-in ones
        kinds = "any pattern" if self.kinds is None else ", ".join([k for k in SPEC_KINDS if k in self.kinds] + own)
        dtypes = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
        limit = f"; head_dim <= {self.max_head_dim}" if self.max_head_dim else ""
        grad = "/".join(sorted(self.backward)) or "none"
        return f"{kinds}; {'/'.join(sorted(self.devices))}; {dtypes}{limit}; backward: {grad}"


FLOATING = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})
"""Every floating dtype a torch-native backend accepts."""


class AttentionBackend(ABC):
    """Computes attention for a spec on some devices and dtypes.

    Contract: ``capabilities`` declares the kinds, devices, dtypes, head-dim limits and backward
    support; ``supports`` answers without running a kernel and returns the reason (one line, naming
    the constraint and the way out) when it cannot; ``attend`` is only called when ``supports``
    returned None, and must not modify its inputs. Subclasses add constraints beyond the declared
    ones in :meth:`check` and may rank themselves per spec in :meth:`preference`; one that
    materialises the probabilities may also return what each key received (:meth:`attend_and_score`).
    """

    name: ClassVar[str] = "backend"
    capabilities: ClassVar[BackendCapabilities] = BackendCapabilities(
        kinds=None, devices=frozenset({"cpu", "cuda", "mps", "xpu"}), dtypes=FLOATING,
        backward=frozenset({"cpu", "cuda", "mps", "xpu"}))

    def supports(self, spec: AttentionSpec, *, device: torch.device, dtype: torch.dtype, head_dim: int,
                 needs_grad: bool = False) -> str | None:
        """None if this backend can compute ``spec`` here (with gradients if ``needs_grad``), else why not."""
        problem = self.capabilities.problem(self.name, spec, device=torch.device(device), dtype=dtype,
                                            head_dim=head_dim, needs_grad=needs_grad)
        return problem or self.check(spec, device=torch.device(device), dtype=dtype, head_dim=head_dim)

    def check(self, spec: AttentionSpec, *, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        """Constraints beyond :attr:`capabilities` (e.g. a kernel larger than the map); None = fine."""
        return None

    def preference(self, spec: AttentionSpec, device: torch.device) -> int | None:
        """Rank for the ``auto`` backend on this spec and device (higher first); None = the record's priority."""
        return None

    def workspace_bytes(self, spec: AttentionSpec, *, batch: int, heads: int, q_len: int, kv_len: int, head_dim: int,
                        dtype: torch.dtype, device: torch.device) -> int | None:
        """Estimated transient memory of one ``attend`` call beyond its inputs and output (None =
        unknown). Benchmarks use it to skip a call that cannot fit instead of being killed."""
        return None

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, *, scale: float) -> torch.Tensor:
        """softmax(scale * q @ k^T restricted to ``spec``) @ v, shape [B, H, Lq, Dv]."""

    def attend_and_score(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, *,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(output, received)`` where this call materialises the attention probabilities anyway:
        ``output`` as :meth:`attend` returns it and ``received: float32 [B, H, Lk]``, the attention
        each key receives summed over the ``Lq`` queries (what scoring cache policies accumulate,
        so they need not compute it again). None (the default): this call does not materialise
        them; the caller then runs :meth:`attend` and scores apart."""
        return None


def scores_bytes(batch: int, heads: int, q_len: int, kv_len: int, itemsize: int, copies: int = 1) -> int:
    """Bytes of ``copies`` materialised ``[B, H, Lq, Lk]`` score tensors of ``itemsize`` bytes."""
    return batch * heads * q_len * kv_len * itemsize * copies


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> str | None:
    """None if ``q, k, v`` fit the layout contract and ``spec``; else the problem as one line."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return (f"attention takes 4-D q, k, v as [batch, heads, tokens, head_dim], got {q.dim()}-D, {k.dim()}-D and "
                f"{v.dim()}-D (reshape to [B, H, L, D])")
    shapes = f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}"
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        return f"q, k and v must share batch and heads: {shapes}"
    if q.shape[-1] != k.shape[-1]:
        return f"q and k must share head_dim: {shapes}"
    if k.shape[-2] != v.shape[-2]:
        return f"k and v must have the same number of tokens: {shapes}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype} (cast them first)"
    if not (q.device == k.device == v.device):
        return f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}"
    return spec.check_lengths(q.shape[-2], k.shape[-2])
