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
* ``search_quality`` / ``search_quality_se`` -- a search trial's quality objective and its standard error over the
  eval prompts where it has one (:func:`evaluation_config.search_quality_se`: 1 - classifier agreement).

:func:`evaluate_search_objectives` computes only ``dmem`` and ``search_quality`` (the two objectives of a search
trial: ``search_objective`` of FID, KID, C2ST, agreement or FID x (1 - agreement)). :func:`score_images` scores any
image set with every quality metric.
The returned dicts hold numbers, counts and the configuration only: never prompts or captions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .columns import check_captions, check_columns
from .evaluation_config import (
    AGREEMENT_KINDS,
    SEARCH_OBJECTIVES,
    EvaluationConfig,
    search_quality,
    search_quality_se,
)
from .files import write_json_atomic
from .generation import generate_images, pipe_default_resolution, progress_bar, real_images, subset_rows
from .metrics.fid import (
    FeatureStatistics,
    cached_features,
    cached_reference_statistics,
    content_key,
    encoder_identity,
    frechet_distance_from_stats,
    image_column_fingerprint,
)
from .tuners import trainable_parameters

__all__ = ["AGREEMENT_KINDS", "QUALITY_METRICS", "SEARCH_OBJECTIVES", "EvaluationConfig", "evaluate",
           "evaluate_search_objectives", "generate_images", "reference_cache_dir", "score_images",
           "search_quality", "write_metrics"]

_CACHE_VERSION = 1


def reference_cache_dir() -> str:
    """Where reference statistics/features are cached: `eval_reference/` under the project's cache root
    (`cache.default_cache_dir()`: ``$MEMCONTROL_CACHE_DIR`` or ``~/.cache/diffusers_memcontrol``)."""
    from .cache import default_cache_dir

    return os.path.join(default_cache_dir(), "eval_reference")


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


def _check_dataset(dataset: Any, columns: dict[str, str], what: str) -> None:
    """The dataset must be a non-empty `datasets.Dataset` holding `columns` (flag -> column; see check_columns)."""
    if not hasattr(dataset, "select"):
        raise ValueError(f"{what} must be a datasets.Dataset, got {type(dataset).__name__}.")
    check_columns(dataset, columns, what)
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty.")


def _load_feature_encoder(config: EvaluationConfig, device: torch.device) -> Any:
    """The configured feature encoder on `device`."""
    from .metrics.encoders import load_encoder

    return load_encoder(config.feature_encoder, weights_path=config.encoder_weights, device=device)


def _fid_reference(encoder: Any, eval_dataset: Any, image_column: str, config: EvaluationConfig,
                   resolution: int) -> tuple[FeatureStatistics, bool, int]:
    """Cached feature statistics of the real eval images: (statistics, from_cache, number of images)."""
    rows = subset_rows(len(eval_dataset), config.max_reference_images, config.seed)
    key = content_key("fid-reference", _CACHE_VERSION, encoder_identity(encoder),
                      image_column_fingerprint(eval_dataset, image_column, rows), resolution, config.center_crop,
                      config.image_interpolation_mode)
    computed = []

    def compute() -> FeatureStatistics:
        stats = FeatureStatistics()
        bar = progress_bar(len(rows), "FID reference features", config.show_progress)
        for batch in real_images(eval_dataset, image_column, rows, resolution, config):
            stats.update(encoder.features(batch, batch_size=config.encoder_batch_size))
            bar.update(len(batch))
        bar.close()
        computed.append(True)
        return stats

    cache_dir = config.cache_dir or reference_cache_dir()
    stats = cached_reference_statistics(cache_dir, key, compute)
    return stats, not computed, len(rows)


def _train_features(encoder: Any, dataset: Any, image_column: str, config: EvaluationConfig, resolution: int,
                    rows: np.ndarray, vae: Any = None) -> tuple[np.ndarray, bool]:
    """Cached features of the training images `rows` (AMD / replication reference), of their VAE round trips when
    `vae` is given."""
    from .metrics.extraction import vae_round_trip

    key = content_key("train-features", _CACHE_VERSION, encoder_identity(encoder),
                      image_column_fingerprint(dataset, image_column, rows), resolution, config.center_crop,
                      config.image_interpolation_mode, None if vae is None else encoder_identity(vae))

    def compute() -> np.ndarray:
        out = []
        bar = progress_bar(len(rows), "training-set features", config.show_progress)
        for batch in real_images(dataset, image_column, rows, resolution, config):
            if vae is not None:
                batch = vae_round_trip(vae, batch, config.encoder_batch_size)
            out.append(encoder.features(batch, batch_size=config.encoder_batch_size).numpy())
            bar.update(len(batch))
        bar.close()
        return np.concatenate(out)

    return cached_features(config.cache_dir or reference_cache_dir(), key, compute)


