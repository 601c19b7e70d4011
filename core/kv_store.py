"""Bounded key/value storage for compressing cache policies (window, sink, h2o, ssd, plugins).

One :class:`BoundedKV` per layer holds ``k, v: [rows, heads, capacity, D]``. The first ``filled``
slots of every (row, head) are in use. ``positions: int32 [rows, heads, capacity]`` records the
sequence position held by each slot; with ``track_scores`` a ``float32`` score per slot
(accumulated attention) is kept beside it and moves with its entry. Appends keep slots in
ascending position order; :meth:`replace` (one token written over an evicted one, O(1) per row and
head: the steady state of raster decoding) does not, which ``ordered`` records.

Eviction of many entries (:meth:`keep`) gathers the kept slots to the front of the same buffers,
so memory never exceeds ``capacity``; a step larger than the free room (a next-scale scale) grows
the buffers once to fit it (:meth:`append`). Every (row, head) always holds the same number of
entries, so the kept keys form one dense ``[rows, heads, n, D]`` tensor that any attention backend
can consume.
"""

from __future__ import annotations

import torch

from .layout import Spans, spans_to_positions


class BoundedKV:
    """One layer's bounded storage; see the module docstring for the layout."""

    def __init__(self, rows: int, heads: int, capacity: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype, *, track_scores: bool = False) -> None:
        self.k = torch.empty(rows, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.positions = torch.zeros(rows, heads, capacity, device=device, dtype=torch.int32)
        self.scores = torch.zeros(rows, heads, capacity, device=device, dtype=torch.float32) if track_scores else None
        self.filled = 0
        self.ordered = True  # slots hold ascending positions in every (row, head)
        # (row, head) index grids for one slot per row and head: advanced indexing, not ``scatter_``
        # along the slot dimension (slower on the CPU, most in bfloat16: docs/measurements.md)
        self.row_index = torch.arange(rows, device=device)[:, None]
        self.head_index = torch.arange(heads, device=device)[None, :]
        self.slot_rows, self.slot_heads = self.row_index[..., None], self.head_index[..., None]  # for [rows, heads, 1]
        self.zero = torch.zeros((), device=device)  # the score of a new entry, as a tensor: no scalar to lift per write

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def _grow(self, capacity: int) -> None:
        def grown(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(*t.shape[:2], capacity, *t.shape[3:])
            out[:, :, :self.filled] = t[:, :, :self.filled]
            return out

        self.k, self.v, self.positions = grown(self.k), grown(self.v), grown(self.positions)
        if self.scores is not None:
            self.scores = grown(self.scores)

    def append(self, k: torch.Tensor, v: torch.Tensor, spans: Spans) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v: [rows, heads, l, D]`` at the positions of ``spans`` (``l`` of them, ascending,
        after every kept position); return views of all ``filled`` keys and values."""
        start, n = self.filled, k.shape[2]
        if start + n > self.capacity:
            self._grow(start + n)
        end = start + n
        self.k[:, :, start:end].copy_(k)
        self.v[:, :, start:end].copy_(v)
        if n == 1:  # a raster step: a scalar fill, no position tensor to build
            self.positions.select(2, start).fill_(spans[0][0])
        else:
            self.positions[:, :, start:end] = spans_to_positions(spans).to(self.positions.device, torch.int32)
        if self.scores is not None:
            self.scores[:, :, start:end].zero_()
        self.filled = end
        return self.filled_kv()

    def replace(self, slots: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: int):
        """Write one token (``k, v: [rows, heads, 1, D]`` at ``position``) over the slot ``slots``
        (one int for every row and head, or ``LongTensor [rows, heads]``); return all keys/values."""
        if isinstance(slots, int):
            self.k[:, :, slots:slots + 1].copy_(k)
            self.v[:, :, slots:slots + 1].copy_(v)
            self.positions.select(2, slots).fill_(position)
            if self.scores is not None:
                self.scores.select(2, slots).zero_()
        else:  # indexed [rows, heads, 1]: the token's k and v are written as they come, [rows, heads, 1, D]
            at = (self.slot_rows, self.slot_heads, slots.to(self.k.device)[..., None])
            self.k[at] = k.to(self.k.dtype)
            self.v[at] = v.to(self.v.dtype)
            self.positions[at] = position
            if self.scores is not None:
                self.scores[at] = self.zero
        self.ordered = False
        return self.filled_kv()

    def filled_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the ``filled`` keys and values (the buffers themselves when full)."""
        if self.filled == self.capacity:
            return self.k, self.v
        return self.k[:, :, :self.filled], self.v[:, :, :self.filled]

    def add_scores(self, received: torch.Tensor) -> None:
        """Accumulate ``received: float32 [rows, heads, filled]`` (attention each slot received this step)."""
        if self.scores is not None:
            n = received.shape[-1]
            (self.scores if n == self.capacity else self.scores[:, :, :n]).add_(received)

    def keep(self, index: torch.Tensor) -> None:
        """Keep the slots ``index: LongTensor [n]`` (the same for every row and head) or
        ``[rows, heads, n]`` in that order, moved to the front; everything else is dropped."""
        self.gather_front(index)
        self.filled = index.shape[-1]

    def fill_from(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, index: torch.Tensor) -> None:
        """Hold exactly the entries ``index: LongTensor [rows, heads, n]`` (``n <= capacity``, ascending
        positions) of ``k, v: [rows, heads, m, D]`` and ``positions: [rows, heads, m]``: a step that
        did not fit beside the kept entries, selected from a copy of both."""
        n = index.shape[-1]
        index = index.to(self.k.device)
        wide = index[..., None].expand(-1, -1, -1, k.shape[-1])
        self.k[:, :, :n] = k.gather(2, wide)
        self.v[:, :, :n] = v.gather(2, wide)
        self.positions[:, :, :n] = positions.gather(2, index)
        if self.scores is not None:
            self.scores[:, :, :n].zero_()
        self.filled, self.ordered = n, True

    def gather_front(self, index: torch.Tensor) -> None:
        """The tensor work of :meth:`keep`: the entries at ``index`` moved to the first slots (the
        host's ``filled`` is the caller's to set: a compiled step changes no Python state)."""
        n = index.shape[-1]
        index = index.to(self.k.device)
        if index.dim() == 1:
            self.k[:, :, :n] = self.k.index_select(2, index)
            self.v[:, :, :n] = self.v.index_select(2, index)
            self.positions[:, :, :n] = self.positions.index_select(2, index)
            if self.scores is not None:
                self.scores[:, :, :n] = self.scores.index_select(2, index)
        else:
            wide = index[..., None].expand(-1, -1, -1, self.k.shape[-1])
            self.k[:, :, :n] = self.k.gather(2, wide)
            self.v[:, :, :n] = self.v.gather(2, wide)
            self.positions[:, :, :n] = self.positions.gather(2, index)
            if self.scores is not None:
                self.scores[:, :, :n] = self.scores.gather(2, index)

    def sort_by_position(self) -> None:
        """Restore ascending positions in every (row, head) after :meth:`replace` calls."""
        if not self.ordered:
            self.keep(self.positions[:, :, :self.filled].argsort(dim=-1))
            self.ordered = True

    def kept_positions(self) -> torch.Tensor:
        """``LongTensor [rows, heads, filled]``: the positions held, ascending."""
        return self.positions[:, :, :self.filled].long().sort(dim=-1).values

    def kv_bytes(self) -> int:
        """Bytes of the key and value buffers (the cache proper)."""
        return 2 * self.k.numel() * self.k.element_size()

    def index_bytes(self) -> int:
        """Bytes of the bookkeeping beside them (positions, scores)."""
        extra = self.positions.numel() * self.positions.element_size()
        if self.scores is not None:
            extra += self.scores.numel() * self.scores.element_size()
        return extra

    def nbytes(self) -> int:
        return self.kv_bytes() + self.index_bytes()
