"""Tests for diffusers_memcontrol.metrics.distances: AMD, replication, tiled l2, cliques, extraction."""

import itertools

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from diffusers_memcontrol.metrics.distances import (
    average_min_cosine_distance,
    clique_share,
    extraction_attack,
    find_cliques,
    min_cosine_distances,
    nearest_neighbors,
    replication_scores,
    tiled_l2,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------- AMD / nearest neighbours


@pytest.mark.parametrize("chunks", [(4096, 4096), (7, 13), (1, 1)])
def test_amd_equals_brute_force(rng, chunks):
    gen = rng.normal(size=(53, 17))
    train = rng.normal(size=(131, 17))
    brute = np.array([[1 - g @ t / np.linalg.norm(g) / np.linalg.norm(t) for t in train] for g in gen])
    amd = average_min_cosine_distance(gen, train, chunk_size=chunks[0], train_chunk_size=chunks[1])
    assert amd == pytest.approx(brute.min(axis=1).mean(), abs=1e-6)
    d, idx = nearest_neighbors(gen, train, chunk_size=chunks[0], train_chunk_size=chunks[1], dtype=torch.float64)
    np.testing.assert_allclose(d.numpy(), brute.min(axis=1), atol=1e-12)
    np.testing.assert_array_equal(idx.numpy(), brute.argmin(axis=1))


def test_amd_accepts_torch_and_numpy_and_matches_cdist(rng):
    gen = rng.normal(size=(40, 8)).astype(np.float32)
    train = rng.normal(size=(90, 8)).astype(np.float32)
    ref = cdist(gen.astype(np.float64), train.astype(np.float64), "cosine").min(axis=1)
    d_np = min_cosine_distances(gen, train, chunk_size=16, train_chunk_size=32)
    d_t = min_cosine_distances(torch.from_numpy(gen), torch.from_numpy(train), chunk_size=16, train_chunk_size=32)
    np.testing.assert_allclose(d_np.numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(d_t.numpy(), ref, atol=1e-5)


def test_amd_is_zero_for_copies_and_positive_otherwise(rng):
    train = rng.normal(size=(30, 6))
    assert average_min_cosine_distance(train[:10] * 3.0, train) == pytest.approx(0.0, abs=1e-6)
    assert average_min_cosine_distance(rng.normal(size=(10, 6)), train) > 0.01


def test_replication_scores(rng):
    train = rng.normal(size=(50, 12))
    gen = np.concatenate([train[:5] + 1e-3 * rng.normal(size=(5, 12)), rng.normal(size=(15, 12))])
    scores = replication_scores(gen, train, chunk_size=3, train_chunk_size=7)
    sims = 1 - cdist(gen, train, "cosine").min(axis=1)
    assert scores["mean"] == pytest.approx(sims.mean(), abs=1e-5)
    assert scores["p95"] == pytest.approx(np.percentile(sims, 95), abs=1e-5)
    assert scores["fraction_above"] == pytest.approx((sims > 0.5).mean())
    assert scores["n_generations"] == 20 and scores["fraction_above"] >= 0.25


@pytest.mark.parametrize(
    "gen, train, match",
    [
        (np.zeros((3, 4)), np.ones((5, 5)), "feature dimensions differ"),
        (np.zeros((0, 4)), np.ones((5, 4)), "gen_feats is empty"),
        (np.ones((3, 4)), np.ones((0, 4)), "train_feats is empty"),
        (np.ones((3,)), np.ones((5, 3)), "gen_feats must be a 2-D array"),
        (np.array([[1.0, np.nan], [1.0, 2.0]]), np.ones((5, 2)), "gen_feats contains NaN"),
        (np.ones((3, 2)), np.array([[1.0, 2.0], [np.inf, 0.0]]), "train_feats contains NaN or inf"),
        (np.zeros((3, 2)), np.ones((5, 2)), "zero norm"),
    ],
)
def test_amd_bad_input(gen, train, match):
    with pytest.raises(ValueError, match=match):
        average_min_cosine_distance(gen, train)


# ---------------------------------------------------------------- tiled l2


def _brute_tiled(a, b, grid, reduction="rms"):
    _, _, h, w = a.shape
    th, tw = h // grid, w // grid
    out = np.zeros((a.shape[0], b.shape[0]))
    for i, j in itertools.product(range(a.shape[0]), range(b.shape[0])):
        best = 0.0
        for gy, gx in itertools.product(range(grid), range(grid)):
            ta = a[i, :, gy * th : (gy + 1) * th, gx * tw : (gx + 1) * tw]
            tb = b[j, :, gy * th : (gy + 1) * th, gx * tw : (gx + 1) * tw]
            dist = np.sqrt(((ta - tb) ** 2).sum())
            if reduction == "rms":
                dist /= np.sqrt(ta.size)
            best = max(best, dist)
        out[i, j] = best
    return out


@pytest.mark.parametrize("reduction", ["rms", "sum"])
def test_tiled_l2_equals_brute_force(rng, reduction):
    a = rng.uniform(size=(7, 3, 8, 12))
    b = rng.uniform(size=(5, 3, 8, 12))
    got = tiled_l2(a, b, grid=4, reduction=reduction, chunk_size=3, dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), _brute_tiled(a, b, 4, reduction), atol=1e-10)
    got32 = tiled_l2(torch.from_numpy(a).float(), torch.from_numpy(b).float(), grid=4, reduction=reduction)
    np.testing.assert_allclose(got32.numpy(), _brute_tiled(a, b, 4, reduction), atol=1e-4)


def test_tiled_l2_self_is_symmetric_with_zero_diagonal(rng):
    a = rng.uniform(size=(11, 1, 8, 8))
    got = tiled_l2(a, grid=2, chunk_size=4, dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, _brute_tiled(a, a, 2), atol=1e-10)
    np.testing.assert_array_equal(np.diag(got), 0.0)
    np.testing.assert_array_equal(got, got.T)


def test_tiled_l2_value_range_minus_one_one(rng):
    a = rng.uniform(size=(4, 3, 8, 8))
    b = rng.uniform(size=(3, 3, 8, 8))
    ref = tiled_l2(a, b)
    got = tiled_l2(a * 2 - 1, b * 2 - 1, value_range=(-1.0, 1.0))
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)


