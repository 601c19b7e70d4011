"""``mvar-engine bench quality``: one quality protocol for every cache policy, on a shipped model.

Every row generates the same images, ``--images-per-label`` of each class, each image from its own
generator seeded from (``--seed``, label, index) (:mod:`..seeding`: a sample does not depend on the
batch), and is compared with the ``full`` cache's generation of the same seeds:

- agreement: the share of equal tokens (free sampling: one early difference changes everything
  after it, the harshest measure); PSNR and SSIM of the decoded images against full's (images in
  [0, 1]; PSNR of the mean squared error over every pixel; SSIM with Wang et al.'s 11 x 11 Gaussian
  window, sigma 1.5, per channel, averaged); teacher-forced: the policy replays full's tokens and
  its guided next-token distributions are compared with full's at every token (top-1 agreement,
  mean ``KL(full || policy)``, no top-k filtering);
- sample quality: class accuracy and the Frechet distance of digit-classifier features to the real
  held-out digits (``mvar-engine evaluate``'s metric);
- memory and time from the same run: the cache's peak bytes (its own count, every row of the batch)
  and seconds per image of the free generation (this process, medians are not taken: one pass).

``--compare`` adds rows of other shipped models (``digits-mvar``: MVAR, no KV cache) run with their
own components: sample quality, memory and time; their tokens come from another model, so agreement
is not reported. Rows ``calibration=auto`` take a scale profile made in the run (``profile-scales``'
profiler over ``--calibration-images`` generations from ``--seed + 1``), ``ssd`` rows a head map
likewise. Output: ``--output`` (JSON, rewritten after every row), the markdown table beside it
(``.md``) and a chart (``.png``: bars of top-1 agreement and equal tokens per row, labelled with the
cache's bytes over full's).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch
import torch.nn.functional as F

from ...core.compatibility import check_compatible
from ...core.engine import Engine
from ...core.errors import MvarEngineError, UsageError
from ...core.files import marked_markdown, save_marked_image
from ...core.registry import get_registry
from ...models.checkpoint import atomic_write
from ...plugins.budget_cache import budget_tokens
from ...plugins.scale_profile import write_scale_profile
from ..cli_helpers import PROG, Parser, finite_float, float_list, name_list, one_line, seed_int
from ..output_files import check_outputs, report_outputs
from ..data import load_dataset
from ..evaluation.classifier import load_or_train
from ..evaluation.evaluate import metric_row
from ..pipeline import Pipeline, PreparedRun, prepare_run
from ..pretrained import SHIPPED, pretrained_config
from ..profile_heads import calibrate_head_map
from ..profile_scales import ScaleProfilingCache, default_drafters
from ..seeding import image_generators, numbered
from .cells import parse_component, run_problems
from .report import PALETTE, add_report_flags, add_run_flags, format_markdown_table, format_table, machine_info, mib, write_json

AUTO = "auto"
"""``calibration=auto``: the scale profile this run makes (or ``--scale-profile``)."""
DEFAULT_POLICIES = {"digits-raster": ("full", "window", "window:shape=neighborhood", "sink", "h2o", "ssd", "lines"),
                    "digits-var": ("full", "scalekv:window=4", f"scalekv:window=4:calibration={AUTO}", "ams",
                                   f"ams:calibration={AUTO}", "h2o", "sink", "window")}
DEFAULT_BUDGETS = {"digits-raster": (0.2, 1 / 6), "digits-var": (0.1, 0.2)}
DEFAULT_COMPARE = {"digits-raster": (), "digits-var": ("digits-mvar",)}
MODELS = tuple(DEFAULT_POLICIES)


@dataclass(frozen=True)
class QualityConfig:
    """Every option of ``bench quality`` (the command-line flags); None: the model's default."""

    model: str = "digits-var"
    policies: tuple[str, ...] | None = None
    budgets: tuple[float, ...] | None = None
    compare: tuple[str, ...] | None = None
    images_per_label: int = 20
    batch: int = 50
    seed: int = 0
    cfg: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    head_map: str | None = None
    scale_profile: str | None = None
    calibration_images: int = 20
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    output: str = "bench_quality.json"
    table: bool = True

    def problems(self) -> list[str]:
        out = []
        if self.model not in MODELS:
            out.append(f"--model {self.model!r}: choose {', '.join(MODELS)}")
        for name in self.compare or ():
            if name not in SHIPPED or name == self.model:
                out.append(f"--compare {name!r}: give another shipped model ({', '.join(sorted(SHIPPED))})")
        if self.images_per_label < 1 or self.batch < 1 or self.calibration_images < 1:
            out.append("--images-per-label, --batch and --calibration-images must be at least 1")
        bad = [b for b in self.budgets or () if not (b > 0 and math.isfinite(b))]
        if bad or self.budgets == ():
            out.append("--budgets: every budget must be > 0 (a fraction <= 1 of the sequence or a token count > 1)")
        if self.policies == ():
            out.append("--policies needs at least one cache policy")
        out += run_problems(threads=self.threads, timeout_s=None, device=self.device, dtype=self.dtype)
        if Path(self.output).suffix != ".json":
            out.append(f"--output {self.output}: give a .json path (the .md table and .png chart go beside it)")
        return out


