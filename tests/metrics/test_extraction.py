"""Per-pair match thresholds calibrated to the VAE (metrics.extraction)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_memcontrol.metrics.distances import extraction_attack
from diffusers_memcontrol.metrics.extraction import calibrate_extraction, match_thresholds


def test_faithful_pairs_keep_carlinis_threshold_and_unfaithful_ones_match_the_round_trip():
    round_trip, thresholds = match_thresholds([0.05, 0.3, 0.3, 0.3], [0.6, 0.6, 0.2, 0.0], 0.15, 0.5)
    assert round_trip.tolist() == [False, True, True, True]
    assert thresholds == pytest.approx([0.15, 0.15, 0.1, 0.0])  # capped at half the nearest other; 0: cannot count


def test_bad_threshold_settings_are_named():
    with pytest.raises(ValueError, match="separation"):
        match_thresholds([0.1], [0.2], 0.15, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        match_thresholds([0.1], [0.2, 0.3], 0.15, 0.5)


def _images(values):
    return torch.stack([torch.full((3, 8, 8), float(v)) for v in values])


def test_calibration_measures_round_trip_and_nearest_other_and_skips_copies_of_the_pair():
    train = _images([-0.8, 0.4])
    blur = lambda x: x * 0.5  # an unfaithful "VAE": halves every pixel
    references = [_images([-0.8, 0.4, 0.4]), _images([0.0])]  # holds both pairs, a duplicate, and one other
    cal = calibrate_extraction(train, blur, references, pixel_threshold=0.15, separation=0.5, grid=2)
    assert cal.reference == pytest.approx([0.2, 0.1], abs=1e-5)  # rms of |x - x/2| on the [0, 1] scale
    assert cal.round_trip.tolist() == [True, False]
    torch.testing.assert_close(cal.targets, torch.stack([blur(train[0]), train[1]]))
    # pair 0: nearest other round trip is 0.0 -> 0.0 or 0.4 -> 0.2 vs target -0.4: 0.2 on [0,1] scale
    assert cal.nearest_other == pytest.approx([0.2, 0.2], abs=1e-5)
    assert cal.thresholds == pytest.approx([0.1, 0.1], abs=1e-5)
    summary = cal.summary()
    assert summary["n_round_trip_targets"] == 1 and summary["n_uncountable"] == 0
    assert summary["vae_round_trip"]["max"] == pytest.approx(0.2, abs=1e-5)


def test_per_prompt_match_thresholds_in_the_attack():
    train = _images([0.0, 0.0])
    gens = torch.stack([_images([0.1] * 3), _images([0.1] * 3)])  # 0.05 from the training image
    result = extraction_attack(gens, train, min_clique_size=3, match_threshold=[0.1, 0.0], value_range=(-1, 1))
    assert result.n_flagged_prompts == 2 and result.n_extracted == 1
    assert result.per_prompt[1]["extracted_indices"] == []
    with pytest.raises(ValueError, match="per-prompt"):
        extraction_attack(gens, train, min_clique_size=3, match_threshold=[0.1], value_range=(-1, 1))
    with pytest.raises(ValueError, match="match_threshold"):
        extraction_attack(gens, train, min_clique_size=3, match_threshold=[-0.1, 0.1], value_range=(-1, 1))
    assert np.isscalar(extraction_attack(gens, train, min_clique_size=3, value_range=(-1, 1)).match_threshold)


# ---- copies by nearest neighbour (nearest_neighbour_copies) -----------------------------------------------------

def _render(x):
    """An unfaithful "VAE": shrinks every pixel towards grey."""
    return 0.8 * x


def _classes(per_class=20, seed=0):
    """Two classes of 3x16x16 images: a class pattern plus per-image noise; (images, labels)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.stack([torch.full((3, 16, 16), -0.3), torch.full((3, 16, 16), 0.3)])
    labels = torch.arange(2).repeat_interleave(per_class)
    noise = 0.15 * torch.randn((2 * per_class, 3, 16, 16), generator=generator)
    return (base[labels] + noise).clamp(-1, 1), labels.tolist()


def _same_class_bound(train, labels, percentile):
    """Brute force: the percentile of each image's nearest same-class distance among the round trips."""
    from diffusers_memcontrol.metrics.distances import tiled_l2

    d = tiled_l2(_render(train), grid=4, value_range=(-1, 1))
    labels = torch.tensor(labels)
    d = d.masked_fill(labels[:, None] != labels[None], float("inf")).fill_diagonal_(float("inf"))
    return [float(torch.quantile(d.min(1).values[labels == c].double(), percentile / 100))
            for c in labels.unique().tolist()]


def _tiled_norm(delta):
    from diffusers_memcontrol.metrics.distances import tiled_l2

    return float(tiled_l2(delta[None], torch.zeros_like(delta)[None], grid=4, value_range=(-1, 1)))


