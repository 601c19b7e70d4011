"""The next-token (raster) generation engine: a :class:`RasterGPT` with the ``raster`` trajectory,
a cache policy and a backend.

Generation: prefill the class prefix (positions ``0 .. P-1``), sample image token 0 from the last
prefix position, then one step per token: token ``t`` enters at position ``P + t`` and its logits
give token ``t + 1``. With a cache that keeps history (``full``) a step runs one token and attends
over what ``cache.update`` returns; with ``none`` every step recomputes the whole prefix (the exact
oracle of cached runs). CFG as LlamaGen: rows ``[cond; uncond]`` (uncond = the null class), the
sampled token is fed to both rows, ``logits = uncond + cfg * (cond - uncond)``; ``cfg == 1`` runs
the conditional rows only.

Cache contract (for compressed raster caches: window / sink / h2o / ssd):

- ``begin(num_layers, batch=rows, num_heads, head_dim, layout, device, dtype)`` once; ``layout`` is
  the model's (prefix ``1 x P`` grid, then the image grid), ``layout.length = P + h * w``.
- Per step and layer: ``update(layer, k_new, v_new, spans) -> (k_all, v_all, k_spans)``. The prefill
  step passes ``P`` tokens (``spans = ((0, P),)``), each decode step one token at ``((p, p + 1),)``.
  Keys are already RoPE-rotated at their positions. ``k_spans`` must be sorted positions of the
  returned keys (kept history, then the new tokens last); the attention spec comes from
  ``trajectory.spec(spans, k_spans)`` (``Causal`` when the new tokens are last).
- Optional ``observe(layer, q, k_all, spec, scale)``: called right after ``update`` with the
  step's (rotated) queries, the returned keys and the spec the backend computes, before attention,
  so scoring caches (h2o, ssd) can accumulate attention statistics; its return value is ignored.
- ``begin(..., guided=True)`` under CFG: rows ``[cond; uncond]``.
- ``end_step()`` after the last layer of every step (the eviction point); ``nbytes()`` is polled
  after every step for ``cache_peak_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backend_selection import BackendSelector
from .cache import CachePolicy
from .engine import autocast_context, cached_attention
from .layout import Spans
from .models.raster_gpt import RasterGPT
from .sampling import sample_tokens


def guided_logits_raster(logits: torch.Tensor, batch: int, cfg: float) -> torch.Tensor:
    """LlamaGen's CFG: rows ``[cond; uncond]`` -> ``uncond + cfg * (cond - uncond)`` (``[B, ..., V]``)."""
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + cfg * (cond - uncond)


@dataclass
class RasterGenerationOutput:
    """``tokens: LongTensor[B, h * w]`` row-major; ``logits`` (when asked): the raw logits
    ``[rows, h * w, V]`` of every row (``[cond; uncond]`` under CFG); ``cache_peak_bytes``."""

    tokens: torch.Tensor
    logits: torch.Tensor | None = None
    cache_peak_bytes: int = 0
    grid: tuple[int, int] = (0, 0)
    extras: dict = field(default_factory=dict)