@dataclass(frozen=True)
class Row:
    """One row: a cache (name and options; ``budget`` None where it takes none) or another model."""

    cache: str
    options: dict[str, Any]
    budget: float | None = None
    model: str | None = None

    @property
    def label(self) -> str:
        if self.model is not None:
            return self.model
        opts = "".join(f":{k}={v}" for k, v in self.options.items())
        return f"{self.cache}{opts}" + ("" if self.budget is None else f"@{self.budget:.3g}")

    @property
    def profiled(self) -> bool:
        """Whether the row takes the scale profile of this run (``calibration=auto``)."""
        return self.options.get("calibration") == AUTO

    def cache_options(self, head_map: str | None = None, scale_profile: str | None = None) -> dict[str, Any]:
        extra: dict[str, Any] = {} if self.budget is None else {"budget": self.budget}
        if self.cache == "ssd" and head_map:
            extra["head_map"] = head_map
        if self.profiled and scale_profile:
            extra["calibration"] = scale_profile
        return {**self.options, **extra}

    def needs_file(self, head_map: str | None, scale_profile: str | None) -> bool:
        """Whether the row waits for a calibration this run makes (an ssd head map, a scale profile)."""
        return (self.cache == "ssd" and not head_map) or (self.profiled and not scale_profile)


def plan_rows(config: QualityConfig, registry=None) -> list[Row]:
    """``full`` first (the reference), each policy once per budget (once when it takes none), then
    ``--compare`` models; unknown names and bad options are one-line errors."""
    registry = registry or get_registry()
    policies = config.policies or DEFAULT_POLICIES[config.model]
    budgets = config.budgets or DEFAULT_BUDGETS[config.model]
    known = registry.names("cache")
    rows = [Row("full", {})]
    for text in policies:
        name, options = parse_component(text, "--policies")
        name = name.lower()
        if name not in known:
            raise UsageError(f"--policies: unknown cache policy '{name}' (available: {', '.join(known)})")
        if name == "full" and not options:
            continue
        rows += ([Row(name, options, b) for b in dict.fromkeys(budgets)] if takes_budget(name, registry)
                 else [Row(name, options)])
    for row in rows:
        try:
            registry.validate_options("cache", row.cache, row.cache_options())
        except (MvarEngineError, ValueError) as error:
            raise UsageError(f"--policies {row.label}: {' '.join(str(error).split())[:300]}") from None
    models = config.compare if config.compare is not None else DEFAULT_COMPARE[config.model]
    return rows + [Row("", {}, model=name) for name in models]


