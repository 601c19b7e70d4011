"""``mvar-engine cache-codes``: an image folder through a frozen tokenizer into a codes folder
(layout: :mod:`.code_cache`), as MVAR's ``main_cache.py`` and LlamaGen's ``extract_codes_c2i.py``
do before training.

Each image is resized (shorter side to 1.125 R, Lanczos) and centre-cropped to R (VAR's evaluation
crop, MVAR's cache), then encoded with its mirror image (the flipped twin, unless
``flip_twin=False``) in one batch. Shards are independent jobs: under torchrun rank ``r`` of ``W``
encodes shards ``r, r + W, ...``, each through its own DataLoader workers, and writes each shard
atomically; ``--resume`` skips the finished shards, so an interrupted job resumed gives the same
bytes as an uninterrupted one (a shard's images are always encoded in the same batches). Rank 0
writes the manifest once every shard is done.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ...core.errors import UsageError
from ...core.files import WRITTEN_BY, atomic_write, remove_orphan_temps, writer
from .. import distributed as D
from ..cli_helpers import PROG, Parser, check_output_path, int_list
from ..data import list_image_folder
from .code_cache import (FORMAT, LABELS_NAME, MANIFEST_NAME, PLAN_NAME, VERSION, is_codes_folder, read_json,
                         scale_hws, shard_stem)
from .frozen_tokenizer import FrozenTokenizer, load_frozen_tokenizer
from .image_stream import FolderItems, ItemRequest, folder_loader


@dataclass
class CacheCodesSettings:
    """Everything ``cache-codes`` takes (the CLI flags, one to one)."""

    data: str = ""
    tokenizer: str = "runs/tokenizer/tokenizer.safetensors"
    tokenizer_patch_nums: tuple[int, ...] | None = None
    output: str = "runs/codes"
    target: Literal["next-scale", "raster"] = "next-scale"
    resolution: int | None = None
    flip_twin: bool = True
    batch_size: int = 64
    shard_size: int = 4096
    workers: int = 2
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True


def schedule_of(tok: FrozenTokenizer, target: str) -> tuple:
    """The scales a target's codes hold: the tokenizer's own, or its latent grid as one scale."""
    return tuple(tok.patch_nums) if target == "next-scale" else (tok.latent_grid,)


def make_plan(s: CacheCodesSettings, tok: FrozenTokenizer, listing) -> dict[str, Any]:
    patch_nums = schedule_of(tok, s.target)
    hws = scale_hws(patch_nums)
    vocab = tok.vocab_size
    return {"format": FORMAT, "version": VERSION, "target": s.target, "scale_hws": hws,
            "seq_len": sum(h * w for h, w in hws), "dtype": "uint16" if vocab <= 2**16 else "int32",
            "vocab_size": vocab, "resolution": tok.resolution, "crop": "center",
            "resize": "lanczos, shorter side round(1.125 R)", "variants": 2 if s.flip_twin else 1,
            "tokenizer": {"path": str(tok.path), "sha256": tok.sha256, "patch_nums": scale_hws(tok.patch_nums)},
            "source": str(listing.root.resolve()), "num_images": len(listing), "class_names": list(listing.class_names),
            "shard_size": s.shard_size, "num_shards": math.ceil(len(listing) / s.shard_size),
            "encode_batch": s.batch_size}


def own_files(root: Path) -> list[Path]:
    """The files a codes job writes in ``root`` (what ``--overwrite`` may delete)."""
    fixed = [root / n for n in (PLAN_NAME, MANIFEST_NAME, LABELS_NAME)]
    return [p for p in fixed if p.exists()] + sorted(root.glob("codes-[0-9][0-9][0-9][0-9][0-9].*"))


def check_codes_output(s: CacheCodesSettings, plan: dict[str, Any]) -> Path:
    """The output folder: new or empty, a codes folder to ``--resume`` (same plan) or to
    ``--overwrite``; never one holding anything else, never inside ``--data``. Writes nothing."""
    root = Path(s.output)
    if not str(s.output).strip():
        raise UsageError("--output is empty: give the codes folder to write (e.g. runs/codes)")
    if root.exists() and not root.is_dir():
        raise UsageError(f"--output {root} is a file (give a folder for the codes)")
    if not root.exists():
        check_output_path("--output", root / PLAN_NAME)
    data = Path(s.data).resolve()
    if root.resolve() == data or data in root.resolve().parents:
        raise UsageError(f"--output {root} lies inside --data {s.data} (it would become a class folder); choose a "
                         f"folder outside it")
    if s.resume:
        if not (root / PLAN_NAME).is_file():
            raise UsageError(f"--resume: {root} holds no unfinished codes job (no {PLAN_NAME}); drop --resume")
        old = read_json(root / PLAN_NAME, "--resume:")
        changed = sorted(k for k in set(old) | set(plan) if k != WRITTEN_BY and old.get(k) != plan.get(k))
        if changed:
            details = "; ".join(f"{k}: {json.dumps(old.get(k))[:60]} then, {json.dumps(plan.get(k))[:60]} now"
                                for k in changed)
            raise UsageError(f"--resume: {root} was started with other settings or data ({details}); resume with the "
                             f"same flags, or --overwrite to start over")
        return root
    if root.is_dir() and any(root.iterdir()):
        if not is_codes_folder(root):
            raise UsageError(f"--output {root} is not empty and holds no codes (choose a new or empty folder)")
        if not s.overwrite:
            raise UsageError(f"--output {root} already holds codes; pass --resume to finish that job, --overwrite to "
                             f"start over, or choose another --output")
    return root


def check_settings(s: CacheCodesSettings) -> None:
    for flag, value, low in (("--batch-size", s.batch_size, 1), ("--shard-size", s.shard_size, 1),
                             ("--workers", s.workers, 0)):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if s.target not in ("next-scale", "raster"):
        raise UsageError(f"--target {s.target}: choose next-scale or raster")
    if s.resume and s.overwrite:
        raise UsageError("--resume and --overwrite contradict each other (give one)")


@torch.no_grad()
def encode_shard(k: int, plan: dict[str, Any], tok: FrozenTokenizer, dataset: FolderItems, workers: int,
                 device: torch.device, bar) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Shard ``k``'s ``[n, V, L]`` codes and its skipped images (see the module docstring)."""
    first = k * plan["shard_size"]
    count = min(plan["shard_size"], plan["num_images"] - first)
    codes = np.zeros((count, plan["variants"], plan["seq_len"]), dtype=plan["dtype"])
    chunks = [[ItemRequest(first + i, 0, 0, False) for i in range(start, min(start + plan["encode_batch"], count))]
              for start in range(0, count, plan["encode_batch"])]
    patch_nums = schedule_of(tok, plan["target"])
    skipped: list[dict[str, Any]] = []
    offset = 0
    for chunk, batch in zip(chunks, folder_loader(dataset, chunks, workers)):
        skipped += [{"index": first + offset + int(i), "file": skip.file, "reason": skip.reason}
                    for i, skip in zip(missing_rows(batch.rows, len(chunk)), batch.skipped)]
        if len(batch.rows):
            x = batch.images
            if plan["variants"] == 2:
                x = torch.cat([x, x.flip(-1)])
            tokens = torch.cat(tok.encode(x.to(device), patch_nums), dim=1).cpu().numpy()
            rows = offset + batch.rows.numpy()
            for v in range(plan["variants"]):
                codes[rows, v] = tokens[v * len(rows):(v + 1) * len(rows)]
        offset += len(chunk)
        bar.update(len(chunk))
    return codes, skipped


