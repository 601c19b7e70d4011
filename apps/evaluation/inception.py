"""torch-fidelity's Inception-v3 feature extractor (``inception-v3-compat``), loaded from a local
weights file only.

Why torch-fidelity: its extractor reproduces the TensorFlow graph behind the published FIDs (the
2015-12-05 Inception weights, TF1's bilinear resize to 299 px, the 2048-d pool features and the
1008 logits), so its numbers are comparable with ADM's evaluator and the VAR/LlamaGen papers; it
reads its weights from a path (``feature_extractor_weights_path``), and it needs no SciPy or
network access (clean-fid downloads its TorchScript model and needs SciPy and requests).

torch-fidelity's package ``__init__`` also imports its CLIP, DINOv2 and VGG16 extractors, which
import torchvision. Where torchvision cannot be imported (a CPU-only torch build beside PyPI's
CUDA torchvision wheel: "operator torchvision::nms does not exist"), :func:`fidelity_module` loads
the Inception extractor's own modules (which import only torch) without running that
``__init__``; the extractor is the same code either way, and the report says which way it came.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import Callable, Iterator

import numpy as np
import torch

from ...core.errors import UsageError
from ...core.files import atomic_write, not_a_file_reason
from ..cli_helpers import one_line

FEATURES = ("2048", "logits_unbiased")
"""The extractor's outputs used here: the pool features (FID, precision/recall) and the logits
without the bias (the Inception Score, as torch-fidelity)."""

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"
WEIGHTS_HINT = (f"--inception-weights PATH: the Inception-v3 weights as a local file (torch-fidelity's {WEIGHTS_NAME}, "
                f"from {WEIGHTS_URL}); nothing is downloaded")
EXTRACTOR_NAME = "inception-v3-compat"


@dataclass(frozen=True)
class FidelityImport:
    """How torch-fidelity was imported: ``version``, ``whole`` (its package ``__init__`` ran) and,
    when not, why (``reason``)."""

    version: str
    whole: bool
    reason: str | None = None


def _installed_version() -> str:
    try:
        return version("torch-fidelity")
    except PackageNotFoundError:
        return "unknown"


def fidelity_module(name: str) -> tuple[ModuleType, FidelityImport]:
    """torch-fidelity's module ``torch_fidelity.<name>`` and how it was imported (module docstring).
    Not installed: a one-line :class:`UsageError` naming the install."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise UsageError("fid needs torch-fidelity: pip install torch-fidelity (pip install 'mvar-engine[fid]' also "
                         "brings torchvision; without a working torchvision use pip install --no-deps torch-fidelity)")
    try:
        return importlib.import_module(f"torch_fidelity.{name}"), FidelityImport(_installed_version(), True)
    except Exception as error:  # torchvision broken or absent: load the module without the package __init__
        reason = one_line(error, with_type=True, limit=200)
    package = sys.modules.get("torch_fidelity")
    stub = None
    if package is None:
        spec = importlib.util.find_spec("torch_fidelity")
        stub = importlib.util.module_from_spec(spec)  # the package's path, its __init__ not run
        sys.modules["torch_fidelity"] = stub
    try:
        module = importlib.import_module(f"torch_fidelity.{name}")
    finally:
        if stub is not None and sys.modules.get("torch_fidelity") is stub:
            del sys.modules["torch_fidelity"]  # a later `import torch_fidelity` runs the real __init__
    return module, FidelityImport(_installed_version(), False, reason)


def load_inception(weights: str | Path | None, device: torch.device) -> tuple[torch.nn.Module, FidelityImport]:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with the weights in ``weights`` (never a
    download), in eval mode on ``device``. Missing or unusable weights: one-line ``UsageError``."""
    if weights is None or not str(weights).strip():
        raise UsageError(f"fid needs {WEIGHTS_HINT}")
    path = Path(weights)
    reason = not_a_file_reason(path)
    if reason is not None:
        raise UsageError(f"--inception-weights {weights}: {reason} (give torch-fidelity's {WEIGHTS_NAME}, "
                         f"from {WEIGHTS_URL})")
    module, how = fidelity_module("feature_extractor_inceptionv3")
    try:
        # weights_only: the file is data, never code (torch-fidelity's own loader unpickles in full)
        state = torch.load(path, map_location="cpu", weights_only=True)
        extractor = unloaded_extractor(module)
        extractor.load_state_dict(state, strict=True)
    except Exception as error:
        raise UsageError(f"--inception-weights {weights}: not torch-fidelity's Inception-v3 state dict "
                         f"({one_line(error, limit=160)}); give {WEIGHTS_NAME}") from None
    return extractor.to(device).eval(), how


def unloaded_extractor(module: ModuleType) -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` built with its random initialisation: its
    constructor's own weight loading (a full unpickling) is given an empty file of ours and skipped;
    the caller loads weights, or keeps the random ones."""

    class Unloaded(module.FeatureExtractorInceptionV3):
        skip_load = True

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if self.skip_load:  # the constructor's call
                self.skip_load = False
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return Unloaded(EXTRACTOR_NAME, list(FEATURES), feature_extractor_weights_path=str(empty))


def batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Writable copies of consecutive ``batch_size`` rows (``images`` may be a read-only map)."""
    for start in range(0, len(images), batch_size):
        yield np.array(images[start:start + batch_size])


@torch.no_grad()
def inception_features(extractor: torch.nn.Module, images: np.ndarray, batch_size: int, device: torch.device,
                       progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``images``: uint8 ``[N, H, W, 3]`` -> (pool features ``[N, 2048]``, unbiased logits
    ``[N, 1008]``), float64 on the CPU, in batches of ``batch_size`` (the extractor resizes)."""
    pools, logits = [], []
    for chunk in batches(images, batch_size):
        x = torch.from_numpy(chunk).permute(0, 3, 1, 2).to(device)
        pool, logit = extractor(x)
        pools.append(pool.double().cpu())
        logits.append(logit.double().cpu())
        if progress is not None:
            progress(len(chunk))
    return torch.cat(pools), torch.cat(logits)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) of ``logits [N, C]``, as torch-fidelity computes it:
    rows shuffled by ``numpy.random.RandomState(seed)``, then over ``splits`` consecutive parts
    ``exp(mean_x KL(p(y|x) || p(y)))``; returns (mean, population std) over the parts."""
    if logits.shape[0] < splits:
        raise ValueError(f"the Inception Score needs at least {splits} images, got {logits.shape[0]}")
    n = logits.shape[0]
    x = logits.double()[np.random.RandomState(seed).permutation(n)]
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part, log_part = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(dim=0, keepdim=True)
        scores.append(float((part * (log_part - marginal.log())).sum(dim=1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a state dict of the extractor's architecture with random weights (He-normal
    convolutions, so activations neither vanish nor explode through its 94 layers) to ``path``,
    atomically: for tests of the plumbing and offline smoke runs. FIDs on it mean nothing."""
    module, _ = fidelity_module("feature_extractor_inceptionv3")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = unloaded_extractor(module)
        for layer in net.modules():
            if isinstance(layer, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    state = net.state_dict()
    return atomic_write(path, lambda tmp: torch.save(state, tmp))