# -- image metrics ------------------------------------------------------------------------------------------
def psnr(images: torch.Tensor, reference: torch.Tensor) -> float | None:
    """PSNR in dB of ``images`` against ``reference`` (both ``[N, C, H, W]`` in [0, 1]) over every
    pixel; None when they are equal."""
    mse = float((images.double() - reference.double()).pow(2).mean())
    return None if mse == 0 else 10 * math.log10(1 / mse)


def ssim(images: torch.Tensor, reference: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window, ``C1 = 0.01**2``, ``C2 = 0.03**2``, data range 1)
    of ``[N, C, H, W]`` images in [0, 1], per channel over the valid window positions; the window
    shrinks to the image side when the image is smaller."""
    size = min(window, images.shape[-1], images.shape[-2])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).expand(images.shape[1], 1, size, size)
    x, y = images.double(), reference.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=images.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(value.mean())


# -- the protocol -------------------------------------------------------------------------------------------
@dataclass
class Generation:
    """A row's images of every batch: native tokens (what ``forced_tokens`` replays), token maps
    ``[N, h * w]`` per scale, images ``[N, 3, H, W]`` in [-1, 1] (None: not decoded), seconds per
    image, the cache's peak bytes."""

    tokens: list[Any]
    maps: list[torch.Tensor]
    images: torch.Tensor | None
    seconds: float
    cache_peak_bytes: int


@dataclass(frozen=True)
class QualitySampling:
    """The sampling settings a :class:`Protocol` draws with (a pipeline's ``SamplingConfig`` serves too)."""

    cfg: float
    top_k: int
    top_p: float
    seed: int


class Protocol:
    """Generations and comparisons over one engine (module docstring): ``items`` are ``(label,
    index)`` pairs, generated ``batch`` at a time, each from its own generator seeded from
    (``sampling.seed``, label, index); ``sampling`` has ``cfg``, ``top_k``, ``top_p`` and ``seed``.
    ``decode`` False: no images (a model without a tokenizer)."""

    def __init__(self, engine: Engine, sampling: Any, items: Sequence[tuple[int, int]], batch: int,
                 device: torch.device, decode: bool = True) -> None:
        self.engine, self.adapter, self.sampling, self.device, self.decode = engine, engine.model, sampling, device, decode
        self.items = [items[i:i + batch] for i in range(0, len(items), batch)]
        self.labels = torch.tensor([label for label, _ in items])

    def _generate(self, cache_of, batch, *, forced: Any = None, logits: bool = False):
        s = self.sampling
        labels = torch.tensor([label for label, _ in batch], device=self.device)
        return self.engine.generate(labels, cache_of(), cfg=s.cfg, top_k=s.top_k, top_p=s.top_p,
                                    generator=image_generators(s.seed, batch, self.device), forced_tokens=forced,
                                    return_logits=logits)

    def generate(self, cache_of) -> Generation:
        """Free sampling with a fresh ``cache_of()`` per batch; each image decoded on its own."""
        adapter, tokens, maps, images, seconds, peak = self.adapter, [], [], [], 0.0, 0
        for batch in self.items:
            start = time.perf_counter()
            out = self._generate(cache_of, batch)
            seconds += time.perf_counter() - start
            peak = max(peak, out.cache_peak_bytes)
            batch_maps = adapter.token_maps(out)
            if self.decode:
                with torch.no_grad():
                    images.append(torch.cat([adapter.decode_maps([m[i:i + 1] for m in batch_maps])
                                             for i in range(len(batch))]).clamp(-1, 1).cpu())
            tokens.append(out.tokens)
            maps.append([m.cpu() for m in batch_maps])
        per_map = [torch.cat([batch[s] for batch in maps]) for s in range(len(maps[0]))]
        return Generation(tokens, per_map, torch.cat(images) if images else None, seconds / len(self.labels), peak)

    def forced_logp(self, cache_of, reference: Generation) -> list[torch.Tensor]:
        """Guided log-probabilities ``[B, L, V]`` per batch while replaying ``reference``'s tokens."""
        adapter, steps, cfg = self.adapter, self.engine.steps, self.sampling.cfg
        out_logp = []
        for batch, tokens in zip(self.items, reference.tokens):
            out = self._generate(cache_of, batch, forced=tokens, logits=True)
            logits = out.logits
            per_step = list(logits) if isinstance(logits, (list, tuple)) else \
                torch.split(logits, [step.emits for step in steps], dim=1)
            guided = [adapter.guide(l.float(), len(batch), cfg, step) if adapter.guided(cfg) else l.float()
                      for l, step in zip(per_step, steps)]
            out_logp.append(torch.log_softmax(torch.cat(guided, dim=1), dim=-1).cpu())
        return out_logp


