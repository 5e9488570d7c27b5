"""Extraction calibrated to the pipeline's VAE: what a generation must match, and how close it must be.

Carlini et al. count a generation as extracted when it lies within a pixel threshold (tiled l2) of its training
image. A latent diffusion model can only reproduce a training image as well as its VAE renders it: on a VAE
whose round trip (encode, posterior mean, decode) of a training image is already farther from it than the
threshold, even a perfectly memorized latent never matches. So, per D_mem pair:

* ``reference``: tiled l2 between the training image and the VAE's round trip of it.
* ``target``: the training image itself where the VAE is faithful (``reference`` below the pixel threshold:
  Carlini's comparison as is), else its round trip (the training image as this pipeline can render it).
* ``nearest_other``: tiled l2 from the target to the nearest *other* training image, rendered the same way
  (raw where the target is raw, round-tripped where it is a round trip). Identical copies of the training
  image (duplicates) are not "other".
* ``threshold``: ``min(pixel threshold, separation * nearest_other)``. With ``separation <= 0.5`` a match is
  closer to its own training image than to any other one (triangle inequality), so a generation of another
  training image cannot count. A pair whose nearest other image is as close as its own rendering
  (``nearest_other == 0``) cannot count: its threshold is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .distances import extraction_attack, tiled_l2

__all__ = [
    "ExtractionCalibration",
    "calibrate_extraction",
    "calibrated_extraction",
    "match_thresholds",
    "vae_round_trip",
]

_SAME_IMAGE = 1e-3  # raw tiled l2 (float32 rounding, below a quarter grey level): the same image, a duplicate


@torch.no_grad()
def vae_round_trip(vae: Any, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``decode(posterior mean(encode(images)))`` of images in [-1, 1], clamped to [-1, 1], on the CPU."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(vae.device, vae.dtype)
        decoded = vae.decode(vae.encode(batch).latent_dist.mean).sample
        out.append(decoded.float().cpu().clamp(-1.0, 1.0))
    return torch.cat(out)


def match_thresholds(reference: Any, nearest_other: Any, pixel_threshold: float,
                     separation: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: (uses the round trip as target, match threshold) from the rule in the module docstring.

    ``nearest_other`` must already be measured against the target the first array selects.
    """
    reference = np.asarray(reference, dtype=np.float64)
    nearest_other = np.asarray(nearest_other, dtype=np.float64)
    if reference.shape != nearest_other.shape:
        raise ValueError(f"reference and nearest_other must have the same shape; got {reference.shape} and "
                         f"{nearest_other.shape}")
    if not pixel_threshold > 0 or not 0 < separation <= 1:
        raise ValueError(f"pixel_threshold must be > 0 and separation in (0, 1]; got {pixel_threshold!r}, "
                         f"{separation!r}")
    round_trip = reference >= pixel_threshold
    return round_trip, np.minimum(pixel_threshold, separation * nearest_other)


@dataclass
class ExtractionCalibration:
    """Per D_mem pair: round-trip distance, target images, nearest other training image and match threshold."""

    reference: np.ndarray
    round_trip: np.ndarray
    nearest_other: np.ndarray
    thresholds: np.ndarray
    targets: torch.Tensor
    pixel_threshold: float
    separation: float

    @property
    def countable(self) -> np.ndarray:
        """Pairs that can count as extracted (threshold > 0)."""
        return self.thresholds > 0

    def summary(self) -> dict[str, Any]:
        """min/median/max of each per-pair distance and the counts (numbers only: no image, no caption)."""

        def spread(values: np.ndarray) -> dict[str, float]:
            finite = values[np.isfinite(values)]
            if not finite.size:
                return {"min": None, "median": None, "max": None}
            return {"min": float(finite.min()), "median": float(np.median(finite)), "max": float(finite.max())}

        return {"vae_round_trip": spread(self.reference), "nearest_other": spread(self.nearest_other),
                "thresholds": spread(self.thresholds), "pixel_threshold": self.pixel_threshold,
                "separation": self.separation, "n_round_trip_targets": int(self.round_trip.sum()),
                "n_uncountable": int((~self.countable).sum())}


