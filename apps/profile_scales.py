"""``mvar-engine profile-scales``: profile a next-scale model's layers for ``scalekv`` and ``ams``.

Calibration generations run with the full cache; at every scale and layer the profiler sees the
scale's queries over every key so far (:class:`ScaleProfilingCache`, through the cache ``observe``
hook) and accumulates ScaleKV's selectivity index and AMS-KV's inter-scale key similarity as
:mod:`~mvar_engine.plugins.scale_profile` defines them. The command writes the profile (JSON) and
prints the budgets it gives at ``--average-budget``.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from ..core.attention import AttentionSpec
from ..core.errors import UsageError
from ..core.layout import SequenceLayout
from ..plugins.budget_cache import attention_probabilities, budget_tokens
from ..plugins.caches import FullCache
from ..plugins.head_map import auto_threshold
from ..plugins.scale_profile import ScaleProfile, drafter_classes, write_scale_profile
from .cli_helpers import PROG, Parser, check_output_path, finite_float
from .output_files import add_overwrite_flag, check_outputs
from .profile_heads import calibration_config
from .pipeline import Pipeline


class ScaleProfilingCache(FullCache):
    """The ``full`` cache that also accumulates, per (scale, layer), the selectivity index and, per
    layer, the cosine of consecutive scales' mean keys (over every generation it serves)."""

    families = ("next-scale",)

    def __init__(self, history_share: float = 0.1) -> None:
        super().__init__()
        self.history_share = history_share
        self.ends: list[int] = []
        self.selectivity_sum: torch.Tensor | None = None  # float64 [scales, layers]
        self.queries: torch.Tensor | None = None
        self.similarity_sum: torch.Tensor | None = None  # float64 [layers]
        self.similarity_count: torch.Tensor | None = None
        self.previous_keys: list[torch.Tensor | None] = []
        self.sizes: list[int] = []

    def begin(self, *, num_layers, batch, num_heads, head_dim, layout: SequenceLayout, device, dtype, guided=False):
        super().begin(num_layers=num_layers, batch=batch, num_heads=num_heads, head_dim=head_dim, layout=layout,
                      device=device, dtype=dtype, guided=guided)
        self.sizes = [scale.numel for scale in layout.scales]
        self.ends = [scale.span[1] for scale in layout.scales]
        if self.selectivity_sum is None:
            self.selectivity_sum = torch.zeros(len(self.sizes), num_layers, dtype=torch.float64)
            self.queries = torch.zeros(len(self.sizes), num_layers, dtype=torch.float64)
            self.similarity_sum = torch.zeros(num_layers, dtype=torch.float64)
            self.similarity_count = torch.zeros(num_layers, dtype=torch.float64)
        self.previous_keys = [None] * num_layers

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, scale: float) -> None:
        l, n = q.shape[2], k.shape[2]
        step, history = self.ends.index(n), n - l
        if history > 0:
            top = math.ceil(self.history_share * history)
            for _, probs in attention_probabilities(q, k, spec, scale):  # probs: [rows, heads, c, n]
                index = probs[..., history:].sum(-1) + probs[..., :history].topk(top, dim=-1).values.sum(-1)
                self.selectivity_sum[step, layer] += float(index.double().sum())
                self.queries[step, layer] += index.numel()
        mean_keys = k[:, :, history:].float().mean(dim=2)  # [rows, heads, D]
        if step >= 2 and self.previous_keys[layer] is not None:
            cosine = F.cosine_similarity(mean_keys, self.previous_keys[layer], dim=-1)
            self.similarity_sum[layer] += float(cosine.double().mean())
            self.similarity_count[layer] += 1
        self.previous_keys[layer] = mean_keys

    def profile(self, drafters_per_scale: int, calibration: dict | None = None,
                weights_id: str | None = None) -> ScaleProfile:
        if self.selectivity_sum is None:
            raise RuntimeError("no calibration generation has run")
        selectivity = (self.selectivity_sum / self.queries.clamp(min=1)).clamp(0, 1).tolist()  # float sums pass 1
        similarity = (self.similarity_sum / self.similarity_count.clamp(min=1)).tolist()
        split = auto_threshold([similarity])
        return ScaleProfile(layers=len(similarity), scale_sizes=self.sizes, history_share=self.history_share,
                            drafters_per_scale=drafters_per_scale, selectivity=selectivity,
                            drafters=drafter_classes(selectivity, drafters_per_scale), key_similarity=similarity,
                            keeps_more=[s < split for s in similarity], calibration=calibration or {},
                            weights_id=weights_id)


