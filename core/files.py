"""Files written atomically (a reader never sees a partial file, an interrupted write loses
nothing) and marked with what wrote them (so that a command replaces only its own outputs)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import FileWriteError, UsageError

ModelT = TypeVar("ModelT", bound=BaseModel)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file, and an
    interrupted write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if error.errno in STORAGE_ERRORS:
            raise FileWriteError(f"{path}: cannot be written ({os.strerror(error.errno)}); the partial file was removed "
                                 f"and nothing else changed (free space, or choose another location)") from error
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
"""Write failures that are the storage's, not the program's: reported in one line naming the path."""


TEMP_NAME = re.compile(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp")
"""The name ``tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")`` gives (8 random characters)."""


def temp_name_of(path: Path) -> str | None:
    """The file an :func:`atomic_write` temp file ``.NAME.XXXXXXXX.tmp`` was for (``NAME``), or None."""
    match = TEMP_NAME.fullmatch(path.name)
    return match.group(1) if match else None


def remove_orphan_temps(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temp files that interrupted :func:`atomic_write` calls (SIGKILL, power loss) left in
    ``folder`` for the files ``names``; only call it while no other process writes those files.
    Returns the paths removed."""
    folder, owned = Path(folder), set(names)
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if temp_name_of(path) in owned and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def not_a_file_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a file (``"is a directory"``, ``"does not exist"``, ``"is not
    a regular file"``), or None when it can."""
    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        return "is a directory, not a file"
    if path.exists():
        return "is not a regular file"
    return "does not exist"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Do ``a`` and ``b`` name one file, through links and hard links? A path that does not exist yet
    is compared by where it resolves."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


WRITTEN_BY = "written_by"
"""Where a file names what wrote it: a JSON report's key, an ``.npz`` or ``.pt`` entry, a
``.safetensors`` metadata key; images carry it in their EXIF ``Software`` tag (:data:`EXIF_SOFTWARE`)
and Markdown in a first-line comment."""
EXIF_SOFTWARE = 0x0131
_WRITER: ContextVar[str] = ContextVar("mvar_engine_writer", default="mvar-engine")


def writer() -> str:
    """The mark of files written now: ``mvar-engine COMMAND`` inside :func:`writing_as`, else ``mvar-engine``."""
    return _WRITER.get()


@contextmanager
def writing_as(command: str) -> Iterator[None]:
    """Files written in this block are marked ``mvar-engine COMMAND`` (the CLI wraps each command)."""
    token = _WRITER.set(f"mvar-engine {command}")
    try:
        yield
    finally:
        _WRITER.reset(token)


def save_marked_image(image: Any, path: str | os.PathLike, **save_options: Any) -> Path:
    """A Pillow ``image`` saved to ``path`` atomically (``save_options``: format, quality, ...), its
    EXIF ``Software`` tag naming :func:`writer` (PNG, JPEG and WebP all keep it)."""
    exif = image.getexif()
    exif[EXIF_SOFTWARE] = writer()
    return atomic_write(path, lambda tmp: image.save(tmp, exif=exif, **save_options))


def marked_markdown(text: str) -> str:
    """``text`` with a first-line comment naming :func:`writer` (invisible when rendered)."""
    return f"<!-- {WRITTEN_BY}: {writer()} -->\n{text}"


def read_json_model(path: str | os.PathLike, model: type[ModelT], what: str, remedy: str) -> ModelT:
    """The pydantic ``model`` a JSON file holds (its :data:`WRITTEN_BY` key dropped); a missing,
    unreadable or malformed file is a one-line :class:`UsageError` naming ``what`` it should be and
    the ``remedy`` (``"write one with `mvar-engine profile-heads`"``)."""
    path = Path(path)
    reason = not_a_file_reason(path)
    if reason is not None:
        raise UsageError(f"{what} {path} {reason} ({remedy})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{what} {path} is not readable JSON: {error}") from None
    if isinstance(data, dict):
        data.pop(WRITTEN_BY, None)  # what wrote it, not part of the model
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UsageError(f"{what} {path}: {where + ': ' if where else ''}"
                         f"{first['msg'].removeprefix('Value error, ')}") from None


def write_json_model(value: BaseModel, path: str | os.PathLike) -> Path:
    """``value`` as indented JSON, its first key naming :func:`writer`, written atomically."""
    text = json.dumps({WRITTEN_BY: writer(), **value.model_dump()}, indent=1) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))
