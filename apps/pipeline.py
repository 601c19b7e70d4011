"""From an :class:`EngineConfig` to images on disk: resolve components, build or load the models,
generate in batches, decode, write the grid (and per-image PNGs and tokens).

Python API::

    import mvar_engine
    pipe = mvar_engine.Pipeline.from_pretrained("digits-mvar")          # or a local file / model folder
    out = pipe(labels=[1, 7], images_per_label=4, seed=0)               # out.images: PIL images
    pipe.to("cuda", "bfloat16")

    from mvar_engine.apps.config import EngineConfig                    # every setting the CLI has
    pipe = mvar_engine.Pipeline.from_config(EngineConfig(trajectory="markov", model={"checkpoint": ..., "tokenizer": ...}))
    result = pipe.generate(labels=[1, 7], samples_per_label=4)          # result.images: [N, 3, H, W] in [0, 1]
    pipe.save(result, "grid.png")
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.adapter import ModelFacts, ModelFamily
from ..core.backend_selection import BackendSelector, selector_for
from ..core.cache import CachePolicy
from ..core.compatibility import check_compatible
from ..core.compiled_decoding import compile_problem
from ..core.engine import Engine
from ..core.errors import IncompatibleComponentsError, MvarEngineError, UsageError, setting
from ..core.files import WRITTEN_BY, atomic_write, writer
from ..core.records import KIND_LABELS
from ..core.registry import Registry, get_registry, normalize_name
from ..models.checkpoint import save_state_dict
from ..models.default_models import available_defaults, default_checkpoints, weights_metadata
from .cli_helpers import PROG
from .config import ComponentChoice, EngineConfig, ModelChoice, SamplingConfig
from .cpu_features import native_bf16
from .images import save_grid, save_images, to_uint8
from .memory_fit import FLOAT32_BYTES, available_bytes, format_bytes
from .model_options import CheckpointModelOptions
from .pretrained import pretrained_config
from .seeding import image_generators, numbered
from .model_loading import build_models, infer_tokenizer_config, load_raster, load_tokenizer, load_var, save_var

__all__ = ["Components", "GenerationResult", "Pipeline", "PipelineOutput", "MODEL_NAMES", "available_devices", "build_models",
           "check_model_facts", "choose_model", "model_family", "infer_tokenizer_config", "load_raster", "load_tokenizer", "load_var",
           "recommended_choices", "resolve_autocast", "resolve_components", "resolve_device", "save_tokens",
           "save_var", "with_weights"]


@dataclass
class Components:
    """The resolved components and the names they were chosen by."""

    names: dict[str, str]
    trajectory: object
    pattern: object
    cache: object
    backends: BackendSelector
    model: ModelFamily | None = None


def resolve_components(config: EngineConfig, registry: Registry | None = None) -> Components:
    """Names -> validated, compatible component instances (errors are one line each)."""
    registry = registry or get_registry()
    trajectory = registry.create("trajectory", config.trajectory.name, config.trajectory.options)
    attention = config.attention or _default_choice(trajectory.default_attention)
    cache_choice = config.cache or _default_choice(trajectory.default_cache)
    names = {"trajectory": registry.get("trajectory", config.trajectory.name).name,
             "attention": registry.get("attention", attention.name).name,
             "cache": registry.get("cache", cache_choice.name).name}
    if trajectory.family not in ("next-scale", "next-token"):
        raise IncompatibleComponentsError(f"trajectory '{names['trajectory']}' is a {trajectory.family} trajectory; "
                                          f"this command runs next-scale and next-token models")
    pattern = registry.create("attention", attention.name, attention.options)
    names["model"] = choose_model(config.model, trajectory.family, registry)
    model = registry.create("model", names["model"], config.model.options)
    cache = registry.create("cache", cache_choice.name, cache_choice.options)
    check_compatible(trajectory, pattern, cache, model_family=model.family, names=names)
    for kind, component in (("attention", pattern), ("cache", cache), ("model", model)):
        availability = registry.get(kind, names[kind]).availability
        if not availability.ok:
            raise UsageError(f"{KIND_LABELS[kind]} '{names[kind]}' is unavailable: {availability.reason}")
    names["backend"] = config.backend.name
    return Components(names, trajectory, pattern, cache, build_backends(config, registry), model)


MODEL_NAMES = {"var": ("var", "full"), "mvar": ("var", "markov"), "llamagen": ("raster-gpt", "raster"),
               "janus": ("janus", "raster")}
"""Model names a run may give (``--model mvar``, ``model={"name": "llamagen"}``) -> (the registered
family, the trajectory it runs on by default); any other name is a registered family
(``raster-gpt``, a plugin's), on its family's default trajectory."""


def model_family(name: str, registry: Registry) -> tuple[str, str]:
    """A model name -> (registered family, default trajectory); one-line error naming the known ones."""
    if not name.strip():
        raise UsageError(f"{setting('model')} is empty: give one of {', '.join(MODEL_NAMES)} or a family "
                         f"('{PROG} plugins --kind model')")
    if normalize_name(name) in MODEL_NAMES:
        return MODEL_NAMES[normalize_name(name)]
    entry = registry.get("model", name)  # unknown: one line listing the registered families
    return entry.name, "raster" if entry.record.family == "next-token" else "markov"


def accepts(record: Any, given: set[str]) -> bool:
    """Does a model family's options model take every option in ``given`` and need no other?"""
    fields = record.options.model_fields
    return given <= set(fields) and all(name in given for name, info in fields.items() if info.is_required())


def choose_model(choice: ModelChoice, family: str, registry: Registry) -> str:
    """The model family a run uses: the one it names (:data:`MODEL_NAMES` or a registered family);
    else, of the families serving the trajectory's ``family`` (in name order), the first
    whose options :func:`accepts` the model options given (``model_dir`` and ``prompt``: Janus)."""
    if choice.name:
        return model_family(choice.name, registry)[0]
    serving = [entry for entry in registry.components("model") if getattr(entry.record, "family", None) == family]
    if not serving:
        raise IncompatibleComponentsError(f"no installed model adapter generates {family} sequences "
                                          f"(see '{PROG} plugins --kind model')")
    given = set(choice.options)
    fitting = [entry for entry in serving if accepts(entry.record, given)]
    if fitting:
        return fitting[0].name
    takers = [entry for entry in registry.components("model") if given <= set(entry.record.options.model_fields)]
    if not takers:  # no family knows them: the first serving family's options say what is wrong
        return serving[0].name
    taker = takers[0]
    raise UsageError(f"no {family} model family takes {', '.join(setting(name) for name in sorted(given))} (model "
                     f"'{taker.name}' takes them: it generates {taker.record.family} sequences (give "
                     f"{setting('model', taker.name)} and a {taker.record.family} trajectory))")


def build_backends(config: EngineConfig, registry: Registry) -> BackendSelector:
    return selector_for(config.backend.name, config.backend.options, registry)


def _default_choice(name: str) -> ComponentChoice:
    return ComponentChoice(name=name)


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``--dtype`` -> torch dtype."""


def available_devices() -> list[str]:
    """The ``--device`` values this machine can run: auto, cpu, cuda and cuda:N per GPU, mps."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str) -> torch.device:
    """``--device`` -> a torch device; a device this machine lacks (or a name torch does not know)
    is a one-line ``UsageError`` listing the available ones."""
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = available_devices()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"{setting('device', repr(name))}: not a device name (available here: {', '.join(have)})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{setting('device', name)}: no CUDA device is available (available here: {', '.join(have)}; "
                         f"use {setting('device', 'cpu')})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{setting('device', name)}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(available here: {', '.join(have)})")
    if device.type == "cpu" and device.index not in (None, 0):
        raise UsageError(f"{setting('device', name)}: use {setting('device', 'cpu')} (available here: {', '.join(have)})")
    if device.type not in ("cpu", "cuda") and device.type not in have:
        raise UsageError(f"{setting('device', name)}: unavailable on this machine (available here: {', '.join(have)})")
    return device


