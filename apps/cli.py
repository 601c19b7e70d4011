"""The ``mvar-engine`` command.

``mvar-engine [flags]`` (or ``mvar-engine generate [flags]``) generates images; ``mvar-engine
plugins`` lists every component (backends with their capabilities); ``mvar-engine bench attention``
times the attention backends. Each selected component's options become flags named
``--{kind}-{option}`` (``--attention-kernel-size 5``, ``--trajectory-order 2``), listed by
``--help`` for the components chosen on the same command line.

Usage and configuration errors print one line per problem and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pydantic import ValidationError

from ..core.errors import ComponentFailedError, ConfigError, MvarEngineError, UsageError, render_settings, setting
from ..core.files import same_file, writing_as
from ..core.records import KIND_LABELS, RECORD_TYPES
from ..core.registry import Registry, failing_component, format_validation_error, get_registry, normalize_name
from .allocator import fix_mmap_threshold
from .cli_helpers import PROG, Commands, ParsedOnly, Parser, check_output_path, under_torchrun
from .config import COMPONENT_KINDS, ComponentChoice, EngineConfig, ModelChoice, build_config, read_config_file
from .images import GRID_FORMATS, per_image_files
from .output_files import check_replaceable
from .pipeline import MODEL_NAMES, Pipeline, accepts, choose_model, model_family, resolve_autocast, resolve_device
from .hub import hub_model, known_ids, looks_like_hub_id, pretrained_from_hub
from .pretrained import file_trajectory


def option_flag(record: Any, option: str) -> str:
    """The flag of a component's option: its run setting as the shell spells it (``--cache-budget``;
    a model's options are the model settings themselves: ``--checkpoint``)."""
    return render_settings(setting(record.option_setting(option)))


def load_commands(registry: Registry | None = None) -> Commands:
    """Every subcommand, built-in and from plugins, through the ``mvar_engine_register_commands`` hook
    of ``registry`` (default :func:`get_registry`), which each receives when it runs."""
    registry = registry or get_registry()
    commands = Commands(registry=registry)
    registry.register_commands(commands)
    return commands


def _subcommands_epilog() -> str:
    """The ``--help`` list of subcommands, from :func:`load_commands` (names are never split)."""
    names = textwrap.fill(", ".join(load_commands().names()), width=78, initial_indent="  ", subsequent_indent="  ",
                          break_on_hyphens=False, break_long_words=False)
    return f"subcommands:\n{names}\n\nsee '{PROG} SUBCOMMAND --help' for each one's options"


@dataclass(frozen=True)
class GenerationCommand:
    """A command that takes every generation flag plus its own: its ``prog``, ``description``,
    ``extend(parser)`` adding its flags (with explicit defaults), and the generation flags it refuses
    (flag -> why, said in the one-line error)."""

    prog: str
    description: str
    extend: Callable[[Parser], None]
    refused: Mapping[str, str] = field(default_factory=dict)


