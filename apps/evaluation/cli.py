"""``mvar-engine evaluate``: compare generation configurations on sample quality.

Each ``--compare NAME=FLAGS`` names a configuration and gives its ``mvar-engine generate`` flags
(parsed by :func:`~mvar_engine.apps.cli.parse_generate_args`, so every generate option works:
checkpoints, ``--cfg``, ``--top-k``, component options, ``--config FILE``). ``--common FLAGS`` come
before every configuration's own flags (e.g. the checkpoints shared by all). The evaluation's
``--seed`` and ``--batch-size`` apply to every configuration unless its flags set their own;
``--classifier-seed`` seeds the evaluation classifier only, so the feature space stays the same
when the sampling seed changes. Without ``--compare`` the default pair :data:`DEFAULT_COMPARE` runs.

Exit status: 0 on success; 2 with one ``mvar-engine: error: ...`` line for bad input (``--compare``
syntax, unknown component or option, checkpoint/resolution/class-count mismatch, unreadable data).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from typing import Sequence

from ...core.errors import UsageError
from ..cli import parse_generate_args
from ..cli_helpers import Parser, check_output_path, one_line, seed_int
from ..output_files import add_overwrite_flag, check_outputs
from ..config import EngineConfig
from .evaluate import DEFAULT_K, REAL_ROW, evaluate, print_report

PROG = "mvar-engine evaluate"

DEFAULT_COMPARE: tuple[str, ...] = (
    "var=--trajectory full --attention dense --cache full",
    "mvar=--trajectory markov --attention neighborhood --cache none",
)
"""The configurations compared when no ``--compare`` is given (the embedded default weights)."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
FORBIDDEN_FLAGS = {
    "--labels": "evaluate generates every class (use --samples-per-class)",
    "--samples-per-label": "use the evaluation's --samples-per-class",
    "-h": "see 'mvar-engine --help' for the generate flags",
    "--help": "see 'mvar-engine --help' for the generate flags",
}


def split_flags(text: str, where: str) -> list[str]:
    """``shlex.split(text)``; a quoting error is a one-line ``UsageError`` naming ``where``."""
    try:
        return shlex.split(text)
    except ValueError as error:
        raise UsageError(f"{where}: cannot split the flags ({error}); quote them as one shell word") from None


def parse_compare(value: str, common: Sequence[str] = (), seed: int | None = None,
                  batch_size: int | None = None) -> tuple[str, EngineConfig]:
    """``"NAME=FLAGS"`` -> ``(NAME, config)``. The flags are ``--seed``/``--batch-size`` (when given),
    ``--no-progress``, ``common``, then the configuration's own (later flags win). Errors: one line."""
    name, sep, flags = value.partition("=")
    name = name.strip()
    if not sep or not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"--compare {value!r}: expected NAME=FLAGS with a name of letters, digits, '_.+-' "
                         f"(e.g. --compare \"mvar=--trajectory markov --cache none\")")
    if name == REAL_ROW:
        raise UsageError(f"--compare {value!r}: '{REAL_ROW}' names the reference row; pick another name")
    own = split_flags(flags, f"--compare {name}")
    for token in [*common, *own]:
        flag = token.split("=", 1)[0]
        if flag in FORBIDDEN_FLAGS:
            raise UsageError(f"--compare {name}: {flag} is not allowed here; {FORBIDDEN_FLAGS[flag]}")
    defaults = ["--no-progress"]
    if seed is not None:
        defaults += ["--seed", str(seed)]
    if batch_size is not None:
        defaults += ["--batch-size", str(batch_size)]

    try:
        return name, parse_generate_args([*defaults, *common, *own])
    except UsageError as error:
        raise UsageError(f"--compare {name}: {one_line(error)}") from None


def build_parser():

    p = Parser(prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Generate samples of every class with each configuration and score them with a "
                            "classifier trained on the real data: accuracy, Frechet distance of classifier "
                            "features and k-NN precision/recall against the real held-out split, and generation "
                            "time. A 'real' row scores the held-out split against the train split (the floor). "
                            "Writes a JSON report and prints a table.",
                epilog="default comparison:\n" + "\n".join(f"  --compare \"{c}\"" for c in DEFAULT_COMPARE)
                       + "\n\nexample:\n  mvar-engine evaluate --common \"--checkpoint var.pth --tokenizer "
                         "vae.pth\" \\\n      --compare \"var=--trajectory full\" --compare \"mvar=--trajectory markov "
                         "--attention-kernel-size 5\""
                         + "\n\nraster cache policies (the shipped raster GPT):\n  mvar-engine evaluate --compare "
                           "\"raster=--trajectory raster\" \\\n      --compare \"raster-sink=--trajectory raster --cache "
                           "sink --cache-budget 0.5\"")
    p.add_argument("--compare", action="append", metavar="NAME=FLAGS", default=None,
                   help="a configuration: a name and its generate flags, one shell word (repeatable)")
    p.add_argument("--common", metavar="FLAGS", default="", help="generate flags put before every configuration's own")
    p.add_argument("--samples-per-class", type=int, default=50, metavar="N", help="images per class (default 50)")
    p.add_argument("--data", default="digits", metavar="digits|PATH",
                   help="real data: digits (default) or a folder with one subfolder of images per class")
    p.add_argument("--resolution", type=int, default=None, metavar="R",
                   help="data resolution (default: the first configuration's image size; all must match)")
    p.add_argument("--seed", type=seed_int, default=0, help="sampling seed of every configuration (default 0)")
    p.add_argument("--classifier-seed", type=seed_int, default=0, metavar="SEED",
                   help="training seed of the evaluation classifier (default 0; part of its cache key)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass (default 64)")
    p.add_argument("--output", default="evaluation.json", metavar="PATH", help="JSON report (default evaluation.json)")
    p.add_argument("--classifier", default=None, metavar="PATH",
                   help="classifier weights: loaded when the file exists, else trained and written there "
                        "(default: cached under $MVAR_ENGINE_CACHE or ~/.cache/mvar-engine)")
    p.add_argument("--no-table", action="store_true", help="do not print the table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_overwrite_flag(p)
    return p


def cmd_evaluate(argv: Sequence[str]) -> int:
    """Run ``mvar-engine evaluate`` (see the module docstring); returns the exit status (0)."""
    args = build_parser().parse_args(list(argv))
    check_outputs({"--output": args.output}, args.overwrite)  # before any work
    if args.classifier is not None:
        check_output_path("--classifier", args.classifier)  # read when it exists, else written after training
    for flag, value, least in (("--samples-per-class", args.samples_per_class, 1), ("--batch-size", args.batch_size, 1),
                               ("--resolution", args.resolution, 8)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    common = split_flags(args.common, "--common")
    configs: dict[str, EngineConfig] = {}
    for value in args.compare or DEFAULT_COMPARE:
        name, config = parse_compare(value, common, args.seed, args.batch_size)
        if name in configs:
            raise UsageError(f"--compare {name}: the name is given twice (give each configuration its own name)")
        configs[name] = config
    notes = {"seed": args.seed, "batch_size": args.batch_size, "common": args.common,
             "compare": list(args.compare or DEFAULT_COMPARE)}
    payload = evaluate(configs, args.samples_per_class, args.data, args.resolution, args.classifier_seed, None,
                       output=args.output, classifier=args.classifier, k=DEFAULT_K, log=sys.stderr, notes=notes)
    print_report(payload, table=not args.no_table, path=args.output)
    return 0