def _stats_of(feats: torch.Tensor, what: str) -> FeatureStatistics:
    """Feature statistics, requiring the 2 rows a covariance needs."""
    if feats.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 {what}; got {feats.shape[0]} (raise num_eval_prompts or "
                         "images_per_prompt).")
    return FeatureStatistics.from_features(feats)


def _dmem(pipe: Any, dmem_dataset: Any, image_column: str, caption_column: str, config: EvaluationConfig,
          resolution: int) -> Any:
    """d_mem (search variant) on the D_mem training latents and captions."""
    from diffusers import DDPMScheduler

    from .metrics.memorization import dmem_search
    from .training_data import encode_images, encode_prompts

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


def _agreement_kind(config: EvaluationConfig) -> str:
    """The agreement kind to compute: the configured one, or 'classifier' where the search objective needs it."""
    if config.agreement == "none" and config.search_objective in ("agreement", "fid_agreement"):
        return "classifier"
    return config.agreement


def _agreement_scorer(encoder: Any, config: EvaluationConfig) -> Any:
    """``score(images, prompts, labels) -> mean agreement`` of the configured kind, its model loaded once (None for
    'none')."""
    from .metrics.agreement import biovil_score, classifier_agreement, clip_score

    kind = _agreement_kind(config)
    if kind == "none":
        return None
    if kind == "classifier":
        classifier = getattr(encoder, "model", None)
        if config.agreement_model is not None or classifier is None or not hasattr(classifier, "head"):
            from .tiny_base import load_domain_encoder

            classifier = load_domain_encoder(config.agreement_model)
        return lambda images, prompts, labels: float(classifier_agreement(
            images, labels, classifier, image_size=32, batch_size=config.encoder_batch_size))
    if kind == "clip":
        from .metrics.encoders import load_encoder

        clip = load_encoder("clip", weights_path=config.agreement_model)
        return lambda images, prompts, labels: float(clip_score(
            images, prompts, clip, batch_size=config.encoder_batch_size).mean())
    return lambda images, prompts, labels: float(biovil_score(images, prompts).mean())


def _agreement(images: torch.Tensor, prompts: list[str], labels: list[int] | None, encoder: Any,
               config: EvaluationConfig) -> float | None:
    """Mean text-image agreement of eval generations for the configured kind (None for 'none')."""
    scorer = _agreement_scorer(encoder, config)
    return None if scorer is None else scorer(images, prompts, labels)


QUALITY_METRICS = ("fid", "kid", "c2st_accuracy", "agreement", "in_domain")
"""Quality metrics scored on every generated set and on the ceiling; each also gets a ``<name>_noise``."""


def _reference_features(encoder: Any, eval_dataset: Any, image_column: str, config: EvaluationConfig,
                        resolution: int) -> np.ndarray:
    """Cached features of the real eval images (the KID / C2ST reference; the same rows as FID's)."""
    rows = subset_rows(len(eval_dataset), config.max_reference_images, config.seed)
    key = content_key("quality-reference", _CACHE_VERSION, encoder_identity(encoder),
                      image_column_fingerprint(eval_dataset, image_column, rows), resolution, config.center_crop,
                      config.image_interpolation_mode)

    def compute() -> np.ndarray:
        return np.concatenate([encoder.features(batch, batch_size=config.encoder_batch_size).numpy()
                               for batch in real_images(eval_dataset, image_column, rows, resolution, config)])

    return cached_features(config.cache_dir or reference_cache_dir(), key, compute)[0]