def _base_generate_parser(add_help: bool = True, command: GenerationCommand | None = None) -> Parser:
    description = command.description if command else ("Generate images with a next-scale (VAR/MVAR) model: the "
                                                        f"default subcommand,\nalso '{PROG} generate'.")
    p = Parser(prog=command.prog if command else PROG, description=description,
               epilog=None if command else _subcommands_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
               argument_default=argparse.SUPPRESS, allow_abbrev=False, add_help=add_help)
    if command is not None:
        command.extend(p)

    def offer(group, flag: str, **kwargs) -> None:
        """Add a generation flag, unless the command refuses it (then --help does not list it)."""
        if command is None or flag not in command.refused:
            group.add_argument(flag, **kwargs)
    p.add_argument("--config", metavar="FILE", help="TOML or JSON config file (flags override it)")
    g = p.add_argument_group("components (see 'mvar-engine plugins')")
    g.add_argument("--trajectory", metavar="NAME", help="conditioning trajectory (default: markov)")
    g.add_argument("--attention", metavar="NAME", help="attention pattern (default: the trajectory's: markov -> neighborhood, full -> dense)")
    g.add_argument("--cache", metavar="NAME", help="KV-cache policy (default: the trajectory's: markov -> none, full -> full)")
    g.add_argument("--backend", metavar="NAME", help="attention backend, or auto (default: auto)")
    m = p.add_argument_group("model (its options follow, under the model family's name)")
    m.add_argument("--model", dest="model_name", metavar="NAME",
                   help=f"which model: {', '.join(MODEL_NAMES)}, a plugin's family ('{PROG} plugins --kind model'), or a "
                        f"Hub id (FoundationVision/var, CVLUESTC/MVAR, FoundationVision/LlamaGen, "
                        f"deepseek-community/Janus-Pro-1B; downloaded into the Hugging Face cache); "
                        f"without --trajectory it picks the model's (var: full, mvar: markov, llamagen and janus: "
                        f"raster). Default: detected from --checkpoint (or from the options given)")
    m.add_argument("--variant", metavar="NAME", help="with --model ORG/NAME (a Hub id): which of its models, e.g. d16 "
                   "for FoundationVision/var (default: the repository's first)")
    m.add_argument("--var-checkpoint", metavar="PATH", help="deprecated: --checkpoint")
    m.add_argument("--vae-checkpoint", metavar="PATH", help="deprecated: --tokenizer")
    m.add_argument("--model-adapter", metavar="NAME", help="deprecated: --model")
    s = p.add_argument_group("sampling")
    s.add_argument("--labels", metavar="L,L,...", help="class labels, one grid row each")
    offer(s, "--samples-per-label", type=int, metavar="N", help="images per label (grid columns; default 8)")
    s.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass (default 16)")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 1.5). 0: none, the conditional "
                   "rows alone (no unconditional rows run); raster models guide, as LlamaGen, only above 1")
    s.add_argument("--top-k", type=int, help="keep the k most likely tokens (default 900; 1 = greedy, 0 = off)")
    s.add_argument("--top-p", type=float, help="nucleus sampling: keep the most likely tokens holding this share of "
                   "the probability mass (default 0.96; 0 or 1 = off)")
    s.add_argument("--seed", type=int, help="random seed (default 0)")
    o = p.add_argument_group("output and run")
    offer(o, "--output", metavar="PATH", help="image grid path: .png, .jpg, .jpeg or .webp (default outputs/samples.png)")
    offer(o, "--per-image", action="store_true", help="also write one PNG per image")
    offer(o, "--save-tokens", metavar="PATH", help="write per-scale token indices (.pt or .safetensors)")
    offer(o, "--overwrite", action="store_true", help="replace existing output files this command did not write "
          "(by default only its own earlier outputs are replaced)")
    o.add_argument("--device", help="auto, cpu, cuda, cuda:N (default auto)")
    o.add_argument("--dtype", help="float32 (default), bfloat16 or float16 autocast (CUDA; bfloat16 also on a CPU with "
                   "native bf16: avx512_bf16, amx_bf16)")
    o.add_argument("--compile", action="store_true",
                   help="compile the decoding steps: raster one-token steps as one torch.compile graph, next-scale "
                   "steps one graph per scale (--cache full, or markov with --cache none); CUDA graphs on CUDA; "
                   "the first generation compiles (tens of seconds)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _chosen_names(known: argparse.Namespace, file_data: dict[str, Any], registry: Registry) -> dict[str, str]:
    """Component names after file and flags, with the trajectory's defaults filled in, and the model
    family (named, or the first serving the trajectory that takes the model options given)."""
    names: dict[str, str] = {}
    for kind in COMPONENT_KINDS:
        flag = getattr(known, kind, None)
        entry = file_data.get(kind)
        from_file = entry if isinstance(entry, str) else (entry or {}).get("name") if isinstance(entry, dict) else None
        given, where = (flag, f"--{kind}") if flag is not None else (from_file, f"the config file's {kind}")
        if given is None:
            continue
        if not isinstance(given, str) or not given.strip():
            raise UsageError(f"{where} is empty: give a {kind} name (`{PROG} plugins` lists them)")
        names[kind] = "auto" if kind == "backend" and normalize_name(given) == "auto" else \
            registry.get(kind, given).record.name  # the registered spelling: FULL -> full
    choice, hub = model_choice(known, file_data), hub_request(known)
    if hub is not None:  # a Hub id: its family and trajectory are known before anything is downloaded
        known_model = hub_model(*hub)[0]
        choice = ModelChoice.model_construct(name=known_model.family, options=choice.options)
        names.setdefault("trajectory", known_model.trajectory)
    if "trajectory" not in names:
        names["trajectory"] = model_trajectory(choice, registry) or "markov"
    names.setdefault("backend", "auto")
    trajectory_cls = registry.get("trajectory", names["trajectory"]).record.factory
    names.setdefault("attention", getattr(trajectory_cls, "default_attention", "dense"))
    names.setdefault("cache", getattr(trajectory_cls, "default_cache", "none"))
    names["model"] = choose_model(choice, getattr(trajectory_cls, "family", "next-scale"), registry)
    return names


MODEL_OPTION = "opt__model__"
"""The argparse dest prefix of a model option's flag."""

RENAMED_FLAGS = {"var_checkpoint": ("--var-checkpoint", "--checkpoint", f"{MODEL_OPTION}checkpoint"),
                 "vae_checkpoint": ("--vae-checkpoint", "--tokenizer", f"{MODEL_OPTION}tokenizer"),
                 "model_adapter": ("--model-adapter", "--model", "model_name")}
"""Old flags (dest -> old flag, new flag, new dest): they keep working for one release, with a note."""


def renamed(values: dict[str, Any]) -> dict[str, Any]:
    """Parsed flags with the old flags' values under their new names (both given: one-line error)."""
    values = dict(values)
    for dest, (old, new, new_dest) in RENAMED_FLAGS.items():
        if dest in values and new_dest in values:
            raise UsageError(f"{old} and {new} name the same thing: give {new} only")
        if dest in values:
            values[new_dest] = values.pop(dest)
    return values


def model_choice(known: argparse.Namespace, file_data: dict[str, Any]) -> ModelChoice:
    """The model the flags and the config file name so far: ``--model`` (else the file's name) and
    every model option given (the file's, then the flags')."""
    given = renamed(vars(known))
    try:
        from_file = ModelChoice.model_validate(file_data.get("model") or {})
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, "the config file's model: ")) from None
    options = {**from_file.options, **{dest.removeprefix(MODEL_OPTION): value for dest, value in given.items()
                                       if dest.startswith(MODEL_OPTION)}}
    return ModelChoice.model_construct(name=given.get("model_name", from_file.name), options=options)  # names: checked next


