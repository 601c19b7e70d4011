"""Teacher-forced logits of a subset of scales, and MVAR's per-scale grouping ("parallel" strategy).

:func:`grouped_logits` runs ``model.embed_scales -> model.backbone -> model.logits`` over the
tokens of the given scales only, packed in scale order, with attention restricted by the pattern's
spec over ``layout.spans_of(scales)`` and the trajectory's visibility (exactly the engine's
``_attend_uncached``). With every scale it is :meth:`NextScaleEngine.teacher_forced_logits`;
under a trajectory where each scale sees only itself (``markov`` order 1) the logits of any subset
equal the corresponding slices of the full sequence's, which is what lets MVAR train scales apart.

Parallel groups (``--parallel-split N``): the scales ``0 .. N-1`` packed together (block-diagonal
mask) form group 0, then every later scale is a group of its own. ``--ratio a:b:...`` gives each
group's number of iterations in a cycle; iteration ``i`` trains group ``cycle[i % len(cycle)]``
(MVAR's 8:1:1 over the 256px schedule: scales 0..7 eight times, 13x13 once, 16x16 once).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import UsageError
from ...core.layout import SequenceLayout, spans_to_positions
from ...models.var import VAR


def scale_inputs(layout: SequenceLayout, var_input: torch.Tensor | None, scales: Sequence[int]) -> list[torch.Tensor | None]:
    """Per-scale slices of ``var_input: [B, L - l_0, Cvae]`` (None for scale 0)."""
    first = layout.scales[0].numel
    out: list[torch.Tensor | None] = []
    for s in scales:
        sc = layout.scales[s]
        out.append(None if s == 0 else var_input[:, sc.begin - first:sc.end - first])
    return out


def token_positions(layout: SequenceLayout, scales: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """LongTensor of the sequence positions of ``scales`` (in scale order)."""
    return spans_to_positions(layout.spans_of(scales), device)


def grouped_logits(model: VAR, trajectory, pattern, backends, labels: torch.Tensor, var_input: torch.Tensor | None,
                   scales: Sequence[int]) -> torch.Tensor:
    """Logits ``[B, sum_s l_s, V]`` of ``scales`` (sorted, distinct) under the trajectory and pattern.

    ``labels: LongTensor[B]`` (``num_classes`` = the null class); ``var_input`` as
    ``MultiScaleVQVAE.indices_to_var_input``. Differentiable."""
    scales = tuple(sorted(set(int(s) for s in scales)))
    layout = model.layout
    if not scales or scales[0] < 0 or scales[-1] >= layout.num_scales:
        raise ValueError(f"scales {list(scales)} are not a non-empty subset of 0..{layout.num_scales - 1}")
    spans = layout.spans_of(scales)
    cond = model.condition(labels)

    def attend(layer, q, k, v, scale):
        spec = pattern.spec(layout, spans, spans, trajectory.visible)
        return backends.attend(q, k, v, spec, scale=scale)

    x = model.embed_scales(scales, cond, scale_inputs(layout, var_input, scales))
    hidden = model.backbone(x, cond, attend)
    return model.logits(hidden, cond)


def scales_isolated(trajectory, num_scales: int) -> bool:
    """True when the trajectory lets every scale see only itself (block-diagonal over scales)."""
    idx = torch.arange(num_scales)
    visible = torch.as_tensor(trajectory.visible(idx[:, None], idx[None, :]), dtype=torch.bool)
    return bool(torch.equal(visible, torch.eye(num_scales, dtype=torch.bool)))


def parallel_groups(num_scales: int, split: int) -> list[tuple[int, ...]]:
    """``[(0, .., split-1), (split,), (split+1,), ..]``; ``1 <= split <= num_scales - 1``."""
    if not 1 <= split <= num_scales - 1:
        raise UsageError(f"--parallel-split {split} must lie in 1..{num_scales - 1} for a schedule of {num_scales} "
                         f"scales (scales before it are packed together, each later scale trains alone)")
    return [tuple(range(split))] + [(s,) for s in range(split, num_scales)]


def describe_group(group: Sequence[int]) -> str:
    return f"{group[0]}" if len(group) == 1 else f"{group[0]}-{group[-1]}"


def parse_ratio(text: str | None, groups: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """``"a:b:c"`` -> iteration counts, one positive int per group. None: one iteration per scale
    in a cycle (the packed group gets its scale count: 8:1:1 for MVAR's 256px split)."""
    if text is None:
        return tuple(len(g) for g in groups)
    expected = ":".join(str(len(g)) for g in groups)
    listing = ", ".join("[" + describe_group(g) + "]" for g in groups)
    try:
        counts = tuple(int(part) for part in text.split(":"))
    except ValueError:
        raise UsageError(f"--ratio {text}: expected colon-separated positive integers, one per group "
                         f"({len(groups)} groups: {listing}), e.g. {expected}") from None
    if len(counts) != len(groups):
        raise UsageError(f"--ratio {text} has {len(counts)} entries but the parallel strategy forms {len(groups)} "
                         f"groups ({listing}); give {len(groups)} counts, e.g. --ratio {expected}")
    if any(c < 1 for c in counts):
        raise UsageError(f"--ratio {text}: every count must be a positive integer (each group must train), "
                         f"e.g. --ratio {expected}")
    return counts


def group_cycle(counts: Sequence[int]) -> tuple[int, ...]:
    """Group index per iteration of one cycle, in blocks: 8:1:1 -> 0,0,0,0,0,0,0,0,1,2."""
    return tuple(g for g, c in enumerate(counts) for _ in range(c))


class VarTrainingModule(nn.Module):
    """The trainable computation, the unit that DDP wraps.

    ``forward(labels, var_input, targets, scales) -> (loss, ce, acc)``: logits of ``scales``
    (:func:`grouped_logits`), ``loss = sum of the group's token cross-entropies / (B * L)``
    (VAR's per-token weight 1/L, ``L`` the schedule's token count), ``ce`` the mean cross-entropy
    per token of the group (with ``label_smoothing``, VAR's ``--ls``) and ``acc`` its token
    accuracy (both detached). ``targets: [B, L]`` are the token indices of the whole schedule;
    ``var_input: [B, L - l_0, Cvae]``."""

    def __init__(self, model: VAR, trajectory, pattern, backends, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.trajectory, self.pattern, self.backends = trajectory, pattern, backends
        self.label_smoothing = label_smoothing

    def forward(self, labels: torch.Tensor, var_input: torch.Tensor | None, targets: torch.Tensor,
                scales: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layout = self.model.layout
        logits = grouped_logits(self.model, self.trajectory, self.pattern, self.backends, labels, var_input, scales)
        group_targets = targets[:, token_positions(layout, scales, targets.device)]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), group_targets.flatten(), reduction="none",
                             label_smoothing=self.label_smoothing)
        loss = ce.sum() / (targets.shape[0] * layout.length)
        acc = (logits.detach().argmax(-1) == group_targets).float().mean()
        return loss, ce.detach().mean(), acc

    def unused_parameters(self, scales: Sequence[int]) -> list[nn.Parameter]:
        """Parameters that a group cannot reach: ``pos_start`` without scale 0, ``word_embed``
        without a later scale. Their gradients are reset to None after backward so that AdamW skips
        them, with or without DDP (which may fill unused gradients with zeros)."""
        out: list[nn.Parameter] = []
        if 0 not in scales:
            out.append(self.model.pos_start)
        if all(s == 0 for s in scales):
            out += list(self.model.word_embed.parameters())
        return out
