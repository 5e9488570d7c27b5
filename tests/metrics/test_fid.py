"""Tests for diffusers_memcontrol.metrics.fid: Frechet distance, streaming statistics, statistics cache."""

import os

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusers_memcontrol.metrics.fid import (
    FeatureStatistics,
    cached_reference_statistics,
    content_key,
    frechet_distance,
    frechet_distance_from_stats,
)


def _scipy_fid(a, b):
    """Straightforward float64 reference implementation (pytorch-fid style)."""
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_fid_matches_scipy_reference(rng, dim):
    a = rng.normal(size=(400, dim))
    b = rng.normal(loc=0.3, scale=1.5, size=(300, dim)) @ rng.normal(size=(dim, dim)) / np.sqrt(dim)
    assert frechet_distance(a, b) == pytest.approx(_scipy_fid(a, b), rel=1e-6)


def test_fid_accepts_torch_and_float32(rng):
    a = rng.normal(size=(200, 8))
    b = rng.normal(loc=1.0, size=(150, 8))
    ref = _scipy_fid(a, b)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a.astype(np.float32), b.astype(np.float32)) == pytest.approx(ref, rel=1e-5)


def test_fid_identical_sets_is_zero(rng):
    a = rng.normal(size=(500, 32)) * 10
    scale = np.trace(np.cov(a, rowvar=False))
    value = frechet_distance(a, a.copy())
    assert isinstance(value, float) and value >= 0.0
    assert value / scale < 1e-6


def test_fid_rank_deficient_is_real_and_finite(rng):
    a = rng.normal(size=(10, 50))  # fewer rows than dims: singular covariances
    b = rng.normal(size=(12, 50))
    value = frechet_distance(a, b)
    assert isinstance(value, float) and np.isfinite(value) and value > 0


def test_fid_is_symmetric(rng):
    a = rng.normal(size=(100, 5))
    b = rng.normal(loc=0.5, size=(80, 5))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros((5, 3)), np.zeros((5, 4)), "feature dimensions differ"),
        (np.zeros((1, 3)), np.zeros((5, 3)), "at least 2 rows"),
        (np.zeros((0, 3)), np.zeros((5, 3)), "feats_a is empty"),
        (np.zeros((5,)), np.zeros((5, 3)), "2-D array"),
        (np.array([[0.0, np.nan], [1.0, 1.0]]), np.zeros((5, 2)), "feats_a contains NaN or inf"),
        (np.zeros((5, 2)), np.array([[0.0, np.inf], [1.0, 1.0]]), "feats_b contains NaN or inf"),
    ],
)
def test_fid_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)


def test_streaming_stats_equal_batch_stats(rng):
    feats = rng.normal(loc=3.0, size=(1001, 12)) * 5
    stats = FeatureStatistics()
    for start in range(0, feats.shape[0], 97):
        stats.update(torch.from_numpy(feats[start : start + 97]) if start % 2 else feats[start : start + 97])
    assert stats.n == 1001
    np.testing.assert_allclose(stats.mean, feats.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-10)
    one_shot = FeatureStatistics.from_features(feats)
    b = rng.normal(size=(300, 12))
    assert frechet_distance_from_stats(stats, FeatureStatistics.from_features(b)) == pytest.approx(
        frechet_distance(feats, b), rel=1e-9
    )
    assert frechet_distance_from_stats(one_shot, stats) == pytest.approx(0.0, abs=1e-8)


def test_stats_errors(rng):
    stats = FeatureStatistics()
    with pytest.raises(ValueError, match="no features"):
        _ = stats.mean
    stats.update(rng.normal(size=(1, 4)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        _ = stats.cov
    with pytest.raises(ValueError, match="4"):
        stats.update(rng.normal(size=(3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 4), np.nan))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_stats_save_load_roundtrip(rng, tmp_path, suffix):
    stats = FeatureStatistics.from_features(rng.normal(size=(50, 6)))
    path = tmp_path / f"stats{suffix}"
    stats.save(path)
    loaded = FeatureStatistics.load(path)
    assert loaded.n == 50 and loaded.dim == 6
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    loaded.update(rng.normal(size=(5, 6)))  # keeps streaming after a reload
    assert loaded.n == 55


def test_npz_has_no_pickled_objects(rng, tmp_path):
    path = tmp_path / "stats.npz"
    FeatureStatistics.from_features(rng.normal(size=(5, 3))).save(path)
    with np.load(path, allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)


def test_cache_computes_once_and_reuses(rng, tmp_path):
    feats = rng.normal(size=(64, 5))
    calls = []

    def compute():
        calls.append(1)
        return feats

    key = content_key("encoder-x", "dataset-y", 224)
    first = cached_reference_statistics(tmp_path / "cache", key, compute)
    second = cached_reference_statistics(tmp_path / "cache", key, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.mean, second.mean)
    np.testing.assert_array_equal(first.cov, second.cov)
    assert not [p for p in os.listdir(tmp_path / "cache") if p.endswith(".tmp")]
    # another key computes again; a FeatureStatistics return value is accepted too
    other = cached_reference_statistics(tmp_path / "cache", "other/key with spaces", lambda: first)
    assert other.n == 64 and len(os.listdir(tmp_path / "cache")) == 2


def test_cache_recomputes_corrupted_file(rng, tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return rng.normal(size=(10, 3))

    cached_reference_statistics(tmp_path, "k", compute)
    (tmp_path / "k.npz").write_bytes(b"garbage")
    stats = cached_reference_statistics(tmp_path, "k", compute)
    assert len(calls) == 2 and stats.n == 10
    assert cached_reference_statistics(tmp_path, "k", compute).n == 10 and len(calls) == 2