def test_tiled_l2_max_picks_a_single_changed_tile():
    a = np.zeros((1, 1, 8, 8))
    b = np.zeros((1, 1, 8, 8))
    b[0, 0, :2, :2] = 1.0  # one full 2x2 tile changed by 1 -> rms 1, sum 2
    assert float(tiled_l2(a, b, grid=4)[0, 0]) == pytest.approx(1.0)
    assert float(tiled_l2(a, b, grid=4, reduction="sum")[0, 0]) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "a, kwargs, match",
    [
        (np.zeros((2, 3, 10, 8)), {}, "not divisible by grid=4"),
        (np.zeros((2, 10, 8)), {}, r"shape \[N, C, H, W\]"),
        (np.zeros((0, 3, 8, 8)), {}, "images_a is empty"),
        (np.full((2, 3, 8, 8), -0.5), {}, r"value_range=\(0, 1\)"),
        (np.full((2, 3, 8, 8), 2.0), {"value_range": (-1, 1)}, "values lie in"),
        (np.full((2, 3, 8, 8), np.nan), {}, "NaN or inf"),
        (np.zeros((2, 3, 8, 8)), {"reduction": "mean"}, "reduction must be"),
    ],
)
def test_tiled_l2_bad_input(a, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiled_l2(a, **kwargs)


def test_tiled_l2_mismatched_image_shapes():
    with pytest.raises(ValueError, match="different shapes per image"):
        tiled_l2(np.zeros((2, 3, 8, 8)), np.zeros((2, 1, 8, 8)))


# ---------------------------------------------------------------- cliques


def _is_clique(adj, members):
    return all(adj[i, j] for i, j in itertools.combinations(members, 2))


def _brute_maximal_cliques(adj, min_size):
    n = adj.shape[0]
    cliques = [set(c) for r in range(1, n + 1) for c in itertools.combinations(range(n), r) if _is_clique(adj, c)]
    maximal = [c for c in cliques if not any(c < o for o in cliques)]
    return sorted((sorted(c) for c in maximal if len(c) >= min_size), key=lambda c: (-len(c), c))


def test_find_cliques_finds_planted_clique(rng):
    n = 200
    d = rng.uniform(0.5, 1.0, size=(n, n))
    d = np.minimum(d, d.T)
    planted = sorted(rng.choice(n, size=12, replace=False).tolist())
    d[np.ix_(planted, planted)] = 0.05
    assert find_cliques(d, threshold=0.1, min_size=10) == [planted]


def test_find_cliques_nothing_in_noise_at_strict_threshold(rng):
    x = rng.uniform(size=(300, 3, 16, 16))
    d = tiled_l2(x)
    assert find_cliques(d, threshold=0.05, min_size=3) == []


def test_chain_is_not_a_clique():
    # a - b - c with no a - c edge: two maximal cliques of size 2, none of size 3
    d = np.array([[0.0, 0.1, 0.9], [0.1, 0.0, 0.1], [0.9, 0.1, 0.0]])
    assert find_cliques(d, threshold=0.5, min_size=3) == []
    assert find_cliques(d, threshold=0.5, min_size=2) == [[0, 1], [1, 2]]


def test_find_cliques_matches_brute_force_on_random_graphs(rng):
    for _ in range(20):
        n = int(rng.integers(2, 11))
        d = rng.uniform(size=(n, n))
        d = (d + d.T) / 2
        adj = (d < 0.5) & ~np.eye(n, dtype=bool)
        for k in (1, 2, 3):
            assert find_cliques(torch.from_numpy(d), 0.5, k) == _brute_maximal_cliques(adj, k)


def test_find_cliques_is_fast_at_500_nodes(rng):
    import time

    d = rng.uniform(size=(500, 500))
    d = np.minimum(d, d.T)
    members = list(range(0, 500, 10))
    d[np.ix_(members, members)] = 0.0
    start = time.perf_counter()
    cliques = find_cliques(d, threshold=0.02, min_size=10)
    assert time.perf_counter() - start < 2.0
    assert cliques[0] == members


def test_find_cliques_bad_input():
    with pytest.raises(ValueError, match="square"):
        find_cliques(np.zeros((3, 4)), 0.1, 2)
    with pytest.raises(ValueError, match="min_size"):
        find_cliques(np.zeros((3, 3)), 0.1, 0)
    with pytest.raises(ValueError, match="NaN"):
        find_cliques(np.full((3, 3), np.nan), 0.1, 2)


# ---------------------------------------------------------------- extraction attack


def _planted(rng, n_prompts=4, n_gen=40, copies=(15, 0, 12, 0), shape=(3, 16, 16)):
    train = rng.uniform(size=(n_prompts,) + shape).astype(np.float32)
    gens = []
    for p in range(n_prompts):
        g = rng.uniform(size=(n_gen,) + shape).astype(np.float32)
        k = copies[p]
        g[:k] = np.clip(train[p] + 0.01 * rng.normal(size=(k,) + shape), 0, 1)
        gens.append(g)
    return gens, train


def test_extraction_finds_planted_near_copies(rng):
    gens, train = _planted(rng)
    result = extraction_attack(gens, train, threshold=0.15, min_clique_size=10)
    assert result.n_extracted == 2
    assert result.n_flagged_prompts == 2
    assert result.n_extracted_generations == 15 + 12
    assert result.per_prompt[0]["extracted_indices"] == list(range(15))
    assert result.per_prompt[2]["clique_sizes"] == [12]
    assert all(dist < 0.15 for dist in result.per_prompt[0]["extracted_distances"])
    assert result.per_prompt[1]["flagged_indices"] == []
    assert result.to_dict()["n_extracted"] == 2


def test_extraction_clique_without_match_is_flagged_not_extracted(rng):
    gens, train = _planted(rng, n_prompts=1, copies=(15,))
    other = rng.uniform(size=train.shape).astype(np.float32)
    result = extraction_attack(gens, other, threshold=0.15, min_clique_size=10)
    assert result.n_flagged_prompts == 1 and result.n_extracted == 0


def test_extraction_zero_on_noise(rng):
    gens = [rng.uniform(size=(60, 3, 16, 16)) for _ in range(3)]
    train = rng.uniform(size=(3, 3, 16, 16))
    result = extraction_attack(gens, train)
    assert result.n_extracted == 0 and result.n_flagged_prompts == 0


def test_extraction_minus_one_one_range(rng):
    gens, train = _planted(rng)
    result = extraction_attack([g * 2 - 1 for g in gens], train * 2 - 1, value_range=(-1.0, 1.0))
    assert result.n_extracted == 2


def test_extraction_bad_input(rng):
    gens, train = _planted(rng, n_prompts=2, copies=(0, 0))
    with pytest.raises(ValueError, match="2 prompts but 3 training images"):
        extraction_attack(gens, np.concatenate([train, train[:1]]))
    with pytest.raises(ValueError, match="expected the same"):
        extraction_attack(gens, train[:, :1])
    with pytest.raises(ValueError, match="generations is empty"):
        extraction_attack([], train[:0])
    with pytest.raises(ValueError, match=r"values lie in"):
        extraction_attack([g * 255 for g in gens], train)


# ---------------------------------------------------------------------------------------------------------------
# clique_share: the memorized-prompt count made continuous (a search's memorization objective)
# ---------------------------------------------------------------------------------------------------------------


def _digits(n: int, label: int) -> torch.Tensor:
    from diffusers_memcontrol.data import tiny_base as tb

    images, labels = tb.load_domain_arrays("digits", "test")
    return tb.images_to_tensor(images[labels == label][:n])  # [n, 3, 32, 32] in [-1, 1]


def test_clique_share_sees_copies_and_not_classmates():
    gen = torch.Generator().manual_seed(0)
    digit = _digits(1, 4)
    copies = (digit.repeat(10, 1, 1, 1) + 0.01 * torch.randn(10, *digit.shape[1:], generator=gen)).clamp(-1, 1)
    classmates = _digits(10, 4)  # ten different writers' fours: one class, no copy
    half = torch.cat([copies[:5], classmates[5:]])  # classmates[0] is the copied four itself
    kwargs = {"value_range": (-1.0, 1.0)}
    assert clique_share([copies], **kwargs) == 1.0  # planted positive: one image ten times
    assert clique_share([classmates], **kwargs) == 0.0  # planted negative
    assert clique_share([half], **kwargs) == pytest.approx(4 / 9)
    assert clique_share([copies, classmates], **kwargs) == pytest.approx(0.5)  # the mean over prompts
    assert clique_share(torch.stack([copies, classmates]), **kwargs) == pytest.approx(0.5)


@pytest.mark.parametrize("generations, match", [
    ([torch.zeros(1, 3, 8, 8)], r"G >= 2"),
    ([torch.zeros(3, 8, 8)], r"\[G, C, H, W\]"),
    ([], r"at least one prompt"),
])
def test_clique_share_bad_input(generations, match):
    with pytest.raises(ValueError, match=match):
        clique_share(generations)
