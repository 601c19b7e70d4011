"""What every subcommand shares: the program name, an argparse that fails in one line, list-valued
argument types, the one-line form of an error, and :class:`Commands`, which the
``mvar_engine_register_commands`` hook fills (built-in and plugin subcommands alike)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import ValidationError

from ..core.errors import ConfigError, UsageError
from .config import SEED_MAX, SEED_MIN

PROG = "mvar-engine"

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""Environment variables torchrun sets in every worker."""


def under_torchrun() -> bool:
    """True when the torchrun variables are all set (this process is one of its workers)."""
    return all(name in os.environ for name in TORCHRUN_VARS)

RunFn = Callable[..., int]
"""A subcommand: ``run(argv) -> exit status``, or ``run(argv, registry=None)`` to receive the
registry that loaded it (the components the command should use); raise ``UsageError`` for bad
input (exit 2)."""


def takes_registry(run: Callable[..., int]) -> bool:
    """Does ``run`` take the ``registry`` keyword?"""
    try:
        return "registry" in inspect.signature(run).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        return False


def call_command(run: Callable[..., int], argv: Sequence[str], registry: Any = None) -> int:
    """``run(argv)``, with ``registry=`` when it takes it."""
    return run(argv, registry=registry) if takes_registry(run) else run(argv)


def lazy_command(module: str, function: str) -> RunFn:
    """``run(argv, registry=None)`` that imports ``module`` when the command runs, so that listing or
    running one subcommand never loads the others (a generation never imports the training stack)."""

    def run(argv: Sequence[str], registry: Any = None) -> int:
        return call_command(getattr(importlib.import_module(module), function), argv, registry)

    run.__qualname__ = f"{module}.{function}"
    return run


PARSE_ONLY_ENV = "MVAR_ENGINE_PARSE_ONLY"
"""``MVAR_ENGINE_PARSE_ONLY=1``: every command parses its command line, prints the parsed
arguments as JSON and exits 0 without running (flag errors still exit 2): how scripted suites
such as ``benchmarks/gpu-suite.sh --dry-run`` check their steps on a machine that cannot run them."""


class ParsedOnly(Exception):
    """Raised by :meth:`Parser.parse_args` under :data:`PARSE_ONLY_ENV`: ``prog`` and its ``arguments``."""

    def __init__(self, prog: str, arguments: dict) -> None:
        super().__init__(prog)
        self.prog, self.arguments = prog, arguments


class Parser(argparse.ArgumentParser):
    """argparse that raises a one-line ``UsageError`` instead of printing usage and exiting (and
    stops after parsing under :data:`PARSE_ONLY_ENV`)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        if os.environ.get(PARSE_ONLY_ENV) == "1":
            raise ParsedOnly(self.prog, vars(parsed))
        return parsed


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"16,32"`` -> ``(16, 32)``; anything but comma-separated positive integers (an empty entry
    as in ``1,,2`` too) raises ``ValueError``."""
    parts = [part.strip() for part in text.split(",")]
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        raise ValueError(f"expected comma-separated positive integers like 1,2,3, got {text!r}") from None
    if min(values) < 1:
        raise ValueError(f"expected comma-separated positive integers like 1,2,3, got {text!r}")
    return values


def int_list(text: str) -> tuple[int, ...]:
    """argparse type of :func:`parse_int_list` (errors become one-line usage errors)."""
    try:
        return parse_int_list(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def finite_float(text: str) -> float:
    """argparse type: a finite number (``inf`` and ``nan`` are one-line usage errors)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def float_list(text: str) -> tuple[float, ...]:
    """argparse type: ``"0.2, 0.5"`` -> ``(0.2, 0.5)``; every entry a finite number, no empty entry
    (``0.2,,0.5``)."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.2,0.5, got {text!r}")
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty entry between commas (e.g. 0.2,0.5)")
    return tuple(finite_float(part) for part in parts)


def seed_int(text: str) -> int:
    """argparse type: an integer ``torch.Generator.manual_seed`` accepts (-2**63 .. 2**64 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not SEED_MIN <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text}: a seed is an integer from -2**63 to 2**64 - 1 (what "
                                         f"torch.Generator accepts)")
    return value


def name_list(text: str) -> tuple[str, ...]:
    """argparse type: ``"a, b"`` -> ``("a", "b")``; an empty list is an error."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def one_line(error: BaseException, *, with_type: bool = False, limit: int | None = None) -> str:
    """An error's message on one line (a ``ConfigError``'s problems joined with '; '), prefixed
    with its type when ``with_type``, cut to ``limit`` characters."""
    lines = error.problems if isinstance(error, ConfigError) else str(error).splitlines()
    text = "; ".join(" ".join(line.split()) for line in lines if line.strip())
    if limit is not None:
        text = text[:limit]
    if with_type:
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text or type(error).__name__


