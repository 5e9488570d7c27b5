"""The quality judges of an image set: FID, KID, C2ST accuracy, the in-domain rate and text-image agreement against
real eval images (their features cached on disk), and the ceiling: real eval images through the pipeline's VAE."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..data.columns import check_captions, check_columns
from ..files import write_json_atomic
from ..metrics.fid import (
    FeatureStatistics,
    cached_features,
    cached_reference_statistics,
    content_key,
    encoder_identity,
    frechet_distance_from_stats,
    image_column_fingerprint,
)
from .config import EvaluationConfig
from .generation import progress_bar, real_images, subset_rows

_CACHE_VERSION = 1


def reference_cache_dir() -> str:
    """Where reference statistics/features are cached: `eval_reference/` under the project's cache root
    (`cache.default_cache_dir()`: ``$MEMCONTROL_CACHE_DIR`` or ``~/.cache/diffusers_memcontrol``)."""
    from ..cache import default_cache_dir

    return os.path.join(default_cache_dir(), "eval_reference")


def load_feature_encoder(config: EvaluationConfig, device: torch.device) -> Any:
    """The configured feature encoder on `device`."""
    from ..metrics.encoders import load_encoder

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


def train_features(encoder: Any, dataset: Any, image_column: str, config: EvaluationConfig, resolution: int,
                    rows: np.ndarray, vae: Any = None) -> tuple[np.ndarray, bool]:
    """Cached features of the training images `rows` (AMD / replication reference), of their VAE round trips when
    `vae` is given."""
    from ..metrics.extraction import vae_round_trip

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


def stats_of(feats: torch.Tensor, what: str) -> FeatureStatistics:
    """Feature statistics, requiring the 2 rows a covariance needs."""
    if feats.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 {what}; got {feats.shape[0]} (raise num_eval_prompts or "
                         "images_per_prompt).")
    return FeatureStatistics.from_features(feats)


def agreement_kind(config: EvaluationConfig) -> str:
    """The agreement kind to compute: the configured one, or 'classifier' where the search objective needs it."""
    if config.agreement == "none" and config.search_objective in ("agreement", "fid_agreement"):
        return "classifier"
    return config.agreement


def _agreement_scorer(encoder: Any, config: EvaluationConfig) -> Any:
    """``score(images, prompts, labels) -> mean agreement`` of the configured kind, its model loaded once (None for
    'none')."""
    from ..metrics.agreement import biovil_score, classifier_agreement, clip_score

    kind = agreement_kind(config)
    if kind == "none":
        return None
    if kind == "classifier":
        classifier = getattr(encoder, "model", None)
        if config.agreement_model is not None or classifier is None or not hasattr(classifier, "head"):
            from ..data.tiny_base import load_domain_encoder

            classifier = load_domain_encoder(config.agreement_model)
        return lambda images, prompts, labels: float(classifier_agreement(
            images, labels, classifier, image_size=32, batch_size=config.encoder_batch_size))
    if kind == "clip":
        from ..metrics.encoders import load_encoder

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


class QualityJudges:
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
            from ..metrics.in_domain import load_in_domain_classifier

            self.in_domain = load_in_domain_classifier(config.in_domain_classifier)

    def identity(self) -> list[Any]:
        """What the scores depend on besides the images (a cache key part)."""
        c = self.config
        judge = getattr(self.encoder, "model", None) if c.agreement_model is None else c.agreement_model
        return [encoder_identity(self.encoder), agreement_kind(c), c.agreement_model,
                encoder_identity(judge) if hasattr(judge, "state_dict") else None,
                None if self.in_domain is None else self.in_domain.weight.numpy().tobytes().hex()[:64] +
                str(float(self.in_domain.bias)), c.kid_subsets, c.kid_subset_size, c.c2st_folds, c.seed,
                c.quality_noise, c.max_reference_images]

    def score(self, images: torch.Tensor, feats: torch.Tensor, prompts: list[str],
              labels: list[int] | None) -> dict[str, Any]:
        """Every quality metric of one image set (and, with ``quality_noise``, its noise over two halves)."""
        out = self._score(images, feats, prompts, labels)
        if self.config.quality_noise and len(images) >= 4:
            from ..metrics.quality import disjoint_halves

            halves = [self._score(images[h], feats[h], [prompts[i] for i in h],
                                  None if labels is None else [labels[i] for i in h])
                      for h in disjoint_halves(len(images))]
            for name in QUALITY_METRICS:
                a, b = halves[0][name], halves[1][name]
                out[f"{name}_noise"] = None if a is None or b is None else abs(a - b)
        return out

    def _score(self, images: torch.Tensor, feats: torch.Tensor, prompts: list[str],
               labels: list[int] | None) -> dict[str, Any]:
        from ..metrics.in_domain import in_domain_rate
        from ..metrics.quality import c2st_accuracy, kernel_inception_distance

        c = self.config
        kid, kid_std = kernel_inception_distance(feats, self.ref_feats, num_subsets=c.kid_subsets,
                                                 subset_size=c.kid_subset_size, seed=c.seed)
        n = min(len(feats), len(self.ref_feats))
        return {
            "fid": float(frechet_distance_from_stats(stats_of(feats, "generated eval images"), self.ref_stats)),
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
    check_dataset(eval_dataset, {"image_column": image_column}, "eval_dataset")
    if encoder is None:
        encoder = load_feature_encoder(config, torch.device("cpu"))
    resolution = config.resolution or int(images.shape[-1])
    kind = agreement_kind(config)
    if kind == "classifier" and labels is None:
        config = replace(config, agreement="none", search_objective="fid")
    elif kind in ("clip", "biovil") and prompts is None:
        raise ValueError(f"agreement={kind!r} needs one prompt per image.")
    judges = QualityJudges(encoder, eval_dataset, image_column, config, resolution)
    feats = encoder.features(images, batch_size=config.encoder_batch_size)
    prompts = list(prompts) if prompts is not None else [""] * len(images)
    return judges.score(images, feats, prompts, None if labels is None else [int(v) for v in labels])


def ceiling_metrics(pipe: Any, judges: QualityJudges, eval_dataset: Any, image_column: str, caption_column: str,
             label_column: str | None, config: EvaluationConfig, resolution: int, n_images: int) -> dict[str, Any]:
    """Every quality metric of real eval images through the pipeline's VAE (as many as the generated set, up to
    every eval image), cached on disk: the best any fine-tune of this pipeline can reach."""
    from ..metrics.extraction import vae_round_trip

    rows = subset_rows(len(eval_dataset), n_images, config.seed)
    labels = prompt_labels(eval_dataset, rows, label_column, config) if judges.agreement is not None else None
    key = content_key("ceiling", _CACHE_VERSION, encoder_identity(pipe.vae), *judges.identity(),
                      image_column_fingerprint(eval_dataset, image_column, rows), labels, resolution,
                      config.center_crop, config.image_interpolation_mode, agreement_kind(config))
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
    prompts = [""] * len(images) if agreement_kind(config) in ("classifier", "none") else check_captions(
        eval_dataset.select(rows)[caption_column], caption_column, "eval_dataset")
    out = {**judges.score(images, feats, prompts, labels), "num_images": len(images),
           "seconds": round(time.perf_counter() - clock, 3)}
    write_json_atomic(path, out, sort_keys=True)
    return {**out, "cached": False}


def check_dataset(dataset: Any, columns: dict[str, str], what: str) -> None:
    """The dataset must be a non-empty `datasets.Dataset` holding `columns` (flag -> column; see check_columns)."""
    if not hasattr(dataset, "select"):
        raise ValueError(f"{what} must be a datasets.Dataset, got {type(dataset).__name__}.")
    check_columns(dataset, columns, what)
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty.")


def prompt_labels(dataset: Any, rows: np.ndarray, label_column: str | None, config: EvaluationConfig) -> list[int] | None:
    """Integer labels of the eval rows when classifier agreement needs them."""
    if agreement_kind(config) != "classifier":
        return None
    if label_column is None:
        if "label" not in dataset.column_names:
            raise ValueError("agreement='classifier' needs class labels: pass label_column (available columns: "
                             f"{dataset.column_names}) or choose agreement 'clip', 'biovil' or 'none'.")
        label_column = "label"
    check_dataset(dataset, {"label_column": label_column}, "eval_dataset")
    labels = dataset.select(rows)[label_column]
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise ValueError(f"label_column {label_column!r} must hold integer class ids.")
    return [int(v) for v in labels]
