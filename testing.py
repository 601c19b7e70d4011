"""The conformance kit: property checks every cache policy, attention pattern and attention backend
must pass, built from the oracles of mvar-engine's own test suite. For plugin packages' tests::

    from mvar_engine.testing import check_attention_backend, check_attention_pattern, check_cache_policy

    def test_my_cache():
        check_cache_policy(lambda budget, layers, heads: MyCache(MyOptions(budget=budget or 1.0)))

    def test_my_pattern():
        check_attention_pattern(MyPattern())

    def test_my_backend():
        check_attention_backend(MyBackend(), dtypes=(torch.float32,))

Each check draws its cases with hypothesis (a test-only dependency: this module imports it, so
import the module from tests only; call the checks from plain test functions, not from inside a
``@given`` test), runs them on tiny random models on the CPU within a few
seconds at the default ``max_examples``, and raises :class:`AssertionError` with a message naming
the component, the broken contract and the case (hypothesis shrinks it first) on a failure.

The checks:

- :func:`check_cache_policy`: the traits are declared consistently; a covering budget (one that
  keeps every token) gives the logits (under forced tokens) and the greedy tokens of the ``full``
  cache; storage (``nbytes()`` after every step) and the keys ``update`` returns never exceed the
  declared budget; at any budget the returned spans name the returned keys and a sample keeps
  the same positions alone and in a batch.
- :func:`check_attention_pattern`: ``spec`` is pure; every query sees a key; no query sees a key
  the trajectory hides (``visible_positions``); ``mask()``, ``mask_mod()``, ``pair_count()`` and
  ``check_lengths()`` agree; a pattern that declares ``sees_every_visible_key`` hides nothing.
- :func:`check_attention_backend`: ``attend`` equals the float64 reference over every spec kind it
  supports (without modifying its inputs); what it does not support, ``supports`` refuses with a
  one-line reason instead of crashing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mvar_engine import (AttentionBackend, AttentionPattern, AttentionSpec, BlockCausal, BlockDiagonal, CachePolicy,
                         Causal, Dense, IncompatibleComponentsError, Masked, Neighborhood2D, SequenceLayout,
                         SlidingWindow1D, Visibility, spans_length, spans_to_positions, visible_positions)
from mvar_engine.backends.reference import ReferenceBackend
from mvar_engine.core.backend_selection import selector_for
from mvar_engine.core.compatibility import check_compatible
from mvar_engine.models.raster_adapter import RasterEngine
from mvar_engine.models.raster_gpt import RasterGPT, RasterGPTConfig
from mvar_engine.models.tokenizer import MultiScaleVQVAE, TokenizerConfig
from mvar_engine.models.var import VAR, VARConfig
from mvar_engine.models.var_adapter import NextScaleEngine
from mvar_engine.plugins.caches import FullCache
from mvar_engine.plugins.patterns import CausalPattern, DensePattern
from mvar_engine.plugins.raster import RasterTrajectory
from mvar_engine.plugins.trajectories import FullTrajectory, MarkovOptions, MarkovTrajectory

SPEC_KINDS: tuple[str, ...] = ("dense", "causal", "window1d", "block-causal", "block-diagonal", "neighborhood2d",
                               "masked")
"""The built-in spec kinds :func:`check_attention_backend` draws."""

__all__ = ["SPEC_KINDS", "attention_specs", "FAMILIES", "BOOKKEEPING_BYTES", "TOLERANCE", "BackendReport", "check_cache_policy",
           "check_attention_pattern", "check_attention_backend", "tiny_raster_model", "tiny_next_scale_model"]

FAMILIES: tuple[str, ...] = ("next-scale", "next-token")
"""Every trajectory family a component may declare."""

BOOKKEEPING_BYTES = 8
"""Bytes per stored token slot (per row, head and layer) a cache may hold beside its keys and
values in :func:`check_cache_policy`'s storage bound (``BoundedKV``: an int32 position and a float32
score)."""

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
"""Absolute and relative tolerance of :func:`check_attention_backend` per input dtype."""

MakeCache = Callable[[int | None, int, int], CachePolicy]
"""``make_cache(budget, num_layers, num_heads) -> CachePolicy``: a fresh cache storing at most
``budget`` tokens per layer (``budget=None``: a budget that keeps every token); the layer and head
counts of the model it will serve let a cache such as ``ssd`` build its head map."""


def _settings(max_examples: int, shrink: bool = True):
    """Fixed-seed settings; ``shrink=False`` reports the first failing case as found (faster)."""
    phases = tuple(Phase) if shrink else (Phase.explicit, Phase.reuse, Phase.generate)
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck), phases=phases)


def _name(component: object) -> str:
    return getattr(component, "name", None) or type(component).__name__


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


# ------------------------------------------------------------------------------------ tiny models
def tiny_raster_model(grid: tuple[int, int] = (3, 3), cls_token_num: int = 1, seed: int = 0, **overrides) -> RasterGPT:
    """A random tiny raster GPT (``RasterGPTConfig.tiny(**overrides)``) whose attention really
    matters (larger q/k weights than the 0.02 init), in eval mode."""
    torch.manual_seed(seed)
    model = RasterGPT(RasterGPTConfig.tiny(grid=tuple(grid), cls_token_num=cls_token_num, **overrides))
    with torch.no_grad():
        for block in model.layers:
            block.attention.wqkv.weight.normal_(0, 0.4)
            block.attention.wo.weight.normal_(0, 0.3)
        model.tok_embeddings.weight.normal_(0, 1.0)
        model.cls_embedding.embedding_table.weight.normal_(0, 1.0)
        model.output.weight.normal_(0, 0.3)
    return model.eval()


def tiny_next_scale_model(patch_nums=(1, 2, 3), seed: int = 0, *, heads: int = 2, depth: int = 2,
                          num_classes: int = 10) -> tuple[VAR, MultiScaleVQVAE]:
    """A random tiny VAR of classes ``0 .. num_classes - 1`` and a matching tokenizer (as the
    project's tests build them), eval mode."""
    torch.manual_seed(seed)
    model = VAR(VARConfig(depth=depth, embed_dim=16 * heads, num_heads=heads, num_classes=num_classes, vocab_size=16,
                          z_channels=8, patch_nums=tuple(patch_nums)))
    with torch.no_grad():  # non-trivial attention temperatures and AdaLN gates
        for block in model.blocks:
            block.ada_lin[1].weight.normal_(0, 0.2)
            block.attn.q_bias.normal_(0, 0.5)
    tokenizer = MultiScaleVQVAE(TokenizerConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                                using_sa=False, using_mid_sa=False, patch_nums=tuple(patch_nums)))
    return model.eval(), tokenizer.eval()