def hub_request(known: argparse.Namespace) -> tuple[str, str | None] | None:
    """``(repo id, variant)`` when ``--model`` names a Hub repository; ``--variant`` without one is a
    one-line error."""
    name, variant = renamed(vars(known)).get("model_name"), getattr(known, "variant", None)
    if isinstance(name, str) and looks_like_hub_id(name):
        return name, variant
    if variant is not None:
        raise UsageError(f"--variant picks a model of a Hub repository: give --model ORG/NAME with it (known: "
                         f"{known_ids()})")
    return None


def model_trajectory(choice: ModelChoice, registry: Registry) -> str | None:
    """The trajectory a run gets when it names none: the named model's, else the one its
    ``checkpoint`` file says (our metadata; LlamaGen's GPT -> raster, MVAR's nesting -> markov,
    VAR's -> full), else that of the one family whose options take those given (``--model-dir``
    and ``--prompt``: Janus, raster)."""
    if choice.name is not None:
        return model_family(choice.name, registry)[1]
    checkpoint = choice.options.get("checkpoint")
    if checkpoint and Path(str(checkpoint)).is_file():
        try:
            return file_trajectory(Path(str(checkpoint)))
        except UsageError:
            return None  # the loader names what is wrong with the file
    takers = [c.name for c in registry.components("model") if choice.options and accepts(c.record, set(choice.options))]
    return model_family(takers[0], registry)[1] if len(takers) == 1 else None


def deprecated_flags(argv: Sequence[str]) -> list[str]:
    """One note per old flag on the command line (printed after a successful run)."""
    given = {token.split("=", 1)[0] for token in argv}
    return [f"{PROG}: note: {old} is deprecated and goes in the next release; use {new}"
            for old, new, _ in RENAMED_FLAGS.values() if old in given]


def model_option_flag(record: Any, field_name: str, info: Any) -> tuple[str, dict[str, Any]]:
    """A model option's flag and its argparse keywords: ``--checkpoint VALUE``; a boolean is a switch
    that turns its default over (``random_weights`` -> ``--random-weights``, ``strict`` ->
    ``--no-strict``)."""
    flag = option_flag(record, field_name)
    help_text = info.description or field_name
    if info.annotation is bool:
        if info.default is True:
            return "--no-" + flag[2:], {"action": "store_false", "help": f"turns {field_name} off ({help_text})"}
        return flag, {"action": "store_true", "help": help_text}
    default = "" if info.is_required() or info.default is None else f" (default {info.default!r})"
    kinds = str(info.annotation)
    metavar = next((word for key, word in (("Path", "PATH"), ("tuple", "N,N,..."), ("int", "N"), ("float", "X"),
                                            ("str", "TEXT")) if key in kinds), "VALUE")
    return flag, {"metavar": metavar, "help": f"{help_text}{default}"}