class RasterEngine:
    """``model``: a :class:`RasterGPT`; ``tokenizer``: a one-scale tokenizer (``embed`` +
    ``fhat_to_img``) for :meth:`decode`, or None; ``trajectory``: the ``raster`` trajectory."""

    def __init__(self, model: RasterGPT, tokenizer, trajectory, cache: CachePolicy, backends: BackendSelector,
                 *, autocast_dtype: torch.dtype | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.trajectory, self.cache, self.backends = trajectory, cache, backends
        self.layout = model.layout
        self.prefix = model.cls_token_num
        self.grid = tuple(model.config.grid)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.autocast_dtype = autocast_dtype

    # -- attention callbacks ---------------------------------------------------------------------
    def _attend_uncached(self, spans: Spans):
        def attend(layer, q, k, v, scale):
            return self.backends.attend(q, k, v, self.trajectory.spec(spans, spans), scale=scale)

        return attend

    def _attend_cached(self, spans: Spans):
        return cached_attention(self.cache, self.backends, spans, lambda k_spans: self.trajectory.spec(spans, k_spans))

    def _autocast(self, device: torch.device):
        return autocast_context(device, self.autocast_dtype)

    def _positions(self, begin: int, end: int, device) -> torch.Tensor:
        return torch.arange(begin, end, device=device)

    # -- teacher forcing -------------------------------------------------------------------------
    def teacher_forced_logits(self, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, n, V]`` predicting ``tokens: LongTensor[B, n]`` (``n <= h * w``, row-major from
        the first token) in one causal pass. Differentiable (the training path)."""
        model, prefix = self.model, self.prefix
        n = tokens.shape[1]
        if not 1 <= n <= self.num_tokens:
            raise ValueError(f"need 1 .. {self.num_tokens} tokens, got {n}")
        length = prefix + n - 1
        with self._autocast(labels.device):
            x = model.embed(labels, tokens[:, :-1] if n > 1 else None)
            hidden = model.backbone(x, self._positions(0, length, labels.device), self._attend_uncached(((0, length),)))
            return model.logits(hidden[:, prefix - 1:])

    # -- generation ------------------------------------------------------------------------------
    def _rows(self, labels: torch.Tensor, guided: bool) -> torch.Tensor:
        if not guided:
            return labels
        return torch.cat([labels, torch.full_like(labels, self.model.null_class)])

    def _step(self, rows_labels: torch.Tensor, tokens: list[torch.Tensor], device) -> torch.Tensor:
        """Hidden state ``[rows, 1, C]`` at the last fed position (the prefix when ``tokens`` is empty)."""
        model, prefix = self.model, self.prefix
        if not tokens:  # prefill
            spans = ((0, prefix),)
            x = model.embed(rows_labels, None)
        elif self.cache.stores_history:
            p = prefix + len(tokens) - 1
            spans = ((p, p + 1),)
            x = model.embed(None, tokens[-1])
        else:  # recompute the whole prefix (exact oracle)
            spans = ((0, prefix + len(tokens)),)
            x = model.embed(rows_labels, torch.cat(tokens, dim=1))
        positions = self._positions(spans[0][0], spans[0][1], device)
        if self.cache.stores_history:
            hidden = model.backbone(x, positions, self._attend_cached(spans))
            self.cache.end_step()
        else:
            hidden = model.backbone(x, positions, self._attend_uncached(spans))
        return hidden[:, -1:]

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, *, cfg: float = 4.0, top_k: int = 2000, top_p: float = 1.0,
                 temperature: float = 1.0, generator: torch.Generator | None = None,
                 forced_tokens: torch.Tensor | None = None, return_logits: bool = False,
                 progress=None) -> RasterGenerationOutput:
        """Generate ``h * w`` tokens per label (``labels: LongTensor[B]``).

        ``forced_tokens: LongTensor[B, h * w]`` replays given tokens instead of sampling (equivalence
        tests). ``progress``: optional callable per token index."""
        model = self.model
        device = labels.device
        batch = labels.shape[0]
        guided = cfg != 1.0
        rows_labels = self._rows(labels, guided)
        rows = rows_labels.shape[0]
        first = model.layers[0].attention if len(model.layers) else None
        heads = first.heads if first else 1
        head_dim = first.head_dim if first else 1
        cache_dtype = self.autocast_dtype or model.tok_embeddings.weight.dtype
        self.cache.begin(num_layers=len(model.layers), batch=rows, num_heads=heads, head_dim=head_dim,
                         layout=self.layout, device=device, dtype=cache_dtype, guided=guided)
        if forced_tokens is not None and tuple(forced_tokens.shape) != (batch, self.num_tokens):
            raise ValueError(f"forced_tokens must be [{batch}, {self.num_tokens}], got {tuple(forced_tokens.shape)}")
        fed: list[torch.Tensor] = []  # [rows, 1] each
        sampled: list[torch.Tensor] = []  # [B, 1] each
        all_logits: list[torch.Tensor] = []
        peak = 0
        for t in range(self.num_tokens):
            with self._autocast(device):
                logits = model.logits(self._step(rows_labels, fed, device))  # [rows, 1, V]
            peak = max(peak, self.cache.nbytes())
            if return_logits:
                all_logits.append(logits)
            if forced_tokens is not None:
                idx = forced_tokens[:, t:t + 1].to(device)
            else:
                step = guided_logits_raster(logits, batch, cfg) if guided else logits
                if temperature != 1.0:
                    step = step / max(temperature, 1e-5)
                idx = sample_tokens(step, top_k=top_k, top_p=top_p, generator=generator)
            sampled.append(idx)
            fed.append(idx.repeat(rows // batch, 1))
            if progress is not None:
                progress(t)
        return RasterGenerationOutput(tokens=torch.cat(sampled, dim=1),
                                      logits=torch.cat(all_logits, dim=1) if return_logits else None,
                                      cache_peak_bytes=peak, grid=self.grid)

    # -- decoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens: LongTensor[B, h * w]`` -> images ``[B, 3, H, W]`` in ``[-1, 1]`` through the
        tokenizer run as one scale of ``h x w``: ``f_hat = phi(embed(tokens))`` (the tokenizer's own
        one-scale reconstruction, its phi convolution included), then ``fhat_to_img``."""
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: decode the tokens elsewhere")
        codes = self.tokenizer.embed(tokens, self.grid).float()
        f_hat, _ = self.tokenizer.next_input(0, torch.zeros_like(codes), codes, patch_nums=(tuple(self.grid),))
        return self.tokenizer.fhat_to_img(f_hat)