# ------------------------------------------------------------------------------------ caches
class _Case:
    """One drawn generation: an engine over a tiny model of ``family``, labels and guidance."""

    def __init__(self, family: str, data, *, heads: int | None = None, seed: int | None = None) -> None:
        draw = data.draw
        self.family = family
        self.seed = draw(st.integers(0, 5), label="seed") if seed is None else seed
        heads = draw(st.sampled_from([1, 2]), label="heads") if heads is None else heads
        batch = draw(st.integers(1, 2), label="batch")
        self.cfg = draw(st.sampled_from([1.0, 4.0]), label="cfg")
        if family == "next-token":
            grid = (draw(st.integers(1, 3), label="height"), draw(st.integers(1, 4), label="width"))
            prefix = draw(st.sampled_from([1, 2]), label="cls_token_num")
            model = tiny_raster_model(grid, prefix, self.seed, heads=heads, width=16 * heads)
            self.engine = RasterEngine(model, None, RasterTrajectory(), FullCache(), selector_for("sdpa"),
                                       pattern=CausalPattern())
            self.layers, self.heads, self.head_dim = len(model.layers), heads, model.config.head_dim
            self.prefix, num_classes = prefix, model.num_classes
        else:
            sides = draw(st.lists(st.integers(1, 4), min_size=2, max_size=4, unique=True), label="patch_nums")
            model, tokenizer = tiny_next_scale_model(tuple(sorted(sides)), self.seed, heads=heads)
            self.engine = NextScaleEngine(model, tokenizer, FullTrajectory(), DensePattern(), FullCache(),
                                          selector_for("sdpa"))
            self.layers, self.heads, self.head_dim = len(model.blocks), heads, model.blocks[0].attn.head_dim
            self.prefix, num_classes = model.layout.scales[0].numel, model.num_classes
        self.layout = self.engine.layout
        self.rows = batch * (2 if self.engine.model.guided(self.cfg) else 1)
        self.labels = torch.randint(0, num_classes, (batch,), generator=torch.Generator().manual_seed(self.seed))

    def run(self, cache: CachePolicy, forced=None, progress=None):
        return self.engine.generate(self.labels, cache, cfg=self.cfg, top_k=1, top_p=1.0, forced_tokens=forced,
                                    return_logits=True, progress=progress)

    def describe(self) -> str:
        return (f"{self.family} model, layout {self.layout.grids}, {self.heads} head(s), {self.rows} row(s), "
                f"cfg {self.cfg}, seed {self.seed}")


def _logits(output) -> list[torch.Tensor]:
    return output.logits if isinstance(output.logits, list) else [output.logits]


def _tokens(output) -> list[torch.Tensor]:
    return output.tokens if isinstance(output.tokens, list) else [output.tokens]