def add_model_flags(parser: argparse.ArgumentParser, records: Sequence[Any], *, strict: bool) -> dict[str, str]:
    """The flags of the model options of ``records`` (dest -> option). ``strict``: an option whose
    flag a generation flag already takes is a one-line error naming the family (else skipped)."""
    dests: dict[str, str] = {}
    taken = {flag for action in parser._actions for flag in action.option_strings}
    for record in records:
        group = parser.add_argument_group(f"model '{record.name}' options") if strict else parser
        for field_name, info in record.options.model_fields.items():
            flag, keywords = model_option_flag(record, field_name, info)
            if flag in taken:
                if strict:
                    raise UsageError(f"model '{record.name}': its option {field_name!r} would be the flag {flag}, "
                                     f"which the command already has (the family's author must rename it)")
                continue
            taken.add(flag)
            dests[f"{MODEL_OPTION}{field_name}"] = field_name
            group.add_argument(flag, dest=f"{MODEL_OPTION}{field_name}", **keywords)
    return dests


def refuse_foreign_model_options(known: argparse.Namespace, family: str, registry: Registry) -> None:
    """A model option flag of another family than the run's: one line naming the family that takes it."""
    record = registry.get("model", family).record
    for dest in renamed(vars(known)):
        option = dest.removeprefix(MODEL_OPTION)
        if dest.startswith(MODEL_OPTION) and option not in record.options.model_fields:
            taker = next(c.record for c in registry.components("model") if option in c.record.options.model_fields)
            flag = model_option_flag(taker, option, taker.options.model_fields[option])[0]
            raise UsageError(f"{flag}: model '{record.name}' has no such option (model '{taker.name}' has: give "
                             f"--model {taker.name}; '{PROG} plugins --kind model' lists each family's options)")


def _add_option_flags(parser: argparse.ArgumentParser, names: dict[str, str], registry: Registry) -> dict[str, tuple[str, str]]:
    """Flags for the chosen components' options and the model's; returns dest -> (kind, option)."""
    dests: dict[str, tuple[str, str]] = {}
    for kind in COMPONENT_KINDS:
        if kind == "backend" and names[kind] == "auto":
            continue
        entry = registry.get(kind, names[kind])
        fields = entry.record.options.model_fields
        if not fields:
            continue
        group = parser.add_argument_group(f"{KIND_LABELS[kind]} '{entry.name}' options")
        for field_name, info in fields.items():
            dest = f"opt__{kind}__{field_name}"
            default = "" if info.is_required() else f" (default {info.default!r})"
            group.add_argument(option_flag(entry.record, field_name), dest=dest, metavar="VALUE",
                               help=f"{info.description or field_name}{default}")
            dests[dest] = (kind, field_name)
    model = registry.get("model", names["model"]).record
    dests.update({dest: ("model", option) for dest, option in add_model_flags(parser, [model], strict=True).items()})
    return dests


