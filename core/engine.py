"""The next-scale generation engine: composes a VAR-style model with a trajectory, an attention
pattern, a cache policy and a backend.

One step per scale ``s``: the trajectory says which scales the step sees (``history(s)``); if the
cache keeps history (or none is needed) only scale ``s``'s tokens run, with earlier keys/values
from the cache; otherwise the visible history is recomputed in the same forward pass (the exact
oracle). Teacher forcing runs the whole sequence under the trajectory's mask and the pattern.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .attention import AttentionPattern, AttentionSpec
from .backend_selection import BackendSelector
from .cache import CachePolicy
from .layout import Spans
from .models.var import VAR
from .sampling import guided_logits_var, sample_tokens

def cached_attention(cache: CachePolicy, backends: BackendSelector, spans: Spans,
                     spec_for: Callable[[Spans], AttentionSpec]):
    """The ``attend(layer, q, k, v, scale)`` callback of a cached step over the tokens at ``spans``:
    store the step's keys/values in ``cache``, build the spec from the spans it returns
    (``spec_for(k_spans)``), let the cache ``observe`` the step when it has that hook, then attend
    over the returned keys/values. Shared by the next-scale and raster engines."""
    observe = getattr(cache, "observe", None)

    def attend(layer, q, k, v, scale):
        k_all, v_all, k_spans = cache.update(layer, k, v, spans)
        spec = spec_for(k_spans)
        if observe is not None:
            observe(layer, q, k_all, spec, scale)
        return backends.attend(q, k_all.to(q.dtype), v_all.to(q.dtype), spec, scale=scale)

    return attend


LOGITS_CHUNK_BYTES = 16 * 2**20
"""Most bytes of float32 logits the sampling path materialises at once (see ``_sample``)."""
from .trajectory import Trajectory


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class GenerationOutput:
    """``tokens[s]: LongTensor[B, h_s * w_s]``; ``f_hat: [B, Cvae, H, W]``; ``logits[s]`` (when asked):
    the raw logits ``[rows, l_s, V]`` of every row (``[cond; uncond]`` under CFG)."""

    tokens: list[torch.Tensor]
    f_hat: torch.Tensor
    logits: list[torch.Tensor] = field(default_factory=list)
    cache_peak_bytes: int = 0


class NextScaleEngine:
    """``model``: a :class:`VAR`; ``tokenizer``: a ``MultiScaleVQVAE`` with the same schedule."""

    def __init__(self, model: VAR, tokenizer, trajectory: Trajectory, pattern: AttentionPattern, cache: CachePolicy,
                 backends: BackendSelector, *, autocast_dtype: torch.dtype | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.trajectory, self.pattern, self.cache, self.backends = trajectory, pattern, cache, backends
        self.layout = model.layout
        self.autocast_dtype = autocast_dtype

    # -- attention callbacks ---------------------------------------------------------------------
    def _attend_uncached(self, spans: Spans):
        def attend(layer, q, k, v, scale):
            spec = self.pattern.spec(self.layout, spans, spans, self.trajectory.visible)
            return self.backends.attend(q, k, v, spec, scale=scale)

        attend.heads_independent = True  # no cache sees the heads: blocks may attend a head group at a time
        return attend

    def _attend_cached(self, spans: Spans):
        return cached_attention(self.cache, self.backends, spans,
                                lambda k_spans: self.pattern.spec(self.layout, spans, k_spans, self.trajectory.visible))

    def _autocast(self, device: torch.device):
        return autocast_context(device, self.autocast_dtype)

    def _sample(self, hidden: torch.Tensor, cond: torch.Tensor, batch: int, cfg: float | None, scale: int,
                top_k: int, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
        """Tokens ``[B, l]`` for one scale from ``hidden: [rows, l, C]``: the head, CFG and sampling
        run over chunks of samples (a sample's cond and uncond rows together) holding at most
        :data:`LOGITS_CHUNK_BYTES` of logits, in sample order, so the generator is consumed as by
        one pass over all rows (the draws are the same on the CPU)."""
        rows_per_sample = 2 if cfg is not None else 1
        l, vocab = hidden.shape[1], self.model.config.vocab_size
        per_chunk = max(1, LOGITS_CHUNK_BYTES // (rows_per_sample * l * vocab * 4))
        pieces = []
        for start in range(0, batch, per_chunk):
            stop = min(batch, start + per_chunk)
            rows = torch.arange(start, stop, device=hidden.device)
            if cfg is not None:
                rows = torch.cat([rows, rows + batch])
            with self._autocast(hidden.device):
                logits = self.model.logits(hidden[rows], cond[rows])
            if cfg is not None:
                logits = guided_logits_var(logits, stop - start, cfg, scale, self.layout.num_scales)
            pieces.append(sample_tokens(logits, top_k=top_k, top_p=top_p, generator=generator))
        return torch.cat(pieces)

    # -- teacher forcing -------------------------------------------------------------------------
    def teacher_forced_logits(self, labels: torch.Tensor, var_input: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[B, L, V]`` of the whole sequence under the trajectory's mask and the pattern.

        ``var_input: [B, L - l_0, Cvae]`` is the tokenizer's ``indices_to_var_input`` (None for a
        one-scale schedule). Differentiable (the training path)."""
        model, layout = self.model, self.layout
        cond = model.condition(labels)
        inputs: list[torch.Tensor | None] = [None]
        offset = 0
        for sc in layout.scales[1:]:
            inputs.append(var_input[:, offset:offset + sc.numel])
            offset += sc.numel
        spans = ((0, layout.length),)
        with self._autocast(labels.device):
            x = model.embed_scales(range(layout.num_scales), cond, inputs)
            hidden = model.backbone(x, cond, self._attend_uncached(spans))
            return model.logits(hidden, cond)

    # -- generation ------------------------------------------------------------------------------
    def dependencies(self, scale: int) -> list[int]:
        """Scales whose tokens a recomputation of ``scale`` must run: the visible history and,
        transitively, what those scales saw (their deeper-layer keys depend on it). Markov order 1:
        ``[scale]``; any trajectory that sees an earlier scale: the whole prefix it reaches."""
        needed, frontier = {scale}, [scale]
        while frontier:
            for j in self.trajectory.history(frontier.pop()):
                if j not in needed:
                    needed.add(j)
                    frontier.append(j)
        return sorted(needed)

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, *, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
                 generator: torch.Generator | None = None, forced_tokens: Sequence[torch.Tensor] | None = None,
                 return_logits: bool = False, progress=None) -> GenerationOutput:
        """Generate one image's tokens per label (``labels: LongTensor[B]``).

        CFG as VAR: rows ``[cond; uncond]`` when ``cfg > 0``. ``forced_tokens`` replays given tokens
        instead of sampling (for equivalence tests). ``progress``: an optional callable per scale."""
        model, layout, tok = self.model, self.layout, self.tokenizer
        device = labels.device
        batch = labels.shape[0]
        guided = cfg > 0
        rows_labels = torch.cat([labels, torch.full_like(labels, model.num_classes)]) if guided else labels
        rows = rows_labels.shape[0]
        cond = model.condition(rows_labels)
        first_block = model.blocks[0].attn if len(model.blocks) else None
        heads = first_block.heads if first_block else 1
        head_dim = first_block.head_dim if first_block else 1
        cache_dtype = self.autocast_dtype or model.word_embed.weight.dtype
        self.cache.begin(num_layers=len(model.blocks), batch=rows, num_heads=heads, head_dim=head_dim, layout=layout,
                         device=device, dtype=cache_dtype, guided=guided)
        last_h, last_w = layout.grids[-1]
        f_hat = torch.zeros(batch, model.z_channels, last_h, last_w, device=device)
        var_inputs: list[torch.Tensor | None] = [None]
        out = GenerationOutput(tokens=[], f_hat=f_hat)
        for sc in layout.scales:
            s = sc.index
            history = self.dependencies(s)
            with self._autocast(device):
                # the embedded input is passed without a name so that the backbone holds its only
                # reference and frees it after the first block (64 MiB at d16's last scale, 16 rows)
                if self.cache.stores_history or history == [s]:
                    # a cache that keeps nothing is not consulted: the step attends to itself alone,
                    # through the uncached callback (heads independent: may run a head group at a time)
                    attend = (self._attend_cached((sc.span,)) if self.cache.stores_history
                              else self._attend_uncached((sc.span,)))
                    hidden = model.backbone(model.embed_scale(s, cond, var_inputs[s]), cond, attend)
                    del attend
                    self.cache.end_step()
                else:
                    hidden = model.backbone(model.embed_scales(history, cond, [var_inputs[j] for j in history]), cond,
                                            self._attend_uncached(layout.spans_of(history)))[:, -sc.numel:]
                if return_logits or forced_tokens is not None:
                    logits = model.logits(hidden, cond)
            out.cache_peak_bytes = max(out.cache_peak_bytes, self.cache.nbytes())
            if return_logits:
                out.logits.append(logits)
            if forced_tokens is not None:
                idx = forced_tokens[s].to(device)
            else:
                idx = self._sample(hidden, cond, batch, cfg if guided else None, s, top_k, top_p, generator)
            del hidden
            out.tokens.append(idx)
            codes = tok.embed(idx, (sc.height, sc.width))
            f_hat, next_map = tok.next_input(s, f_hat, codes.float())
            if s + 1 < layout.num_scales:
                var_inputs.append(next_map.flatten(2).transpose(1, 2).repeat(rows // batch, 1, 1))
            if progress is not None:
                progress(s)
        out.f_hat = f_hat
        return out
