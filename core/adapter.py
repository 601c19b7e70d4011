"""The model-adapter contract: what the one generation engine needs of a model family.

The engine (:mod:`mvar_engine.core.engine`) owns the loop: steps from the trajectory, attention
through the pattern, the cache and the backends, sampling. An adapter owns everything about its
model: the rows it runs (``[cond; uncond]`` under guidance), how a step's tokens are embedded and
run through the backbone, logits, its guidance rule, how sampled tokens become the next input, and
decoding. Adding a model family means writing an adapter (and registering it through the
``mvar_engine_model_adapters`` hook), never touching the engine.

Tensors: ``labels: LongTensor[B]``; hidden states ``[rows, n, C]``; logits ``[rows, l, V]``;
sampled tokens ``LongTensor[B, l]``; ``attend(layer, q, k, v, scale)`` takes and returns
``[rows, H, n, D]`` tensors (see :mod:`mvar_engine.core.attention`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch

from .layout import SequenceLayout, Spans
from .trajectory import Step

AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
AttendFor = Callable[[Spans], AttendFn]
"""``attend_for(spans)``: the engine's attention callback for queries and keys at ``spans``."""


class GenerationState:
    """One generation's model-side state, owned by the adapter (the engine reads ``batch`` and
    ``rows`` only): ``batch`` samples, ``rows`` forward rows (``2 * batch`` under guidance)."""

    def __init__(self, batch: int, rows: int) -> None:
        self.batch, self.rows = batch, rows


@dataclass(frozen=True)
class ModelFacts:
    """What a model family can tell about the model a run's settings name without building it (read
    off file headers and metadata): the sequence ``layout``, ``num_layers``, ``num_heads``,
    ``num_classes``, ``weights_id``. The CLI checks labels, the pattern and the cache against them before any
    weights are read, so a mistake costs seconds, not a generation."""

    layout: SequenceLayout
    num_layers: int
    num_heads: int
    num_classes: int
    weights_id: str | None = None
    """A fingerprint of the weights (None: random or unknown); head maps record the one they were
    profiled on."""
    pixels_per_token: int | None = None
    """The side in pixels of the patch one token of the final grid decodes to (16 for VAR's and
    LlamaGen's tokenizers); None: unknown. The pipeline sizes its images' memory from it."""