def missing_rows(rows: torch.Tensor, n: int) -> list[int]:
    """The rows of a chunk of ``n`` that a batch does not hold (its skipped images, in order)."""
    present = set(rows.tolist())
    return [i for i in range(n) if i not in present]


def write_shard(root: Path, k: int, plan: dict[str, Any], codes: np.ndarray, skipped: list[dict[str, Any]]) -> None:
    """The array, then its JSON (the completion mark), each atomically."""
    stem = shard_stem(k)
    atomic_write(root / f"{stem}.npy", lambda tmp: np.save(open(tmp, "wb"), codes))
    record = {"format": FORMAT, "file": f"{stem}.npy", "first": k * plan["shard_size"], "count": len(codes),
              "sha256": hashlib.sha256((root / f"{stem}.npy").read_bytes()).hexdigest(), "skipped": skipped,
              WRITTEN_BY: writer()}
    atomic_write(root / f"{stem}.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))


def shard_done(root: Path, k: int) -> bool:
    return (root / f"{shard_stem(k)}.json").is_file() and (root / f"{shard_stem(k)}.npy").is_file()


def cache_codes(s: CacheCodesSettings) -> Path:
    """Run the job per ``s`` (module docstring); returns the manifest's path. Every rank calls it."""
    check_settings(s)
    tok = load_frozen_tokenizer(s.tokenizer, s.resolution, s.tokenizer_patch_nums)
    if s.target == "next-scale" and not tok.multi_scale:
        raise UsageError(f"--tokenizer {s.tokenizer} is LlamaGen's VQ, one scale: give --target raster")
    if is_codes_folder(s.data):
        raise UsageError(f"--data {s.data} holds codes; cache-codes reads an image folder (one subfolder per class)")
    listing = list_image_folder(s.data)
    plan = make_plan(s, tok, listing)
    root = check_codes_output(s, plan)
    info = D.setup(s.device)
    try:
        if info.is_main:
            remove_orphan_temps(root, [PLAN_NAME, MANIFEST_NAME, LABELS_NAME] +
                                [f"{shard_stem(k)}.{x}" for k in range(plan["num_shards"]) for x in ("npy", "json")])
            if not s.resume:
                for path in own_files(root):
                    path.unlink()
                root.mkdir(parents=True, exist_ok=True)
                atomic_write(root / PLAN_NAME, lambda tmp: tmp.write_text(json.dumps({**plan, WRITTEN_BY: writer()},
                                                                                     indent=1) + "\n"))
                atomic_write(root / LABELS_NAME, lambda tmp: np.save(open(tmp, "wb"), listing.labels))
        D.barrier()
        todo = [k for k in range(info.rank, plan["num_shards"], info.world_size) if not shard_done(root, k)]
        dataset = FolderItems(listing, tok.resolution, "center", seed=0)
        tok.model.to(info.device)
        total = sum(min(plan["shard_size"], plan["num_images"] - k * plan["shard_size"]) for k in todo)
        with tqdm(total=total, desc=f"cache-codes rank {info.rank}" if info.distributed else "cache-codes", unit="img",
                  disable=not s.progress, dynamic_ncols=True) as bar:
            for k in todo:
                codes, skipped = encode_shard(k, plan, tok, dataset, s.workers, info.device, bar)
                write_shard(root, k, plan, codes, skipped)
        D.barrier()
        if info.is_main:
            write_manifest(root, plan)
        D.barrier()
    finally:
        D.cleanup()
    return root / MANIFEST_NAME


def write_manifest(root: Path, plan: dict[str, Any]) -> Path:
    """The plan plus every shard's record (file, first, count, sha256) and every skipped image."""
    shards, skipped = [], []
    for k in range(plan["num_shards"]):
        record = read_json(root / f"{shard_stem(k)}.json", "cache-codes: shard record")
        shards.append({key: record[key] for key in ("file", "first", "count", "sha256")})
        skipped += record["skipped"]
    manifest = {**plan, "shards": shards, "skipped": skipped, WRITTEN_BY: writer()}
    return atomic_write(root / MANIFEST_NAME, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))