def _trajectory_of(family: str):
    return (RasterTrajectory(), CausalPattern()) if family == "next-token" else (FullTrajectory(), DensePattern())


def _check_cache_traits(cache: CachePolicy) -> tuple[str, ...]:
    name = _name(cache)
    families = tuple(getattr(cache, "families", ()))
    _check(bool(families) and set(families) <= set(FAMILIES),
           f"cache '{name}' declares families {families!r}: give a non-empty subset of {FAMILIES}")
    for trait in ("stores_history", "stand_in_spans", "track_scores"):
        _check(isinstance(getattr(cache, trait, None), bool), f"cache '{name}' must declare the bool trait '{trait}'")
    for family in FAMILIES:
        trajectory, pattern = _trajectory_of(family)
        try:
            check_compatible(trajectory, pattern, cache)
            accepted = True
        except IncompatibleComponentsError:
            accepted = False
        _check(accepted == (family in families),
               f"cache '{name}' declares families {families!r} but check_compatible "
               f"{'accepts' if accepted else 'refuses'} it under trajectory '{trajectory.name}' ({family})")
    if cache.stand_in_spans:
        try:
            check_compatible(MarkovTrajectory(), DensePattern(), cache)
        except IncompatibleComponentsError:
            pass
        else:
            raise AssertionError(f"cache '{name}' has stand-in spans but check_compatible accepts it under trajectory "
                                 f"'markov', which hides earlier keys")
    return families


class _Recorder:
    """Wraps a cache's ``update`` to record the keys it returns and checks each step's storage."""

    def __init__(self, cache: CachePolicy, case: _Case, budget: int | None, name: str) -> None:
        self.cache, self.case, self.budget, self.name = cache, case, budget, name
        self.largest_step = 0
        self.seen = 0
        original = cache.update

        def update(layer, k, v, spans):
            count = spans_length(spans)
            if layer == 0:
                self.largest_step = max(self.largest_step, count)
                self.seen += count
            k_all, v_all, k_spans = original(layer, k, v, spans)
            _check(k_all.shape[2] == v_all.shape[2] == spans_length(k_spans),
                   f"cache '{name}' returned {k_all.shape[2]} keys, {v_all.shape[2]} values and spans of "
                   f"{spans_length(k_spans)} positions at layer {layer} ({case.describe()})")
            _check(k_all.shape[2] <= min(self.seen, self.slots()),
                   f"cache '{name}' returned {k_all.shape[2]} keys at layer {layer} after {self.seen} tokens "
                   f"were fed, more than its budget of {self.budget} tokens allows ({self.slots()}; {case.describe()})")
            return k_all, v_all, k_spans

        cache.update = update

    def slots(self) -> int:
        """Token slots a layer may hold now: the budget, or ``budget - 1`` kept tokens plus the largest
        step (a next-scale scale), never more than the sequence."""
        length = self.case.layout.length
        if self.budget is None:
            return length
        return min(length, max(self.budget, self.budget - 1 + self.largest_step))

    def step_done(self, step: int) -> None:
        c = self.case
        itemsize = torch.empty((), dtype=c.engine.model.dtype).element_size()
        bound = c.layers * c.rows * c.heads * self.slots() * (2 * c.head_dim * itemsize + BOOKKEEPING_BYTES)
        used = self.cache.nbytes()
        _check(used <= bound,
               f"cache '{self.name}' holds {used} bytes after step {step}, more than its budget of {self.budget} "
               f"tokens allows ({self.slots()} slots x {c.layers} layers x {c.rows} rows x {c.heads} heads = "
               f"{bound} bytes; {c.describe()})")