def distribution_agreement(reference_logp: torch.Tensor, logp: torch.Tensor) -> tuple[int, float, int]:
    """``(tokens whose argmax agrees, sum over tokens of KL(reference || logp), tokens)`` for two
    log-softmax distributions ``[..., V]`` (equal ones give exactly 0)."""
    agree = int((logp.argmax(-1) == reference_logp.argmax(-1)).sum())
    kl = (reference_logp.exp() * (reference_logp - logp)).sum(-1).clamp(min=0)
    return agree, float(kl.double().sum()), int(kl.numel())


class SampleScorer:
    """The sample-quality metric of ``mvar-engine evaluate`` (class accuracy, FD of classifier features
    against the real held-out split, precision/recall) for decoded digits."""

    def __init__(self, resolution: int, num_classes: int, log: TextIO) -> None:
        train = load_dataset("digits", resolution, "train")
        heldout = load_dataset("digits", resolution, "heldout")
        if train.num_classes != num_classes:
            raise UsageError(f"the model has {num_classes} classes, the digits {train.num_classes}")
        self.classifier, info = load_or_train(train, 0, None, log=log)
        self.heldout_features = self.classifier.features(heldout.images)
        self.num_classes, self.info = num_classes, info.as_dict()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        row = metric_row(self.classifier, images.float().cpu(), labels.cpu(), self.heldout_features,
                         num_classes=self.num_classes)
        return {k: row[k] for k in ("accuracy", "fd", "precision", "recall")}


def takes_budget(name: str, registry=None) -> bool:
    """Whether the cache ``name`` has a ``budget`` option (window, sink, h2o, ssd, plugins alike)."""
    return "budget" in (registry or get_registry()).get("cache", name).record.options.model_fields


def agreement(row: Generation, full: Generation, row_logp: list[torch.Tensor],
              full_logp: list[torch.Tensor]) -> dict[str, Any]:
    """The agreement fields of a row against the full cache's generation of the same seeds."""
    same = sum(int((a == b).sum()) for a, b in zip(row.maps, full.maps))
    total = sum(m.numel() for m in full.maps)
    agree = kl = tokens = 0
    for logp, ref in zip(row_logp, full_logp):
        a, k, n = distribution_agreement(ref, logp)
        agree, kl, tokens = agree + a, kl + k, tokens + n
    out = {"equal_tokens": same / total, "top1_agreement": agree / tokens, "kl": kl / tokens}
    if row.images is not None and full.images is not None:
        x, y = row.images.add(1).div(2), full.images.add(1).div(2)
        out.update(psnr_db=psnr(x, y), ssim=ssim(x, y))
    return out


# -- the run ------------------------------------------------------------------------------------------------
def prepared(name: str, config: QualityConfig) -> PreparedRun:
    sampling = {k: v for k, v in (("cfg", config.cfg), ("top_k", config.top_k), ("top_p", config.top_p),
                                  ("seed", config.seed)) if v is not None}
    return prepare_run(pretrained_config(name, device=config.device, dtype=config.dtype, progress=False,
                                         sampling=sampling))


