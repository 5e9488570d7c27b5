"""Evaluation of a fine-tuned pipeline: the paper's Table 1 metrics and the two search objectives.

:func:`evaluate` generates images with any diffusers Stable Diffusion pipeline and computes, on any image-caption
datasets:

* ``fid`` -- quality: images generated for ``num_eval_prompts`` captions of ``eval_dataset`` (the test split in
  stage 2, the validation split during the search; ``images_per_prompt`` raised until the set holds
  ``quality_images``) against the real images of ``eval_dataset``, in the feature space of ``feature_encoder``.
  Reference statistics are cached on disk under a key built from the encoder's weights and the reference images'
  bytes/paths, so every search trial reuses them.
* ``kid`` (unbiased at small n), ``c2st_accuracy`` (classifier two-sample test, 0.5 = indistinguishable) and
  ``in_domain`` (share of generations a target-vs-pretraining-domain classifier calls in-domain) beside FID, each
  with its noise (``<metric>_noise``: two disjoint halves of the generations), and the ``ceiling``: every quality
  metric of real eval images through the pipeline's VAE (cached), the best any fine-tune can reach (docs/metrics.md).
* ``amd`` -- memorization, eq. 5 of the paper (lower = more memorized): mean over the images generated for the
  ``D_mem`` prompts (``extraction_generations`` per prompt) of the minimum cosine distance to the features of the
  *training* images (``reference_dataset``: the data the model was fine-tuned on, which contains ``D_mem``).
  ``amd_eval`` is the same distance for the images generated for the eval prompts (unseen captions).
* ``replication`` -- Somepalli et al.'s top-1 cosine similarity of the ``D_mem`` generations to the training set
  (mean, 95th percentile, fraction above ``replication_threshold``), in a copy-detection space
  (``replication_encoder``) against the training images as the VAE renders them (``replication_round_trip``).
* ``extracted_images`` -- Carlini et al.'s extraction attack on the ``D_mem`` generations: cliques of near-identical
  generations (tiled l2) that also match the prompt's training image, as well as the pipeline's VAE can render it
  (per-pair thresholds calibrated by :mod:`metrics.extraction`). ``memorized_prompts``: the prompts with a clique.
* ``copied_images`` -- D_mem prompts with a generation whose nearest training image (tiled l2 among the VAE round
  trips of the training set) is the prompt's own, closer than the ``copy_percentile``-th percentile of the distances
  between training images and their nearest same-class neighbour (:func:`metrics.extraction.nearest_neighbour_copies`;
  classes: ``label_column``, else ``label``; none in the data: one class). No clique needed. Details: ``copies``.
* ``dmem`` / ``dmem_mean`` -- the search variant of d_mem on the ``D_mem`` training latents: per-batch max of the
  conditional-minus-unconditional noise prediction norm averaged over batches (the reference code's objective),
  and the plain mean.
* ``agreement`` -- text-image agreement of the eval generations: domain-classifier accuracy (built-in domains),
  CLIP score, or BioViL-T score.
* ``quality_objective`` / ``quality_objective_se`` -- a search trial's quality objective and its standard error over the
  eval prompts where it has one (:func:`evaluation.config.quality_objective_se`: 1 - classifier agreement).

:func:`evaluate_search_objectives` computes the two objectives of a search trial:
``memorization_objective`` (``search_memorization``: d_mem or the clique share) and ``quality_objective``
(``search_objective``: FID, KID, C2ST, 1 - agreement or FID x (1 - agreement)); ``memorization_metric`` and
``quality_metric`` name them. :func:`score_images` scores any
image set with every quality metric.
The returned dicts hold numbers, counts and the configuration only: never prompts or captions.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..data.columns import check_captions
from ..files import write_json_atomic
from ..tuners import trainable_parameters
from .config import AGREEMENT_KINDS, SEARCH_OBJECTIVES, EvaluationConfig, quality_objective, quality_objective_se
from .generation import generate_images, pipe_default_resolution, real_images, subset_rows
from .quality import (
    QUALITY_METRICS,
    QualityJudges,
    agreement_kind,
    ceiling_metrics,
    check_dataset,
    load_feature_encoder,
    prompt_labels,
    reference_cache_dir,
    score_images,
    train_features,
)

__all__ = ["AGREEMENT_KINDS", "QUALITY_METRICS", "SEARCH_OBJECTIVES", "EvaluationConfig", "evaluate",
           "evaluate_search_objectives", "generate_images", "reference_cache_dir", "score_images",
           "quality_objective", "write_metrics"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _check_pipeline(pipe: Any) -> None:
    """The pipeline must be callable and expose the SD components evaluation needs."""
    missing = [name for name in ("unet", "vae", "tokenizer", "text_encoder", "scheduler")
               if getattr(pipe, name, None) is None]
    if missing or not callable(pipe):
        raise ValueError(f"pipe must be a diffusers Stable Diffusion pipeline with unet, vae, tokenizer, text_encoder "
                         f"and scheduler; missing {missing or ['__call__']}.")


def _dmem(pipe: Any, dmem_dataset: Any, image_column: str, caption_column: str, config: EvaluationConfig,
          resolution: int) -> Any:
    """d_mem (search variant) on the D_mem training latents and captions."""
    from diffusers import DDPMScheduler

    from ..data.encoding import encode_images, encode_prompts
    from ..metrics.memorization import dmem_search

    captions = check_captions(dmem_dataset[caption_column], caption_column, "dmem_dataset")
    images = torch.cat(list(real_images(dmem_dataset, image_column, range(len(dmem_dataset)), resolution, config)))
    generator = torch.Generator("cpu").manual_seed(config.seed)
    with torch.no_grad():
        latents = encode_images(pipe.vae, images, batch_size=config.encoder_batch_size, generator=generator)
        embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions)
        uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    timesteps = config.dmem_timesteps
    if timesteps is not None and len(timesteps) not in (1, len(captions), len(captions) * config.dmem_repeats):
        raise ValueError(f"dmem_timesteps holds {len(timesteps)} values; expected 1, {len(captions)} (one per D_mem "
                         f"pair) or {len(captions) * config.dmem_repeats}.")
    return dmem_search(pipe.unet, scheduler, latents, embeds, uncond, timesteps=timesteps,
                       num_repeats=config.dmem_repeats, generator=torch.Generator("cpu").manual_seed(config.seed),
                       batch_size=config.dmem_batch_size)


"""Quality metrics scored on every generated set and on the ceiling; each also gets a ``<name>_noise``."""


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------


def evaluate(
    pipe: Any,
    eval_dataset: Any,
    dmem_dataset: Any,
    reference_dataset: Any,
    config: EvaluationConfig | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    label_column: str | None = None,
    trainable_params: int | None = None,
    *,
    encoder: Any = None,
    generations_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Table-1 metrics of a pipeline (FID, AMD, agreement, extracted images, d_mem, replication) as a JSON-able dict.

    Args:
        pipe: any diffusers Stable Diffusion pipeline (``unet``, ``vae``, ``tokenizer``, ``text_encoder``,
            ``scheduler``), e.g. the tiny base with a MemControl adapter loaded.
        eval_dataset: the held-out split (test in stage 2): its captions are the eval prompts and its images the
            FID reference.
        dmem_dataset: the D_mem pairs (:func:`data.build_memorization_set`): prompts for the extraction attack,
            AMD and replication, and training images/captions for d_mem.
        reference_dataset: the training images the model saw (AMD and replication nearest neighbours).
        config: :class:`EvaluationConfig` (default settings when None).
        label_column: integer class column of ``eval_dataset`` for ``agreement="classifier"`` (default ``label``).
        trainable_params: reported as is; None = parameters of ``pipe.unet`` with ``requires_grad``.
        encoder: an already loaded feature encoder (``metrics.ImageEncoder``); None = ``config.feature_encoder``.
        generations_path: where to keep a few D_mem generations, their training images and flags for the
            memorization figure (``figures.save_dmem_generations``; local only: it holds training images).

    Returns ``fid``, ``amd``, ``amd_eval``, ``agreement``, ``extracted_images``, ``memorized_prompts`` (D_mem
    prompts whose generations form a clique: the MemControl authors' count), ``extraction`` (counts and the
    per-pair calibration: min/median/max of the VAE round-trip and nearest-other-image distances and of the
    thresholds), ``copied_images`` and ``copies`` (nearest-neighbour copies: counts, bounds), ``dmem``,
    ``dmem_mean``, ``replication``, ``trainable_params``, counts, ``fid_reference_cached``, ``timings`` (seconds) and
    ``config``. No prompt or caption is ever included. ``amd``, ``replication``, ``extracted_images``,
    ``copied_images`` and ``memorized_prompts`` are None when ``config.extraction_generations == 0``; ``agreement`` is
    None for ``agreement="none"``. When ``config.max_train_images`` caps the training reference, the D_mem rows
    (``dmem_index``) are always kept in it.
    """
    config = config or EvaluationConfig()
    if not isinstance(config, EvaluationConfig):
        raise TypeError(f"config must be an EvaluationConfig, got {type(config).__name__}.")
    _check_pipeline(pipe)
    check_dataset(eval_dataset, {"image_column": image_column, "caption_column": caption_column}, "eval_dataset")
    check_dataset(dmem_dataset, {"image_column": image_column, "caption_column": caption_column}, "dmem_dataset")
    check_dataset(reference_dataset, {"image_column": image_column}, "reference_dataset")
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    resolution = config.resolution or pipe_default_resolution(pipe)
    device = pipe.unet.device
    if encoder is None:
        encoder = load_feature_encoder(config, device)

    out, eval_feats = _eval_prompt_metrics(pipe, eval_dataset, image_column, caption_column, label_column, encoder,
                                           config, resolution, timings)
    clock = time.perf_counter()
    keep = [int(i) for i in dmem_dataset["dmem_index"]] if "dmem_index" in dmem_dataset.column_names else []
    keep = [i for i in keep if 0 <= i < len(reference_dataset)]
    train_rows = subset_rows(len(reference_dataset), config.max_train_images, config.seed, keep=keep)
    train_feats, train_cached = train_features(encoder, reference_dataset, image_column, config, resolution,
                                                train_rows)
    timings["train_features"] = time.perf_counter() - clock
    from ..metrics.distances import average_min_cosine_distance

    out["amd_eval"] = float(average_min_cosine_distance(eval_feats, train_feats))
    out.update(amd=None, extracted_images=None, memorized_prompts=None, extraction={}, replication=None,
               clique_share=None, copied_images=None, copies={})
    if config.extraction_generations > 0:
        out.update(_dmem_prompt_metrics(pipe, dmem_dataset, reference_dataset, train_rows, train_feats,
                                        image_column, caption_column, encoder, config, resolution, timings,
                                        generations_path, label_column))
    clock = time.perf_counter()
    dmem = _dmem(pipe, dmem_dataset, image_column, caption_column, config, resolution)
    timings["dmem"] = time.perf_counter() - clock
    out.update({
        "dmem": float(dmem.max),
        "dmem_mean": float(dmem.mean),
        "trainable_params": int(trainable_params) if trainable_params is not None else trainable_parameters(pipe.unet),
        "num_dmem": len(dmem_dataset),
        "num_train_images": int(train_feats.shape[0]),
        "resolution": int(resolution),
        "feature_encoder": str(getattr(encoder, "name", config.feature_encoder)),
        "train_features_cached": bool(train_cached),
        "quality_metric": config.search_objective,
        "quality_objective": quality_objective(out, config.search_objective),
        "quality_objective_se": quality_objective_se(out["agreement"], out["agreement_kind"], out["num_eval_prompts"],
                                                     config.search_objective),
        "memorization_metric": config.search_memorization,
        "memorization_objective": out["clique_share"] if config.search_memorization == "cliques" else float(dmem.max),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "config": config.to_dict(),
    })
    return out