def check_cache_policy(make_cache: MakeCache, *, families: str | Sequence[str] | None = None, bounded: bool = True,
                       lossy: Sequence[object] = (), max_examples: int = 10, shrink: bool = True) -> None:
    """Check a cache policy's contract; raise :class:`AssertionError` on the first violation.

    ``make_cache(budget, num_layers, num_heads)`` builds a fresh cache that stores at most
    ``budget`` tokens per layer (an int count, always more than the class prefix), or keeps every
    token when ``budget`` is None. ``families``: those to run (default: every family the cache
    declares). ``bounded=False``: the cache takes no token budget (``full``, ``none``, a policy set by
    a share); its storage is then checked against the whole sequence. ``lossy``: settings of such a
    cache that drop tokens, passed as ``make_cache``'s ``budget`` to check 4 (a budgeted cache is
    checked there at drawn budgets).

    Verified, over hypothesis-drawn tiny random models of each family (raster GPT under ``raster``
    with ``causal``; VAR under ``full`` with ``dense``), batches, heads, guidance and budgets:

    1. traits: ``families`` is a non-empty subset of :data:`FAMILIES` and
       ``check_compatible`` accepts exactly those; ``stores_history``, ``stand_in_spans`` and
       ``track_scores`` are bools; a cache with stand-in spans is refused under ``markov``;
    2. a covering budget equals ``full``: the same logits under the ``full`` cache's greedy tokens
       (forced), and the same greedy tokens;
    3. storage never exceeds the budget: after every step ``nbytes()`` is at most
       ``slots * layers * rows * heads * (2 * head_dim * itemsize + BOOKKEEPING_BYTES)`` (float32 models) and each
       ``update`` returns at most ``slots`` keys, where ``slots`` is the budget (a next-scale step of
       ``l`` tokens may grow it to ``budget - 1 + l``), never more than the sequence length;
    4. at every budget (lossy ones too), driven with synthetic keys and queries: the spans ``update``
       returns name the positions of the keys it returns, for every row and head (unless the cache
       declares ``stand_in_spans``: then every kept key precedes the new tokens), and each sample
       keeps the same positions in a batch as alone (no score coupled across the batch).
    """
    declared = _check_cache_traits(make_cache(None, 2, 2))
    wanted = declared if families is None else ((families,) if isinstance(families, str) else tuple(families))
    for family in wanted:
        _check(family in declared, f"cache '{_name(make_cache(None, 2, 2))}' does not declare family {family!r}")
        _check_covering(make_cache, family, max_examples, shrink)
        _check_bounded(make_cache, family, bounded, max_examples, shrink)
        _check_kept_positions(make_cache, family, bounded, 3 * max_examples, shrink, lossy)


def _check_covering(make_cache: MakeCache, family: str, max_examples: int, shrink: bool) -> None:
    @_settings(max_examples, shrink)
    @given(data=st.data())
    def covering(data):
        case = _Case(family, data)
        full = case.run(FullCache())
        cache = make_cache(None, case.layers, case.heads)
        name = _name(cache)
        forced = case.run(cache, forced=full.tokens)
        for step, (got, want) in enumerate(zip(_logits(forced), _logits(full))):
            if not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
                error = float((got - want).abs().max())
                raise AssertionError(f"cache '{name}' with a covering budget changes the logits of step {step} "
                                     f"(max |error| {error:.3g}) against 'full' under forced tokens ({case.describe()})")
        greedy = case.run(make_cache(None, case.layers, case.heads))
        for step, (got, want) in enumerate(zip(_tokens(greedy), _tokens(full))):
            _check(torch.equal(got, want), f"cache '{name}' with a covering budget samples other greedy tokens than "
                                           f"'full' at step {step} ({case.describe()})")

    covering()


def _check_bounded(make_cache: MakeCache, family: str, bounded: bool, max_examples: int, shrink: bool) -> None:
    @_settings(max_examples, shrink)
    @given(data=st.data())
    def bounds(data):
        case = _Case(family, data)
        length = case.layout.length
        budget = data.draw(st.integers(case.prefix + 1, length + 2), label="budget") if bounded else None
        cache = make_cache(budget, case.layers, case.heads)
        recorder = _Recorder(cache, case, budget, _name(cache))
        case.run(cache, progress=recorder.step_done)

    bounds()


@st.composite
def _drives(draw, family: str, bounded: bool, settings: Sequence[object] = ()):
    """A synthetic generation for :func:`_drive`: the layout and its steps' spans (raster: the
    class prefix, then one token a step; next-scale: a scale a step), the batch, heads, layers,
    guidance, the budget (lossy ones included) and the seed of the keys and queries."""
    if family == "next-token":
        prefix = draw(st.integers(1, 2), label="prefix")
        layout = SequenceLayout(((1, prefix), (draw(st.integers(1, 3), label="h"), draw(st.integers(1, 4), label="w"))))
        steps = [((0, prefix),)] + [((p, p + 1),) for p in range(prefix, layout.length)]
    else:
        sides = draw(st.lists(st.integers(1, 4), min_size=2, max_size=4, unique=True), label="patch_nums")
        layout = SequenceLayout.from_patch_nums(tuple(sorted(sides)))
        steps = [layout.spans_of([s]) for s in range(layout.num_scales)]
    prefix = layout.scales[0].numel
    if settings:
        budget = draw(st.sampled_from(list(settings)), label="setting")
    else:
        budget = draw(st.integers(prefix + 1, layout.length + 1), label="budget") if bounded else None
    return {"layout": layout, "steps": steps, "batch": draw(st.integers(2, 3), label="batch"),
            "heads": draw(st.integers(1, 2), label="heads"), "layers": draw(st.integers(1, 2), label="layers"),
            "guided": draw(st.booleans(), label="guided"), "budget": budget, "seed": draw(st.integers(0, 9), label="seed")}