def check_rows(rows: Sequence[Row], run: PreparedRun, head_map: str | None, scale_profile: str | None,
               registry=None) -> None:
    """Every cache row against the model's layout before the model is built (a row waiting for a
    calibration of this run: checked again once it is made)."""
    registry, facts = registry or get_registry(), run.facts
    for row in rows:
        if row.model is not None or row.needs_file(head_map, scale_profile):
            continue
        options = row.cache_options(head_map, scale_profile)
        try:
            cache = registry.create("cache", row.cache, options)
            c = run.components
            check_compatible(c.trajectory, c.pattern, cache, model_family=c.model.family,
                             names={**c.names, "cache": row.cache})
            if facts is not None:
                cache.check_layout(facts.layout, num_layers=facts.num_layers, num_heads=facts.num_heads,
                                   weights_id=facts.weights_id)
        except MvarEngineError as error:
            raise UsageError(f"--policies {row.label}: {' '.join(str(error).split())}") from None
    if facts is not None:
        for row in rows:
            if row.budget is not None and budget_tokens(row.budget, facts.layout.length) < 2:
                raise UsageError(f"--budgets {row.budget:g} keeps fewer than 2 of {facts.layout.length} tokens")


def run_quality(config: QualityConfig, out: TextIO | None = None, log: TextIO | None = None) -> dict[str, Any]:
    """Validate, build, generate the reference, then every row; the JSON rewritten after each."""
    out, log = out or sys.stdout, log or sys.stderr
    problems = config.problems()
    if problems:
        raise UsageError("; ".join(problems))
    rows = plan_rows(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    run = prepared(config.model, config)
    check_rows(rows, run, config.head_map, config.scale_profile)
    others = {row.model: prepared(row.model, config) for row in rows if row.model is not None}
    pipe = Pipeline.build(run)
    protocol = Protocol(pipe.engine, run.config.sampling, numbered(range(pipe.adapter.num_classes),
                                                                   config.images_per_label), config.batch, pipe.device)
    registry = get_registry()
    payload: dict[str, Any] = {
        "benchmark": "quality", "machine": machine_info(pipe.device), "config": asdict(config),
        "model": {"id": config.model, "components": dict(pipe.components.names), "tokens": pipe.engine.layout.length,
                  "steps": len(pipe.engine.steps)},
        "sampling": run.config.sampling.model_dump(), "images": len(protocol.labels), "results": []}
    head_map = config.head_map
    if head_map is None and any(row.cache == "ssd" for row in rows):
        path = Path(config.output).with_suffix(".head_map.json")
        payload["head_map"] = calibrate_head_map(
            pipe.engine, path, log, images=config.calibration_images, batch=config.batch, cfg=run.config.sampling.cfg,
            top_k=run.config.sampling.top_k, top_p=run.config.sampling.top_p, seed=config.seed + 1, model=config.model,
            source="mvar-engine bench quality", device=pipe.device)
        head_map = payload["head_map"]["path"]
    scale_profile = config.scale_profile
    if scale_profile is None and any(row.profiled for row in rows):
        payload["scale_profile"] = profile_scales(pipe, Path(config.output).with_suffix(".scale_profile.json"), config,
                                                  log)
        scale_profile = payload["scale_profile"]["path"]
    check_rows([row for row in rows if row.needs_file(config.head_map, config.scale_profile)], run, head_map,
               scale_profile)  # the rows that waited for this run's calibration
    scorer = sample_scorer(pipe, log, payload)
    print(f"quality: {len(protocol.labels)} images with the full cache (reference) ...", file=log, flush=True)
    full = protocol.generate(lambda: registry.create("cache", "full"))
    full_logp = protocol.forced_logp(lambda: registry.create("cache", "full"), full)
    for index, row in enumerate(rows, 1):
        start = time.perf_counter()
        try:
            result = measure_row(row, protocol, full, full_logp, row.cache_options(head_map, scale_profile), others,
                                 config, registry)
        except (MvarEngineError, RuntimeError, ValueError) as error:
            result = {"status": "error", "reason": one_line(error)}
        if scorer is not None and "generation" in result:
            result.update({f"sample_{k}": v for k, v in scorer(result["generation"].images,
                                                                protocol.labels).items()})
        result.pop("generation", None)
        payload["results"].append({"label": row.label, "cache": row.cache or None, "model": row.model or config.model,
                                   "budget": row.budget, "options": row.cache_options(head_map, scale_profile) if not row.model else {},
                                   **result, "wall_s": time.perf_counter() - start})
        add_ratios(payload["results"])
        write_json(config.output, payload)
        print(f"[{index}/{len(rows)}] {progress_line(payload['results'][-1])}", file=log, flush=True)
    md_path = write_markdown(Path(config.output).with_suffix(".md"), payload)
    chart = draw_chart(Path(config.output).with_suffix(".png"), payload)
    if config.table:
        print(format_table(table_rows(payload), COLUMNS), file=out)
    print(f"wrote {config.output}, {md_path} and {chart}", file=out)
    return payload


def sample_scorer(pipe: Pipeline, log: TextIO, payload: dict[str, Any]) -> SampleScorer | None:
    """The digits classifier's metric at the model's image size (None, with a note, when unavailable)."""
    side = pipe.engine.layout.grids[-1][0] * (pipe.facts.pixels_per_token if pipe.facts else 0)
    try:
        scorer = SampleScorer(side, pipe.adapter.num_classes, log)
    except Exception as error:  # agreement does not need it
        payload["sample_quality"] = f"unavailable: {one_line(error)}"
        return None
    payload["sample_quality"] = {"metric": "class accuracy and Frechet distance of digit-classifier features to the "
                                           "real held-out split (mvar-engine evaluate's)", "classifier": scorer.info}
    return scorer


def profile_scales(pipe: Pipeline, path: Path, config: QualityConfig, log: TextIO) -> dict[str, Any]:
    """Profile the model's scales over ``--calibration-images`` generations (seed ``--seed + 1``, so
    not the compared images) with an eighth of the layers as drafters; write the profile to ``path``."""
    start = time.perf_counter()
    print(f"profiling scales: {config.calibration_images} generations with the full cache ...", file=log, flush=True)
    profiler = ScaleProfilingCache()
    sampling = pipe.config.sampling.model_copy(update={"seed": config.seed + 1})
    labels = [index % pipe.adapter.num_classes for index in range(config.calibration_images)]  # every class in turn
    pipe.generate(labels, 1, cache=profiler, sampling=sampling)
    drafters = default_drafters(pipe.adapter.num_layers)
    profile = profiler.profile(drafters, {"images": config.calibration_images, "seed": config.seed + 1},
                               pipe.facts.weights_id if pipe.facts else None)
    write_scale_profile(profile, path)
    return {"path": str(path), "calibrated": True, "images": config.calibration_images, "drafters_per_scale": drafters,
            "keeps_more": [i for i, flag in enumerate(profile.keeps_more) if flag],
            "seconds": time.perf_counter() - start}


def measure_row(row: Row, protocol: Protocol, full: Generation, full_logp: list[torch.Tensor], options: dict[str, Any],
                others: dict[str, PreparedRun], config: QualityConfig, registry) -> dict[str, Any]:
    """A row's fields (and its ``generation``, for the sample metric)."""
    if row.model is not None:
        other = Pipeline.build(others[row.model])
        gen = Protocol(other.engine, others[row.model].config.sampling, numbered(range(other.adapter.num_classes),
                       config.images_per_label), config.batch, other.device).generate(lambda: other.components.cache)
        return {"status": "ok", "components": dict(other.components.names), "generation": gen,
                "cache_peak_bytes": gen.cache_peak_bytes, "s_per_image": gen.seconds}

    def cache_of():
        return registry.create("cache", row.cache, options)

    gen = full if row.cache == "full" and not row.options else protocol.generate(cache_of)
    logp = full_logp if gen is full else protocol.forced_logp(cache_of, full)
    return {"status": "ok", "generation": gen, "cache_peak_bytes": gen.cache_peak_bytes, "s_per_image": gen.seconds,
            **agreement(gen, full, logp, full_logp)}


def add_ratios(results: list[dict[str, Any]]) -> None:
    """``cache_ratio``: the row's cache peak over the full row's; ``time_ratio`` likewise."""
    base = results[0] if results and results[0].get("status") == "ok" else None
    for row in results:
        ok = base is not None and row.get("status") == "ok"
        row["cache_ratio"] = row["cache_peak_bytes"] / base["cache_peak_bytes"] if ok and base["cache_peak_bytes"] else None
        row["time_ratio"] = row["s_per_image"] / base["s_per_image"] if ok else None


# -- presentation -------------------------------------------------------------------------------------------
COLUMNS = [("label", "row"), ("cache_mib", "cache MiB"), ("cache_ratio", "vs full"), ("equal_tokens", "equal tokens"),
           ("psnr_db", "PSNR dB"), ("ssim", "SSIM"), ("top1_agreement", "top-1 agree"), ("kl", "KL(full||row)"),
           ("sample_accuracy", "accuracy"), ("sample_fd", "FD"), ("s_per_image", "s/image")]


def table_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**r, "cache_mib": mib(r.get("cache_peak_bytes"))} if r["status"] == "ok"
            else {"label": r["label"], "cache_mib": f"error: {r['reason']}"} for r in payload["results"]]


