"""Error types. Every user-facing error is one line that names the problem and the way out."""

from __future__ import annotations


class MvarEngineError(Exception):
    """Base class of the engine's own errors; the CLI prints ``str(error)`` without a traceback."""


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


class FileWriteError(MvarEngineError):
    """The storage refused a write (disk full, quota, read-only): one line naming the path (exit 1)."""


class TrainingDivergedError(MvarEngineError):
    """A training step's loss is NaN or inf: the run stops before saving that step (exit status 1)."""
