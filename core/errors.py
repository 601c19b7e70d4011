"""Error types. Every user-facing error is one line that names the problem and the way out."""

from __future__ import annotations

import re
from typing import Literal

Style = Literal["cli", "python"]
SETTING = re.compile(r"\[\[([a-z_]+)(?:=([^\]]*))?\]\]")
NUMBER = re.compile(r"-?\d+(\.\d*)?(e-?\d+)?")


def setting(name: str, value: object | None = None) -> str:
    """A reference to the run setting ``name`` (with a value, or none) inside a message: core/ names
    settings this way, never as a CLI flag; :func:`render_settings` words it for the reader."""
    return f"[[{name}]]" if value is None else f"[[{name}={value}]]"


def render_settings(text: str, style: Style = "cli") -> str:
    """``text`` with its :func:`setting` references as the shell spells them (a flag, then its value;
    a boolean as its switch, the negated flag for false) or the Python API (``backend='sdpa'``,
    ``strict=False``)."""
    def word(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if style == "cli":
            flag = "--" + name.replace("_", "-")
            if value in ("True", "False"):  # a boolean is a switch: on as the flag, off as its negation
                return flag if value == "True" else flag[:2] + "no-" + flag[2:]
            return flag if value is None else f"{flag} {value}"
        if value is None:
            return name
        return f"{name}={value}" if value in ("True", "False") or NUMBER.fullmatch(value) else f"{name}={value!r}"

    return SETTING.sub(word, text)


class MvarEngineError(Exception):
    """Base class of the engine's own errors; the CLI prints ``str(error)`` without a traceback.
    Its text may name run settings (:func:`setting`): ``str`` words them for :attr:`style`, the
    shell's by default (the Python API sets ``"python"``)."""

    style: Style = "cli"

    def __str__(self) -> str:
        return render_settings(super().__str__(), self.style)


class UsageError(MvarEngineError):
    """Bad command-line or configuration input (the CLI exits with status 2)."""


class UnknownComponentError(UsageError):
    """A component name that no installed plugin provides."""


class DuplicateComponentError(UsageError):
    """Two providers registered the same (kind, name) and the name was used (the CLI exits with 2)."""


class ComponentFailedError(MvarEngineError):
    """Plugin code (a component's factory) raised; the message names the component and its provider
    and ``__cause__`` holds the original exception. ``origin``: the component, when known."""

    def __init__(self, message: str, origin: object | None = None):
        self.origin = origin
        super().__init__(message)


class ConfigError(UsageError):
    """A configuration value failed validation; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class IncompatibleComponentsError(UsageError):
    """A combination of trajectory, attention pattern, cache policy and backend that makes no sense."""


class BackendUnsupportedError(UsageError):
    """A backend cannot compute the requested attention (pattern kind, device, dtype, head_dim)."""


class CheckpointError(UsageError):
    """A checkpoint file that is unreadable or does not match the model (keys or shapes)."""


class ArchitectureError(CheckpointError, ValueError):
    """A weights file's tensor shapes do not tell its architecture (a ``ValueError`` too, for the
    callers that read shapes): one line naming the setting that would."""


class FileWriteError(MvarEngineError):
    """The storage refused a write (disk full, quota, read-only): one line naming the path (exit 1)."""


class TrainingDivergedError(MvarEngineError):
    """A training step's loss is NaN or inf: the run stops before saving that step (exit status 1)."""
