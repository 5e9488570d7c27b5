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

:func:`nearest_neighbour_copies` counts copies a second way, without cliques or Carlini's pixel threshold: a
generation is a *copy* when its nearest training image (tiled l2 among the training set's VAE round trips) is its
own prompt's training image, and it is closer to that image than two different training images of the same class
usually are (``bound``: the ``percentile``-th percentile, over calibration images of the training set, of the
distance to their nearest *different* training image of the same class; without classes, of any class).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .distances import extraction_attack, tiled_l2

__all__ = [
    "DEFAULT_COPY_PERCENTILE",
    "ExtractionCalibration",
    "cached_render",
    "calibrate_extraction",
    "calibrated_extraction",
    "match_thresholds",
    "nearest_neighbour_copies",
    "vae_round_trip",
]

_SAME_IMAGE = 1e-3  # raw tiled l2 (float32 rounding, below a quarter grey level): the same image, a duplicate
DEFAULT_COPY_PERCENTILE = 5.0  # a copy is closer to its image than 95% of training images are to their neighbour
_MIN_CLASS_IMAGES = 5  # a class with fewer calibration images (with a same-class neighbour) takes the pooled bound
_RENDER_CACHE_BYTES = 1 << 30  # round trips cached_render keeps (1 GiB: the quickstart's training set is 16 MB)


@torch.no_grad()
def vae_round_trip(vae: Any, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``decode(posterior mean(encode(images)))`` of images in [-1, 1], clamped to [-1, 1], on the CPU."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(vae.device, vae.dtype)
        decoded = vae.decode(vae.encode(batch).latent_dist.mean).sample
        out.append(decoded.float().cpu().clamp(-1.0, 1.0))
    return torch.cat(out)


def cached_render(render: Callable[[torch.Tensor], torch.Tensor],
                  max_bytes: int = _RENDER_CACHE_BYTES) -> Callable[[torch.Tensor], torch.Tensor]:
    """``render`` that renders a batch of the same pixels once (keyed by content, up to ``max_bytes`` of round trips
    kept), so that the calibrated attack and the nearest-neighbour copies stream the training set through one VAE."""
    cache: dict[tuple, torch.Tensor] = {}
    held = 0

    def cached(images: torch.Tensor) -> torch.Tensor:
        nonlocal held
        key = (tuple(images.shape), hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).digest())
        if key in cache:
            return cache[key]
        out = render(images)
        size = out.numel() * out.element_size()
        if held + size <= max_bytes:
            cache[key], held = out, held + size
        return out

    return cached


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


def _spread(values: torch.Tensor) -> dict[str, float | None]:
    """min/median/max of the finite values (None when there are none)."""
    finite = values[torch.isfinite(values)].double()
    if not finite.numel():
        return {"min": None, "median": None, "max": None}
    return {"min": float(finite.min()), "median": float(finite.median()), "max": float(finite.max())}


def _class_codes(*groups: Sequence[Any] | None) -> list[torch.Tensor] | None:
    """Each group of class labels as int64 codes shared by all groups; None when no group has labels."""
    if all(g is None for g in groups):
        return None
    if any(g is None for g in groups):
        raise ValueError("class labels must be given for the D_mem pairs, the references and the calibration "
                         "images together, or not at all")
    index: dict[Any, int] = {}
    return [torch.tensor([index.setdefault(v, len(index)) for v in g], dtype=torch.int64) for g in groups]


def _class_bounds(nearest: torch.Tensor, codes: torch.Tensor, percentile: float,
                  n_classes: int) -> tuple[torch.Tensor, float]:
    """(bound per class code, pooled bound): the percentile of the finite nearest-same-class distances."""
    finite = torch.isfinite(nearest)
    q = percentile / 100.0
    pooled = float(torch.quantile(nearest[finite].double(), q)) if finite.any() else 0.0
    bounds = torch.full((n_classes,), pooled, dtype=torch.float64)
    for c in codes.unique().tolist():
        values = nearest[finite & (codes == c)].double()
        if len(values) >= _MIN_CLASS_IMAGES:
            bounds[c] = torch.quantile(values, q)
    return bounds, pooled


@torch.no_grad()
def nearest_neighbour_copies(
    generations: torch.Tensor,
    training_images: torch.Tensor,
    render: Callable[[torch.Tensor], torch.Tensor],
    references: Iterable[torch.Tensor],
    *,
    labels: Sequence[Any] | None = None,
    reference_labels: Sequence[Any] | None = None,
    queries: torch.Tensor | None = None,
    query_labels: Sequence[Any] | None = None,
    percentile: float = DEFAULT_COPY_PERCENTILE,
    grid: int = 4,
    reduction: str = "rms",
    device: str | torch.device | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Count the ``[P, G, C, H, W]`` generations (in [-1, 1]) that copy their prompt's training image (module
    docstring), in the tiled l2 of the extraction attack, against the training set's VAE round trips.

    Args:
        generations: ``G`` generations of each of the ``P`` D_mem prompts.
        training_images: ``[P, C, H, W]``, the training image of each prompt.
        render: the VAE round trip of a batch of images (:func:`vae_round_trip`).
        references: batches ``[B, C, H, W]`` of the training set, streamed once (copies of a prompt's own image
            count as its own image).
        labels, reference_labels, query_labels: the class of each D_mem pair, of each reference (in stream
            order) and of each calibration image; all None: one class (the bound is then calibrated on the
            nearest different training image of any class).
        queries: the training images whose nearest different same-class reference calibrates the bound (a seeded
            subset of ``references`` bounds the memory and the time); None: every reference (all held in memory).
        percentile: the bound's percentile of those distances (:data:`DEFAULT_COPY_PERCENTILE`).
        device: where the distances are computed (default: CPU).

    Returns (counts, the bounds and distance spreads: numbers only; ``[P, G]`` bool, True for a copy).
    """
    if generations.ndim != 5 or tuple(generations.shape[2:]) != tuple(training_images.shape[1:]) or \
            len(generations) != len(training_images):
        raise ValueError(f"generations must be [P, G, C, H, W] with one [C, H, W] training image per prompt; got "
                         f"{tuple(generations.shape)} and {tuple(training_images.shape)}")
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100); got {percentile!r}")
    if queries is None:  # every reference calibrates: each batch is rendered once, for both uses, and held once
        references = list(references)
        sizes = [len(images) for images in references]
        query_round_trips = torch.cat([render(images) for images in references])
        queries, query_labels = torch.cat(references), reference_labels
        del references
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = zip(queries.split(sizes),
                                                                   query_round_trips.split(sizes))
    else:
        query_round_trips = render(queries)
        batches = ((images, render(images)) for images in references)
    codes = _class_codes(labels, reference_labels, query_labels)
    n_prompts, per_prompt = generations.shape[:2]
    pair_codes, ref_codes, query_codes = codes or [torch.zeros(n, dtype=torch.int64) for n in
                                                   (n_prompts, 0, len(queries))]
    kwargs: dict[str, Any] = {"grid": grid, "reduction": reduction, "value_range": (-1.0, 1.0), "device": device}
    flat = generations.flatten(0, 1)
    prompt_of = torch.arange(n_prompts).repeat_interleave(per_prompt)
    own = tiled_l2(flat, render(training_images), **kwargs).cpu()[torch.arange(len(flat)), prompt_of]
    other = torch.full((len(flat),), torch.inf)  # nearest training image other than the prompt's own
    query_nearest = torch.full((len(queries),), torch.inf)  # nearest different same-class training image
    seen = 0
    for images, round_trips in batches:
        is_own = (tiled_l2(training_images, images, **kwargs).cpu() < _SAME_IMAGE)[prompt_of]
        other = torch.minimum(other, tiled_l2(flat, round_trips, **kwargs).cpu().masked_fill(is_own, torch.inf)
                              .amin(dim=1))
        excluded = tiled_l2(queries, images, **kwargs).cpu() < _SAME_IMAGE
        if codes is not None:
            if seen + len(images) > len(ref_codes):
                raise ValueError(f"got {len(ref_codes)} reference labels for more reference images")
            excluded |= query_codes[:, None] != ref_codes[None, seen:seen + len(images)]
        query_nearest = torch.minimum(query_nearest, tiled_l2(query_round_trips, round_trips, **kwargs).cpu()
                                      .masked_fill(excluded, torch.inf).amin(dim=1))
        seen += len(images)
    if codes is not None and seen != len(ref_codes):
        raise ValueError(f"got {len(ref_codes)} reference labels for {seen} reference images")
    n_classes = 1 + max(int(c.max()) for c in (pair_codes, ref_codes, query_codes) if c.numel())
    bounds, pooled = _class_bounds(query_nearest, query_codes, percentile, n_classes)
    pair_bounds = bounds[pair_codes].float()
    nearest_own = own < other
    copies = (nearest_own & (own < pair_bounds[prompt_of])).reshape(n_prompts, per_prompt)
    return {"n_copied": int(copies.any(dim=1).sum()), "n_copy_generations": int(copies.sum()),
            "n_nearest_own_generations": int(nearest_own.sum()), "n_prompts": int(n_prompts),
            "generations_per_prompt": int(per_prompt), "percentile": float(percentile),
            "classes": codes is not None, "n_calibration_images": len(queries), "pooled_bound": pooled,
            "bounds": _spread(pair_bounds), "own_distance": _spread(own),
            "calibration_nearest": _spread(query_nearest)}, copies
