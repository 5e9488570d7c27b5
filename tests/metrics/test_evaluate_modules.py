"""The `evaluate` metric modules load from their local folders (offline) and agree with the library functions."""

from pathlib import Path

import evaluate
import numpy as np
import pytest

from diffusers_memcontrol.metrics.distances import (
    average_min_cosine_distance,
    replication_scores,
)
from diffusers_memcontrol.metrics.fid import FeatureStatistics, frechet_distance

MODULES = Path(__file__).resolve().parents[2] / "diffusers_memcontrol" / "metrics" / "evaluate"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _load(name):
    return evaluate.load(str(MODULES / name))


def test_fid_module(rng, tmp_path):
    a = rng.normal(size=(120, 8))
    b = rng.normal(loc=0.5, size=(90, 8))
    fid = _load("fid")
    assert fid.compute(predictions=a, reference_features=b)["fid"] == pytest.approx(frechet_distance(a, b), rel=1e-9)
    path = tmp_path / "ref.npz"
    FeatureStatistics.from_features(b).save(path)
    assert fid.compute(predictions=a, reference_statistics=str(path))["fid"] == pytest.approx(
        frechet_distance(a, b), rel=1e-9
    )
    with pytest.raises(ValueError, match="exactly one"):
        fid.compute(predictions=a)


def test_fid_module_streams_batches(rng):
    a = rng.normal(size=(100, 4))
    b = rng.normal(size=(80, 4))
    fid = _load("fid")
    for start in range(0, 100, 30):
        fid.add_batch(predictions=a[start : start + 30])
    assert fid.compute(reference_features=b)["fid"] == pytest.approx(frechet_distance(a, b), rel=1e-9)


def test_amd_module(rng):
    a = rng.normal(size=(50, 8)).astype(np.float32)
    b = rng.normal(size=(70, 8)).astype(np.float32)
    out = _load("amd").compute(predictions=a, reference_features=b, chunk_size=16)
    assert out["amd"] == pytest.approx(average_min_cosine_distance(a, b), abs=1e-6)


def test_replication_module(rng):
    a = rng.normal(size=(50, 8)).astype(np.float32)
    b = rng.normal(size=(70, 8)).astype(np.float32)
    out = _load("replication").compute(predictions=a, reference_features=b)
    ref = replication_scores(a, b)
    assert out.keys() == ref.keys()
    assert out["mean"] == pytest.approx(ref["mean"], abs=1e-6)


def test_extraction_module(rng):
    train = rng.uniform(size=(2, 1, 8, 8)).astype(np.float32)
    gens = rng.uniform(size=(2, 14, 1, 8, 8)).astype(np.float32)
    gens[0, :11] = np.clip(train[0] + 0.005 * rng.normal(size=(11, 1, 8, 8)), 0, 1)
    out = _load("extraction").compute(predictions=list(gens), references=list(train), min_clique_size=10)
    assert out["n_extracted"] == 1 and out["n_flagged_prompts"] == 1
    assert out["per_prompt"][0]["extracted_indices"] == list(range(11))