def summary_line(manifest_path: Path) -> str:
    m = json.loads(manifest_path.read_text())
    size = sum((manifest_path.parent / s["file"]).stat().st_size for s in m["shards"]) / 2**20
    return (f"wrote {m['num_images'] - len(m['skipped'])} images' {m['target']} codes ({m['seq_len']} tokens x "
            f"{m['variants']} variant{'s' if m['variants'] > 1 else ''}) in {len(m['shards'])} shards, {size:.1f} MiB, "
            f"to {manifest_path.parent}" + (f"; skipped {len(m['skipped'])} unreadable images (named in "
                                            f"{manifest_path.name})" if m["skipped"] else ""))


def parse_cache_codes(argv: Sequence[str]) -> CacheCodesSettings:
    d = CacheCodesSettings()
    p = Parser(prog=f"{PROG} cache-codes", allow_abbrev=False,
               description="Encode a class-per-subfolder image folder with a frozen tokenizer into sharded, "
                           "memory-mappable codes (centre crop, plus the flipped twin) for 'train --data CODES'.")
    p.add_argument("--data", required=True, metavar="FOLDER", help="image folder, one subfolder per class (ImageNet's train/)")
    p.add_argument("--tokenizer", default=d.tokenizer, metavar="PATH", help=f"tokenizer weights (default {d.tokenizer})")
    p.add_argument("--tokenizer-patch-nums", type=int_list, default=None, metavar="N,N,...",
                   help="scale schedule of a tokenizer file without mvar_engine metadata (VAR's vae_ch160v4096z32.pth: "
                        "1,2,3,4,5,6,8,10,13,16)")
    p.add_argument("--resolution", type=int, default=None, help="image side; must match the tokenizer (default: its own)")
    p.add_argument("--target", choices=("next-scale", "raster"), default=d.target,
                   help="next-scale: every scale's tokens (VAR/MVAR, default); raster: the latent grid as one scale")
    p.add_argument("--no-flip-twin", action="store_true", help="do not store the codes of the mirrored image")
    p.add_argument("--output", default=d.output, metavar="DIR", help=f"codes folder (default {d.output})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images encoded at once (default {d.batch_size})")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help=f"images per shard file (default {d.shard_size})")
    p.add_argument("--workers", type=int, default=d.workers, help=f"DataLoader decoding processes (default {d.workers})")
    p.add_argument("--resume", action="store_true", help="finish an interrupted job in --output (same flags)")
    p.add_argument("--overwrite", action="store_true", help="start over in an --output that holds codes")
    p.add_argument("--device", default=d.device, help="auto (default), cpu, cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    a = p.parse_args(list(argv))
    return CacheCodesSettings(data=a.data, tokenizer=a.tokenizer, tokenizer_patch_nums=a.tokenizer_patch_nums,
                              output=a.output, target=a.target, resolution=a.resolution, flip_twin=not a.no_flip_twin,
                              batch_size=a.batch_size, shard_size=a.shard_size, workers=a.workers, resume=a.resume,
                              overwrite=a.overwrite, device=a.device, progress=not a.no_progress)


def cmd_cache_codes(argv: Sequence[str]) -> int:
    """``mvar-engine cache-codes [flags]``; returns the exit status."""
    manifest = cache_codes(parse_cache_codes(argv))
    if D.launch_rank() == 0:
        print(summary_line(manifest))
    return 0
