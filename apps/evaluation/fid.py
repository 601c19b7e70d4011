"""``mvar-engine fid SAMPLES.npz --ref REF.npz --inception-weights PATH``: FID (and the Inception
Score, and optionally k-NN precision/recall) of an image batch against a reference batch.

Features: torch-fidelity's Inception-v3 (:mod:`.inception`, weights from a local file). FID: the
Fréchet distance of the Gaussians fitted to the two sets of pool features (:mod:`.metrics`, float64,
symmetric eigendecompositions). IS: torch-fidelity's computation (10 splits) on the samples.
Precision/recall (``--prc``): Kynkäänniemi et al.'s k-NN manifolds (k = 3) on the same Inception
pool features; the paper's numbers use VGG16 features instead, so compare these only with each
other. Both batches are ADM-style ``.npz`` files (``arr_0``: uint8 ``[N, H, W, 3]``), of one
resolution. Writes a JSON report atomically and prints one line per metric.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ...core.errors import UsageError
from ..bench.report import machine_info, write_json
from ..cli_helpers import PROG, Parser, check_output_path
from ..output_files import add_overwrite_flag, check_outputs
from ..npz_images import NpzImages, read_npz_images
from ..pipeline import resolve_device
from .inception import inception_features, inception_score, load_inception
from .metrics import frechet_distance, precision_recall

PRC_K = 3


def check_pair(samples: NpzImages, reference: NpzImages) -> None:
    """One resolution for both batches (the published protocols compare 256 px with 256 px)."""
    if samples.resolution != reference.resolution:
        (sh, sw), (rh, rw) = samples.resolution, reference.resolution
        raise UsageError(f"--ref {reference.path}: its images are {rw}x{rh} but {samples.path}'s are {sw}x{sh}; "
                         f"score against a reference batch of the samples' resolution")


def score(samples: NpzImages, reference: NpzImages, extractor: torch.nn.Module, device: torch.device, *,
          batch_size: int = 64, prc: bool = False, progress: bool = True) -> dict[str, Any]:
    """The metrics of ``samples`` against ``reference`` (see the module docstring)."""
    bar = tqdm(total=len(samples) + len(reference), unit="img", desc="inception", disable=not progress, leave=False)
    start = time.perf_counter()
    fake_pool, fake_logits = inception_features(extractor, samples.images, batch_size, device, bar.update)
    real_pool, _ = inception_features(extractor, reference.images, batch_size, device, bar.update)
    bar.close()
    result: dict[str, Any] = {"fid": frechet_distance(fake_pool, real_pool), "samples": len(samples),
                              "reference": len(reference), "resolution": list(samples.resolution)}
    if len(samples) >= 10:
        result["isc_mean"], result["isc_std"] = inception_score(fake_logits)
    if prc:
        result["precision"], result["recall"] = precision_recall(real_pool, fake_pool, k=PRC_K)
    result["features_s"] = time.perf_counter() - start
    return result


def build_parser() -> Parser:
    p = Parser(prog=f"{PROG} fid", allow_abbrev=False,
               description="FID of an image batch against a reference batch on torch-fidelity's Inception-v3 "
                           "features (weights from a local file), with the Inception Score and, with --prc, k-NN "
                           "precision/recall. Both files are ADM-style .npz batches (arr_0: uint8 [N, H, W, 3]) of "
                           "one resolution, e.g. what `mvar-engine sample` writes and ADM's reference batches.")
    p.add_argument("samples", metavar="SAMPLES.npz", help="the generated images")
    p.add_argument("--ref", required=True, metavar="REF.npz", help="the reference images (e.g. ADM's "
                   "VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (required: nothing is downloaded)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per Inception pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--prc", action="store_true", help="also k-NN precision/recall (k=3; cost grows with N^2)")
    p.add_argument("--output", default="fid.json", metavar="PATH", help="JSON report (default fid.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_overwrite_flag(p)
    return p


def cmd_fid(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    output = check_output_path("--output", args.output, (".json",))
    check_outputs({"--output": output}, args.overwrite)
    device = resolve_device(args.device)
    samples = read_npz_images(args.samples, "fid SAMPLES")
    reference = read_npz_images(args.ref, "--ref")
    check_pair(samples, reference)
    if args.prc and min(len(samples), len(reference)) <= PRC_K:
        raise UsageError(f"--prc needs more than {PRC_K} images in each batch")
    extractor, how = load_inception(args.inception_weights, device)
    result = score(samples, reference, extractor, device, batch_size=args.batch_size, prc=args.prc,
                   progress=not args.no_progress)
    payload = {"fid": result, "samples": str(Path(args.samples)), "ref": str(Path(args.ref)),
               "inception_weights": str(args.inception_weights),
               "feature_extractor": {"library": "torch-fidelity", "version": how.version, "name": "inception-v3-compat",
                                     "package_init": how.whole, "why_not": how.reason},
               "machine": machine_info(device)}
    write_json(output, payload)
    lines = [f"FID {result['fid']:.4f} ({result['samples']} samples vs {result['reference']} reference images, "
             f"{result['resolution'][1]}x{result['resolution'][0]})"]
    if "isc_mean" in result:
        lines.append(f"IS {result['isc_mean']:.4f} ± {result['isc_std']:.4f}")
    if args.prc:
        lines.append(f"precision {result['precision']:.4f}, recall {result['recall']:.4f} (k={PRC_K}, Inception features)")
    print("\n".join(lines + [f"wrote {output}"]))
    return 0
