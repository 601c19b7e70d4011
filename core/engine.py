"""The one generation engine: a model adapter driven through a trajectory's steps, an attention
pattern, a cache policy (an argument of each generation) and the attention backends.

Per step the trajectory gives the positions fed and the steps they see (``Step.history``). If the
cache keeps history (or the step sees only itself) only the step's tokens run, attending over what
``cache.update`` returns; otherwise the step's whole visible history, transitively, is recomputed in
one forward pass (the exact oracle of cached runs). The hidden states of the step's last ``emits``
positions give logits; under guidance the adapter's rule combines the ``[cond; uncond]`` rows; then
temperature, top-k, top-p and a draw (:mod:`.sampling`). Teacher forcing runs a whole sequence under
the trajectory's rule and the pattern (the training path).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch

from .adapter import AttendFn, GenerationState, ModelAdapter
from .attention import AttentionPattern, AttentionSpec
from .backend_selection import BackendSelector
from .cache import CachePolicy
from .compatibility import check_compatible
from .compiled_decoding import CompiledScaleSteps, CompiledTokenStep, compile_problem
from .errors import UsageError
from .layout import Spans, merge_spans
from .sampling import Generators, sample_tokens
from .trajectory import Step, Trajectory, Visibility

LOGITS_CHUNK_BYTES = 16 * 2**20
"""Most bytes of float32 logits the sampling path materialises at once (see :meth:`Engine.sample`)."""


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def weight_cast_scope(device: torch.device, dtype: torch.dtype | None):
    """Keeps autocast's 16-bit copies of the weights for the whole scope, so a generation casts each
    weight once instead of once a step (592 steps for a raster image). Autocast caches the cast of a
    float32 leaf tensor that requires grad (``nn.Parameter``'s default) and drops the cache when the
    outermost autocast context exits; this outer context is *disabled*, so it only keeps the cache
    alive across the per-step :func:`autocast_context` inside it: code between them (sampling, the
    next input) stays float32. Weights frozen with ``requires_grad_(False)`` are re-cast every step
    (autocast does not cache them). No-op when ``dtype`` is None."""
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype, enabled=False)


def cached_attention(cache: CachePolicy, backends: BackendSelector, spans: Spans,
                     spec_for: Callable[[Spans], AttentionSpec]) -> AttendFn:
    """The ``attend(layer, q, k, v, scale)`` callback of a cached step over the tokens at ``spans``:
    store the step's keys/values in ``cache``, build the spec from the spans it returns
    (``spec_for(k_spans)``), attend over the returned keys/values, and let the cache ``observe`` the
    step after the attention (it may evict from that layer's storage there). A scoring cache
    (``track_scores``) also gets the attention each key received where the
    backend materialised it (:meth:`BackendSelector.attend_and_score`)."""

    def attend(layer, q, k, v, scale):
        k_all, v_all, k_spans = cache.update(layer, k, v, spans)
        spec = spec_for(k_spans)
        k_in, v_in = k_all.to(q.dtype), v_all.to(q.dtype)
        if not cache.track_scores:
            out = backends.attend(q, k_in, v_in, spec, scale=scale)
            cache.observe(layer, q, k_all, spec, scale)
            return out
        out, received = backends.attend_and_score(q, k_in, v_in, spec, scale=scale)
        cache.observe(layer, q, k_all, spec, scale, received=received)
        return out

    return attend


def dependencies(steps: Sequence[Step], index: int) -> list[int]:
    """Steps whose tokens a recomputation of step ``index`` must run: its history and, transitively,
    what those steps saw (their deeper-layer keys depend on it). Ascending."""
    needed, frontier = {index}, [index]
    while frontier:
        for j in steps[frontier.pop()].history:
            if j not in needed:
                needed.add(j)
                frontier.append(j)
    return sorted(needed)


class Engine:
    """Generation and teacher forcing for any :class:`ModelAdapter` under one trajectory, pattern
    and backend selector. Stateless between calls (the cache comes with each :meth:`generate`),
    except that ``compile=True`` keeps the compiled one-token step for the next generations."""

    def __init__(self, model: ModelAdapter, trajectory: Trajectory, pattern: AttentionPattern,
                 backends: BackendSelector, *, autocast_dtype: torch.dtype | None = None, compile: bool = False) -> None:
        """``compile``: one-token steps run compiled (:mod:`.compiled_decoding`)."""
        self.model, self.trajectory, self.pattern, self.backends = model, trajectory, pattern, backends
        self.layout = model.layout
        self.autocast_dtype = autocast_dtype
        self.compile = compile
        self.compiled: CompiledTokenStep | CompiledScaleSteps | None = None
        self.visibility = Visibility(trajectory)
        self.steps = trajectory.steps(self.layout)

    # -- attention callbacks ---------------------------------------------------------------------
    def spec(self, queries: Spans, keys: Spans) -> AttentionSpec:
        """The pattern's spec for queries at ``queries`` over keys at ``keys``."""
        return self.pattern.spec(self.layout, queries, keys, self.visibility)

    def attend_uncached(self, spans: Spans) -> AttendFn:
        """Attention of the tokens at ``spans`` among themselves (no cache sees the heads, so a
        model may attend a head group at a time: ``heads_independent``)."""
        def attend(layer, q, k, v, scale):
            return self.backends.attend(q, k, v, self.spec(spans, spans), scale=scale)

        attend.heads_independent = True
        return attend

    def attend_cached(self, cache: CachePolicy, spans: Spans) -> AttendFn:
        return cached_attention(cache, self.backends, spans, lambda k_spans: self.spec(spans, k_spans))

    def autocast(self, device: torch.device):
        return autocast_context(device, self.autocast_dtype)

    # -- teacher forcing -------------------------------------------------------------------------
    def teacher_forced_logits(self, labels: torch.Tensor, inputs: Any) -> torch.Tensor:
        """Logits of a whole training sequence (``inputs`` as the adapter defines; differentiable)."""
        with self.autocast(labels.device):
            return self.model.teacher_forced_logits(labels, inputs, self.attend_uncached)

    # -- sampling --------------------------------------------------------------------------------
    def sample(self, state: GenerationState, hidden: torch.Tensor, step: Step, cfg: float | None, *, top_k: int,
               top_p: float, temperature: float, generator: Generators) -> torch.Tensor:
        """Tokens ``[B, l]`` from ``hidden: [rows, l, C]``: logits, guidance, temperature and the draw
        run over chunks of samples (a sample's cond and uncond rows together) holding at most
        :data:`LOGITS_CHUNK_BYTES` of logits, in sample order, so the generator is consumed as by
        one pass over all rows (the draws are the same on the CPU). With one generator per sample, each
        chunk draws from its own samples' generators."""
        batch = state.batch
        rows_per_sample = 2 if cfg is not None else 1
        per_chunk = max(1, LOGITS_CHUNK_BYTES // (rows_per_sample * hidden.shape[1] * self.model.vocab_size * 4))
        pieces = []
        for start in range(0, batch, per_chunk):
            stop = min(batch, start + per_chunk)
            if stop - start == batch:  # one chunk: every row, no gather
                rows, chunk_hidden = None, hidden
            else:
                rows = torch.arange(start, stop, device=hidden.device)
                if cfg is not None:
                    rows = torch.cat([rows, rows + batch])
                chunk_hidden = hidden[rows]
            with self.autocast(hidden.device):
                logits = self.model.logits(state, chunk_hidden, rows)
            logits = logits.float()  # guidance, filters and the draw in float32 under 16-bit autocast too
            if cfg is not None:
                logits = self.model.guide(logits, stop - start, cfg, step)
            if temperature != 1.0:
                logits = logits / max(temperature, 1e-5)
            chunk_generator = generator if generator is None or isinstance(generator, torch.Generator) \
                else generator[start:stop]
            pieces.append(sample_tokens(logits, top_k=top_k, top_p=top_p, generator=chunk_generator))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    # -- generation ------------------------------------------------------------------------------
    def check(self, cache: CachePolicy, names: dict[str, str] | None = None) -> None:
        """Refuse (one line) a cache, pattern or model that does not serve this trajectory, and a
        pattern or cache whose options do not fit this model's layout."""
        check_compatible(self.trajectory, self.pattern, cache, model_family=self.model.family, names=names)
        self.pattern.check_layout(self.layout)
        cache.check_layout(self.layout, num_layers=self.model.num_layers, num_heads=self.model.num_heads)
        if self.compile:
            problem = compile_problem(trajectory=self.trajectory, pattern=self.pattern, cache=cache,
                                      compiles_token_steps=self.model.compiles_token_steps,
                                      compiles_scale_steps=self.model.compiles_scale_steps,
                                      backend=self.backends.choice, names=names)
            if problem is not None:
                raise UsageError(problem)

    def compiled_step(self, cache: CachePolicy, device: torch.device) -> CompiledTokenStep | CompiledScaleSteps:
        """The compiled steps (one-token, or one graph per scale under a next-scale trajectory), over
        ``cache`` now (one per engine and device: a new cache of the same shapes reuses the graphs)."""
        if self.compiled is None or self.compiled.device != device:
            autocast = lambda: self.autocast(device)  # noqa: E731
            if self.trajectory.family == "next-scale":
                self.compiled = CompiledScaleSteps(self.model, cache, device, autocast,
                                                   lambda step, keys: self.spec(step.spans, keys))
            else:
                self.compiled = CompiledTokenStep(self.model, cache, device, autocast)
        self.compiled.cache = cache
        return self.compiled

    def run_step(self, state: GenerationState, step: Step, cache: CachePolicy,
                 compiled: CompiledTokenStep | CompiledScaleSteps | None, device: torch.device) -> torch.Tensor:
        """Hidden states ``[rows, n, C]`` of ``step``: compiled for a one-token step after the
        prefill when ``compiled``; else the step's tokens over the cache, or its history recomputed."""
        if compiled is not None and compiled.serves(step):
            hidden = compiled.run(state, step)
            cache.end_step()
            return hidden
        with self.autocast(device):
            if cache.stores_history:
                hidden = self.model.run(state, (step,), step.spans, self.attend_cached(cache, step.spans))
                cache.end_step()
                return hidden
            history = dependencies(self.steps, step.index)  # O(step) a step: only where no cache keeps it
            if history == [step.index]:
                return self.model.run(state, (step,), step.spans, self.attend_uncached(step.spans))
            spans = merge_spans(span for j in history for span in self.steps[j].spans)
            return self.model.run(state, [self.steps[j] for j in history], spans, self.attend_uncached(spans))

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, cache: CachePolicy, *, cfg: float, top_k: int, top_p: float,
                 temperature: float = 1.0, generator: Generators = None, forced_tokens: Any = None,
                 return_logits: bool = False, progress: Callable[[int], None] | None = None) -> Any:
        """Generate one image's tokens per label (``labels: LongTensor[B]``) with ``cache``.

        ``generator``: one for every draw, or one per label (a sample's tokens then do not depend on
        the batch it is generated in). ``forced_tokens`` replays given tokens instead of sampling
        (equivalence tests; layout as the adapter's ``forced``). ``progress``: an optional callable per step index. Returns the
        adapter's output (``finish``)."""
        self.check(cache)
        model, device = self.model, labels.device
        guided = model.guided(cfg)
        state = model.start(labels, guided)
        cache.begin(num_layers=model.num_layers, batch=state.rows, num_heads=model.num_heads, head_dim=model.head_dim,
                    layout=self.layout, device=device, dtype=self.autocast_dtype or model.dtype, guided=guided)
        tokens: list[torch.Tensor] = []
        all_logits: list[torch.Tensor] = []
        peak = 0
        compiled = self.compiled_step(cache, device) if self.compile else None
        if compiled is not None:
            compiled.begin()
        with weight_cast_scope(device, self.autocast_dtype):
            for step in self.steps:
                hidden = self.run_step(state, step, cache, compiled, device)[:, -step.emits:]
                if return_logits or forced_tokens is not None:
                    with self.autocast(device):
                        logits = model.logits(state, hidden).float()
                peak = max(peak, cache.nbytes())
                if return_logits:
                    all_logits.append(logits)
                if forced_tokens is not None:
                    idx = model.forced(forced_tokens, step).to(device)
                else:
                    idx = self.sample(state, hidden, step, cfg if guided else None, top_k=top_k, top_p=top_p,
                                      temperature=temperature, generator=generator)
                del hidden
                tokens.append(idx)
                model.advance(state, step, idx)
                if progress is not None:
                    progress(step.index)
        return model.finish(state, tokens, all_logits, peak)
