"""Reading, matching and writing checkpoints (``.pth`` pickles and ``.safetensors``).

Accepted layouts: a flat state dict (the released ``var_d*.pth`` / ``vae_ch160v4096z32.pth``),
VAR trainer checkpoints (``['trainer']['var_wo_ddp']``), MVAR checkpoints (``['mvar_wo_ddp']``),
and ``{'model': ...}`` / ``{'module': ...}`` / ``{'state_dict': ...}`` wrappers (LlamaGen's c2i GPT
files use ``model``, its DeepSpeed checkpoints ``module``); ``module.`` and ``_orig_mod.`` prefixes
(DDP, torch.compile) are stripped. Files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..core.errors import CheckpointError, setting
from ..core.files import WRITTEN_BY, atomic_write, not_a_file_reason, writer

NESTED_KEYS: tuple[tuple[str, ...], ...] = (
    ("trainer", "var_wo_ddp"),
    ("trainer", "vae_wo_ddp"),
    ("mvar_wo_ddp",),
    ("var_wo_ddp",),
    ("model",),
    ("module",),
    ("state_dict",),
)
STRIPPED_PREFIXES = ("module.", "_orig_mod.")


def check_file(path: str | os.PathLike) -> None:
    """A one-line ``CheckpointError`` unless ``path`` is a readable file (a directory, a missing
    path and a device are each named as such)."""
    reason = not_a_file_reason(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} {reason} (give the weights file's path)")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
"""Classes ``weights_only`` loading may rebuild: training checkpoints (LlamaGen's, VAR's) carry their
``argparse.Namespace`` of arguments beside the weights."""


def _load(path: Path, device: str) -> Any:
    """The object stored in ``path``: a safetensors file's tensors, or a ``weights_only`` unpickling
    (``device="meta"``: shapes only, nothing read into memory)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            if device == "meta":
                return {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}
            return {key: handle.get_tensor(key) for key in handle.keys()}
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(path, map_location=device, weights_only=True, mmap=device == "meta")


def _first_line(error: BaseException, limit: int = 160) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:limit]