def architecture_error(error: ValidationError, flags: str) -> UsageError:
    """A model config's first validation problem as a one-line usage error pointing at ``flags``."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return UsageError(f"model architecture: {where + ': ' if where else ''}{message} (check {flags})")


@dataclass(frozen=True)
class Command:
    name: str
    run: RunFn
    help: str
    provider: str = ""

    def invoke(self, argv: Sequence[str], registry: Any = None) -> int:
        """Run it (``registry=`` where its ``run`` takes it)."""
        return call_command(self.run, argv, registry)


@dataclass
class Commands:
    """The subcommands of ``mvar-engine``: top-level (``mvar-engine NAME``) and grouped
    (``mvar-engine GROUP NAME``, e.g. ``bench``). A plugin adds its own in the
    ``mvar_engine_register_commands(commands)`` hook with :meth:`add`."""

    top: dict[str, Command] = field(default_factory=dict)
    groups: dict[str, dict[str, Command]] = field(default_factory=dict)
    group_help: dict[str, str] = field(default_factory=dict)
    registry: Any = None
    """The registry whose plugins added these commands; each command receives it when it runs."""

    def add(self, name: str, run: RunFn, help: str, *, group: str | None = None) -> None:
        """Register ``run`` as ``mvar-engine [GROUP] NAME``; a name taken twice is an error."""
        table = self.top if group is None else self.groups.setdefault(group, {})
        if name in table or (group is None and name in self.groups):
            where = f"{group} {name}" if group else name
            raise ValueError(f"subcommand '{where}' is registered twice")
        table[name] = Command(name, run, help)

    def add_group(self, group: str, help: str) -> None:
        """Declare a group (``bench``) and its one-line description."""
        self.groups.setdefault(group, {})
        self.group_help[group] = help

    def names(self) -> list[str]:
        """Every top-level name and group, in registration order."""
        return [*self.top, *(g for g in self.groups if g not in self.top)]


NAME_MAX = 255
"""The longest file or folder name (bytes) of the common file systems (ext4, xfs, btrfs, APFS, NTFS)."""


def check_output_path(flag: str, path: str | os.PathLike | None, suffixes: Sequence[str] = ()) -> Path:
    """A path the command will write, checked before any work: not empty, not a directory, the
    suffix one of ``suffixes`` (when given), and its nearest existing ancestor a writable directory
    (nothing is created here). Returns the path; a problem raises a one-line ``UsageError`` naming
    ``flag``. ``os.devnull`` is accepted (the output is discarded)."""
    text = "" if path is None else os.fspath(path)
    want = " or ".join(suffixes)
    example = f"out{suffixes[0]}" if suffixes else "out.bin"
    if not text.strip():
        raise UsageError(f"{flag} '': the path is empty (give a file path such as {example})")
    if text == os.devnull:
        return Path(text)
    target = Path(text)
    too_long = [part for part in target.parts if len(os.fsencode(part)) > NAME_MAX]
    if too_long:
        raise UsageError(f"{flag} {text[:60]}...: a name in it is {len(os.fsencode(too_long[0]))} bytes, more than the "
                         f"{NAME_MAX} a file system allows (give a shorter name)")
    if target.is_dir():
        raise UsageError(f"{flag} {text}: is a directory (give a file path such as {target / example})")
    if target.exists() and not target.is_file():
        raise UsageError(f"{flag} {text}: exists and is not a regular file (give a file path such as {example})")
    if suffixes and target.suffix.lower() not in [s.lower() for s in suffixes]:
        raise UsageError(f"{flag} {text}: the file name must end in {want} (change the suffix: {target.with_suffix(suffixes[0]).name})")
    ancestor = target.absolute().parent
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {text}: {ancestor} is a file, not a directory (choose another location)")
    if not (os.access(ancestor, os.W_OK | os.X_OK) and _can_create_in(ancestor)):
        raise UsageError(f"{flag} {text}: cannot write under {ancestor} (not writable; choose another location)")
    return target


def _can_create_in(folder) -> bool:
    """Whether a file can be created in ``folder`` (root passes ``os.access`` on read-only file
    systems such as /proc, so a probe file is created and removed at once)."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".mvar-engine-probe.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True