class _QualityJudges:
    """Everything that scores a set of images for quality, loaded once: feature encoder, FID statistics and
    features of the real eval images, agreement scorer, in-domain classifier."""

    def __init__(self, encoder: Any, eval_dataset: Any, image_column: str, config: EvaluationConfig,
                 resolution: int) -> None:
        self.encoder, self.config = encoder, config
        self.ref_stats, self.ref_cached, self.n_ref = _fid_reference(encoder, eval_dataset, image_column, config,
                                                                     resolution)
        self.ref_feats = _reference_features(encoder, eval_dataset, image_column, config, resolution)
        self.agreement = _agreement_scorer(encoder, config)
        self.in_domain = None
        if config.in_domain_classifier is not None:
            from .metrics.in_domain import load_in_domain_classifier

            self.in_domain = load_in_domain_classifier(config.in_domain_classifier)

    def identity(self) -> list[Any]:
        """What the scores depend on besides the images (a cache key part)."""
        c = self.config
        judge = getattr(self.encoder, "model", None) if c.agreement_model is None else c.agreement_model
        return [encoder_identity(self.encoder), _agreement_kind(c), c.agreement_model,
                encoder_identity(judge) if hasattr(judge, "state_dict") else None,
                None if self.in_domain is None else self.in_domain.weight.numpy().tobytes().hex()[:64] +
                str(float(self.in_domain.bias)), c.kid_subsets, c.kid_subset_size, c.c2st_folds, c.seed,
                c.quality_noise, c.max_reference_images]

    def score(self, images: torch.Tensor, feats: torch.Tensor, prompts: list[str],
              labels: list[int] | None) -> dict[str, Any]:
        """Every quality metric of one image set (and, with ``quality_noise``, its noise over two halves)."""
        out = self._score(images, feats, prompts, labels)
        if self.config.quality_noise and len(images) >= 4:
            from .metrics.quality import disjoint_halves

            halves = [self._score(images[h], feats[h], [prompts[i] for i in h],
                                  None if labels is None else [labels[i] for i in h])
                      for h in disjoint_halves(len(images))]
            for name in QUALITY_METRICS:
                a, b = halves[0][name], halves[1][name]
                out[f"{name}_noise"] = None if a is None or b is None else abs(a - b)
        return out

    def _score(self, images: torch.Tensor, feats: torch.Tensor, prompts: list[str],
               labels: list[int] | None) -> dict[str, Any]:
        from .metrics.in_domain import in_domain_rate
        from .metrics.quality import c2st_accuracy, kernel_inception_distance

        c = self.config
        kid, kid_std = kernel_inception_distance(feats, self.ref_feats, num_subsets=c.kid_subsets,
                                                 subset_size=c.kid_subset_size, seed=c.seed)
        n = min(len(feats), len(self.ref_feats))
        return {
            "fid": float(frechet_distance_from_stats(_stats_of(feats, "generated eval images"), self.ref_stats)),
            "kid": kid, "kid_std": kid_std,
            "c2st_accuracy": c2st_accuracy(feats, self.ref_feats, folds=c.c2st_folds, seed=c.seed)
            if n >= c.c2st_folds else None,
            "agreement": None if self.agreement is None else self.agreement(images, prompts, labels),
            "in_domain": None if self.in_domain is None else in_domain_rate(images, self.in_domain),
        }


def score_images(images: torch.Tensor, eval_dataset: Any, config: EvaluationConfig | None = None, *,
                 labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None, encoder: Any = None,
                 image_column: str = "image") -> dict[str, Any]:
    """Every quality metric (:data:`QUALITY_METRICS`, with ``kid_std`` and the ``<name>_noise`` values) of any image
    set ``[N, 3, H, W]`` in [-1, 1] against the real images of ``eval_dataset``, exactly as :func:`evaluate` scores
    a model's generations: e.g. real images through a VAE (the ceiling) or another domain's images (a negative).

    ``labels`` (one class per image) feed classifier agreement, ``prompts`` CLIP/BioViL agreement.
    """
    config = config or EvaluationConfig()
    _check_dataset(eval_dataset, {"image_column": image_column}, "eval_dataset")
    if encoder is None:
        encoder = _load_feature_encoder(config, torch.device("cpu"))
    resolution = config.resolution or int(images.shape[-1])
    kind = _agreement_kind(config)
    if kind == "classifier" and labels is None:
        config = replace(config, agreement="none", search_objective="fid")
    elif kind in ("clip", "biovil") and prompts is None:
        raise ValueError(f"agreement={kind!r} needs one prompt per image.")
    judges = _QualityJudges(encoder, eval_dataset, image_column, config, resolution)
    feats = encoder.features(images, batch_size=config.encoder_batch_size)
    prompts = list(prompts) if prompts is not None else [""] * len(images)
    return judges.score(images, feats, prompts, None if labels is None else [int(v) for v in labels])


