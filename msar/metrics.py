"""Modality-agnostic sample-quality metrics on feature vectors."""
from __future__ import annotations

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` of ``(N, D)`` features (N >= 2)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected an (N, D) array with N >= 2, got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``:
    ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` -- FID when the features are Inception's.

    ``tr (S1 S2)^{1/2}`` is computed as ``sum sqrt(eig(R S2 R))`` with ``R = S1^{1/2}`` (symmetric,
    from ``eigh``): ``S1 S2`` is similar to the symmetric positive semi-definite ``R S2 R``, so
    the eigenvalues are real and >= 0 up to rounding (clipped at 0). Unlike ``scipy.linalg.sqrtm``
    of the non-symmetric product, this needs no ``eps`` and warns about nothing when a covariance
    is singular -- as it is whenever there are fewer samples than feature dimensions, or dead
    ReLU features. The value then is the exact distance of the two (degenerate) Gaussians; a
    small set still gives a noisy, biased estimate of the population distance.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    for name, v in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(v).all():
            raise ValueError(f"{name} has non-finite entries")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(_zero_tiny(w))) @ v.T
    inner = root1 @ ((s2 + s2.T) / 2) @ root1
    tr_covmean = np.sqrt(_zero_tiny(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _zero_tiny(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise (|w| below ``n eps max|w|``) set to 0: the
    square root would turn a 1e-16 into a 1e-8 per null direction."""
    tol = len(w) * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    return np.where(w > tol, w, 0.0)


def frechet_distance_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to ``(N, D)`` and ``(M, D)`` feature sets (N, M >= 2)."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def nearest_neighbour_distances(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Euclidean distance from each row of ``a (N, D)`` to its nearest row of ``b (M, D)``: ``(N,)``.

    With ``b`` a training set, small values flag generated items that copy a training item;
    compare with the same distances of held-out real items (see :func:`copy_rate`)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(b) == 0:
        raise ValueError(f"expected (N, D) and (M >= 1, D) arrays, got shapes {a.shape} and {b.shape}")
    bb = (b * b).sum(1)
    out = np.empty(len(a))
    for i in range(0, len(a), chunk):
        x = a[i:i + chunk]
        # ||x - y||^2 = |x|^2 - 2 x.y + |y|^2, clipped at 0 against rounding
        d2 = (x * x).sum(1)[:, None] - 2 * x @ b.T + bb[None]
        out[i:i + chunk] = np.sqrt(d2.min(1).clip(min=0))
    return out


def copy_rate(distances: np.ndarray, threshold: float) -> float:
    """Fraction of ``distances`` (to the nearest training item) strictly below ``threshold``.

    Set ``threshold`` from held-out real data (e.g. the 5th percentile of their
    nearest-training distances): a generator that copies more often than held-out data
    happens to lie close to the training set is memorising."""
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(f"distances: expected a non-empty 1-D array, got shape {d.shape}")
    return float((d < threshold).mean())