def _overrides(args: argparse.Namespace, names: dict[str, str], dests: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Command-line values shaped like the config file (only what was given)."""
    given = renamed(vars(args))
    out: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {}
    for dest, (kind, field_name) in dests.items():
        if dest in given:
            options.setdefault(kind, {})[field_name] = given[dest]
    for kind in COMPONENT_KINDS:
        if kind in given or kind in options:
            out[kind] = {"name": names[kind], "options": options.get(kind, {})}
    if "model_name" in given or "model" in options:
        out["model"] = {**({"name": names["model"]} if "model_name" in given else {}), "options": options.get("model", {})}
    sections = {section: set(EngineConfig.model_fields[section].annotation.model_fields)
                for section in ("sampling", "output")}  # the config's own fields: no key set kept by hand
    top_level = set(EngineConfig.model_fields) - set(sections) - set(COMPONENT_KINDS) - {"model"}
    for key, value in given.items():
        section = next((name for name, fields in sections.items() if key in fields), None)
        if section is not None:
            out.setdefault(section, {})[key] = value
        elif key in top_level and key not in ("progress",):
            out[key] = value
    if given.get("no_progress"):
        out["progress"] = False
    return out


def _full_parser(argv: Sequence[str], registry: Registry, command: GenerationCommand | None = None):
    """Phase 1 reads the component names (flags and config file); phase 2's parser adds their option
    flags. Returns (parser, file data, chosen names, option dests)."""
    if command is not None:
        for token in argv:
            flag = token.split("=", 1)[0]
            if flag in command.refused:
                raise UsageError(f"{command.prog}: {flag} does not apply here; {command.refused[flag]}")
    first = _base_generate_parser(add_help=False, command=command)
    add_model_flags(first, [c.record for c in registry.components("model")], strict=False)
    known, _ = first.parse_known_args(argv)
    if hasattr(known, "config") and not str(known.config).strip():
        raise UsageError("--config is empty: give a .toml or .json file")
    file_data = read_config_file(known.config) if getattr(known, "config", None) else {}
    names = _chosen_names(known, file_data, registry)
    refuse_foreign_model_options(known, names["model"], registry)
    parser = _base_generate_parser(command=command)
    dests = _add_option_flags(parser, names, registry)
    return parser, file_data, names, dests


def parse_generate_args(argv: Sequence[str], registry: Registry | None = None) -> EngineConfig:
    """Command-line arguments -> validated :class:`EngineConfig` (file < flags)."""
    return parse_generation_command(argv, None, registry)[0]


def parse_generation_command(argv: Sequence[str], command: GenerationCommand | None,
                             registry: Registry | None = None) -> tuple[EngineConfig, argparse.Namespace]:
    """Arguments of ``command`` (None: generate) -> (validated :class:`EngineConfig`, the parsed
    namespace, which also holds the command's own flags)."""
    registry = registry or get_registry()
    parser, file_data, names, dests = _full_parser(argv, registry, command)
    args = parser.parse_args(argv)
    if isinstance(file_data.get("model"), dict) and isinstance(file_data["model"].get("name"), str):
        # the file's model by its family's name ("mvar" -> "var"), so that --model's options merge with it
        file_data = {**file_data, "model": {**file_data["model"], "name": model_family(file_data["model"]["name"], registry)[0]}}
    config = build_config(file_data, _overrides(args, names, dests))
    hub = hub_request(args)
    if hub is not None:  # the Hub's files under the options given (a flag still wins: --patch-nums)
        options = {**pretrained_from_hub(*hub)[1], **config.model.options}
        config = config.model_copy(update={"model": config.model.model_copy(update={"options": options})})
    # Fill the trajectory's defaults so that the config says what runs (and the trajectory --model or
    # --checkpoint chose, when neither a flag nor the file names one).
    updates: dict[str, Any] = {kind: ComponentChoice(name=names[kind]) for kind in ("attention", "cache")
                               if getattr(config, kind) is None}
    updates["model"] = config.model.model_copy(update={"name": names["model"]})
    if not hasattr(args, "trajectory") and "trajectory" not in file_data and config.trajectory.name != names["trajectory"]:
        updates["trajectory"] = config.trajectory.model_copy(update={"name": names["trajectory"]})
    return config.model_copy(update=updates), args


def check_generate_inputs(config: EngineConfig, registry: Registry | None = None) -> None:
    """Everything about a generation run that can be checked before a model is built: the device
    and autocast dtype, and every output path (nothing is created here). One-line ``UsageError``s."""
    device = resolve_device(config.device)
    resolve_autocast(config.dtype, device)
    out = config.output
    grid = check_output_path("--output", out.output, tuple(GRID_FORMATS))
    if out.per_image:
        folder = grid.with_suffix("")
        if str(grid) == os.devnull or (folder.exists() and not folder.is_dir()):
            raise UsageError(f"--per-image writes its PNGs into {folder}, which is not a directory "
                             f"(choose another --output)")
    if out.save_tokens is not None:
        tokens = check_output_path("--save-tokens", out.save_tokens, (".pt", ".safetensors"))
        if str(grid) != os.devnull and tokens.absolute() == grid.absolute():
            raise UsageError(f"--save-tokens {tokens}: the same path as --output (give another file)")
    check_outputs_are_not_inputs(config, registry)
    per_image = {f"--per-image ({grid.with_suffix('')})": path for path in per_image_files(grid.with_suffix(""))
                 } if out.per_image else {}
    check_replaceable({"--output": grid, "--save-tokens": out.save_tokens, **per_image}, out.overwrite)


def check_outputs_are_not_inputs(config: EngineConfig, registry: Registry | None = None) -> None:
    """An output path that names one of the run's input files (a checkpoint, through any link) would
    overwrite it: a one-line ``UsageError`` naming both flags. ``config.model`` names its family."""
    family = (registry or get_registry()).create("model", config.model.name, config.model.options)
    inputs = {f"--{option.replace('_', '-')}": path for option, path in family.input_files().items()}
    outputs = {"--output": config.output.output, "--save-tokens": config.output.save_tokens}
    for out_flag, out_path in outputs.items():
        if out_path is None or str(out_path) == os.devnull:
            continue
        for in_flag, in_path in inputs.items():
            if same_file(out_path, in_path):
                raise UsageError(f"{out_flag} {out_path}: the same file as {in_flag} {in_path}, which the run reads "
                                 f"(writing it would destroy it; give {out_flag} another path)")


def cmd_generate(argv: Sequence[str], registry: Registry | None = None) -> int:
    config = parse_generate_args(argv, registry)
    check_generate_inputs(config, registry)
    start = time.perf_counter()
    pipe = Pipeline.from_config(config, registry)
    result = pipe.generate()
    written = pipe.save(result)
    names = pipe.components.names
    backends = ", ".join(f"{kind}: {name}" for kind, name in sorted(result.backends_used.items())) or "-"
    print(f"wrote {written[0]} ({result.rows} rows x {len(result.labels) // max(result.rows, 1)} images, "
          f"{names['trajectory']}/{names['attention']}/{names['cache']}, backends {backends}, "
          f"peak cache {result.cache_peak_bytes / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s)")
    for path in written[1:]:
        if path.suffix != ".png":
            print(f"wrote {path}")
    for note in deprecated_flags(argv):
        print(note, file=sys.stderr)
    return 0


def cmd_plugins(argv: Sequence[str], registry: Registry | None = None) -> int:
    p = Parser(prog=f"{PROG} plugins", description="List every component: kind, name, provider, availability.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--kind", choices=list(RECORD_TYPES), help="only this kind")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    registry = registry or get_registry()
    components = registry.components(args.kind)
    if args.json:
        print(json.dumps({
            "components": [_component_dict(c) for c in components],
            "broken": [b.as_dict() for b in registry.broken],
            "skipped": [vars(s) for s in registry.skipped],
        }, indent=2, default=str))
        return 0
    rows = [(c.kind, c.name, str(c.provider), "yes" if c.availability.ok else f"no: {c.availability.reason}",
             c.record.description) for c in components]
    header = ("KIND", "NAME", "PROVIDER", "AVAILABLE", "DESCRIPTION")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    print("  ".join(header[i].ljust(widths[i]) for i in range(3)) + "  " + header[3])
    for component, row in zip(components, rows):
        print("  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3] + (f"  — {row[4]}" if row[4] else ""))
        capabilities = backend_capabilities(component)
        if capabilities:
            print(f"    capabilities: {capabilities}")
        for line in option_lines(component.record):
            print(f"    {line}")
    for broken in registry.broken:
        print(f"broken plugin {broken.plugin} ({broken.provider}): {broken.error}")
    for skipped in registry.skipped:
        print(f"skipped plugin {skipped.plugin} ({skipped.package}): {skipped.reason}")
    return 0


def option_lines(record: Any) -> list[str]:
    """A component's options as ``mvar-engine plugins`` lists them: one line each, its flag (a model
    family's boolean: the switch that turns it over), what it holds, its default."""
    lines = []
    for field_name, info in record.options.model_fields.items():
        flag = (model_option_flag(record, field_name, info)[0] if record.kind == "model"
                else option_flag(record, field_name))
        default = ("required" if info.is_required() else "a switch" if info.annotation is bool and record.kind == "model"
                   else f"default {info.default!r}")
        lines.append(f"option {flag}: {info.description or field_name} ({default})")
    return lines


def backend_capabilities(component) -> str | None:
    """``capabilities.summary()`` of a backend's factory class (never instantiated), or None for
    other kinds and for factories that declare none."""
    if component.kind != "backend":
        return None
    summary = getattr(getattr(component.record.factory, "capabilities", None), "summary", None)
    try:
        return summary() if callable(summary) else None
    except Exception as error:  # a plugin's broken declaration must not break the listing
        return f"unreadable ({type(error).__name__}: {error})"


def _component_dict(component) -> dict[str, Any]:
    data = component.as_dict()
    if component.kind == "backend":
        data["capabilities"] = backend_capabilities(component)
    return data


DEBUG_HINT = "(rerun with --debug for the traceback)"


def main(argv: Sequence[str] | None = None, registry: Registry | None = None) -> int:
    """Run one command; returns its exit status. Python warnings raised while it runs (torch's among
    them) are held back and shown after it, unless it ends in a usage error (exit 2): the error's
    one line is then all there is (``--debug`` shows everything as it happens). ``registry``: the
    components generation runs with (default: every installed plugin, :func:`get_registry`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        return _dispatch(argv, debug, registry)
    with warnings.catch_warnings(record=True) as held:
        code = _dispatch(argv, debug, registry)
    if code != 2:
        for item in held:
            warnings.showwarning(item.message, item.category, item.filename, item.lineno)
    return code


def _dispatch(argv: list[str], debug: bool, registry: Registry | None = None) -> int:
    try:
        commands = load_commands(registry) if argv and not argv[0].startswith("-") else None
        if commands is not None and argv[0] in commands.top:
            with writing_as(argv[0]):
                return commands.top[argv[0]].invoke(argv[1:], commands.registry)
        if commands is not None and argv[0] in commands.groups:
            with writing_as(" ".join(argv[:2])):
                return run_group(commands, argv[0], argv[1:])
        if "-h" in argv or "--help" in argv:
            return _print_help(argv)
        with writing_as("generate"):
            return cmd_generate(argv, registry)
    except ParsedOnly as parsed:
        print(json.dumps({"command": parsed.prog, "arguments": parsed.arguments}, default=str))
        return 0
    except MvarEngineError as error:
        if debug:
            raise
        lines = str(error).splitlines() or [type(error).__name__]
        if isinstance(error, ComponentFailedError):
            lines[-1] += f" {DEBUG_HINT}"
        for line in lines:
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        text = " ".join(str(error).split())
        detail = f"{type(error).__name__}: {text}" if text else type(error).__name__
        origin = failing_component(error)  # the plugin component whose code raised, if any
        if origin is None:
            print(f"{PROG}: internal error: {detail} {DEBUG_HINT}", file=sys.stderr)
        else:
            where = "internal error" if origin.provider.builtin else "error"
            print(f"{PROG}: {where}: {origin} failed: {detail} {DEBUG_HINT}", file=sys.stderr)
        return 1


def _group_parser(commands: Commands, group: str) -> Parser:
    table = commands.groups[group]
    listing = "\n".join(f"  {name:<12} {command.help}" for name, command in table.items())
    p = Parser(prog=f"{PROG} {group}", usage=f"{PROG} {group} {{{','.join(table)}}} [options]",
               description=commands.group_help.get(group, ""),
               epilog=f"{group} commands:\n{listing}\n\nsee '{PROG} {group} NAME --help' for each one's options",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run_group(commands: Commands, group: str, argv: Sequence[str]) -> int:
    """``mvar-engine GROUP NAME ...``: run the named command of the group, or print the group's help."""
    table = commands.groups[group]
    if argv and argv[0] in table:
        return table[argv[0]].invoke(argv[1:], commands.registry)
    if argv and not argv[0].startswith("-"):
        raise UsageError(f"unknown {group} command '{argv[0]}' (available: {', '.join(table)}; "
                         f"see '{PROG} {group} --help')")
    parser = _group_parser(commands, group)
    parser.parse_args(argv)
    parser.print_help()
    return 0


def _print_help(argv: Sequence[str]) -> int:
    stripped = [a for a in argv if a not in ("-h", "--help")]
    _full_parser(stripped, get_registry())[0].print_help()
    return 0


def entry() -> None:
    """The ``mvar-engine`` program (console script and ``python -m mvar_engine.apps.cli``).

    A torchrun worker leaves through ``os._exit`` once its streams are flushed: every file the
    command writes is already saved atomically, and skipping interpreter finalisation avoids an
    abort in the C++ teardown of the process group's threads ("terminate called without an active
    exception"), which can strike after every rank passed a final barrier and destroyed its group."""
    fix_mmap_threshold()  # freed transients leave the resident set (apps/allocator.py)
    code = main()
    if under_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
