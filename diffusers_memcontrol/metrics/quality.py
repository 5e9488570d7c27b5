"""Sample-quality metrics that stay meaningful at small sample sizes, and their noise.

* :func:`kernel_inception_distance` -- KID (Binkowski et al., 2018): the unbiased estimator of the squared MMD
  between two feature sets under the cubic polynomial kernel ``k(x, y) = (x.y / d + 1) ** 3``, averaged over random
  subsets. Unlike FID it has no bias that grows as the sample shrinks, so 100-200 generations can rank models.
* :func:`c2st_accuracy` -- a classifier two-sample test: the cross-validated accuracy of a logistic regression that
  tells generated from real features (0.5: indistinguishable; 1.0: always told apart). Works in any feature space,
  so on a user's own data too.
* :func:`disjoint_halves` -- two disjoint halves of one model's generations: a metric computed on each half and
  differenced gives that metric's noise (``fid_noise``, ``kid_noise``, ...).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["c2st_accuracy", "disjoint_halves", "kernel_inception_distance"]


def _as_array(x: Any, name: str) -> np.ndarray:
    """Features as a 2-D float64 array with at least 2 rows."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(f"{name} must be a 2-D feature array with at least 2 rows, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds non-finite values")
    return arr


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray, degree: int, coef: float) -> float:
    """Unbiased MMD^2 (diagonals left out of the within-set terms) under the polynomial kernel."""
    d = x.shape[1]
    kxx = (x @ x.T / d + coef) ** degree
    kyy = (y @ y.T / d + coef) ** degree
    kxy = (x @ y.T / d + coef) ** degree
    m, n = len(x), len(y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def kernel_inception_distance(feats_a: Any, feats_b: Any, *, num_subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, coef: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """KID between two feature sets: (mean, standard deviation) of the unbiased MMD^2 over ``num_subsets`` random
    subsets of ``min(subset_size, len(a), len(b))`` rows of each set (drawn without replacement, seeded).

    The estimate is unbiased whatever the subset size (it can be slightly negative when the sets match); the
    standard deviation is the spread over subsets, not a confidence interval.
    """
    a, b = _as_array(feats_a, "feats_a"), _as_array(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"num_subsets must be >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}")
    size = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = [_unbiased_mmd2(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)],
                             degree, coef) for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def c2st_accuracy(generated: Any, real: Any, *, folds: int = 5, seed: int = 0) -> float:
    """Classifier two-sample test: held-out accuracy of a logistic regression telling ``generated`` from ``real``.

    Both sets are first cut (seeded) to the size of the smaller, so 0.5 is chance; features are standardized inside
    each fold. Accuracy is the mean over ``folds`` stratified, shuffled folds (scikit-learn, ``random_state=seed``).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    g, r = _as_array(generated, "generated"), _as_array(real, "real")
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"feature dimensions differ: {g.shape[1]} vs {r.shape[1]}")
    n = min(len(g), len(r))
    if n < folds:
        raise ValueError(f"c2st needs at least {folds} samples per set (one per fold), got {n}")
    rng = np.random.default_rng(seed)
    g, r = g[np.sort(rng.choice(len(g), n, replace=False))], r[np.sort(rng.choice(len(r), n, replace=False))]
    x = np.concatenate([g, r])
    y = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    scores = cross_val_score(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return float(np.mean(scores))


def disjoint_halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two disjoint halves of ``n`` samples: even and odd positions (with images generated
    prompt-major, k >= 2 per prompt, both halves hold every prompt)."""
    if n < 4:
        raise ValueError(f"two halves need at least 4 samples, got {n}")
    idx = np.arange(n)
    return idx[0::2], idx[1::2]