def autocast_problem(dtype: str, device: torch.device) -> str | None:
    """Why ``dtype`` cannot autocast on ``device`` (one line naming the fix, its settings marked by
    :func:`~mvar_engine.core.errors.setting` for an error to word), or None: 16-bit runs on CUDA, and
    bfloat16 also on a CPU with native bf16 (:func:`cpu_features.native_bf16`)."""
    if dtype == "float32" or device.type == "cuda":
        return None
    if device.type == "cpu" and dtype == "bfloat16":
        supported, why = native_bf16()
        return None if supported else (f"{setting('dtype', 'bfloat16')} on the CPU needs native bf16 and {why}; use "
                                       f"{setting('dtype', 'float32')}")
    if device.type == "cpu":
        return (f"{setting('dtype', dtype)} autocast runs on CUDA only (the CPU takes {setting('dtype', 'bfloat16')} "
                f"where it has native bf16)")
    return (f"{setting('dtype', dtype)} (autocast) is supported on CUDA and the CPU only; use "
            f"{setting('dtype', 'float32')} on {device.type}")


def resolve_autocast(dtype: str, device: torch.device) -> torch.dtype | None:
    """``--dtype`` -> the autocast dtype on ``device`` (None: float32, no autocast); a combination the
    device cannot run is a one-line :class:`UsageError` (:func:`autocast_problem`). Logits and
    sampling stay in float32 either way (the engine casts them)."""
    problem = autocast_problem(dtype, device)
    if problem is not None:
        raise UsageError(problem)
    return None if dtype == "float32" else TORCH_DTYPES[dtype]


