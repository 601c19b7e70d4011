"""The raster GPT (LlamaGen's c2i transformer) as a model adapter of the one engine.

Steps (the ``raster`` trajectory): the class prefix (positions ``0 .. P-1``) gives image token 0;
step ``t`` feeds token ``t - 1`` at position ``P + t - 1`` and gives token ``t``. CFG as LlamaGen:
rows ``[cond; uncond]`` (uncond = the null class) only when ``cfg > 1`` (else the conditional rows alone), the sampled token is fed to
both rows, ``logits = uncond + cfg * (cond - uncond)``. Decoding runs the tokenizer as one scale of
the token grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..core.adapter import AttendFn, AttendFor, GenerationState, ModelAdapter
from ..core.attention import AttentionPattern
from ..core.backend_selection import BackendSelector
from ..core.cache import CachePolicy
from ..core.engine import Engine
from ..core.layout import Spans, spans_to_positions
from ..core.sampling import guided_logits_raster, raster_guided
from ..core.trajectory import Step, Trajectory
from .raster_gpt import RasterGPT


@dataclass
class RasterGenerationOutput:
    """``tokens: LongTensor[B, h * w]`` row-major; ``logits`` (when asked): the raw logits
    ``[rows, h * w, V]`` of every row (``[cond; uncond]`` under CFG); ``cache_peak_bytes``."""

    tokens: torch.Tensor
    logits: torch.Tensor | None = None
    cache_peak_bytes: int = 0
    grid: tuple[int, int] = (0, 0)
    extras: dict = field(default_factory=dict)


class RasterState(GenerationState):
    """``labels: LongTensor[rows]`` (null class for the uncond rows); ``fed[t]: LongTensor[rows, 1]``."""

    def __init__(self, batch: int, labels: torch.Tensor) -> None:
        super().__init__(batch, labels.shape[0])
        self.labels = labels
        self.fed: list[torch.Tensor] = []


class RasterAdapter(ModelAdapter):
    """``model``: a :class:`RasterGPT`; ``tokenizer``: a one-scale tokenizer (``embed``,
    ``next_input``, ``fhat_to_img``) for :meth:`decode`, or None."""

    name = "raster-gpt"
    family = "next-token"
    compiles_token_steps = True

    def __init__(self, model: RasterGPT, tokenizer=None) -> None:
        self.net, self.tokenizer = model, tokenizer
        self.layout = model.layout
        self.prefix = model.cls_token_num
        self.grid = tuple(model.config.grid)
        self.num_tokens = self.grid[0] * self.grid[1]
        first = model.layers[0].attention if len(model.layers) else None
        self.num_layers = len(model.layers)
        self.num_heads = first.heads if first else 1
        self.head_dim = first.head_dim if first else 1
        self.vocab_size, self.num_classes = model.vocab_size, model.num_classes

    @property
    def dtype(self) -> torch.dtype:
        return self.net.tok_embeddings.weight.dtype

    def guided(self, cfg: float) -> bool:
        """LlamaGen's rule (:func:`raster_guided`): guidance only when ``cfg > 1``."""
        return raster_guided(cfg)

    def start(self, labels: torch.Tensor, guided: bool) -> RasterState:
        rows = torch.cat([labels, torch.full_like(labels, self.net.null_class)]) if guided else labels
        return RasterState(labels.shape[0], rows)

    def run(self, state: RasterState, steps: Sequence[Step], spans: Spans, attend: AttendFn) -> torch.Tensor:
        first, last = steps[0].index, steps[-1].index
        labels = state.labels if first == 0 else None
        tokens = state.fed[max(first - 1, 0):last]
        x = self.net.embed(labels, (tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=1)) if tokens else None)
        return self.net.backbone(x, spans_to_positions(spans, x.device), attend)

    def fed_tokens(self, state: RasterState, step: Step) -> torch.Tensor:
        return state.fed[step.index - 1]

    def run_token(self, tokens: torch.Tensor, position: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        return self.net.backbone(self.net.embed(None, tokens), position, attend)

    def logits(self, state: RasterState, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.net.logits(hidden)

    def guide(self, logits: torch.Tensor, batch: int, cfg: float, step: Step) -> torch.Tensor:
        return guided_logits_raster(logits, batch, cfg)

    def advance(self, state: RasterState, step: Step, tokens: torch.Tensor) -> None:
        state.fed.append(tokens.repeat(state.rows // state.batch, 1))

    def forced(self, forced_tokens: torch.Tensor, step: Step) -> torch.Tensor:
        """``forced_tokens: LongTensor[B, h * w]``."""
        if forced_tokens.dim() != 2 or forced_tokens.shape[1] <= step.index:
            raise ValueError(f"forced_tokens must be [B, {self.num_tokens}] (a token per step), got "
                             f"{tuple(forced_tokens.shape)}")
        return forced_tokens[:, step.index:step.index + 1]

    def finish(self, state: RasterState, tokens, logits, cache_peak_bytes) -> RasterGenerationOutput:
        return RasterGenerationOutput(tokens=torch.cat(tokens, dim=1), logits=torch.cat(logits, dim=1) if logits else None,
                                      cache_peak_bytes=cache_peak_bytes, grid=self.grid)

    def token_maps(self, output: RasterGenerationOutput) -> list[torch.Tensor]:
        return [output.tokens]

    def decode_maps(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """:meth:`decode` of the one map (``tokens: LongTensor[B, h * w]``)."""
        (tokens,) = maps
        return self.decode(tokens)

    @torch.no_grad()
    def decode(self, output: RasterGenerationOutput | torch.Tensor) -> torch.Tensor:
        """Images from an output (or its ``tokens: LongTensor[B, h * w]``) through the tokenizer run as
        one scale of ``h x w``: ``f_hat = phi(embed(tokens))`` (its phi convolution included), then
        ``fhat_to_img``."""
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: decode the tokens elsewhere")
        tokens = output.tokens if isinstance(output, RasterGenerationOutput) else output
        if hasattr(self.tokenizer, "decode_tokens"):  # a raster tokenizer (LlamaGen's VQ): tokens -> images
            return self.tokenizer.decode_tokens(tokens, self.grid).clamp(-1, 1)
        codes = self.tokenizer.embed(tokens, self.grid).float()
        f_hat, _ = self.tokenizer.next_input(0, torch.zeros_like(codes), codes, patch_nums=(tuple(self.grid),))
        return self.tokenizer.fhat_to_img(f_hat)

    def teacher_forced_logits(self, labels: torch.Tensor, tokens: torch.Tensor, attend_for: AttendFor) -> torch.Tensor:
        """Logits ``[B, n, V]`` predicting ``tokens: LongTensor[B, n]`` (``n <= h * w``, row-major from
        the first token) in one causal pass."""
        n = tokens.shape[1]
        if not 1 <= n <= self.num_tokens:
            raise ValueError(f"need 1 .. {self.num_tokens} tokens, got {n}")
        length = self.prefix + n - 1
        x = self.net.embed(labels, tokens[:, :-1] if n > 1 else None)
        hidden = self.net.backbone(x, torch.arange(0, length, device=labels.device), attend_for(((0, length),)))
        return self.net.logits(hidden[:, self.prefix - 1:])


class RasterEngine(Engine):
    """The engine over a :class:`RasterAdapter` (``pattern``: the raster trajectory's, e.g. the
    built-in ``causal``) with a default cache for :meth:`generate`."""

    def __init__(self, model: RasterGPT, tokenizer, trajectory: Trajectory, cache: CachePolicy,
                 backends: BackendSelector, *, pattern: AttentionPattern,
                 autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__(RasterAdapter(model, tokenizer), trajectory, pattern, backends, autocast_dtype=autocast_dtype)
        self.tokenizer, self.cache = tokenizer, cache
        self.grid, self.num_tokens, self.prefix = self.model.grid, self.model.num_tokens, self.model.prefix

    def generate(self, labels: torch.Tensor, cache: CachePolicy | None = None, *, cfg: float = 4.0, top_k: int = 2000,
                 top_p: float = 1.0, **kwargs) -> RasterGenerationOutput:
        return super().generate(labels, cache or self.cache, cfg=cfg, top_k=top_k, top_p=top_p, **kwargs)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens)
