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