def check_labels(labels: Iterable[int], num_classes: int) -> None:
    """Refuse (one line) labels outside ``0 .. num_classes - 1``."""
    bad = sorted({label for label in labels if not 0 <= label < num_classes})
    if bad:
        raise UsageError(f"{setting('labels', ','.join(map(str, bad)))}: this model has classes 0..{num_classes - 1}")


def check_model_facts(config: EngineConfig, components: Components) -> ModelFacts | None:
    """Check the run against what its model family tells before building (``ModelFamily.inspect``):
    the labels against the classes, the attention pattern and the cache against the layout, layer
    and head counts (and a head map against the weights), the images' memory. One-line
    ``UsageError``s; returns the facts (None when the family tells nothing: the engine checks at
    ``generate``)."""
    facts = components.model.inspect()
    if facts is None:
        return None
    check_labels(config.labels or [], facts.num_classes)
    components.pattern.check_layout(facts.layout)
    components.cache.check_layout(facts.layout, num_layers=facts.num_layers, num_heads=facts.num_heads,
                                  weights_id=facts.weights_id)
    refuse_unfitting_images(facts, config)
    return facts


def refuse_unfitting_images(facts: ModelFacts, config: EngineConfig, available: int | None = None) -> None:
    """A generation holds every image it makes (float32 pixels, their uint8 copy, the tokens) until
    it writes the grid: a one-line :class:`UsageError` when that alone exceeds the CPU's free memory
    (``available`` overrides it, for tests), before any allocation. Needs ``pixels_per_token``."""
    if facts.pixels_per_token is None:
        return
    labels = len(config.labels) if config.labels is not None else min(facts.num_classes, 10)
    count = labels * config.samples_per_label
    (height, width), tokens, side = facts.layout.grids[-1], facts.layout.length, facts.pixels_per_token
    need = count * (height * width * side ** 2 * 3 * (FLOAT32_BYTES + 1) + tokens * 8)
    free = available if available is not None else available_bytes(torch.device("cpu"))
    if free is not None and need > free:
        raise UsageError(f"{setting('samples_per_label', config.samples_per_label)} x {labels} labels: {count} images "
                         f"of {height * side}x{width * side} need at least {format_bytes(need)} in memory, more than "
                         f"the {format_bytes(free)} free (ask for fewer; `{PROG} sample` writes images as it goes)")


