"""VAR and MVAR as a model adapter of the one engine: next-scale prediction over a multi-scale
tokenizer (VAR's CFG ramp; sampled codes feed the next scale through the tokenizer's residual)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..core.adapter import AttendFn, AttendFor, GenerationState, ModelAdapter
from ..core.attention import AttentionPattern
from ..core.backend_selection import BackendSelector
from ..core.cache import CachePolicy
from ..core.engine import Engine
from ..core.layout import Spans
from ..core.sampling import guided_logits_var
from ..core.trajectory import Step, Trajectory
from .tokenizer import MultiScaleVQVAE
from .var import VAR


@dataclass
class GenerationOutput:
    """``tokens[s]: LongTensor[B, h_s * w_s]``; ``f_hat: [B, Cvae, H, W]``; ``logits[s]`` (when asked):
    the raw logits ``[rows, l_s, V]`` of every row (``[cond; uncond]`` under CFG)."""

    tokens: list[torch.Tensor]
    f_hat: torch.Tensor
    logits: list[torch.Tensor] = field(default_factory=list)
    cache_peak_bytes: int = 0


class NextScaleState(GenerationState):
    """``cond: [rows, C]``; ``f_hat: [B, Cvae, H, W]`` (the tokenizer's running reconstruction);
    ``var_inputs[s]: [rows, l_s, Cvae]`` (None for scale 0)."""

    def __init__(self, batch: int, rows: int, cond: torch.Tensor, f_hat: torch.Tensor) -> None:
        super().__init__(batch, rows)
        self.cond, self.f_hat = cond, f_hat
        self.var_inputs: list[torch.Tensor | None] = [None]


class VarAdapter(ModelAdapter):
    """``model``: a :class:`VAR`; ``tokenizer``: a :class:`MultiScaleVQVAE` with the same schedule.
    Guidance: rows ``[cond; uncond]`` when ``cfg > 0``, VAR's linear ramp over scales."""

    name = "var"
    family = "next-scale"
    compiles_scale_steps = True

    def __init__(self, model: VAR, tokenizer: MultiScaleVQVAE) -> None:
        self.net, self.tokenizer = model, tokenizer
        self.layout = model.layout
        first = model.blocks[0].attn if len(model.blocks) else None
        self.num_layers = len(model.blocks)
        self.num_heads = first.heads if first else 1
        self.head_dim = first.head_dim if first else 1
        self.vocab_size, self.num_classes = model.config.vocab_size, model.num_classes

    @property
    def dtype(self) -> torch.dtype:
        return self.net.word_embed.weight.dtype

    def guided(self, cfg: float) -> bool:
        """VAR's rule: ``(1 + t) cond - t uncond`` with ``t`` ramping to ``cfg``, so ``cfg == 0`` is the
        conditional rows alone (no unconditional rows run)."""
        return cfg > 0

    def start(self, labels: torch.Tensor, guided: bool) -> NextScaleState:
        model, batch = self.net, labels.shape[0]
        rows_labels = torch.cat([labels, torch.full_like(labels, model.num_classes)]) if guided else labels
        last_h, last_w = self.layout.grids[-1]
        f_hat = torch.zeros(batch, model.z_channels, last_h, last_w, device=labels.device)
        return NextScaleState(batch, rows_labels.shape[0], model.condition(rows_labels), f_hat)

    def run(self, state: NextScaleState, steps: Sequence[Step], spans: Spans, attend: AttendFn) -> torch.Tensor:
        # the embedded input is passed without a name so that the backbone holds its only reference
        # and frees it after the first block (64 MiB at d16's last scale, 16 rows)
        if len(steps) == 1:
            s = steps[0].index
            return self.net.backbone(self.net.embed_scale(s, state.cond, state.var_inputs[s]), state.cond, attend)
        scales = [step.index for step in steps]
        return self.net.backbone(self.net.embed_scales(scales, state.cond, [state.var_inputs[j] for j in scales]),
                                 state.cond, attend)

    def scale_inputs(self, state: NextScaleState, step: Step) -> tuple[torch.Tensor, ...]:
        """``(cond,)`` for scale 0, ``(cond, var_input)`` after it."""
        var_input = state.var_inputs[step.index]
        return (state.cond,) if var_input is None else (state.cond, var_input)

    def run_scale(self, index: int, inputs: tuple[torch.Tensor, ...], attend: AttendFn) -> torch.Tensor:
        cond = inputs[0]
        return self.net.backbone(self.net.embed_scale(index, cond, inputs[1] if len(inputs) > 1 else None), cond, attend)

    def logits(self, state: NextScaleState, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.net.logits(hidden, state.cond if rows is None else state.cond[rows])

    def guide(self, logits: torch.Tensor, batch: int, cfg: float, step: Step) -> torch.Tensor:
        return guided_logits_var(logits, batch, cfg, step.index, self.layout.num_scales)

    def advance(self, state: NextScaleState, step: Step, tokens: torch.Tensor) -> None:
        sc = self.layout.scales[step.index]
        codes = self.tokenizer.embed(tokens, (sc.height, sc.width))
        state.f_hat, next_map = self.tokenizer.next_input(sc.index, state.f_hat, codes.float())
        if sc.index + 1 < self.layout.num_scales:
            state.var_inputs.append(next_map.flatten(2).transpose(1, 2).repeat(state.rows // state.batch, 1, 1))

    def finish(self, state: NextScaleState, tokens, logits, cache_peak_bytes) -> GenerationOutput:
        return GenerationOutput(tokens=tokens, f_hat=state.f_hat, logits=logits, cache_peak_bytes=cache_peak_bytes)

    def token_maps(self, output: GenerationOutput) -> list[torch.Tensor]:
        return list(output.tokens)

    def decode(self, output: GenerationOutput) -> torch.Tensor:
        return self.tokenizer.fhat_to_img(output.f_hat)

    def decode_maps(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The tokenizer's reconstruction of the per-scale maps (``indices_to_fhat``), decoded."""
        return self.tokenizer.fhat_to_img(self.tokenizer.indices_to_fhat(list(maps)))

    def teacher_forced_logits(self, labels: torch.Tensor, inputs: torch.Tensor | None, attend_for: AttendFor
                              ) -> torch.Tensor:
        """Logits ``[B, L, V]`` of the whole sequence; ``inputs: [B, L - l_0, Cvae]`` is the
        tokenizer's ``indices_to_var_input`` (None for a one-scale schedule)."""
        model, layout = self.net, self.layout
        cond = model.condition(labels)
        var_inputs: list[torch.Tensor | None] = [None]
        offset = 0
        for sc in layout.scales[1:]:
            var_inputs.append(inputs[:, offset:offset + sc.numel])
            offset += sc.numel
        x = model.embed_scales(range(layout.num_scales), cond, var_inputs)
        hidden = model.backbone(x, cond, attend_for(((0, layout.length),)))
        return model.logits(hidden, cond)


class NextScaleEngine(Engine):
    """The engine over a :class:`VarAdapter`, with a default cache for :meth:`generate` (the
    construction the tests, training and benchmarks use)."""

    def __init__(self, model: VAR, tokenizer: MultiScaleVQVAE, trajectory: Trajectory, pattern: AttentionPattern,
                 cache: CachePolicy, backends: BackendSelector, *, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__(VarAdapter(model, tokenizer), trajectory, pattern, backends, autocast_dtype=autocast_dtype)
        self.tokenizer, self.cache = tokenizer, cache

    def generate(self, labels: torch.Tensor, cache: CachePolicy | None = None, *, cfg: float = 1.5, top_k: int = 900,
                 top_p: float = 0.96, **kwargs) -> GenerationOutput:
        return super().generate(labels, cache or self.cache, cfg=cfg, top_k=top_k, top_p=top_p, **kwargs)