def _drive(cache: CachePolicy, case: dict, samples: Sequence[int]) -> list[torch.Tensor]:
    """Run ``cache`` through ``case``'s steps for ``samples`` (rows ``[cond; uncond]`` when guided) with
    keys and queries drawn per (sample, row half, layer, position), values that spell each key's
    position, and a ``Dense`` spec; returns, per step and layer, the positions of the keys
    ``update`` returned, ``LongTensor[rows, heads, n]``. Checks each step's spans against them."""
    layout, heads, dim, name = case["layout"], case["heads"], 4, _name(cache)
    halves = 2 if case["guided"] else 1
    tables = [torch.randn(2, halves, case["layers"], layout.length, heads, dim,
                          generator=torch.Generator().manual_seed(case["seed"] * 1000 + sample)) for sample in samples]
    cache.begin(num_layers=case["layers"], batch=len(samples) * halves, num_heads=heads, head_dim=dim, layout=layout,
                device=torch.device("cpu"), dtype=torch.float32, guided=case["guided"])
    kept: list[torch.Tensor] = []
    for spans in case["steps"]:
        positions = spans_to_positions(spans)
        for layer in range(case["layers"]):
            def rows(which: int) -> torch.Tensor:  # [rows, heads, l, dim]: the cond rows, then the uncond rows
                return torch.cat([t[which, half, layer, positions].transpose(0, 1)[None]
                                  for half in range(halves) for t in tables])
            v = positions.float()[None, None, :, None].expand(len(samples) * halves, heads, -1, dim)
            k_all, v_all, k_spans = cache.update(layer, rows(0), v.contiguous(), spans)
            held = v_all[..., 0].round().long()
            where = f"step at {spans}, layer {layer}, {len(samples)} sample(s), budget {case['budget']}, layout {layout.grids}"
            if cache.stand_in_spans:  # any slot order; the new tokens among the keys, every other key before them
                new = torch.isin(held, positions)
                _check(held.shape[-1] == spans_length(k_spans) and bool((new.sum(-1) == len(positions)).all())
                       and bool((held[~new] < positions.min()).all()),
                       f"cache '{name}' has stand-in spans but returned keys that are not the new tokens and earlier "
                       f"ones ({where})")
            else:
                said = spans_to_positions(k_spans)
                _check(held.shape[-1] == said.numel() and bool((held == said).all()),
                       f"cache '{name}' returned keys at positions {held[0, 0].tolist()} (row 0, head 0) but spans "
                       f"{k_spans}: a cache whose kept positions differ per row or per head must declare "
                       f"stand_in_spans = True ({where})")
            cache.observe(layer, rows(1), k_all, Dense(), dim ** -0.5)
            kept.append(held)
        cache.end_step()
    return kept


def _check_kept_positions(make_cache: MakeCache, family: str, bounded: bool, max_examples: int, shrink: bool,
                          settings: Sequence[object] = ()) -> None:
    """At lossy budgets (or ``settings``) too: the spans a cache returns name the keys it returns
    (unless it declares ``stand_in_spans``), and each sample keeps the positions it keeps alone,
    whatever else is in the batch (a score summed over the batch fails here)."""
    @_settings(max_examples, shrink)
    @given(case=_drives(family, bounded, settings))
    def kept(case):
        name = _name(make_cache(case["budget"], case["layers"], case["heads"]))
        together = _drive(make_cache(case["budget"], case["layers"], case["heads"]), case, range(case["batch"]))
        batch, halves = case["batch"], 2 if case["guided"] else 1
        for sample in range(batch):
            alone = _drive(make_cache(case["budget"], case["layers"], case["heads"]), case, [sample])
            for index, (got, own) in enumerate(zip(together, alone)):
                rows = [half * batch + sample for half in range(halves)]
                if not torch.equal(got[rows], own):
                    raise AssertionError(
                        f"cache '{name}' keeps other positions for sample {sample} in a batch of {batch} than alone "
                        f"(step/layer {index}, budget {case['budget']}, layout {case['layout'].grids}): a sample's "
                        f"kept positions must depend on its own rows only (no score summed over the batch)")

    kept()


# ------------------------------------------------------------------------------------ patterns
def _full_mask(spec: AttentionSpec, q_len: int, kv_len: int) -> torch.Tensor:
    mask = spec.mask(q_len, kv_len, "cpu")
    return torch.ones(q_len, kv_len, dtype=torch.bool) if mask is None else mask.bool().cpu()


def _same_spec(a: AttentionSpec, b: AttentionSpec, q_len: int, kv_len: int) -> bool:
    if type(a) is not type(b) or a.describe() != b.describe():
        return False
    return a == b or torch.equal(_full_mask(a, q_len, kv_len), _full_mask(b, q_len, kv_len))


