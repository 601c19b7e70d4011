"""Sample-quality metrics on feature vectors: Fréchet distance, k-NN precision/recall, accuracy.

All functions take features as ``[N, F]`` arrays or tensors (one row per image) and return plain
Python floats. They are pure (no randomness, no global state).

- :func:`frechet_distance`: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` of the Gaussians
  fitted to the two sets (the FID formula, here on whatever features are given), in float64 numpy.
  ``tr (S_a S_b)^{1/2}`` is computed as the sum of the square roots of the eigenvalues of the
  symmetric PSD matrix ``S_a^{1/2} S_b S_a^{1/2}`` (same spectrum as ``S_a S_b``), using symmetric
  eigendecompositions only; tiny negative eigenvalues from round-off are clipped to zero, and so
  is the result.
- :func:`precision_recall`: Kynkäänniemi et al. (2019). Each set's manifold is the union of balls
  around its points with radius the distance to the point's k-th nearest neighbour in the same set
  (the point itself excluded). Precision = fraction of fake points inside the real manifold;
  recall = fraction of real points inside the fake manifold.
- :func:`class_accuracy`: fraction of predictions equal to the labels.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = ["class_accuracy", "frechet_distance", "frechet_distance_from_moments", "gaussian_moments",
           "kth_neighbour_radii", "precision_recall"]


def _as_float64(x: ArrayLike, name: str) -> np.ndarray:
    array = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a [N, F] matrix of features, got shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def gaussian_moments(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[F]`` and unbiased covariance ``[F, F]`` (float64) of ``features [N, F]``, ``N >= 2``."""
    x = _as_float64(features, "features")
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {x.shape[0]}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance_from_moments(mu_a: ArrayLike, cov_a: ArrayLike, mu_b: ArrayLike, cov_b: ArrayLike) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)``.

    Contract: covariances symmetric PSD ``[F, F]``, means ``[F]``; result ``>= 0`` (float).
    """
    mu_a, mu_b = np.asarray(mu_a, dtype=np.float64).ravel(), np.asarray(mu_b, dtype=np.float64).ravel()
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, dtype=np.float64)), np.atleast_2d(np.asarray(cov_b, dtype=np.float64))
    if not (mu_a.shape == mu_b.shape and cov_a.shape == cov_b.shape == (mu_a.size, mu_a.size)):
        raise ValueError(f"moment shapes do not agree: means {mu_a.shape} and {mu_b.shape}, "
                         f"covariances {cov_a.shape} and {cov_b.shape}")
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())
    diff = mu_a - mu_b
    distance = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
    return max(distance, 0.0)


def frechet_distance(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """Fréchet distance between the Gaussians fitted to ``features_a [Na, F]`` and ``features_b [Nb, F]``
    (``Na, Nb >= 2``; same ``F``). ``frechet_distance(x, x) == 0`` up to round-off."""
    a, b = _as_float64(features_a, "features_a"), _as_float64(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    return frechet_distance_from_moments(*gaussian_moments(a), *gaussian_moments(b))


def _as_tensor64(x: ArrayLike, name: str) -> torch.Tensor:
    return torch.from_numpy(_as_float64(x, name))


def _min_over_chunks(queries: torch.Tensor, points: torch.Tensor, chunk: int, fn) -> torch.Tensor:
    return torch.cat([fn(torch.cdist(queries[i:i + chunk], points)) for i in range(0, queries.shape[0], chunk)])


def kth_neighbour_radii(features: ArrayLike, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """``[N]`` float64: each point's distance to its k-th nearest neighbour among the *other* points
    (duplicates count as neighbours at distance 0). Needs ``N > k``."""
    x = _as_tensor64(features, "features")
    if k < 1 or x.shape[0] <= k:
        raise ValueError(f"k-th neighbour radii need 1 <= k < N, got k={k} and N={x.shape[0]}")
    # the k+1 smallest distances include the point itself (0); the largest of them is the k-th neighbour
    return _min_over_chunks(x, x, chunk, lambda d: d.topk(k + 1, dim=1, largest=False).values[:, -1])


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of ``queries`` within ``radii[j]`` of some ``centres[j]``."""
    inside = _min_over_chunks(queries, centres, chunk, lambda d: (d <= radii[None, :]).any(dim=1))
    return float(inside.double().mean())


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake [Nf, F]`` against ``real [Nr, F]``.

    Contract: ``1 <= k < min(Nr, Nf)``; both results in ``[0, 1]``. Identical sets give ``(1, 1)``.
    """
    r, f = _as_tensor64(real, "real"), _as_tensor64(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature sizes differ: real {r.shape[1]}, fake {f.shape[1]}")
    real_radii = kth_neighbour_radii(r, k, chunk)
    fake_radii = kth_neighbour_radii(f, k, chunk)
    return _coverage(f, r, real_radii, chunk), _coverage(r, f, fake_radii, chunk)


def class_accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of ``predictions[i] == labels[i]`` (1-D integer sequences of equal, non-zero length)."""
    p = torch.as_tensor(np.asarray(predictions) if not isinstance(predictions, torch.Tensor) else predictions).reshape(-1)
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if p.shape != y.shape or p.numel() == 0:
        raise ValueError(f"predictions and labels must have the same non-zero length, got {p.numel()} and {y.numel()}")
    return float((p.long().cpu() == y.long().cpu()).double().mean())