def progress_line(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['label']}: error: {row['reason']}"
    parts = [f"cache {row['cache_peak_bytes'] / 2**20:.3f} MiB"]
    if row.get("equal_tokens") is not None:
        parts.append(f"equal tokens {row['equal_tokens']:.3f}, top-1 {row['top1_agreement']:.3f}")
    if row.get("sample_accuracy") is not None:
        parts.append(f"accuracy {row['sample_accuracy']:.3f}, FD {row['sample_fd']:.3g}")
    return f"{row['label']}: " + ", ".join(parts)


def write_markdown(path: Path, payload: dict[str, Any]) -> Path:
    m, machine, s = payload["model"], payload["machine"], payload["sampling"]
    text = (f"# mvar-engine bench quality\n\nModel `{m['id']}` ({m['tokens']} tokens in {m['steps']} steps; "
            f"{m['components']['trajectory']}/{m['components']['attention']}), {payload['images']} images "
            f"(seed {s['seed']}, cfg {s['cfg']:g}, top-k {s['top_k']}, top-p {s['top_p']:g}); "
            f"{machine['device_name']} ({machine['device']}), torch {machine['torch']}. Every row against the full "
            f"cache's generation of the same seeds: equal tokens (free sampling), PSNR and SSIM of the decoded images, "
            f"top-1 agreement and KL of the guided distributions on full's tokens (teacher-forced); sample quality "
            f"(digit-classifier accuracy, FD to the held-out digits); the cache's peak bytes and seconds per image "
            f"from the same run.\n\n{format_markdown_table(table_rows(payload), COLUMNS)}\n")
    return atomic_write(path, lambda tmp: tmp.write_text(marked_markdown(text)))