@st.composite
def _raster_cases(draw, mode: str):
    """(layout, queries, keys, Visibility) as the engine asks a next-token pattern: the prefill, a
    decode step over every earlier token, a step over kept keys (a cache's selection, in slot
    order), or a whole teacher-forced sequence."""
    h, w, prefix = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    layout = SequenceLayout(((1, prefix), (h, w)))
    length = layout.length
    if mode == "prefill":
        queries = keys = ((0, prefix),)
    elif mode == "teacher":
        queries = keys = ((0, draw(st.integers(1, length))),)
    else:
        p = draw(st.integers(prefix, length - 1)) if length > prefix else prefix - 1
        queries = ((p, p + 1),)
        if mode == "step":
            keys = ((0, p + 1),)
        else:
            earlier = draw(st.lists(st.integers(prefix, max(prefix, p - 1)), unique=True, max_size=8)) if p > prefix else []
            history = list(range(prefix)) + [q for q in earlier if q < p]
            history = draw(st.permutations(history))  # slot order: any order, the query last
            positions = [*history, p]
            keys = tuple((q, q + 1) for q in positions)
    return layout, queries, keys, Visibility(RasterTrajectory())


@st.composite
def _next_scale_cases(draw, mode: str):
    """(layout, queries, keys, Visibility) over multi-scale layouts under ``full`` and ``markov``: a
    cached step, a whole teacher-forced sequence, or scale subsets (the keys include the queries)."""
    grids = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=5))
    layout = SequenceLayout.from_patch_nums(grids)
    n = layout.num_scales
    if mode == "step":
        s = draw(st.integers(0, n - 1))
        queries, keys = layout.spans_of([s]), layout.spans_of(range(s + 1))
    elif mode == "teacher":
        queries = keys = layout.spans_of(range(n))
    else:
        q_scales = draw(st.sets(st.integers(0, n - 1), min_size=1))
        k_scales = draw(st.sets(st.integers(0, n - 1))) | q_scales
        queries, keys = layout.spans_of(q_scales), layout.spans_of(k_scales)
    trajectory = draw(st.sampled_from([FullTrajectory(), MarkovTrajectory(), MarkovTrajectory(MarkovOptions(order=2))]))
    return layout, queries, keys, Visibility(trajectory)


def _check_pattern_case(pattern: AttentionPattern, layout, queries, keys, visible) -> None:
    name = _name(pattern)
    where = f"queries {queries} over keys {keys} of layout {layout.grids} under '{visible.trajectory.name}'"
    spec = pattern.spec(layout, queries, keys, visible)
    _check(isinstance(spec, AttentionSpec), f"pattern '{name}' returned {spec!r}, not an AttentionSpec, for {where}")
    q_len, kv_len = spans_length(queries), spans_length(keys)
    again = pattern.spec(layout, tuple(tuple(s) for s in queries), tuple(tuple(s) for s in keys), visible)
    _check(_same_spec(spec, again, q_len, kv_len),
           f"pattern '{name}' is not pure: {spec.describe()} then {again.describe()} for {where}")
    problem = spec.check_lengths(q_len, kv_len)
    _check(problem is None, f"pattern '{name}' returned {spec.describe()}, undefined for {where}: {problem}")
    mask = _full_mask(spec, q_len, kv_len)
    _check(tuple(mask.shape) == (q_len, kv_len),
           f"pattern '{name}': {spec.describe()}.mask() has shape {tuple(mask.shape)}, not ({q_len}, {kv_len}), for {where}")
    _check(bool(mask.any(dim=1).all()), f"pattern '{name}': a query sees no key under {spec.describe()} for {where}")
    shown = visible_positions(layout, queries, keys, visible).bool().cpu()
    leaks = mask & ~shown
    if bool(leaks.any()):
        qi, ki = (int(x) for x in leaks.nonzero()[0])
        q_pos, k_pos = spans_to_positions(queries), spans_to_positions(keys)
        raise AssertionError(f"pattern '{name}' lets the query at position {int(q_pos[qi])} see the key at position "
                             f"{int(k_pos[ki])}, which the trajectory hides ({spec.describe()}, {where})")
    if getattr(pattern, "sees_every_visible_key", False):
        _check(torch.equal(mask, shown), f"pattern '{name}' declares sees_every_visible_key but {spec.describe()} "
                                         f"hides a visible key for {where}")
    mod = spec.mask_mod(q_len, kv_len, "cpu")
    zero = torch.zeros((), dtype=torch.long)
    q_idx, kv_idx = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
    by_mod = torch.as_tensor(mod(zero, zero, q_idx, kv_idx)).bool().expand(q_len, kv_len)
    _check(torch.equal(by_mod, mask), f"pattern '{name}': {spec.describe()}.mask_mod() disagrees with its mask() "
                                      f"for {where}")
    pairs = spec.pair_count(q_len, kv_len)
    _check(pairs == int(mask.sum()), f"pattern '{name}': {spec.describe()}.pair_count() is {pairs}, its mask allows "
                                     f"{int(mask.sum())} pairs, for {where}")