def calibrate_extraction(
    training_images: torch.Tensor,
    render: Callable[[torch.Tensor], torch.Tensor],
    references: Iterable[torch.Tensor],
    pixel_threshold: float,
    separation: float = 0.5,
    *,
    grid: int = 4,
    reduction: str = "rms",
) -> ExtractionCalibration:
    """Calibrate the match of each D_mem pair (module docstring) from its image, its VAE round trip and the others.

    Args:
        training_images: ``[P, C, H, W]`` in [-1, 1], the training image of each D_mem pair.
        render: the VAE round trip of a batch of images (:func:`vae_round_trip`); called on the reference
            batches only when some pair's target is a round trip.
        references: batches ``[B, C, H, W]`` of the training reference set (it may contain the D_mem images:
            copies of a pair's own image are skipped).
        pixel_threshold: Carlini's match threshold on the tiled-l2 scale.
        separation: cap of the threshold as a fraction of the distance to the nearest other training image.
    """
    kwargs: dict[str, Any] = {"grid": grid, "reduction": reduction, "value_range": (-1.0, 1.0)}
    round_trips = render(training_images)
    reference = tiled_l2(training_images, round_trips, **kwargs).diagonal().numpy().astype(np.float64)
    round_trip, _ = match_thresholds(reference, reference, pixel_threshold, separation)
    targets = torch.where(torch.as_tensor(round_trip)[:, None, None, None], round_trips, training_images)
    nearest = np.full(len(training_images), np.inf)
    for images in references:
        same = tiled_l2(training_images, images, **kwargs).numpy() < _SAME_IMAGE
        distances = tiled_l2(targets, images, **kwargs).numpy()
        if round_trip.any():
            rendered = tiled_l2(targets, render(images), **kwargs).numpy()
            distances = np.where(round_trip[:, None], rendered, distances)
        nearest = np.minimum(nearest, np.where(same, np.inf, distances).min(axis=1))
    _, thresholds = match_thresholds(reference, nearest, pixel_threshold, separation)  # no other image: pixel
    return ExtractionCalibration(reference, round_trip, nearest, thresholds, targets, float(pixel_threshold),
                                 float(separation))


def calibrated_extraction(
    generations: torch.Tensor,
    training_images: torch.Tensor,
    render: Callable[[torch.Tensor], torch.Tensor],
    references: Iterable[torch.Tensor],
    *,
    threshold: float,
    pixel_threshold: float,
    separation: float = 0.5,
    min_clique_size: int = 3,
    grid: int = 4,
    reduction: str = "rms",
) -> tuple[dict[str, Any], torch.Tensor]:
    """Carlini's attack on ``[P, G, C, H, W]`` generations in [-1, 1], matched against calibrated targets.

    Arguments as :func:`calibrate_extraction` and :func:`~.distances.extraction_attack` (``threshold``: clique
    edges). Returns (counts and the calibration summary, ``[P, G]`` uint8 flags: bit 1 clique member, bit 2
    extracted).
    """
    calibration = calibrate_extraction(training_images, render, references, pixel_threshold, separation,
                                       grid=grid, reduction=reduction)
    result = extraction_attack(generations, calibration.targets, threshold=threshold,
                               min_clique_size=min_clique_size, grid=grid,
                               match_threshold=calibration.thresholds.tolist(), reduction=reduction,
                               value_range=(-1.0, 1.0))
    flags = torch.zeros(generations.shape[:2], dtype=torch.uint8)
    for p, entry in enumerate(result.per_prompt):
        flags[p, entry["flagged_indices"]] |= 1
        flags[p, entry["extracted_indices"]] |= 2
    return {"n_extracted": int(result.n_extracted), "n_extracted_generations": int(result.n_extracted_generations),
            "n_flagged_prompts": int(result.n_flagged_prompts), "n_prompts": int(result.n_prompts),
            "generations_per_prompt": int(generations.shape[1]), **calibration.summary()}, flags