# -- models ----------------------------------------------------------------------------------------
def recommended_choices(config: EngineConfig, metadata: dict[str, Any] | None) -> EngineConfig:
    """``config`` with the attention pattern's options taken from the weights' metadata when the run
    uses the same pattern and set none itself (explicit options always win)."""
    if not metadata:
        return config
    trained = metadata.get("attention") or {}
    chosen = config.attention
    if not trained.get("name") or not trained.get("options"):
        return config
    if chosen is None:
        if (metadata.get("trajectory") or {}).get("name") != config.trajectory.name:
            return config
        chosen = ComponentChoice(name=trained["name"])
    if chosen.name != trained["name"] or chosen.options:
        return config
    return config.model_copy(update={"attention": ComponentChoice(name=chosen.name, options=dict(trained["options"]))})


def with_sampling_defaults(config: EngineConfig, defaults: dict[str, Any]) -> EngineConfig:
    """``config`` with the model family's sampling defaults (Janus: cfg 5, the full softmax) for the
    settings the run did not set (flags and config files always win)."""
    unset = {key: value for key, value in defaults.items() if key not in config.sampling.model_fields_set}
    if not unset:
        return config
    sampling = config.sampling.model_copy(update=unset)
    return config.model_copy(update={"sampling": sampling})


def with_weights(config: EngineConfig, registry: Registry | None = None) -> EngineConfig:
    """``config`` with the shipped default checkpoints of its trajectory filled in when its model is
    a built-in checkpoint family (:class:`CheckpointModelOptions`) that names no files (and asks for
    no random weights), and the pattern options the weights were trained with (from their metadata)
    where the run sets none."""
    registry = registry or get_registry()
    family = registry.create("trajectory", config.trajectory.name, config.trajectory.options).family
    name = choose_model(config.model, family, registry)
    if not issubclass(registry.get("model", name).record.options, CheckpointModelOptions):
        return config  # a model directory (Janus), a plugin's family: the shipped weights are not for it
    options = config.model.options
    if not any(options.get(key) for key in ("checkpoint", "tokenizer", "random_weights")):
        found = default_checkpoints(config.trajectory.name)
        if found is None:
            have = ", ".join(available_defaults()) or "none in this installation"
            raise UsageError(f"no default weights for trajectory '{config.trajectory.name}' (shipped for: {have}); give "
                             f"{setting('checkpoint')} and {setting('tokenizer')}, or {setting('random_weights')} to "
                             f"time a random model")
        options = {**options, "checkpoint": str(found[0]), "tokenizer": str(found[1])}
        config = config.model_copy(update={"model": config.model.model_copy(update={"options": options})})
    if options.get("checkpoint") and options.get("tokenizer"):
        config = recommended_choices(config, weights_metadata(options["checkpoint"]))
    return config


@dataclass
class PreparedRun:
    """A run resolved and checked but not built: the config with its weights and the family's
    sampling defaults filled in, the components, the device, what the family told of the model."""

    config: EngineConfig
    components: Components
    device: torch.device
    facts: ModelFacts | None


def prepare_run(config: EngineConfig, registry: Registry | None = None) -> PreparedRun:
    """Everything before a model is built: the shipped weights, the components, the family's sampling
    defaults, the device, and :func:`check_model_facts` (one-line ``UsageError`` on bad input)."""
    config = with_weights(config, registry)
    components = resolve_components(config, registry)
    config = with_sampling_defaults(config, components.model.sampling_defaults)
    device = resolve_device(config.device)
    if config.compile:
        check_compile(config, components, device)
    return PreparedRun(config, components, device, check_model_facts(config, components))


def check_compile(config: EngineConfig, components: Components, device: torch.device) -> None:
    """``--compile`` where it cannot run: a one-line ``UsageError`` before any model is built."""
    problem = compile_problem(trajectory=components.trajectory, pattern=components.pattern, cache=components.cache,
                              compiles_token_steps=components.model.compiles_token_steps(),
                              compiles_scale_steps=components.model.compiles_scale_steps(),
                              backend=config.backend.name, device=device, names=components.names)
    if problem is not None:
        raise UsageError(problem)