def check_attention_pattern(pattern: AttentionPattern, *, families: str | Sequence[str] | None = None,
                            max_examples: int = 60, shrink: bool = True) -> None:
    """Check an attention pattern's contract; raise :class:`AssertionError` on the first violation.

    ``families``: those to run (default: every family the pattern declares). Over hypothesis-drawn
    layouts and query/key spans as the engine asks them (next-token: the ``raster`` trajectory's
    prefill, decode steps over all or over kept keys in any slot order, teacher forcing;
    next-scale: cached steps, teacher forcing and scale subsets under ``full`` and ``markov``
    orders 1 and 2), verified: ``families`` is a non-empty subset of :data:`FAMILIES`; ``spec`` is
    pure (equal inputs give an equal spec) and its lengths check passes; every query sees at least
    one key; no query sees a key the trajectory hides (:func:`~mvar_engine.visible_positions`); with
    ``sees_every_visible_key`` it hides none either; ``mask_mod()`` and ``pair_count()`` agree with
    ``mask()``.
    """
    name = _name(pattern)
    declared = tuple(getattr(pattern, "families", ()))
    _check(bool(declared) and set(declared) <= set(FAMILIES),
           f"pattern '{name}' declares families {declared!r}: give a non-empty subset of {FAMILIES}")
    _check(isinstance(getattr(pattern, "sees_every_visible_key", None), bool),
           f"pattern '{name}' must declare the bool trait 'sees_every_visible_key'")
    wanted = declared if families is None else ((families,) if isinstance(families, str) else tuple(families))
    for family in wanted:
        _check(family in declared, f"pattern '{name}' does not declare family {family!r}")
        modes = ("prefill", "step", "kept", "teacher") if family == "next-token" else ("step", "teacher", "subsets")
        for mode in modes:
            cases = _raster_cases(mode) if family == "next-token" else _next_scale_cases(mode)

            @_settings(max(1, max_examples // len(modes)), shrink)
            @given(case=cases)
            def run(case):
                _check_pattern_case(pattern, *case)

            run()


# ------------------------------------------------------------------------------------ backends
@dataclass
class BackendReport:
    """What :func:`check_attention_backend` ran: ``compared`` cases equal to the reference per spec
    kind, ``refused`` cases with the reasons ``supports`` gave."""

    compared: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


@st.composite
def _random_mask(draw, q_len: int, kv_len: int) -> torch.Tensor:
    seed, density = draw(st.integers(0, 2**16)), draw(st.sampled_from([0.1, 0.5, 0.9]))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(q_len, kv_len, generator=g) < density
    mask[torch.arange(q_len), torch.randint(0, kv_len, (q_len,), generator=g)] = True  # every query sees a key
    return mask


@st.composite
def attention_specs(draw, kinds: Iterable[str] | None = None, max_len: int = 40, max_side: int = 12):
    """``(spec, q_len, kv_len)`` of one of ``kinds`` (default: every built-in kind); neighbourhoods
    have a kernel that fits the map half of the time (NATTEN's domain)."""
    kinds = tuple(kinds) if kinds is not None else SPEC_KINDS
    kind = draw(st.sampled_from(kinds))
    if kind in ("dense", "causal", "window1d"):
        kv_len = draw(st.integers(1, max_len))
        q_len = draw(st.integers(1, max_len if kind == "dense" else kv_len))
        if kind == "dense":
            return Dense(), q_len, kv_len
        if kind == "causal":
            return Causal(), q_len, kv_len
        return SlidingWindow1D(draw(st.integers(0, 12)), draw(st.integers(0, 3))), q_len, kv_len
    if kind in ("block-causal", "block-diagonal"):
        blocks = tuple(draw(st.lists(st.integers(1, 10), min_size=1, max_size=5)))
        return (BlockCausal(blocks) if kind == "block-causal" else BlockDiagonal(blocks)), sum(blocks), sum(blocks)
    if kind == "neighborhood2d":
        k, d = draw(st.integers(1, 7)), draw(st.integers(1, 2))
        low = k * d if draw(st.booleans()) else 1
        h, w = draw(st.integers(low, max(max_side, low))), draw(st.integers(low, max(max_side, low)))
        return Neighborhood2D(h, w, k, d, draw(st.booleans())), h * w, h * w
    q_len, kv_len = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    return Masked(draw(_random_mask(q_len, kv_len)), "random"), q_len, kv_len


def check_attention_backend(backend: AttentionBackend, *, device: str | torch.device = "cpu",
                            dtypes: Sequence[torch.dtype] = (torch.float32,), head_dims: Sequence[int] = (8, 16, 32),
                            kinds: Iterable[str] | None = None, own_kinds: Mapping[str, st.SearchStrategy] | None = None,
                            max_examples: int = 40, shrink: bool = True) -> BackendReport:
    """Check an attention backend's contract; raise :class:`AssertionError` on the first violation.

    Over hypothesis-drawn specs of every kind (``kinds``; default: those the backend declares, all
    when it declares None), lengths, batches, heads, ``head_dims`` and ``dtypes`` on ``device``:
    ``supports`` answers without raising; when it refuses, the reason is a non-empty single line
    (recorded in the report); when it accepts, ``attend`` runs, returns ``[B, H, Lq, Dv]`` in the
    input dtype, leaves its inputs unchanged and equals the float64 reference
    (``backends/reference.py``) within :data:`TOLERANCE` of the dtype. Returns a
    :class:`BackendReport`; a backend that refuses every case is reported, not failed (assert on
    ``report.compared`` to require support). ``own_kinds``: spec kinds a plugin defines, each with a
    hypothesis strategy of ``(spec, q_len, kv_len)`` (the reference computes them through ``mask()``).
    """
    name, device = _name(backend), torch.device(device)
    declared = backend.capabilities.kinds
    kinds = tuple(kinds) if kinds is not None else tuple(k for k in SPEC_KINDS if declared is None or k in declared)
    own = dict(own_kinds or {})
    kinds += tuple(kind for kind in own if kind not in kinds)
    reference = ReferenceBackend()
    report = BackendReport()

    def one(case, batch, heads, head_dim, dtype, seed):
        spec, q_len, kv_len = case
        where = f"{spec.describe()} with {q_len} queries x {kv_len} keys, B={batch} H={heads} D={head_dim}, {dtype}"
        try:
            reason = backend.supports(spec, device=device, dtype=dtype, head_dim=head_dim)
        except Exception as error:  # noqa: BLE001 - the contract is to answer, not raise
            raise AssertionError(f"backend '{name}'.supports raised {type(error).__name__}: {error} for {where}") from error
        if reason is not None:
            _check(isinstance(reason, str) and reason.strip() != "" and "\n" not in reason,
                   f"backend '{name}' refused {where} without a one-line reason: {reason!r}")
            report.refused.setdefault(spec.kind, reason)
            return
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(batch, heads, q_len, head_dim, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(batch, heads, kv_len, head_dim, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(batch, heads, kv_len, head_dim, generator=g).to(device=device, dtype=dtype)
        originals = [t.clone() for t in (q, k, v)]
        scale = head_dim ** -0.5
        try:
            with torch.no_grad():
                got = backend.attend(q, k, v, spec, scale=scale)
        except Exception as error:  # noqa: BLE001
            raise AssertionError(f"backend '{name}' accepted {where} (supports returned None) but attend raised "
                                 f"{type(error).__name__}: {error}") from error
        for tensor, original, label in zip((q, k, v), originals, "qkv"):
            _check(torch.equal(tensor, original), f"backend '{name}' modified its input {label} for {where}")
        _check(tuple(got.shape) == (batch, heads, q_len, head_dim) and got.dtype == dtype,
               f"backend '{name}' returned {tuple(got.shape)} {got.dtype}, not {(batch, heads, q_len, head_dim)} "
               f"{dtype}, for {where}")
        want = reference.attend(q.double(), k.double(), v.double(), spec, scale=scale)
        tol = TOLERANCE.get(dtype, 1e-2)
        error = float((got.double() - want).abs().max())
        _check(bool(torch.allclose(got.double(), want, atol=tol, rtol=tol)),
               f"backend '{name}' differs from the float64 reference by {error:.3g} (tolerance {tol:g}) for {where}")
        report.compared[spec.kind] = report.compared.get(spec.kind, 0) + 1

    for kind in kinds:  # every kind gets its share of the examples
        @_settings(max(1, max_examples // len(kinds)), shrink)
        @given(case=own[kind] if kind in own else attention_specs((kind,)), batch=st.integers(1, 2), heads=st.integers(1, 3),
               head_dim=st.sampled_from(list(head_dims)), dtype=st.sampled_from(list(dtypes)), seed=st.integers(0, 1000))
        def run(case, batch, heads, head_dim, dtype, seed):
            one(case, batch, heads, head_dim, dtype, seed)

        run()
    return report
