"""Frechet distance between feature sets (FID), streaming feature statistics and an on-disk statistics cache.

The encoder is not part of this module: pass features from any image encoder (the MemControl paper uses a
chest X-ray DenseNet-121, 1024-d; classic FID uses InceptionV3 pool3, 2048-d). All statistics are float64.

The matrix square root term ``tr(sqrt(S1 S2))`` is computed as ``sum(sqrt(eig(sqrt(S1) S2 sqrt(S1))))``:
``sqrt(S1) S2 sqrt(S1)`` is symmetric positive semi-definite, so a symmetric eigensolver gives real,
non-negative eigenvalues (clipped at 0 against round-off). It equals the trace of
``scipy.linalg.sqrtm(S1 @ S2)`` whenever that is well defined, and never returns a complex value, also for
rank-deficient covariances (fewer samples than dimensions).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.images import image_source
from ..files import atomic_open

__all__ = [
    "FeatureStatistics",
    "cached_features",
    "cached_reference_statistics",
    "content_key",
    "encoder_identity",
    "frechet_distance",
    "frechet_distance_from_stats",
    "image_column_fingerprint",
]

_FORMAT_VERSION = 1


def _as_features(x: Any, name: str) -> np.ndarray:
    """Validate ``x`` as finite ``[N, D]`` features with N >= 1 and return it as float64 numpy."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dims]; got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: expected at least one row, got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has zero feature dimensions; expected shape [rows, dims>0], got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise ValueError(f"{name} contains NaN or inf (first at row {bad}); expected finite features")
    return arr


def _sqrt_psd(mat: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(mat)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """``tr(sqrt(S1 S2))`` via the eigenvalues of ``sqrt(S1) S2 sqrt(S1)``; eps*I offset if eigh fails."""
    for offset in (0.0, eps, 1e3 * eps):
        try:
            s1 = sigma1 + offset * np.eye(sigma1.shape[0]) if offset else sigma1
            s2 = sigma2 + offset * np.eye(sigma2.shape[0]) if offset else sigma2
            root1 = _sqrt_psd(s1)
            inner = root1 @ s2 @ root1
            inner = 0.5 * (inner + inner.T)
            eig = np.linalg.eigvalsh(inner)
            if np.isfinite(eig).all():
                return float(np.sqrt(np.clip(eig, 0.0, None)).sum())
        except np.linalg.LinAlgError:
            continue
    raise ValueError("could not compute sqrt(S1 S2): the covariance matrices are not finite/positive semi-definite")


def _frechet_from_moments(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float
) -> float:
    """``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))``, clipped at 0 (it is a squared distance)."""
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}; expected both from the same encoder"
        )
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2, eps))
    return max(value, 0.0)