def read_state_dict(path: str | os.PathLike, nested: Iterable[tuple[str, ...]] = NESTED_KEYS, *,
                    device: str = "cpu") -> dict[str, torch.Tensor]:
    """The model state dict stored in ``path`` (on ``device``; ``"meta"`` reads the shapes only);
    unreadable files and files without a state dict raise a one-line error."""
    path = Path(path)
    check_file(path)
    try:
        obj = _load(path, device)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: {_first_line(error)}); "
                              f"expected a .pth/.pt state dict or a .safetensors file") from None
    state = obj
    if not _is_state_dict(state):
        for keys in nested:
            node = obj
            for key in keys:
                node = node.get(key) if isinstance(node, dict) else None
            if _is_state_dict(node):
                state = node
                break
        else:
            found = ", ".join(sorted(map(str, obj))[:8]) if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path} holds no model state dict (top level: {found}); expected a flat state dict "
                                  f"or one under {', '.join(repr('/'.join(k)) for k in nested)}")
    out = {}
    for key, value in state.items():
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def read_state_shapes(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """:func:`read_state_dict` as ``meta`` tensors: every key and shape, no weights read (checks
    that run before a model is built)."""
    return read_state_dict(path, device="meta")


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """A one-line ``CheckpointError`` naming ``source`` if a floating-point tensor holds NaN or inf."""
    broken = non_finite_tensors(state)
    if broken:
        raise CheckpointError(f"{source}: {len(broken)} tensor(s) hold NaN or inf values (first: {broken[0]}); the "
                              f"file is corrupt or from a diverged run (use an earlier checkpoint)")


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors holding NaN or inf."""
    return [key for key, value in state.items()
            if value.is_floating_point() and value.device.type != "meta" and not bool(torch.isfinite(value).all())]


@dataclass
class KeyReport:
    """Differences between a checkpoint and a model's state dict."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 6) -> str:
        def listing(items: list[str]) -> str:
            more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({listing(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({listing(self.unexpected)})")
        if self.mismatched:
            shapes = [f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
            parts.append(f"{len(shapes)} mis-shaped ({listing(shapes)})")
        return "; ".join(parts) or "keys match"


def compare_keys(model_state: dict[str, torch.Tensor], file_state: dict[str, torch.Tensor],
                 optional: Iterable[str] = ()) -> KeyReport:
    """Report of ``file_state`` against ``model_state``; ``optional`` keys may be absent from the file."""
    optional = set(optional)
    report = KeyReport()
    report.missing = [k for k in model_state if k not in file_state and k not in optional]
    report.unexpected = [k for k in file_state if k not in model_state]
    report.mismatched = [(k, tuple(file_state[k].shape), tuple(v.shape)) for k, v in model_state.items()
                         if k in file_state and tuple(file_state[k].shape) != tuple(v.shape)]
    return report


def load_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, strict: bool = True,
              derived: Iterable[str] = ()) -> KeyReport:
    """Copy ``state`` into ``model``. ``derived`` buffers are recomputed by the model, so the file's
    values (present or not) are ignored. Strict: any difference raises a ``CheckpointError`` listing
    the missing, unexpected and mis-shaped keys; non-strict loads what matches."""
    derived = set(derived)
    model_state = {k: v for k, v in model.state_dict().items() if k not in derived}
    file_state = {k: v for k, v in state.items() if k not in derived}
    report = compare_keys(model_state, file_state)
    if strict and not report.ok:
        raise CheckpointError(f"{source} does not match {type(model).__name__}: {report.describe()} "
                              f"(check {setting('depth')} / the architecture settings, or load what matches with "
                              f"{setting('strict', False)})")
    mismatched = {k for k, _, _ in report.mismatched}
    loadable = {k: v for k, v in file_state.items() if k in model_state and k not in mismatched}
    check_finite(loadable, source)
    model.load_state_dict(loadable, strict=False)
    return report


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a flat state dict as ``.safetensors`` (by suffix; its metadata names what wrote it,
    :data:`WRITTEN_BY`) or a ``.pth`` pickle, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {**(metadata or {}), WRITTEN_BY: writer()}

        return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def convert_weights(source: str | os.PathLike, target: str | os.PathLike, dtype: torch.dtype) -> Path:
    """Copy a weights file to ``target`` (.safetensors) with every floating tensor cast to ``dtype``;
    the ``mvar_engine`` metadata is kept, with the conversion recorded under ``"exported"``.
    Loading casts back to the model's dtype, so float16 halves the file at a ~1e-3 relative cost."""

    state = read_state_dict(source)
    metadata: dict[str, str] | None = None
    if Path(source).suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    if Path(target).suffix != ".safetensors":
        raise CheckpointError(f"{target}: export writes .safetensors files (change the suffix)")
    converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if metadata and "mvar_engine" in metadata:
        info = json.loads(metadata["mvar_engine"])
        info["exported"] = {"from": Path(source).name, "dtype": str(dtype).removeprefix("torch.")}
        metadata["mvar_engine"] = json.dumps(info, sort_keys=True)
    return save_state_dict(converted, target, metadata=metadata)


METADATA_KEY = "mvar_engine"
"""The safetensors metadata key of the engine's own exports (architecture, kind, training record)."""


def read_weights_metadata(path: str | Path) -> dict[str, Any] | None:
    """The ``mvar_engine`` metadata dict of a ``.safetensors`` file; None when the file has none or
    is not a safetensors file. A missing file is a one-line ``CheckpointError``."""
    path = Path(path)
    check_file(path)
    if path.suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({type(error).__name__})") from None
    text = meta.get(METADATA_KEY)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: the '{METADATA_KEY}' metadata is not valid JSON (re-export the weights)") from None
    return value if isinstance(value, dict) else None


FINGERPRINT_BYTES = 1 << 20
"""Bytes read from each end of a weights file for :func:`weights_fingerprint`."""


def weights_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a weights file: sha256 over its size and its first and last
    :data:`FINGERPRINT_BYTES` (the header and key table, and weight bytes), so a map profiled on one
    file is not silently used with another of the same shape (seconds for any size)."""
    import hashlib

    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            handle.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(handle.read())
    return digest.hexdigest()