def draw_chart(path: Path, payload: dict[str, Any]) -> Path:
    """Horizontal bars per row: top-1 agreement (teacher-forced) and equal tokens (free sampling)
    with the full cache, each row labelled with its cache bytes over full's."""
    from PIL import Image, ImageDraw

    rows = [r for r in payload["results"] if r["status"] == "ok" and r.get("top1_agreement") is not None]
    metrics = (("top1_agreement", "top-1 agreement"), ("equal_tokens", "equal tokens"))
    left, right, bar, top = 230, 40, 9, 50
    width, height = 760, top + 30 + len(rows) * (len(metrics) * bar + 8)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), f"{payload['model']['id']}: agreement with the full cache from the same seeds "
                        f"({payload['images']} images)", fill="black")
    for m, (_, name) in enumerate(metrics):
        draw.rectangle((left + 170 * m, 28, left + 170 * m + 12, 38), fill=PALETTE[m])
        draw.text((left + 170 * m + 18, 27), name, fill="black")
    span = width - left - right
    y = top
    for row in rows:
        ratio = row.get("cache_ratio")
        draw.text((10, y + 2), f"{row['label']} ({'-' if ratio is None else f'{ratio:.2f}'}x cache)", fill="black")
        for m, (key, _) in enumerate(metrics):
            value = row.get(key) or 0.0
            draw.rectangle((left, y, left + span * value, y + bar - 2), fill=PALETTE[m])
            draw.text((left + span * value + 4, y - 2), f"{value:.2f}", fill="black")
            y += bar
        y += 8
    draw.line([(left, top - 4), (left, y)], fill="black")
    return save_marked_image(image, path, format="PNG")


