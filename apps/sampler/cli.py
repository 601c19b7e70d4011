"""``mvar-engine sample``: ``--per-class N`` images of every class (or ``--labels``) into a folder of
PNGs and an ADM-style ``.npz``, as one process or sharded under torchrun.

Image ``i`` of class ``c`` draws from its own generator seeded from (``--seed``, c, i) and is
decoded on its own (:meth:`~mvar_engine.apps.pipeline.Pipeline.generate_items`), so the files do
not depend on ``--batch-size``, on the number of processes or on interruptions. Under ``torchrun
--nproc_per_node N`` rank ``r`` makes the images ``r, r + N, ...`` of the plan (gloo on CPU, nccl
on CUDA), each written atomically as it is finished; after a barrier rank 0 packs the ``.npz``.
``--resume`` skips the images already on disk, after checking that the folder was written with
the same settings (:mod:`.identity`). Bad input is one line and exit 2 before any model is built.
"""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...core import __version__
from ...core.errors import UsageError
from ...core.files import file_sha256
from .. import distributed as D
from ..cli import GenerationCommand, parse_generation_command
from ..cli_helpers import PROG, check_output_path
from ..config import EngineConfig
from ..images import to_uint8
from ..memory_fit import available_bytes, format_bytes
from ..output_files import check_replaceable
from ..pipeline import Pipeline, PreparedRun, prepare_run, resolve_autocast, resolve_device
from .folder import SampleFolder
from .identity import model_files, sample_identity

DEFAULT_PER_CLASS = 50
"""Images per class by default: the ImageNet protocol's 50 (50,000 for 1,000 classes)."""


def positive_int_of(flag: str, what: str = "a whole number", minimum: int = 1):
    """argparse type: an integer >= ``minimum`` for ``flag`` (one-line errors naming it)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{flag} {text!r}: give {what}") from None
        if value < minimum:
            raise UsageError(f"{flag} {value}: give at least {minimum}")
        return value

    return parse


def resized(images: torch.Tensor, side: int | None) -> torch.Tensor:
    """``images [N, 3, H, W]`` in [0, 1] resized to ``side`` (bicubic, each image on its own), clamped."""
    if side is None or tuple(images.shape[-2:]) == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)


def add_sample_flags(parser) -> None:
    g = parser.add_argument_group("sampling job")
    g.add_argument("--per-class", type=positive_int_of("--per-class", "a whole number of images per class (e.g. 50)"),
                   default=DEFAULT_PER_CLASS, metavar="N",
                   help=f"images of every class (default {DEFAULT_PER_CLASS}; with --labels, of each label)")
    g.add_argument("--output-dir", default="samples", metavar="DIR",
                   help="folder of the PNGs (DIR/images) and DIR/samples.json (default samples)")
    g.add_argument("--npz", default=None, metavar="PATH", help="packed images (default DIR/samples.npz)")
    g.add_argument("--resize", type=positive_int_of("--resize", "the side in pixels (e.g. 256)", minimum=8), default=None, metavar="SIDE",
                   help="resize every image to SIDE x SIDE (bicubic) before it is saved, as LlamaGen's "
                        "--image-size-eval 256 does for its 384 px models (default: the model's size)")
    g.add_argument("--decode-chunk", type=positive_int_of("--decode-chunk"), default=1, metavar="N",
                   help="images decoded at once (default 1: each image on its own, so its pixels do not depend on "
                        "the batch; N > 1 is faster on a GPU, but the decoder's rounding then depends on the chunk)")
    g.add_argument("--resume", action="store_true", default=False, help="continue a folder: skip the images already in it "
                   "(refused when it was written with other settings)")


SAMPLE_COMMAND = GenerationCommand(
    prog=f"{PROG} sample",
    description="Sample --per-class images of every class (or of --labels) with any generation flags into "
                "DIR/images/*.png and an ADM-style .npz (arr_0: uint8 [N, H, W, 3], labels). Each image has its own "
                "seed, so the files do not depend on --batch-size or the number of processes; run under "
                "`torchrun --nproc_per_node N -m mvar_engine.apps.cli sample ...` to shard the images.",
    extend=add_sample_flags,
    refused={"--output": "sample writes into --output-dir (and --npz)",
             "--per-image": "sample always writes one PNG per image",
             "--save-tokens": "sample writes images",
             "--samples-per-label": "use --per-class"})


def check_sample_inputs(config: EngineConfig, args) -> tuple[SampleFolder, Path]:
    """Everything about the job that can be checked before a model is built (one-line errors)."""
    resolve_autocast(config.dtype, resolve_device(config.device))
    if not str(args.output_dir).strip():
        raise UsageError("--output-dir '': the path is empty (give a folder, e.g. samples)")
    folder = SampleFolder(args.output_dir)
    folder.check_writable()
    npz = check_output_path("--npz", args.npz if args.npz is not None else folder.root / "samples.npz", (".npz",))
    if args.npz is not None:  # the default, inside the folder, is the folder's own (its record says so)
        check_replaceable({"--npz": npz}, config.output.overwrite)
    if args.resize is not None:
        check_resize_fits(args.resize, config.batch_size)
    return folder, npz


RESIZE_BYTES_PER_PIXEL = 3 * (4 + 4 + 1)
"""Per output pixel of a resized batch: RGB float32 source-resolution result and its bicubic copy, then uint8."""


def check_resize_fits(side: int, batch_size: int, available: int | None = None) -> None:
    """``--resize SIDE``: each image within Pillow's decompression-bomb limit (the packing step reads
    every PNG back) and a batch of them within the CPU's free memory (``available`` overrides it, for
    tests); else a one-line :class:`UsageError`, before any model is built."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and side * side > limit:
        raise UsageError(f"--resize {side}: {side}x{side} images are more than the {limit} pixels Pillow reads back "
                         f"safely (give at most {math.isqrt(limit)})")
    need = batch_size * side * side * RESIZE_BYTES_PER_PIXEL
    free = available if available is not None else available_bytes(torch.device("cpu"))
    if free is not None and need > free:
        raise UsageError(f"--resize {side} with --batch-size {batch_size}: {format_bytes(need)} per batch, more than the "
                         f"{format_bytes(free)} free (lower --batch-size or --resize)")