@dataclass
class GenerationResult:
    """``images: [N, 3, H, W]`` in [0, 1]; ``labels: [N]``; ``tokens[s]: LongTensor[N, l_s]``; ``rows``:
    the grid's rows (one per label)."""

    images: torch.Tensor
    labels: torch.Tensor
    tokens: list[torch.Tensor]
    rows: int
    cache_peak_bytes: int = 0
    backends_used: dict[str, str] = field(default_factory=dict)


@contextmanager
def python_wording() -> Iterator[None]:
    """Errors leaving the Python API name settings as arguments (``backend='sdpa'``), not flags."""
    try:
        yield
    except MvarEngineError as error:
        error.style = "python"
        raise


@dataclass
class PipelineOutput:
    """What ``pipe(...)`` returns: ``images`` (a list of ``PIL.Image``, or ``[N, 3, H, W]`` in [0, 1]),
    their ``labels``, the per-scale ``tokens`` (``LongTensor[N, h_s * w_s]``) and run ``facts``
    (seconds, cache peak bytes, the backends used, the components, the seed)."""

    images: Any
    labels: list[int]
    tokens: list[torch.Tensor]
    facts: dict[str, Any]


class Pipeline:
    """A ready-to-run engine plus the run settings of an :class:`EngineConfig`.

    ``Pipeline.from_pretrained("digits-mvar")(labels=[3], images_per_label=4)`` is the short way;
    ``Pipeline.from_config(EngineConfig(...))`` takes every setting the CLI has."""

    def __init__(self, config: EngineConfig, model: Any, tokenizer: Any, components: Components,
                 device: torch.device, facts: ModelFacts | None = None) -> None:
        self.config, self.model, self.tokenizer, self.components, self.device = config, model, tokenizer, components, device
        self.facts = facts  # what the family told before the build (weights_id: the weights' fingerprint)
        self.adapter = components.model.adapter(model, tokenizer)
        self.engine = self.make_engine()

    def make_engine(self) -> Engine:
        """The engine over the adapter, with the config's autocast dtype, checked against the cache."""
        engine = Engine(self.adapter, self.components.trajectory, self.components.pattern, self.components.backends,
                        autocast_dtype=resolve_autocast(self.config.dtype, self.device), compile=self.config.compile)
        engine.check(self.components.cache, self.components.names)
        return engine

    @classmethod
    def from_config(cls, config: EngineConfig, registry: Registry | None = None) -> "Pipeline":
        """Resolve, check (everything :func:`check_model_facts` can tell before a build), build."""
        return cls.build(prepare_run(config, registry))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, variant: str | None = None, tokenizer: str | Path | None = None,
                        trajectory: str | None = None, **settings: Any) -> "Pipeline":
        """A shipped model by name (``"digits-mvar"``, ``"digits-var"``, ``"digits-raster"``), a local
        weights file or model folder of any family, or a Hub id with its ``variant``
        (``"FoundationVision/var", variant="d16"``; :mod:`.pretrained`, :mod:`.hub`), with ``settings``
        as :class:`EngineConfig` fields (``attention``, ``cache``, ``device``, ``dtype``, ``batch_size``,
        ``model={"patch_nums": (16,)}``, ...). Bad input is a one-line :class:`UsageError`."""
        with python_wording():
            return cls.from_config(pretrained_config(name_or_path, variant=variant, tokenizer=tokenizer,
                                                     trajectory=trajectory, **settings))

    def to(self, device: str | torch.device | None = None, dtype: str | None = None) -> "Pipeline":
        """Move the models to ``device`` and/or run in autocast ``dtype`` (``"float32"``, ``"bfloat16"``,
        ``"float16"``); returns ``self``. An unsupported pair is a one-line :class:`UsageError`."""
        update = {key: str(value) for key, value in (("device", device), ("dtype", dtype)) if value is not None}
        config = self.config.model_copy(update=update)
        with python_wording():
            target = resolve_device(config.device)
            resolve_autocast(config.dtype, target)  # refuses before anything moves
        self.model.to(target)
        if self.tokenizer is not None:
            self.tokenizer.to(target)
        self.config, self.device = config, target
        self.engine = self.make_engine()
        return self

    def __call__(self, labels: Sequence[int] | int | None = None, images_per_label: int = 1, *, seed: int | None = None,
                 generator: torch.Generator | None = None, cfg: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, cache: str | CachePolicy | None = None, cache_budget: float | None = None,
                 output_type: str = "pil") -> "PipelineOutput":
        """Generate ``images_per_label`` images of each label (image ``i`` of label ``c`` is the CLI's
        image ``i`` of ``c`` at the same seed and sampling settings: the same pixels). ``generator``
        (as diffusers takes it) stands for its seed, ``generator.initial_seed()``: every image draws
        from its own generator seeded from (seed, label, index), so its pixels do not depend on the
        batch. ``cache``: a policy name (with ``cache_budget``) or a :class:`CachePolicy`;
        ``output_type``: ``"pil"`` (a list of ``PIL.Image``) or ``"pt"`` (``[N, 3, H, W]`` in [0, 1])."""
        if output_type not in ("pil", "pt"):
            raise UsageError(f"output_type={output_type!r}: choose 'pil' or 'pt'")
        if generator is not None:
            if seed is not None:
                raise UsageError("seed= and generator= both give the seed: give one of them")
            seed = generator.initial_seed()
        labels = [labels] if isinstance(labels, int) else labels
        sampling = self.config.sampling.model_copy(update={k: v for k, v in (("seed", seed), ("cfg", cfg),
                                                                              ("top_k", top_k), ("top_p", top_p))
                                                          if v is not None})
        SamplingConfig.model_validate(sampling.model_dump())  # the CLI's ranges
        started = time.perf_counter()
        with python_wording():
            result = self.generate(labels, images_per_label, self.cache_for(cache, cache_budget), sampling=sampling)
        images = result.images if output_type == "pt" else [Image.fromarray(a) for a in to_uint8(result.images)]
        return PipelineOutput(images, result.labels.tolist(), result.tokens,
                              {"seconds": time.perf_counter() - started, "cache_peak_bytes": result.cache_peak_bytes,
                               "backends": result.backends_used, "components": dict(self.components.names),
                               "seed": sampling.seed})

    def cache_for(self, cache: str | CachePolicy | None, budget: float | None) -> CachePolicy | None:
        """The policy of one call: the pipeline's (None), a given one, or one made by name."""
        if cache is None or isinstance(cache, CachePolicy):
            if budget is not None:
                raise UsageError("cache_budget= needs cache= (a policy name such as 'ssd')")
            policy = cache
        else:
            registry = get_registry()
            policy = registry.create("cache", cache, {} if budget is None else {"budget": budget})
            names = {**self.components.names, "cache": registry.get("cache", cache).name}
            check_compatible(self.components.trajectory, self.components.pattern, policy,
                             model_family=self.components.model.family, names=names)
        if policy is not None:
            self.engine.check(policy, {**self.components.names, "cache": getattr(policy, "name", str(cache))})
        return policy

    @classmethod
    def build(cls, run: "PreparedRun") -> "Pipeline":
        """Build the models of a :func:`prepare_run` result and the engine over them."""
        model, tokenizer = run.components.model.build(run.device, TORCH_DTYPES[run.config.dtype])
        tokenizer = None if tokenizer is None else tokenizer.to(run.device).eval()
        return cls(run.config, model.to(run.device).eval(), tokenizer, run.components, run.device, run.facts)

    def default_labels(self) -> list[int]:
        return list(range(min(self.adapter.num_classes, 10)))

    def generate(self, labels: Sequence[int] | None = None, samples_per_label: int | None = None,
                 cache: CachePolicy | None = None, sampling: SamplingConfig | None = None) -> GenerationResult:
        """Images for ``labels`` (default: the config's), ``samples_per_label`` each (default: the
        config's), with the config's cache or ``cache`` and sampling or ``sampling``: image ``i`` of
        label ``c`` is :meth:`generate_items`' ``(c, i)`` (the same image whatever the batch size)."""
        cfg = self.config
        labels = list(labels if labels is not None else (cfg.labels if cfg.labels is not None else self.default_labels()))
        result = self.generate_items(numbered(labels, samples_per_label or cfg.samples_per_label), cache,
                                     sampling=sampling)
        result.rows = len(labels)
        return result

    def generate_items(self, items: Sequence[tuple[int, int]], cache: CachePolicy | None = None,
                       progress: Callable[[int], None] | None = None, decode_chunk: int = 1,
                       sampling: SamplingConfig | None = None) -> GenerationResult:
        """Image ``index`` of class ``label`` for every ``(label, index)`` item, in batches of the
        config's ``batch_size``; each image draws from its own generator seeded from (seed, label,
        index) (:mod:`.seeding`) and is decoded on its own, so its pixels do not depend on the batch
        (``decode_chunk > 1`` decodes that many at once: faster, but the decoder's rounding then
        depends on the chunk). ``progress(n)``: called with the number of images each batch
        finished (the default is a bar over the trajectory's steps)."""
        cfg = self.config
        sampling = sampling or cfg.sampling
        cache = cache or self.components.cache
        check_labels((label for label, _ in items), self.adapter.num_classes)
        all_labels = torch.tensor([label for label, _ in items], dtype=torch.long)
        generators = image_generators(sampling.seed, items, self.device)
        images, tokens, peak = [], [], 0
        steps, unit = len(self.engine.steps), self.components.trajectory.step_unit
        starts = range(0, len(items), cfg.batch_size)
        bar = tqdm(total=len(starts) * steps, desc=f"{unit}s", unit=unit,
                   disable=not cfg.progress or progress is not None, leave=False)
        for start in starts:
            chunk = all_labels[start:start + cfg.batch_size]
            out = self.engine.generate(chunk.to(self.device), cache, cfg=sampling.cfg, top_k=sampling.top_k,
                                       top_p=sampling.top_p, generator=generators[start:start + cfg.batch_size],
                                       progress=lambda s: bar.update(1))
            peak = max(peak, out.cache_peak_bytes)
            maps = self.adapter.token_maps(out)
            with torch.no_grad():  # image by image: its pixels depend on its tokens alone
                pixels = torch.cat([self.adapter.decode_maps([m[i:i + decode_chunk] for m in maps])
                                    for i in range(0, len(chunk), decode_chunk)])
                images.append(pixels.add(1).mul(0.5).clamp(0, 1).cpu())
            tokens.append([t.cpu() for t in maps])
            if progress is not None:
                progress(len(chunk))
        bar.close()
        per_scale = [torch.cat([chunk[s] for chunk in tokens]) for s in range(len(tokens[0]))]
        return GenerationResult(torch.cat(images), all_labels, per_scale, rows=1, cache_peak_bytes=peak,
                                backends_used=dict(self.components.backends.used))

    def save(self, result: GenerationResult, output: str | Path | None = None) -> list[Path]:
        """Write the grid (one row per label), optional per-image PNGs and tokens; returns the paths."""
        out_cfg = self.config.output
        grid_path = Path(output or out_cfg.output)
        # --output /dev/null discards the grid (never replace the device file)
        written = [grid_path if str(grid_path) == os.devnull else save_grid(result.images, result.rows, grid_path)]
        if out_cfg.per_image:
            written += save_images(result.images, result.labels, grid_path.with_suffix(""))
        if out_cfg.save_tokens:
            written.append(save_tokens(result, self.model, out_cfg.save_tokens))
        return written


def save_tokens(result: GenerationResult, model: Any, path: str | Path) -> Path:
    """Per-scale token indices: ``tokens.{s}: LongTensor[N, h_s * w_s]``, ``labels: [N]``, ``grids: [G, 2]``
    (the layout's grids; docs/cli.md, "The saved tokens")."""
    state = {f"tokens.{s}": t for s, t in enumerate(result.tokens)}
    state["labels"] = result.labels
    state["grids"] = torch.tensor(model.layout.grids)
    path = Path(path)
    if path.suffix == ".safetensors":
        return save_state_dict(state, path)  # its metadata names what wrote it
    return atomic_write(path, lambda tmp: torch.save({**state, WRITTEN_BY: writer()}, tmp))