# -- command line -------------------------------------------------------------------------------------------
def cmd_bench_quality(argv: Sequence[str]) -> int:
    """``mvar-engine bench quality``: parse the flags, run, exit 0 (1 when a row failed)."""
    d = QualityConfig()
    p = Parser(prog=f"{PROG} bench quality", allow_abbrev=False,
               description="Cache policies against the full cache on a shipped model, from the same seeds: equal "
                           "tokens, PSNR/SSIM of the images, teacher-forced top-1 agreement and KL, sample quality "
                           "(accuracy, FD), cache bytes and time. Writes JSON, a markdown table and a chart.")
    p.add_argument("--model", choices=MODELS, default=d.model, help=f"shipped model (default {d.model})")
    p.add_argument("--policies", type=name_list, default=None, metavar="NAME[:KEY=VALUE],...",
                   help="cache policies (default per model: " + "; ".join(
                       f"{k}: {','.join(v)}" for k, v in DEFAULT_POLICIES.items()) + "; full always runs first)")
    p.add_argument("--budgets", type=float_list, default=None, metavar="B,...",
                   help="budgets of the budgeted policies (fraction <= 1 or token count; default per model: " + "; ".join(
                       f"{k}: {','.join(f'{b:.3g}' for b in v)}" for k, v in DEFAULT_BUDGETS.items()) + ")")
    p.add_argument("--compare", type=name_list, default=None, metavar="MODEL,...",
                   help="other shipped models measured beside (default: digits-mvar for digits-var)")
    p.add_argument("--images-per-label", type=int, default=d.images_per_label, metavar="N",
                   help=f"images of every class (default {d.images_per_label})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"images per generation (default {d.batch})")
    p.add_argument("--seed", type=seed_int, default=d.seed, help=f"sampling seed (default {d.seed})")
    p.add_argument("--cfg", type=finite_float, default=None, help="guidance (default: the model's)")
    p.add_argument("--top-k", type=int, default=None, help="top-k (default: the model's; 1 is greedy)")
    p.add_argument("--top-p", type=finite_float, default=None, help="top-p (default: the model's)")
    p.add_argument("--head-map", default=None, metavar="FILE", help="SSD head map (default: calibrate here)")
    p.add_argument("--scale-profile", default=None, metavar="FILE",
                   help="scale profile for the calibration=auto rows (default: profile here, NAME.scale_profile.json)")
    p.add_argument("--calibration-images", type=int, default=d.calibration_images, metavar="N",
                   help=f"generations profiled for the automatic head map (default {d.calibration_images})")
    add_run_flags(p, device=d.device, dtype=d.dtype, backend=None)
    add_report_flags(p, d.output)
    args = p.parse_args(argv)
    if Path(args.output).suffix == ".json":
        check_outputs(report_outputs(args.output, (".md", ".png", ".head_map.json", ".head_map.png",
                                                          ".scale_profile.json")), args.overwrite)
    payload = run_quality(QualityConfig(
        model=args.model, policies=args.policies, budgets=args.budgets, compare=args.compare,
        images_per_label=args.images_per_label, batch=args.batch, seed=args.seed, cfg=args.cfg, top_k=args.top_k,
        top_p=args.top_p, head_map=args.head_map, scale_profile=args.scale_profile, calibration_images=args.calibration_images, device=args.device,
        dtype=args.dtype, threads=args.threads, output=args.output, table=not args.no_table))
    return 1 if any(r["status"] != "ok" for r in payload["results"]) else 0
