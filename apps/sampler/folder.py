"""A sample folder: ``samples.json`` (what wrote it), ``images/LLLLL_IIIIII.png`` (image ``I`` of
class ``L``, each written atomically, so a file that exists is whole) and the packed ``.npz``.

A run into a folder that already holds samples needs ``--resume``, and resumes only with the
settings that wrote it (:func:`first_difference` names the one that differs): the images already
there are then exactly those the run would make, so it skips them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from ...core.errors import UsageError
from ...core.files import remove_orphan_temps
from ..bench.report import write_json
from ..cli_helpers import check_output_path
from ..images import save_png
from ..npz_images import write_npz_images

RECORD_NAME = "samples.json"
IMAGES_DIR = "images"
FORMAT = "mvar-engine samples 1"
IMAGE_NAME = re.compile(r"(\d{5})_(\d{6})\.png")


def image_name(label: int, index: int) -> str:
    """``LLLLL_IIIIII.png``: names sort in (label, index) order."""
    return f"{label:05d}_{index:06d}.png"


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys (``{"sampling": {"cfg": 2}}`` -> ``{"sampling.cfg": 2}``)."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def first_difference(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first dotted key (in the recorded order, then the current's new keys) whose value differs
    between two identities: (key, recorded, current); None when they agree."""
    a, b = flatten(recorded), flatten(current)
    for key in [*a, *(key for key in b if key not in a)]:
        if a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None


class SampleFolder:
    """The folder ``root`` of one sampling job (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.images = self.root / IMAGES_DIR
        self.record_path = self.root / RECORD_NAME

    def image_path(self, label: int, index: int) -> Path:
        return self.images / image_name(label, index)

    # -- checks (before any model is built) --------------------------------------------------------
    def check_writable(self) -> None:
        """A folder (or a place to make one) this process can write: one-line ``UsageError``."""
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"--output-dir {self.root}: is a file, not a folder (choose another --output-dir)")
        if self.images.is_symlink() or (self.images.exists() and not self.images.is_dir()):
            raise UsageError(f"--output-dir {self.root}: its {IMAGES_DIR}/ is a link or a file, not a folder of its "
                             f"own (nothing is written through a link; sample into another --output-dir)")
        check_output_path("--output-dir", self.record_path, (".json",))

    def read_record(self) -> dict[str, Any] | None:
        if not self.record_path.is_file():
            return None
        try:
            record = json.loads(self.record_path.read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"--output-dir {self.root}: its {RECORD_NAME} cannot be read ({error}); "
                             f"sample into another --output-dir") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("identity"), dict):
            raise UsageError(f"--output-dir {self.root}: its {RECORD_NAME} was not written by `mvar-engine sample` "
                             f"({FORMAT}); sample into another --output-dir")
        return record

    def check_start(self, identity: Mapping[str, Any], resume: bool) -> dict[str, Any] | None:
        """Whether a run with ``identity`` may write here: a new folder, an empty one, or (with
        ``resume``) one written with the same identity. Returns the existing record (None when new)."""
        self.check_writable()
        record = self.read_record()
        if record is None:
            others = [p.name for p in self.root.iterdir()] if self.root.is_dir() else []
            if others:
                raise UsageError(f"--output-dir {self.root}: is not empty and holds no {RECORD_NAME} ({others[0]}, ...); "
                                 f"sample into a new or empty folder")
            return None
        if not resume:
            raise UsageError(f"--output-dir {self.root}: already holds samples ({RECORD_NAME}); pass --resume to "
                             f"continue them, or choose another --output-dir")
        difference = first_difference(record["identity"], identity)
        if difference is not None:
            key, was, now = difference
            raise UsageError(f"--resume: {self.root} was sampled with {key}={json.dumps(was)}, this run has "
                             f"{key}={json.dumps(now)} (resume with the same setting, or sample into another --output-dir)")
        return record

    # -- writing ---------------------------------------------------------------------------------
    def write_record(self, record: Mapping[str, Any]) -> Path:
        return write_json(self.record_path, {"format": FORMAT, **record})

    def remove_temps(self, items: Iterable[tuple[int, int]]) -> list[Path]:
        """Delete temp files a killed run left for these images (only while nothing else writes them)."""
        return remove_orphan_temps(self.images, (image_name(label, index) for label, index in items))

    def done(self, items: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
        """The items whose PNG exists and reads as a PNG (atomic writes: a file this command wrote is
        complete; one damaged since is made again)."""
        return {(label, index) for label, index in items if self.readable(self.image_path(label, index))}

    @staticmethod
    def readable(path: Path) -> bool:
        """A regular file whose PNG chunks are whole (Pillow's ``verify``: checksums, no decoding)."""
        if path.is_symlink() or not path.is_file():
            return False
        try:
            with Image.open(path) as image:
                image.verify()
            return image.format == "PNG"
        except (OSError, ValueError, SyntaxError):  # Pillow raises SyntaxError for some broken chunks
            return False

    def save(self, label: int, index: int, pixels: np.ndarray) -> Path:
        """``pixels``: uint8 ``[H, W, 3]``."""
        return save_png(pixels, self.image_path(label, index))

    def load(self, label: int, index: int) -> np.ndarray:
        with Image.open(self.image_path(label, index)) as image:
            return np.asarray(image.convert("RGB"))

    def pack(self, items: Sequence[tuple[int, int]], npz: str | Path) -> tuple[Path, tuple[int, int]]:
        """Every item's PNG, in ``items`` order, into ``npz`` (``arr_0`` uint8 ``[N, H, W, 3]``,
        ``labels``); returns the path and the image size. All PNGs must exist and share one size."""
        missing = [item for item in items if not self.image_path(*item).is_file()]
        if missing:
            raise UsageError(f"{self.root}: {len(missing)} of {len(items)} images are missing (first: "
                             f"{image_name(*missing[0])}); run the command again with --resume")
        height, width = self.load(*items[0]).shape[:2]

        def images():
            for label, index in items:
                pixels = self.load(label, index)
                if pixels.shape != (height, width, 3):
                    raise UsageError(f"{self.image_path(label, index)}: {pixels.shape[1]}x{pixels.shape[0]}, the others "
                                     f"are {width}x{height} (remove it and run again with --resume)")
                yield pixels

        labels = np.array([label for label, _ in items], dtype=np.int64)
        return write_npz_images(npz, images(), len(items), height, width, labels), (height, width)