def _generate_for_captions(pipe: Any, dataset: Any, caption_column: str, label_column: str | None,
                           config: EvaluationConfig, resolution: int, what: str, desc: str
                           ) -> tuple[list[str], list[int] | None, torch.Tensor]:
    """(prompts, labels, images): `num_eval_prompts` seeded captions of `dataset` and their generations."""
    rows = subset_rows(len(dataset), config.num_eval_prompts, config.seed)
    prompts = check_captions(dataset.select(rows)[caption_column], caption_column, what)
    labels = prompt_labels(dataset, rows, label_column, config)
    images = generate_images(
        pipe, prompts, _images_per_prompt(config, len(prompts)), num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale, resolution=resolution, batch_size=config.generation_batch_size,
        seed=config.seed, show_progress=config.show_progress, desc=f"generate ({desc})")
    return prompts, labels, images


def _images_per_prompt(config: EvaluationConfig, n_prompts: int) -> int:
    """Generations per eval prompt: images_per_prompt, raised until the set holds quality_images."""
    if config.quality_images is None:
        return config.images_per_prompt
    return max(config.images_per_prompt, -(-config.quality_images // n_prompts))


def _eval_prompt_metrics(pipe: Any, eval_dataset: Any, image_column: str, caption_column: str,
                         label_column: str | None, encoder: Any, config: EvaluationConfig, resolution: int,
                         timings: dict[str, float]) -> tuple[dict[str, Any], torch.Tensor]:
    """Quality metrics (FID, KID, C2ST, agreement, in-domain, their noise, the ceiling) of the eval prompts'
    generations; (metrics, their features)."""
    clock = time.perf_counter()
    prompts, labels, eval_images = _generate_for_captions(pipe, eval_dataset, caption_column, label_column, config,
                                                          resolution, "eval_dataset", "eval prompts")
    k = eval_images.shape[0] // len(prompts)  # images per prompt
    timings["generate_eval"] = time.perf_counter() - clock
    clock = time.perf_counter()
    eval_feats = encoder.features(eval_images, batch_size=config.encoder_batch_size)
    judges = QualityJudges(encoder, eval_dataset, image_column, config, resolution)
    repeated_labels = None if labels is None else [v for v in labels for _ in range(k)]
    repeated_prompts = [p for p in prompts for _ in range(k)]
    out: dict[str, Any] = judges.score(eval_images, eval_feats, repeated_prompts, repeated_labels)
    timings["quality"] = time.perf_counter() - clock
    out.update({"agreement_kind": agreement_kind(config), "num_eval_prompts": len(prompts),
                "num_eval_images": int(eval_images.shape[0]), "images_per_prompt": k,
                "num_fid_reference_images": int(judges.n_ref), "fid_reference_cached": bool(judges.ref_cached)})
    if config.ceiling:
        clock = time.perf_counter()
        out["ceiling"] = ceiling_metrics(pipe, judges, eval_dataset, image_column, caption_column, label_column, config,
                                  resolution, int(eval_images.shape[0]))
        timings["ceiling"] = time.perf_counter() - clock
    return out, eval_feats


def _dmem_prompt_metrics(pipe: Any, dmem_dataset: Any, reference_dataset: Any, train_rows: np.ndarray,
                         train_feats: np.ndarray, image_column: str, caption_column: str, encoder: Any,
                         config: EvaluationConfig, resolution: int, timings: dict[str, float],
                         generations_path: str | os.PathLike | None, label_column: str | None = None
                         ) -> dict[str, Any]:
    """AMD, replication, the calibrated extraction attack and the nearest-neighbour copies on the D_mem prompts'
    generations."""
    from ..metrics.distances import average_min_cosine_distance, replication_scores
    from ..metrics.encoders import load_encoder, replication_encoder_name
    from ..metrics.extraction import cached_render, calibrated_extraction, vae_round_trip

    clock = time.perf_counter()
    generations = _dmem_generations(pipe, dmem_dataset, caption_column, config, resolution)
    images = generations.flatten(0, 1)
    timings["generate_dmem"] = time.perf_counter() - clock
    clock = time.perf_counter()
    feats = encoder.features(images, batch_size=config.encoder_batch_size)
    out: dict[str, Any] = {"amd": average_min_cosine_distance(feats, train_feats)}
    name = getattr(encoder, "name", config.feature_encoder)
    replication_name = replication_encoder_name(name, config.replication_encoder)
    if replication_name != name or config.replication_round_trip:
        if replication_name != name:
            encoder = load_encoder(replication_name, device=pipe.unet.device)
            feats = encoder.features(images, batch_size=config.encoder_batch_size)
        train_feats, _ = train_features(encoder, reference_dataset, image_column, config, resolution, train_rows,
                                         vae=pipe.vae if config.replication_round_trip else None)
    out["replication"] = replication_scores(feats, train_feats, threshold=config.replication_threshold)
    out["replication_space"] = {"encoder": replication_name, "round_trip": config.replication_round_trip}
    timings["amd_replication"] = time.perf_counter() - clock
    clock = time.perf_counter()
    training_images = torch.cat(list(real_images(dmem_dataset, image_column, range(len(dmem_dataset)),
                                                  resolution, config)))
    render = cached_render(lambda x: vae_round_trip(pipe.vae, x, config.encoder_batch_size))
    extraction, flags = calibrated_extraction(
        generations, training_images, render,
        real_images(reference_dataset, image_column, train_rows, resolution, config),
        threshold=config.extraction_threshold, pixel_threshold=config.extraction_match_threshold or
        config.extraction_threshold, separation=config.extraction_separation,
        min_clique_size=config.extraction_min_clique_size, grid=config.extraction_grid,
        reduction=config.extraction_reduction)
    timings["extraction"] = time.perf_counter() - clock
    out.update(extracted_images=extraction["n_extracted"], memorized_prompts=extraction["n_flagged_prompts"],
               extraction=extraction, clique_share=_clique_share(generations, config))
    if config.copies:
        out.update(_copies(generations, training_images, render, dmem_dataset, reference_dataset, train_rows,
                           image_column, label_column, resolution, config, flags))
        timings["copies"] = out["copies"].pop("seconds")
    if generations_path is not None:
        from .figures import save_dmem_generations

        save_dmem_generations(generations_path, generations, training_images, flags,
                              round_trips=vae_round_trip(pipe.vae, training_images, config.encoder_batch_size))
    return out


def _copies(generations: torch.Tensor, training_images: torch.Tensor, render: Any, dmem_dataset: Any,
            reference_dataset: Any, train_rows: np.ndarray, image_column: str, label_column: str | None,
            resolution: int, config: EvaluationConfig, flags: torch.Tensor) -> dict[str, Any]:
    """The nearest-neighbour copies of the D_mem generations (`copied_images`, `copies`); marks them in `flags`."""
    from ..metrics.extraction import nearest_neighbour_copies
    from .figures import COPY

    clock = time.perf_counter()
    column = _class_column(dmem_dataset, reference_dataset, label_column)
    query_rows = train_rows[subset_rows(len(train_rows), config.copy_calibration_images, config.seed)]
    every = len(query_rows) == len(train_rows)  # then the reference itself calibrates: rendered once
    copies, copied = nearest_neighbour_copies(
        generations, training_images, render, real_images(reference_dataset, image_column, train_rows, resolution,
                                                          config),
        labels=None if column is None else dmem_dataset[column],
        reference_labels=None if column is None else reference_dataset.select(train_rows)[column],
        queries=None if every else torch.cat(list(real_images(reference_dataset, image_column, query_rows,
                                                              resolution, config))),
        query_labels=None if column is None or every else reference_dataset.select(query_rows)[column],
        percentile=config.copy_percentile, grid=config.extraction_grid, reduction=config.extraction_reduction)
    flags |= copied.to(torch.uint8) * COPY
    return {"copied_images": copies["n_copied"],
            "copies": {**copies, "class_column": column, "seconds": time.perf_counter() - clock}}


def _class_column(dmem_dataset: Any, reference_dataset: Any, label_column: str | None) -> str | None:
    """The class column of the training images (``label_column``, else ``label``); None when the data has none."""
    column = label_column or "label"
    if column in reference_dataset.column_names and column in dmem_dataset.column_names:
        return column
    return None


def _dmem_generations(pipe: Any, dmem_dataset: Any, caption_column: str, config: EvaluationConfig,
                      resolution: int) -> torch.Tensor:
    """[P, G, C, H, W]: config.extraction_generations images of each D_mem prompt."""
    captions = check_captions(dmem_dataset[caption_column], caption_column, "dmem_dataset")
    images = generate_images(
        pipe, captions, config.extraction_generations, num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale, resolution=resolution, batch_size=config.generation_batch_size,
        seed=config.seed + 1, show_progress=config.show_progress, desc="generate (D_mem prompts)")
    return images.reshape(len(captions), config.extraction_generations, *images.shape[1:])


def _clique_share(generations: torch.Tensor, config: EvaluationConfig) -> float:
    from ..metrics.distances import clique_share

    return clique_share(generations, config.extraction_threshold, config.extraction_grid,
                        reduction=config.extraction_reduction, value_range=(-1.0, 1.0))


def evaluate_search_objectives(
    pipe: Any,
    dmem_dataset: Any,
    validation_dataset: Any,
    config: EvaluationConfig | None = None,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    encoder: Any = None,
    label_column: str | None = None,
) -> dict[str, Any]:
    """The two objectives of a search trial, lower is better: ``memorization_objective`` (on D_mem:
    ``config.search_memorization``) and ``quality_objective`` (on validation: ``config.search_objective`` of
    :data:`SEARCH_OBJECTIVES`), with ``dmem``, ``fid``, ``kid``, ``c2st_accuracy`` and ``agreement`` (None unless
    computed) beside them.

    Uses ``config`` as given (default: :meth:`EvaluationConfig.for_search`, the reference code's trial settings);
    the validation reference statistics are cached on disk, so only the generations are paid per trial.
    """
    config = config or EvaluationConfig.for_search()
    if not isinstance(config, EvaluationConfig):
        raise TypeError(f"config must be an EvaluationConfig, got {type(config).__name__}.")
    _check_pipeline(pipe)
    check_dataset(dmem_dataset, {"image_column": image_column, "caption_column": caption_column}, "dmem_dataset")
    check_dataset(validation_dataset, {"image_column": image_column, "caption_column": caption_column},
                   "validation_dataset")
    resolution = config.resolution or pipe_default_resolution(pipe)
    if encoder is None:
        encoder = load_feature_encoder(config, pipe.unet.device)
    prompts, labels, images = _generate_for_captions(pipe, validation_dataset, caption_column, label_column, config,
                                                     resolution, "validation_dataset", "validation prompts")
    k = images.shape[0] // len(prompts)  # images per prompt
    feats = encoder.features(images, batch_size=config.encoder_batch_size)
    judges = QualityJudges(encoder, validation_dataset, image_column, replace(config, quality_noise=False),
                            resolution)
    quality = judges.score(images, feats, [p for p in prompts for _ in range(k)],
                           None if labels is None else [v for v in labels for _ in range(k)])
    dmem = float(_dmem(pipe, dmem_dataset, image_column, caption_column, config, resolution).max)
    memorization = (_clique_share(_dmem_generations(pipe, dmem_dataset, caption_column, config, resolution), config)
                    if config.search_memorization == "cliques" else dmem)
    return {"dmem": dmem, "fid": quality["fid"], "kid": quality["kid"],
            "c2st_accuracy": quality["c2st_accuracy"], "agreement": quality["agreement"],
            "quality_metric": config.search_objective,
            "quality_objective": quality_objective(quality, config.search_objective),
            "quality_objective_se": quality_objective_se(quality["agreement"], agreement_kind(config), len(prompts),
                                                         config.search_objective),
            "memorization_metric": config.search_memorization, "memorization_objective": memorization}


def write_metrics(metrics: dict[str, Any], path: str | os.PathLike) -> str:
    """Write `metrics` as strict JSON (NaN/inf become ``null``, keys sorted) atomically; returns the path."""
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}.")
    return write_json_atomic(path, metrics, sort_keys=True)