def frechet_distance(feats_a: Any, feats_b: Any, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

    Args:
        feats_a: ``[N, D]`` features (numpy or torch), N >= 2.
        feats_b: ``[M, D]`` features, M >= 2, same D.
        eps: diagonal offset used only if the eigen-decomposition fails.

    Raises:
        ValueError: mismatched D, fewer than 2 rows, empty input, NaN or inf.
    """
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature dimensions differ: feats_a has {a.shape[1]} dims, feats_b has {b.shape[1]}; "
            "expected both from the same encoder"
        )
    for name, arr in (("feats_a", a), ("feats_b", b)):
        if arr.shape[0] < 2:
            raise ValueError(f"{name} has {arr.shape[0]} row; expected at least 2 rows to estimate a covariance")
    return frechet_distance_from_stats(FeatureStatistics.from_features(a), FeatureStatistics.from_features(b), eps=eps)


class FeatureStatistics:
    """Streaming float64 mean/covariance of features (Chan et al.'s pairwise update), saved without pickle.

    ``update`` can be called with batches of any size; ``mean`` and ``cov`` (unbiased, ``ddof=1``) equal the
    batch statistics of all rows seen. ``save``/``load`` use ``.npz`` (``np.load(allow_pickle=False)``) or
    ``.safetensors`` depending on the file suffix.
    """

    def __init__(self, dim: int | None = None) -> None:
        """Empty accumulator; ``dim`` is fixed by the first ``update`` when not given."""
        self._n = 0
        self._dim = dim
        self._mean: np.ndarray | None = None if dim is None else np.zeros(dim)
        self._m2: np.ndarray | None = None if dim is None else np.zeros((dim, dim))

    @classmethod
    def from_features(cls, feats: Any) -> FeatureStatistics:
        """Statistics of one ``[N, D]`` feature array."""
        stats = cls()
        stats.update(feats)
        return stats

    def update(self, feats: Any) -> FeatureStatistics:
        """Add a ``[B, D]`` batch of features (numpy or torch); returns self."""
        batch = _as_features(feats, "feats")
        if self._dim is None:
            self._dim = batch.shape[1]
            self._mean = np.zeros(self._dim)
            self._m2 = np.zeros((self._dim, self._dim))
        if batch.shape[1] != self._dim:
            raise ValueError(f"feats has {batch.shape[1]} dims but these statistics have {self._dim}")
        nb = batch.shape[0]
        mean_b = batch.mean(axis=0)
        centered = batch - mean_b
        m2_b = centered.T @ centered
        n = self._n
        total = n + nb
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (nb / total)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n * nb / total)
        self._n = total
        return self

    @property
    def n(self) -> int:
        """Number of rows accumulated."""
        return self._n

    @property
    def dim(self) -> int | None:
        """Feature dimension (None before the first update)."""
        return self._dim

    @property
    def mean(self) -> np.ndarray:
        """Mean feature vector ``[D]`` (float64)."""
        if self._n == 0:
            raise ValueError("no features accumulated yet; call update() first")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance ``[D, D]`` (float64, ``ddof=1``); needs at least 2 rows."""
        if self._n < 2:
            raise ValueError(f"covariance needs at least 2 rows; have {self._n}")
        m2 = self._m2 / (self._n - 1)
        return 0.5 * (m2 + m2.T)

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (``.safetensors`` by suffix, otherwise ``.npz``); no pickle involved."""
        arrays = self._to_arrays()
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(arrays, str(path))
        else:
            with open(path, "wb") as fh:
                np.savez(fh, **arrays)

    def _to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays that define these statistics (row count, mean, scatter matrix, format version)."""
        if self._n == 0:
            raise ValueError("refusing to save empty statistics; call update() first")
        return {
            "n": np.array([self._n], dtype=np.int64),
            "mean": np.ascontiguousarray(self._mean),
            "m2": np.ascontiguousarray(self._m2),
            "format_version": np.array([_FORMAT_VERSION], dtype=np.int64),
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStatistics:
        """Read statistics written by :meth:`save` (``np.load(allow_pickle=False)`` or safetensors)."""
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
        else:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        missing = {"n", "mean", "m2"} - set(arrays)
        if missing:
            raise ValueError(f"{path} is not a FeatureStatistics file: missing {sorted(missing)}")
        mean = np.asarray(arrays["mean"], dtype=np.float64)
        m2 = np.asarray(arrays["m2"], dtype=np.float64)
        if mean.ndim != 1 or m2.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"{path}: inconsistent shapes mean {mean.shape}, m2 {m2.shape}")
        stats = cls(dim=mean.shape[0])
        stats._n = int(arrays["n"][0])
        stats._mean = mean
        stats._m2 = m2
        return stats

    def __repr__(self) -> str:
        """Short description: rows and dims."""
        return f"FeatureStatistics(n={self._n}, dim={self._dim})"


def frechet_distance_from_stats(stats_a: FeatureStatistics, stats_b: FeatureStatistics, eps: float = 1e-6) -> float:
    """Frechet distance from two :class:`FeatureStatistics` (e.g. cached reference statistics)."""
    for name, stats in (("stats_a", stats_a), ("stats_b", stats_b)):
        if stats.n < 2:
            raise ValueError(f"{name} has {stats.n} rows; expected at least 2 rows to estimate a covariance")
    if stats_a.dim != stats_b.dim:
        raise ValueError(
            f"feature dimensions differ: stats_a has {stats_a.dim} dims, stats_b has {stats_b.dim}; "
            "expected both from the same encoder"
        )
    return _frechet_from_moments(stats_a.mean, stats_a.cov, stats_b.mean, stats_b.cov, eps)


def content_key(*parts: Any) -> str:
    """A stable sha256 hex key of JSON-serializable parts (encoder name, data fingerprint, resolution, ...)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _cache_path(cache_dir: Path, key: str) -> Path:
    """File for ``key``: the key itself when filename-safe and short, else its sha256."""
    if not key:
        raise ValueError("key must be a non-empty string")
    safe = key if re.fullmatch(r"[A-Za-z0-9._-]{1,128}", key) and not key.startswith(".") else None
    name = safe or hashlib.sha256(key.encode("utf-8")).hexdigest()
    return cache_dir / f"{name}.npz"


def cached_reference_statistics(
    cache_dir: str | os.PathLike,
    key: str,
    compute_fn: Callable[[], Any],
) -> FeatureStatistics:
    """Reference statistics from ``cache_dir`` under ``key``, computed once by ``compute_fn`` and reused.

    Search trials share one reference set: compute its statistics once, store them atomically (temporary
    file in the same directory, then ``os.replace``: `files.atomic_open`) so concurrent workers never read a
    partial file.
    ``compute_fn`` returns a :class:`FeatureStatistics` or an ``[N, D]`` feature array. ``key`` should
    identify the content (see :func:`content_key`); unreadable cache files are recomputed.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = _cache_path(cache_dir, key)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                stored_key = str(data["key"]) if "key" in data.files else None
            if stored_key == key:
                return FeatureStatistics.load(path)
        except (OSError, ValueError, KeyError, EOFError):
            pass  # corrupted or foreign file: recompute and overwrite
    result = compute_fn()
    stats = result if isinstance(result, FeatureStatistics) else FeatureStatistics.from_features(result)
    with atomic_open(path, "wb") as fh:
        np.savez(fh, key=np.array(key), **stats._to_arrays())
    return stats


def encoder_identity(encoder: Any) -> str:
    """Hash of an encoder's name and weights (so cached features follow weight changes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(getattr(encoder, "name", type(encoder).__name__)).encode())
    h.update(type(encoder).__name__.encode())
    for key, tensor in sorted(encoder.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if tensor.numel() else b"")
    return h.hexdigest()


def image_column_fingerprint(dataset: Any, column: str, rows: Sequence[int]) -> str:
    """Content hash of the selected images: their encoded bytes, or path + size + mtime for file-backed images."""
    h = hashlib.blake2b(digest_size=16)
    table = dataset.with_format("arrow")
    rows = [int(r) for r in rows]
    for start in range(0, len(rows), 1024):
        values = table.select(rows[start:start + 1024])[column].to_pylist()
        for row, value in zip(rows[start:start + 1024], values):
            source, _, data = image_source(value, row, column)
            if data is not None:
                h.update(b"b")
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
            else:  # a file: its path, size and modification time (cheap, unlike reading every file)
                h.update(b"p")
                h.update(source.encode())
                try:
                    st = os.stat(source)
                    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
                except OSError:
                    pass
    return h.hexdigest()


def cached_features(cache_dir: str, key: str, compute: Any) -> tuple[np.ndarray, bool]:
    """``[N, D]`` float32 features cached in ``cache_dir/<key>.npy`` (atomic write); (features, from_cache)."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"features-{key}.npy")
    if os.path.exists(path):
        try:
            return np.load(path, allow_pickle=False), True
        except (OSError, ValueError, EOFError):
            pass  # unreadable: recompute and overwrite
    feats = np.ascontiguousarray(np.asarray(compute(), dtype=np.float32))
    with atomic_open(path, "wb") as fh:
        np.save(fh, feats)
    return feats, False
