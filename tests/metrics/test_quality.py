"""KID, C2ST, the in-domain classifier, and every quality metric planted with a positive and a negative on the
tiny base: the ceiling (real test digits through the VAE) near its best, Freeze (the base's own generations) near
its worst, and the base's pretraining domain (Fashion-MNIST through the VAE) near Freeze, not near the ceiling.
The base has the digits' vocabulary (it draws digit-like shapes, not the prompted one), so for the in-domain rate
the wrong domain, not Freeze, is the floor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_memcontrol.metrics.in_domain import InDomainClassifier, fit_in_domain_classifier, in_domain_rate
from diffusers_memcontrol.metrics.quality import c2st_accuracy, disjoint_halves, kernel_inception_distance


def _brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 under k(a, b) = (a.b / d + 1)^3, one pair at a time."""
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(1.0, 1.0, size=(7, 3))
    mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=7)  # whole sets: every subset equal
    assert mean == pytest.approx(_brute_force_mmd2(x, y), rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_kid_is_unbiased_at_small_n_unlike_fid():
    from diffusers_memcontrol.metrics.fid import frechet_distance

    rng = np.random.default_rng(0)
    same = [kernel_inception_distance(rng.normal(size=(20, 8)), rng.normal(size=(500, 8)), num_subsets=20,
                                      seed=s)[0] for s in range(20)]
    shifted = kernel_inception_distance(rng.normal(0.5, 1, size=(20, 8)), rng.normal(size=(500, 8)))[0]
    assert abs(np.mean(same)) < 0.1 * shifted  # same distribution: ~0 at n=20
    fid_same = frechet_distance(rng.normal(size=(20, 8)), rng.normal(size=(500, 8)))
    assert fid_same > 1.0  # FID of the same distribution at n=20 is mostly bias


def test_c2st_is_chance_on_one_distribution_and_one_on_two():
    rng = np.random.default_rng(0)
    assert c2st_accuracy(rng.normal(size=(200, 5)), rng.normal(size=(300, 5))) < 0.6
    assert c2st_accuracy(rng.normal(3.0, 1, size=(200, 5)), rng.normal(size=(300, 5))) > 0.95
    x, y = rng.normal(size=(50, 5)), rng.normal(size=(60, 5))
    assert c2st_accuracy(x, y, seed=1) == c2st_accuracy(x, y, seed=1)  # seeded folds and subsets
    with pytest.raises(ValueError, match="at least 5"):
        c2st_accuracy(np.zeros((3, 2)), np.ones((3, 2)))


def test_disjoint_halves():
    a, b = disjoint_halves(9)
    assert not set(a) & set(b) and sorted([*a, *b]) == list(range(9))
    with pytest.raises(ValueError):
        disjoint_halves(3)


def test_in_domain_classifier_round_trips_through_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    bright = torch.rand(40, 3, 32, 32, generator=g) * 0.5 + 0.5
    dark = -torch.rand(40, 3, 32, 32, generator=g)
    classifier = fit_in_domain_classifier(bright, dark, info={"target_domain": "bright"})
    assert in_domain_rate(bright, classifier) == 1.0 and in_domain_rate(dark, classifier) == 0.0
    loaded = InDomainClassifier.load(classifier.save(tmp_path / "c.safetensors"))
    torch.testing.assert_close(loaded.probability(bright[:5]), classifier.probability(bright[:5]))
    assert loaded.info == {"target_domain": "bright"}


# ------------------------------------------------------------------------------------------------------------------
# planted positives and negatives on the tiny base
# ------------------------------------------------------------------------------------------------------------------

# metric -> True where higher is better
DIRECTION = {"fid": False, "kid": False, "c2st_accuracy": False, "agreement": True, "in_domain": True}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Every quality metric of the ceiling, Freeze and Fashion-MNIST through the VAE (100 images each)."""
    from diffusers import StableDiffusionPipeline

    from diffusers_memcontrol.data import tiny_base as tb
    from diffusers_memcontrol.evaluation.evaluator import EvaluationConfig, generate_images, score_images
    from diffusers_memcontrol.metrics.extraction import vae_round_trip

    pipe = StableDiffusionPipeline.from_pretrained(tb.tiny_base_path(), safety_checker=None)
    rng = np.random.default_rng(0)
    digits, digit_labels = tb.load_domain_arrays("digits", "test")
    rows = np.sort(rng.choice(len(digits), 100, replace=False))
    fashion = tb.load_domain_arrays("fashion-mnist", "test")[0][np.sort(rng.choice(10000, 100, replace=False))]
    labels = [int(v) for v in digit_labels[rows]]
    freeze = generate_images(pipe, [tb.DOMAINS["digits"].caption(v) for v in labels], 1, num_inference_steps=20,
                             guidance_scale=4.0, show_progress=False)
    sets = {"ceiling": (vae_round_trip(pipe.vae, tb.images_to_tensor(digits[rows])), labels),
            "freeze": (freeze, labels),  # the base draws digit-like shapes, not the prompted digit
            "fashion": (vae_round_trip(pipe.vae, tb.images_to_tensor(fashion)), labels)}
    test = tb.load_domain("digits", "test")
    config = EvaluationConfig(in_domain_classifier="digits", show_progress=False,
                              cache_dir=str(tmp_path_factory.mktemp("quality-cache")))
    return {name: score_images(images, test, config, labels=labels)
            for name, (images, labels) in sets.items()}


def test_shipped_classifiers_reach_their_ceiling_on_vae_round_trips(scored):
    assert scored["ceiling"]["agreement"] >= 0.95  # the refitted head on real test digits through the VAE
    assert scored["ceiling"]["in_domain"] >= 0.95 and scored["fashion"]["in_domain"] <= 0.05


@pytest.mark.parametrize("metric", list(DIRECTION))
def test_ceiling_near_best_freeze_near_worst_base_domain_near_freeze(scored, metric):
    sign = 1.0 if DIRECTION[metric] else -1.0
    ceiling, freeze, fashion = (sign * scored[k][metric] for k in ("ceiling", "freeze", "fashion"))
    noise = max(scored[k][f"{metric}_noise"] for k in ("ceiling", "freeze", "fashion"))
    if metric == "in_domain":  # it asks "a digit at all?", and the base does draw digit-like shapes
        assert ceiling - fashion > 3 * noise and ceiling - fashion >= 0.9, (metric, scored)
        return
    gap = ceiling - freeze
    assert gap > 3 * noise, (metric, scored)  # the ceiling is clearly above the floor, beyond the metric's noise
    assert ceiling - fashion >= 0.5 * gap, (metric, scored)  # the base's pretraining domain: closer to Freeze