def _planted(train, labels):
    """Prompt 0 (training image 0) and prompt 1 (image 25, the other class) with planted generations."""
    from diffusers_memcontrol.metrics.extraction import DEFAULT_COPY_PERCENTILE

    bound = _same_class_bound(train, labels, DEFAULT_COPY_PERCENTILE)[0]
    signs = torch.randint(0, 2, (3, 16, 16), generator=torch.Generator().manual_seed(1)) * 2.0 - 1.0
    near = _render(train[0]) + signs * (0.85 * bound / _tiled_norm(signs))  # 0.85 x the class bound away
    fresh = (-0.3 + 0.15 * torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    prompt0 = torch.stack([_render(train[0]),  # the decoded training image: an exact copy
                           near, near + 1e-3, near - 1e-3,  # a near copy, three times (a clique)
                           _render(train[1]),  # a classmate, decoded
                           _render(fresh)])  # a new image of the class
    prompt1 = torch.stack([_render(train[0])] * 3 + [_render(train[2])] * 3)  # images of other prompts/rows
    return torch.stack([prompt0, prompt1]), train[[0, 25]]


def test_copies_count_exact_and_near_copies_but_not_classmates_or_other_prompts_images():
    from diffusers_memcontrol.metrics.extraction import calibrated_extraction, nearest_neighbour_copies

    train, labels = _classes()
    generations, pairs = _planted(train, labels)
    references = [train[:7], train[7:], train[:1]]  # streamed in batches, with a duplicate of pair 0's image
    reference_labels = labels + labels[:1]
    summary, copies = nearest_neighbour_copies(generations, pairs, _render, references, labels=[0, 1],
                                               reference_labels=reference_labels, queries=train, query_labels=labels)
    assert copies.tolist() == [[True, True, True, True, False, False], [False] * 6]
    assert summary["n_copied"] == 1 and summary["n_copy_generations"] == 4 and summary["n_prompts"] == 2
    assert summary["classes"] and summary["n_calibration_images"] == 40
    assert summary["bounds"]["min"] == pytest.approx(min(_same_class_bound(train, labels, 5.0)), rel=1e-4)
    # the calibrated threshold (at most half the distance to the nearest other image) misses the near copies
    _, flags = calibrated_extraction(generations, pairs, _render, [train], threshold=0.15,
                                     pixel_threshold=0.15, min_clique_size=3, grid=4)
    assert (flags[:, :4] & 1).all()  # every prompt's first four generations are in a clique
    assert flags[0, 0] & 2 and not (flags[0, 1:4] & 2).any() and not (flags[1] & 2).any()


def test_copies_fall_back_to_any_class_and_a_wide_percentile_counts_more():
    from diffusers_memcontrol.metrics.extraction import nearest_neighbour_copies

    train, labels = _classes()
    generations, pairs = _planted(train, labels)
    summary, copies = nearest_neighbour_copies(generations, pairs, _render, [train[:9], train[9:]])
    assert not summary["classes"] and summary["n_calibration_images"] == 40
    assert copies[0, 0] and not copies[0, 4] and not copies[1].any()  # exact copy in; classmate, other prompt out
    low, high = (_same_class_bound(train, [0] * len(train), q)[0] for q in (5, 50))
    assert summary["pooled_bound"] == pytest.approx(low, rel=1e-4) and low < high
    signs = torch.randint(0, 2, (3, 16, 16), generator=torch.Generator().manual_seed(3)) * 2.0 - 1.0
    between = _render(pairs[0]) + signs * ((low + high) / 2 / _tiled_norm(signs))  # between the two bounds
    generations = torch.stack([generations[0], generations[1].index_copy(0, torch.tensor([0]), between[None])])
    generations[1, 0] = generations[0, 0]  # prompt 1 generates prompt 0's image: never its copy
    generations[0, 5] = between
    counts = [nearest_neighbour_copies(generations, pairs, _render, [train], percentile=q)[1][0, 5] for q in (5, 50)]
    assert counts == [False, True]


def test_copies_of_a_class_without_enough_calibration_images_take_the_pooled_bound_and_bad_inputs_are_named():
    from diffusers_memcontrol.metrics.extraction import nearest_neighbour_copies

    train, labels = _classes()
    generations, pairs = _planted(train, labels)
    summary, copies = nearest_neighbour_copies(generations, pairs, _render, [train], labels=[7, 1],
                                               reference_labels=labels, queries=train, query_labels=labels)
    expected = sorted([summary["pooled_bound"], _same_class_bound(train, labels, 5.0)[1]])  # class 7: the pooled
    assert copies[0, 0] and [summary["bounds"]["min"], summary["bounds"]["max"]] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="percentile"):
        nearest_neighbour_copies(generations, pairs, _render, [train], percentile=100)
    with pytest.raises(ValueError, match="together"):
        nearest_neighbour_copies(generations, pairs, _render, [train], labels=[0, 1])
    with pytest.raises(ValueError, match="reference labels"):
        nearest_neighbour_copies(generations, pairs, _render, [train], labels=[0, 1], reference_labels=labels[:5],
                                 queries=train, query_labels=labels)
    with pytest.raises(ValueError, match="one \\[C, H, W\\] training image per prompt"):
        nearest_neighbour_copies(generations, pairs[:1], _render, [train])


def test_cached_render_renders_a_batch_of_the_same_pixels_once_within_its_budget():
    from diffusers_memcontrol.metrics.extraction import cached_render

    calls = []

    def render(x):
        calls.append(len(x))
        return 0.5 * x

    cached = cached_render(render, max_bytes=2 * 3 * 8 * 8 * 4)  # room for the round trips of two images
    a, b = _images([0.1, 0.2]), _images([0.3])
    torch.testing.assert_close(cached(a), 0.5 * a)
    torch.testing.assert_close(cached(a.clone()), 0.5 * a)  # same pixels, another tensor: no render
    assert calls == [2]
    cached(b), cached(b)  # over the budget: rendered each time, still right
    assert calls == [2, 1, 1]