class ModelFamily(ABC):
    """A model family as a registered component (the ``mvar_engine_model_adapters`` hook). The registry
    makes it as every component, ``factory(options)``, with its validated options model (the record's
    ``options``: checkpoint paths, sizes, a prompt...; each is a model setting, a CLI flag of its own
    name and a key of the Python API's ``model={...}``); it builds the models those options name and
    wraps them in its :class:`ModelAdapter`. ``family``: the trajectory family it generates under."""

    name: ClassVar[str] = "model"
    family: ClassVar[str] = "next-scale"
    sampling_defaults: ClassVar[dict[str, Any]] = {}
    """Sampling settings (``cfg``, ``top_k``, ``top_p``) this family's models are run with when the
    run sets none (Janus-Pro: cfg 5, top-k 0, top-p 1); the CLI's defaults otherwise."""

    def __init__(self, options: Any = None) -> None:
        self.options = options

    @abstractmethod
    def build(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        """``(model, tokenizer)`` that :attr:`options` name, as ``nn.Module``s (the tokenizer may be
        None); the pipeline moves them to ``device`` and puts them in eval mode. ``dtype``: the run's
        compute dtype; a family may load its weights in it (Janus) or keep float32 weights and let
        the engine autocast (VAR, LlamaGen). Bad options raise a one-line ``UsageError``."""

    @abstractmethod
    def adapter(self, model: Any, tokenizer: Any) -> "ModelAdapter":
        """The engine's adapter over a built ``(model, tokenizer)``."""

    def compiles_token_steps(self) -> bool:
        """Does this family's adapter set ``compiles_token_steps`` (compiled decoding is checked before a build)?"""
        return False

    def compiles_scale_steps(self) -> bool:
        """Does this family's adapter set ``compiles_scale_steps``?"""
        return False

    def inspect(self) -> ModelFacts | None:
        """The :class:`ModelFacts` of the model :meth:`build` would return, without building it or
        reading its weights; bad options raise the one-line ``UsageError`` that ``build`` would.
        Default: None (nothing is known before ``build``; the engine checks at ``generate``)."""
        return None

    def input_files(self) -> dict[str, Path]:
        """The files and folders :meth:`build` reads, by option name (a run never writes over them).
        Default: every option that holds a ``Path``."""
        fields = getattr(type(self.options), "model_fields", None) or {}
        return {name: value for name in fields if isinstance(value := getattr(self.options, name), Path)}


class ModelAdapter(ABC):
    """A model family as the engine drives it. Attributes: ``family`` (the trajectory family it
    generates under), ``layout`` (positions of the whole sequence), ``num_layers``, ``num_heads``,
    ``head_dim`` (for ``cache.begin``), ``vocab_size``, ``num_classes``, ``dtype`` (of its weights:
    the cache's dtype without autocast)."""

    name: ClassVar[str] = "model"
    family: ClassVar[str] = "next-scale"
    compiles_token_steps: ClassVar[bool] = False
    """Trait: implements :meth:`fed_tokens` and :meth:`run_token` (compiled decoding)."""
    compiles_scale_steps: ClassVar[bool] = False
    """Trait: implements :meth:`scale_inputs` and :meth:`run_scale` (compiled next-scale steps)."""
    layout: SequenceLayout
    num_layers: int
    num_heads: int
    head_dim: int
    vocab_size: int
    num_classes: int
    dtype: torch.dtype

    @abstractmethod
    def guided(self, cfg: float) -> bool:
        """Does guidance scale ``cfg`` run unconditional rows beside the conditional ones?"""

    @abstractmethod
    def start(self, labels: torch.Tensor, guided: bool) -> GenerationState:
        """A new generation for ``labels: LongTensor[B]``."""

    @abstractmethod
    def run(self, state: GenerationState, steps: Sequence[Step], spans: Spans, attend: AttendFn) -> torch.Tensor:
        """Hidden states ``[rows, n, C]`` of the tokens of ``steps`` (all fed now, at positions
        ``spans``, ``n`` of them) through the backbone, attention through ``attend``."""

    def fed_tokens(self, state: GenerationState, step: Step) -> torch.Tensor:
        """``LongTensor[rows, 1]``: what a one-token ``step`` feeds (for :meth:`run_token`)."""
        raise NotImplementedError(f"model adapter '{self.name}' has no compiled decoding step")

    def run_token(self, tokens: torch.Tensor, position: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        """:meth:`run` of one token per row as pure tensor code (it is traced into a graph): ``tokens:
        LongTensor[rows, 1]`` at ``position: LongTensor[1]`` -> hidden ``[rows, 1, C]``."""
        raise NotImplementedError(f"model adapter '{self.name}' has no compiled decoding step")

    def scale_inputs(self, state: GenerationState, step: Step) -> tuple[torch.Tensor, ...]:
        """The tensors a next-scale ``step``'s forward reads (for :meth:`run_scale`)."""
        raise NotImplementedError(f"model adapter '{self.name}' has no compiled next-scale step")

    def run_scale(self, index: int, inputs: tuple[torch.Tensor, ...], attend: AttendFn) -> torch.Tensor:
        """:meth:`run` of the one scale ``index`` as pure tensor code (it is traced into a graph):
        ``inputs`` from :meth:`scale_inputs` -> hidden ``[rows, l, C]``."""
        raise NotImplementedError(f"model adapter '{self.name}' has no compiled next-scale step")

    @abstractmethod
    def logits(self, state: GenerationState, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[r, l, V]`` of ``hidden: [r, l, C]``, the forward rows ``rows`` (None: all)."""

    @abstractmethod
    def guide(self, logits: torch.Tensor, batch: int, cfg: float, step: Step) -> torch.Tensor:
        """Guided logits ``[B, l, V]`` from ``logits: [2B, l, V]`` with rows ``[cond; uncond]``."""

    @abstractmethod
    def advance(self, state: GenerationState, step: Step, tokens: torch.Tensor) -> None:
        """Take the tokens ``[B, step.emits]`` sampled at ``step`` (they feed later steps)."""

    def forced(self, forced_tokens: Any, step: Step) -> torch.Tensor:
        """The tokens ``[B, step.emits]`` of ``step`` from the ``forced_tokens`` a caller replays
        (default: ``forced_tokens[step.index]``)."""
        return forced_tokens[step.index]

    @abstractmethod
    def finish(self, state: GenerationState, tokens: list[torch.Tensor], logits: list[torch.Tensor],
               cache_peak_bytes: int) -> Any:
        """The generation's output from the tokens and (when asked) raw logits of every step."""

    @abstractmethod
    def token_maps(self, output: Any) -> list[torch.Tensor]:
        """The output's tokens as ``LongTensor[B, h * w]`` maps (one per scale, or one)."""

    @abstractmethod
    def decode(self, output: Any) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` from a generation's output."""

    @abstractmethod
    def decode_maps(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` from token maps as :meth:`token_maps` gives them
        (``LongTensor[B, h * w]`` each): a function of the tokens alone, so an image decoded on its
        own (``B = 1``) does not depend on the batch it was generated in."""

    @abstractmethod
    def teacher_forced_logits(self, labels: torch.Tensor, inputs: Any, attend_for: AttendFor) -> torch.Tensor:
        """Differentiable logits of a whole training sequence (the training path)."""