def default_drafters(num_layers: int) -> int:
    """Drafter layers per scale when none are asked for: an eighth of the layers, at least 1."""
    return max(1, num_layers // 8)


def budget_lines(profile: ScaleProfile, average: float, floor: int) -> list[str]:
    """Per scale that compresses: the drafter and refiner budgets at ``average``."""
    total = sum(profile.scale_sizes)
    kept = budget_tokens(average, total) - 1
    lines = []
    for index, (row, drafters) in enumerate(zip(profile.budgets(kept, floor), profile.drafters)):
        held = sum(profile.scale_sizes[:index + 1])
        if held > kept:
            d = [b for b, is_d in zip(row, drafters) if is_d]
            r = [b for b, is_d in zip(row, drafters) if not is_d]
            lines.append(f"scale {index} ({held} tokens held): drafters {len(d)} x {d[0] if d else '-'}, refiners "
                         f"{len(r)} x {r[0] if r else '-'} (mean {sum(row) / len(row):.1f})")
    return lines


def cmd_profile_scales(argv: Sequence[str]) -> int:
    p = Parser(prog=f"{PROG} profile-scales", allow_abbrev=False,
               description="Profile a next-scale model's layers for --cache scalekv and --cache ams: generate with the "
                           "full cache, score every (scale, layer) by ScaleKV's attention-selectivity index and every "
                           "layer by AMS-KV's inter-scale key similarity, write the JSON profile. Every other flag is "
                           "a generation flag (model, --labels, --samples-per-label, --seed, --cfg, ...).")
    p.add_argument("--scale-profile", default="scale_profile.json", help="JSON to write (default scale_profile.json)")
    p.add_argument("--drafters", type=int, default=None, metavar="N",
                   help="drafter layers per scale (default: an eighth of the layers, at least 1)")
    p.add_argument("--history-share", type=finite_float, default=0.1, metavar="S",
                   help="share of the earlier tokens the selectivity index counts (default 0.1)")
    p.add_argument("--average-budget", type=finite_float, default=0.1, metavar="B",
                   help="print (and record) the budgets at this average: a fraction of the sequence or a count "
                        "(default 0.1)")
    p.add_argument("--window", type=int, default=16, metavar="W",
                   help="scalekv's window, the least a refiner keeps (default 16)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_overwrite_flag(p)
    args, rest = p.parse_known_args(argv)
    if not 0 < args.history_share <= 1:
        raise UsageError(f"--history-share must be in (0, 1], got {args.history_share:g}")
    if args.average_budget <= 0 or args.window < 1 or (args.drafters is not None and args.drafters < 0):
        raise UsageError("--average-budget must be > 0, --window at least 1 and --drafters at least 0")
    target = check_output_path("--scale-profile", args.scale_profile, (".json",))
    check_outputs({"--scale-profile": target}, args.overwrite)
    config, facts = calibration_config(rest, "profile-scales", "full", "next-scale")
    if facts is not None:
        drafters = args.drafters if args.drafters is not None else default_drafters(facts.num_layers)
        if drafters > facts.num_layers:
            raise UsageError(f"--drafters {drafters}: the model has {facts.num_layers} layers")
        if budget_tokens(args.average_budget, facts.layout.length) - 1 <= args.window:
            raise UsageError(f"--average-budget {args.average_budget:g} keeps no more than the {args.window} window "
                             f"tokens of a {facts.layout.length}-token sequence (raise it or lower --window)")
    pipe = Pipeline.from_config(config)
    drafters = args.drafters if args.drafters is not None else default_drafters(pipe.adapter.num_layers)
    start = time.perf_counter()
    profiler = ScaleProfilingCache(args.history_share)
    result = pipe.generate(cache=profiler)
    floor = args.window + 1
    calibration = {"images": len(result.labels), "cfg": config.sampling.cfg, "seed": config.sampling.seed,
                   "model": str(next(iter(pipe.components.model.input_files().values()), "default weights")),
                   "average_budget": args.average_budget, "refiner_floor": floor}
    profile = profiler.profile(drafters, calibration, pipe.facts.weights_id if pipe.facts else None)
    kept = budget_tokens(args.average_budget, sum(profile.scale_sizes)) - 1
    profile = profile.model_copy(update={"calibration": {**calibration, "budgets": profile.budgets(kept, floor)}})
    path = write_scale_profile(profile, target)
    for line in budget_lines(profile, args.average_budget, floor):
        print(line)
    more = [i for i, flag in enumerate(profile.keeps_more) if flag]
    print(f"wrote {path}: {profile.layers} layers x {len(profile.scale_sizes)} scales, {drafters} drafter(s) a scale; "
          f"ams: layers {more or 'none'} keep more ({len(result.labels)} calibration images, "
          f"{time.perf_counter() - start:.1f} s)")
    return 0
