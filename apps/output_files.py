"""Outputs a command may replace: its own, never a file the user made.

Every file the engine writes names what wrote it (:data:`~mvar_engine.core.files.WRITTEN_BY`: a
JSON key, an ``.npz``/``.pt`` entry, ``.safetensors`` metadata, an image's EXIF ``Software`` tag, a
Markdown comment). A command refuses, before any work, to replace an existing file that the same
command did not write, unless ``--overwrite`` says so: running a command twice replaces its own
results, and a typo in a path never destroys a user's file.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, Mapping

from ..core.errors import UsageError
from ..core.files import EXIF_SOFTWARE, WRITTEN_BY, writer
from .cli_helpers import check_output_path

MARK_READ_LIMIT = 64 * 2**20
"""JSON and Markdown files larger than this are not parsed for a mark (none of ours is)."""


def _json_mark(path: Path) -> str | None:
    if path.stat().st_size > MARK_READ_LIMIT:
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data.get(WRITTEN_BY) if isinstance(data, dict) else None


def _markdown_mark(path: Path) -> str | None:
    with open(path, encoding="utf-8") as handle:
        first = handle.readline(4096)
    match = re.fullmatch(rf"<!-- {WRITTEN_BY}: (.*) -->\s*", first)
    return match.group(1) if match else None


def _image_mark(path: Path) -> str | None:
    from PIL import Image

    with Image.open(path) as image:
        return image.getexif().get(EXIF_SOFTWARE)


def _npz_mark(path: Path) -> str | None:
    import numpy as np

    with zipfile.ZipFile(path) as archive:
        if f"{WRITTEN_BY}.npy" not in archive.namelist():
            return None
        with archive.open(f"{WRITTEN_BY}.npy") as handle:
            value = np.lib.format.read_array(handle, allow_pickle=False)
    return str(value) if value.ndim == 0 and value.dtype.kind == "U" else None


def _safetensors_mark(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get(WRITTEN_BY)


def _pickle_mark(path: Path) -> str | None:
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # never runs code from the file
    return data.get(WRITTEN_BY) if isinstance(data, dict) else None


MARK_READERS: dict[str, Callable[[Path], str | None]] = {
    ".json": _json_mark, ".md": _markdown_mark, ".png": _image_mark, ".jpg": _image_mark, ".jpeg": _image_mark,
    ".webp": _image_mark, ".npz": _npz_mark, ".safetensors": _safetensors_mark, ".pt": _pickle_mark,
    ".pth": _pickle_mark,
}
"""Suffix -> how that kind of file names what wrote it."""


def written_by(path: str | os.PathLike) -> str | None:
    """What wrote ``path`` (``"mvar-engine generate"``, ...), or None: no mark, not readable, or a
    kind of file the engine does not mark."""
    path = Path(path)
    reader = MARK_READERS.get(path.suffix.lower())
    if reader is None or not path.is_file():
        return None
    try:
        mark = reader(path)
    except Exception:  # unreadable, truncated, another format under this suffix: not ours
        return None
    return mark if isinstance(mark, str) else None


def check_replaceable(outputs: Mapping[str, str | os.PathLike | None], overwrite: bool) -> None:
    """Each existing output (flag -> path; None and ``os.devnull`` skipped) was written by the command
    running now (:func:`~mvar_engine.core.files.writer`), or ``overwrite`` is set: else a one-line
    :class:`UsageError` naming the flag, the file and the two ways out. Reads, writes nothing."""
    if overwrite:
        return
    for flag, path in outputs.items():
        if path is None or os.fspath(path) == os.devnull or not Path(path).exists():
            continue
        if written_by(path) != writer():
            command = writer().removeprefix("mvar-engine ")
            raise UsageError(f"{flag} {path}: the file exists and was not written by `mvar-engine {command}` "
                             f"(pass --overwrite to replace it, or choose another path)")


def check_outputs(outputs: Mapping[str, str | os.PathLike | None], overwrite: bool) -> None:
    """Every file a command will write (flag or description -> path), before any work: each a
    writable file path (:func:`~mvar_engine.apps.cli_helpers.check_output_path`) and replaceable
    (:func:`check_replaceable`). One-line :class:`UsageError`; creates nothing."""
    for flag, path in outputs.items():
        if path is not None:
            check_output_path(flag, path)
    check_replaceable(outputs, overwrite)


def add_overwrite_flag(parser) -> None:
    """``--overwrite`` on a command's argparse parser (see :func:`check_replaceable`)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files this command did not write (by default only its own "
                             "earlier outputs are replaced)")


def report_outputs(output: str | os.PathLike, companions: tuple[str, ...]) -> dict[str, Path]:
    """A report's files: ``--output`` and each companion suffix beside it (``bm.json`` -> ``bm.md``)."""
    output = Path(output)
    return {"--output": output, **{f"--output's {suffix} companion": output.with_suffix(suffix) for suffix in companions}}