ITEM_BYTES = 256
"""Memory one planned image costs the job before it is made (its (label, index) entry and bookkeeping)."""


def check_job_fits(labels: int, per_class: int, available: int | None = None) -> None:
    """The job's image list fits in the CPU's free memory (``available`` overrides it, for tests):
    else a one-line :class:`UsageError`, before anything is planned or written."""
    count = labels * per_class
    free = available if available is not None else available_bytes(torch.device("cpu"))
    if free is not None and count * ITEM_BYTES > free:
        raise UsageError(f"--per-class {per_class} x {labels} classes: {count} images; listing them alone needs "
                         f"{format_bytes(count * ITEM_BYTES)}, more than the {format_bytes(free)} free (ask for fewer "
                         f"images per class)")


def plan_items(labels: Sequence[int], per_class: int) -> list[tuple[int, int]]:
    """``(label, index)`` of every image of the job, in (label, index) order (the npz's order)."""
    return [(label, index) for label in labels for index in range(per_class)]


def job_labels(config: EngineConfig, run: PreparedRun) -> list[int] | None:
    """``--labels`` (deduplicated, in order) or every class the family reports (None: unknown
    before the build)."""
    if config.labels is not None:
        return list(dict.fromkeys(config.labels))
    return list(range(run.facts.num_classes)) if run.facts is not None else None


def cmd_sample(argv: Sequence[str]) -> int:
    config, args = parse_generation_command(argv, SAMPLE_COMMAND)
    folder, npz = check_sample_inputs(config, args)
    info = D.setup(config.device)
    try:
        return run_job(config.model_copy(update={"device": str(info.device)}), args, folder, npz, info)
    finally:
        D.cleanup()


def on_main(info: D.DistInfo, work: Callable[[], Any]) -> Any:
    """``work()`` on rank 0 only; its one-line ``UsageError`` is raised on every rank (so no rank
    waits at a barrier for one that stopped). Returns its result on rank 0, None elsewhere."""
    problem, result = None, None
    if info.is_main:
        try:
            result = work()
        except UsageError as error:
            problem = str(error)
    problem = D.broadcast_object(problem)
    if problem is not None:
        raise UsageError(problem)
    return result


def run_job(config: EngineConfig, args, folder: SampleFolder, npz: Path, info: D.DistInfo) -> int:
    run = prepare_run(config)
    labels = job_labels(run.config, run)
    pipe = None
    if labels is None:  # the family tells nothing before the build: build first
        pipe = Pipeline.build(run)
        labels = list(range(pipe.adapter.num_classes))
    check_job_fits(len(labels), args.per_class)
    items = plan_items(labels, args.per_class)

    def check() -> tuple[dict, dict, dict | None]:  # rank 0: the folder may take this run (files hashed once, here)
        files = model_files(run.config, run.components.model)
        identity = sample_identity(run.config, info.device, labels, args.per_class, files, args.resize,
                                   args.decode_chunk)
        return files, identity, folder.check_start(identity, args.resume)

    checked = on_main(info, check)
    pipe = pipe or Pipeline.build(run)  # the weights are checked (shapes, finite) before the folder is written

    def start() -> None:
        files, identity, record = checked
        folder.remove_temps(items)
        folder.write_record(start_record(record, run.config, identity, files, info, len(items)))

    on_main(info, start)
    mine = items[info.rank::info.world_size]
    done = folder.done(mine)
    todo = [item for item in mine if item not in done]
    began = time.perf_counter()
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="img", desc="images",
               disable=not (config.progress and info.is_main))
    batch = pipe.config.batch_size
    for offset in range(0, len(todo), batch):
        chunk = todo[offset:offset + batch]
        result = pipe.generate_items(chunk, progress=lambda n: None, decode_chunk=args.decode_chunk)
        for (label, index), pixels in zip(chunk, to_uint8(resized(result.images, args.resize))):
            folder.save(label, index, pixels)
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - began
    D.barrier()

    def pack() -> None:  # rank 0, once every rank has written its images
        path, (height, width) = folder.pack(items, npz)
        record = folder.read_record() or {}
        record["npz"] = {"path": str(path), "sha256": file_sha256(path), "images": len(items),
                         "height": height, "width": width}
        record["runs"][-1].update(seconds=round(seconds, 3), generated_by_rank0=len(todo))
        folder.write_record(record)
        print(f"wrote {path} ({len(items)} images of {len(labels)} classes, {width}x{height}; {len(todo)} generated "
              f"by rank 0 in {seconds:.1f} s, {info.world_size} process(es); {folder.root}/images)")

    on_main(info, pack)
    return 0


def start_record(previous: dict[str, Any] | None, config: EngineConfig, identity: dict[str, Any],
                 files: dict[str, dict[str, str]], info: D.DistInfo, images: int) -> dict[str, Any]:
    """``samples.json`` at the start of a run: the identity, every setting, the model files, the
    package version and this run appended to ``runs`` (the packed npz is added at the end)."""
    runs = list((previous or {}).get("runs", []))
    runs.append({"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "world_size": info.world_size, "batch_size": config.batch_size, "device": str(info.device),
                 "resumed": previous is not None, "mvar_engine": __version__})
    return {"mvar_engine": __version__, "identity": identity, "images": images, "config": config.model_dump(mode="json"),
            "model_files": files, "runs": runs}