def _ceiling(pipe: Any, judges: _QualityJudges, eval_dataset: Any, image_column: str, caption_column: str,
             label_column: str | None, config: EvaluationConfig, resolution: int, n_images: int) -> dict[str, Any]:
    """Every quality metric of real eval images through the pipeline's VAE (as many as the generated set, up to
    every eval image), cached on disk: the best any fine-tune of this pipeline can reach."""
    from .metrics.extraction import vae_round_trip

    rows = subset_rows(len(eval_dataset), n_images, config.seed)
    labels = _labels(eval_dataset, rows, label_column, config) if judges.agreement is not None else None
    key = content_key("ceiling", _CACHE_VERSION, encoder_identity(pipe.vae), *judges.identity(),
                      image_column_fingerprint(eval_dataset, image_column, rows), labels, resolution,
                      config.center_crop, config.image_interpolation_mode, _agreement_kind(config))
    path = os.path.join(config.cache_dir or reference_cache_dir(), f"ceiling-{key}.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return {**json.load(f), "cached": True}
        except (OSError, ValueError):
            pass  # unreadable: recompute and overwrite
    clock = time.perf_counter()
    images = torch.cat([vae_round_trip(pipe.vae, batch, config.encoder_batch_size)
                        for batch in real_images(eval_dataset, image_column, rows, resolution, config)])
    feats = judges.encoder.features(images, batch_size=config.encoder_batch_size)
    prompts = [""] * len(images) if _agreement_kind(config) in ("classifier", "none") else check_captions(
        eval_dataset.select(rows)[caption_column], caption_column, "eval_dataset")
    out = {**judges.score(images, feats, prompts, labels), "num_images": len(images),
           "seconds": round(time.perf_counter() - clock, 3)}
    write_json_atomic(path, out, sort_keys=True)
    return {**out, "cached": False}


def _labels(dataset: Any, rows: np.ndarray, label_column: str | None, config: EvaluationConfig) -> list[int] | None:
    """Integer labels of the eval rows when classifier agreement needs them."""
    if _agreement_kind(config) != "classifier":
        return None
    if label_column is None:
        if "label" not in dataset.column_names:
            raise ValueError("agreement='classifier' needs class labels: pass label_column (available columns: "
                             f"{dataset.column_names}) or choose agreement 'clip', 'biovil' or 'none'.")
        label_column = "label"
    _check_dataset(dataset, {"label_column": label_column}, "eval_dataset")
    labels = dataset.select(rows)[label_column]
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise ValueError(f"label_column {label_column!r} must hold integer class ids.")
    return [int(v) for v in labels]


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
    _check_dataset(eval_dataset, {"image_column": image_column, "caption_column": caption_column}, "eval_dataset")
    _check_dataset(dmem_dataset, {"image_column": image_column, "caption_column": caption_column}, "dmem_dataset")
    _check_dataset(reference_dataset, {"image_column": image_column}, "reference_dataset")
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    resolution = config.resolution or pipe_default_resolution(pipe)
    device = pipe.unet.device
    if encoder is None:
        encoder = _load_feature_encoder(config, device)

    out, eval_feats = _eval_prompt_metrics(pipe, eval_dataset, image_column, caption_column, label_column, encoder,
                                           config, resolution, timings)
    clock = time.perf_counter()
    keep = [int(i) for i in dmem_dataset["dmem_index"]] if "dmem_index" in dmem_dataset.column_names else []
    keep = [i for i in keep if 0 <= i < len(reference_dataset)]
    train_rows = subset_rows(len(reference_dataset), config.max_train_images, config.seed, keep=keep)
    train_feats, train_cached = _train_features(encoder, reference_dataset, image_column, config, resolution,
                                                train_rows)
    timings["train_features"] = time.perf_counter() - clock
    from .metrics.distances import average_min_cosine_distance

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
        "search_objective": config.search_objective,
        "search_quality": search_quality(out, config.search_objective),
        "search_quality_se": search_quality_se(out["agreement"], out["agreement_kind"], out["num_eval_prompts"],
                                               config.search_objective),
        "search_memorization_objective": config.search_memorization,
        "search_memorization": out["clique_share"] if config.search_memorization == "cliques" else float(dmem.max),
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
    labels = _labels(dataset, rows, label_column, config)
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
    judges = _QualityJudges(encoder, eval_dataset, image_column, config, resolution)
    repeated_labels = None if labels is None else [v for v in labels for _ in range(k)]
    repeated_prompts = [p for p in prompts for _ in range(k)]
    out: dict[str, Any] = judges.score(eval_images, eval_feats, repeated_prompts, repeated_labels)
    timings["quality"] = time.perf_counter() - clock
    out.update({"agreement_kind": _agreement_kind(config), "num_eval_prompts": len(prompts),
                "num_eval_images": int(eval_images.shape[0]), "images_per_prompt": k,
                "num_fid_reference_images": int(judges.n_ref), "fid_reference_cached": bool(judges.ref_cached)})
    if config.ceiling:
        clock = time.perf_counter()
        out["ceiling"] = _ceiling(pipe, judges, eval_dataset, image_column, caption_column, label_column, config,
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
    from .metrics.distances import average_min_cosine_distance, replication_scores
    from .metrics.encoders import load_encoder, replication_encoder_name
    from .metrics.extraction import cached_render, calibrated_extraction, nearest_neighbour_copies, vae_round_trip

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
        train_feats, _ = _train_features(encoder, reference_dataset, image_column, config, resolution, train_rows,
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
    from .figures import COPY

    flags |= copied.to(torch.uint8) * COPY
    timings["copies"] = time.perf_counter() - clock
    if generations_path is not None:
        from .figures import save_dmem_generations

        save_dmem_generations(generations_path, generations, training_images, flags,
                              round_trips=vae_round_trip(pipe.vae, training_images, config.encoder_batch_size))
    out.update(extracted_images=extraction["n_extracted"], memorized_prompts=extraction["n_flagged_prompts"],
               extraction=extraction, clique_share=_clique_share(generations, config),
               copied_images=copies["n_copied"], copies={**copies, "class_column": column})
    return out


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
    from .metrics.distances import clique_share

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
    """The two objectives of a search trial: ``dmem`` (on D_mem, lower = less memorized) and ``search_quality`` (on
    validation: ``config.search_objective`` of :data:`SEARCH_OBJECTIVES`, lower is better), with ``fid``, ``kid``,
    ``c2st_accuracy`` and ``agreement`` (None unless computed) beside them.

    Uses ``config`` as given (default: :meth:`EvaluationConfig.for_search`, the reference code's trial settings);
    the validation reference statistics are cached on disk, so only the generations are paid per trial.
    """
    config = config or EvaluationConfig.for_search()
    if not isinstance(config, EvaluationConfig):
        raise TypeError(f"config must be an EvaluationConfig, got {type(config).__name__}.")
    _check_pipeline(pipe)
    _check_dataset(dmem_dataset, {"image_column": image_column, "caption_column": caption_column}, "dmem_dataset")
    _check_dataset(validation_dataset, {"image_column": image_column, "caption_column": caption_column},
                   "validation_dataset")
    resolution = config.resolution or pipe_default_resolution(pipe)
    if encoder is None:
        encoder = _load_feature_encoder(config, pipe.unet.device)
    prompts, labels, images = _generate_for_captions(pipe, validation_dataset, caption_column, label_column, config,
                                                     resolution, "validation_dataset", "validation prompts")
    k = images.shape[0] // len(prompts)  # images per prompt
    feats = encoder.features(images, batch_size=config.encoder_batch_size)
    judges = _QualityJudges(encoder, validation_dataset, image_column, replace(config, quality_noise=False),
                            resolution)
    quality = judges.score(images, feats, [p for p in prompts for _ in range(k)],
                           None if labels is None else [v for v in labels for _ in range(k)])
    dmem = float(_dmem(pipe, dmem_dataset, image_column, caption_column, config, resolution).max)
    memorization = (_clique_share(_dmem_generations(pipe, dmem_dataset, caption_column, config, resolution), config)
                    if config.search_memorization == "cliques" else dmem)
    return {"dmem": dmem, "fid": quality["fid"], "kid": quality["kid"],
            "c2st_accuracy": quality["c2st_accuracy"], "agreement": quality["agreement"],
            "search_objective": config.search_objective,
            "search_quality": search_quality(quality, config.search_objective),
            "search_quality_se": search_quality_se(quality["agreement"], _agreement_kind(config), len(prompts),
                                                   config.search_objective),
            "search_memorization_objective": config.search_memorization, "search_memorization": memorization}


def write_metrics(metrics: dict[str, Any], path: str | os.PathLike) -> str:
    """Write `metrics` as strict JSON (NaN/inf become ``null``, keys sorted) atomically; returns the path."""
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}.")
    return write_json_atomic(path, metrics, sort_keys=True)
