"""Settings of :func:`evaluation.evaluate`: :class:`EvaluationConfig` (a dataclass with help per field, JSON round trip)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..data.images import check_interpolation
from ..metrics.extraction import DEFAULT_COPY_PERCENTILE

__all__ = ["AGREEMENT_KINDS", "SEARCH_MEMORIZATION_OBJECTIVES", "SEARCH_OBJECTIVES", "EvaluationConfig",
           "quality_objective", "quality_objective_se"]

AGREEMENT_KINDS = ("classifier", "clip", "biovil", "none")
SEARCH_OBJECTIVES = ("fid", "kid", "c2st", "agreement", "fid_agreement")
SEARCH_MEMORIZATION_OBJECTIVES = ("dmem", "cliques")
"""Quality objectives a search trial can minimize (``quality_objective`` in the metrics): FID, KID, C2ST accuracy,
1 - agreement, or FID x (1 - agreement)."""


def _positive_int(value: Any, name: str, allow_zero: bool = False) -> None:
    """ValueError unless `value` is an int > 0 (or >= 0)."""
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")


@dataclass
class EvaluationConfig:
    """Settings of :func:`evaluate`; defaults follow the MemControl paper and its reference code. JSON round trip."""

    feature_encoder: str = field(default="tiny-domain", metadata={
        "help": "Encoder of the FID/AMD/replication feature space (metrics.load_encoder): 'tiny-domain' for the "
                "built-in digits domain, 'xrv-densenet121' (the paper's) for chest X-rays, 'inception' for "
                "natural images."})
    encoder_weights: str | None = field(default=None, metadata={
        "help": "Local weights file/folder of the feature encoder (None: the encoder's default source)."})
    num_inference_steps: int = field(default=50, metadata={"help": "Sampling steps (50 in the reference code)."})
    guidance_scale: float = field(default=4.0, metadata={"help": "Classifier-free guidance (4.0 in the search)."})
    images_per_prompt: int = field(default=1, metadata={"help": "Generations per eval prompt (FID, agreement)."})
    num_eval_prompts: int | None = field(default=100, metadata={
        "help": "Eval prompts drawn (seeded) from eval_dataset; None = every row."})
    quality_images: int | None = field(default=200, metadata={
        "help": "Generations scored by the quality metrics (FID, KID, C2ST, agreement, in-domain): images_per_prompt "
                "is raised until num_eval_prompts x images_per_prompt reaches it (FID is biased at small n); None: "
                "images_per_prompt as given."})
    kid_subsets: int = field(default=100, metadata={"help": "Random subsets averaged by KID."})
    kid_subset_size: int = field(default=1000, metadata={
        "help": "Rows per KID subset (capped by the smaller set)."})
    c2st_folds: int = field(default=5, metadata={
        "help": "Cross-validation folds of the classifier two-sample test (generated vs real eval features)."})
    in_domain_classifier: str | None = field(default=None, metadata={
        "help": "In-domain rate: a shipped classifier's target domain ('digits', 'animal-mnist': against the tiny "
                "base's Fashion-MNIST) or a .safetensors file of metrics.in_domain.InDomainClassifier; None: none."})
    quality_noise: bool = field(default=True, metadata={
        "help": "Report each quality metric's noise (<metric>_noise): |metric(half A) - metric(half B)| over two "
                "disjoint halves of the generations."})
    ceiling: bool = field(default=True, metadata={
        "help": "Also score real eval images through the pipeline's VAE (the best any fine-tune can reach) with "
                "every quality metric (`ceiling` in the metrics; cached: it depends on the VAE, the eval images "
                "and these settings only)."})
    search_objective: str = field(default="fid", metadata={
        "help": "Quality objective of a search trial, returned as quality_objective (lower is better): 'fid', 'kid', "
                "'c2st' (accuracy), 'agreement' (1 - agreement) or 'fid_agreement' (FID x (1 - agreement))."})
    search_memorization: str = field(default="dmem", metadata={
        "help": "Memorization objective of a search trial, returned as memorization_objective (lower is better): "
                "'dmem' (the paper's d_mem) or 'cliques' (metrics.clique_share of the extraction_generations of each "
                "D_mem prompt: how far they collapse onto one image)."})
    resolution: int | None = field(default=None, metadata={
        "help": "Square generation size in pixels; None = the pipeline's default (unet sample_size x VAE factor)."})
    center_crop: bool = field(default=True, metadata={
        "help": "Center-crop real images after resizing their shorter side (else a random crop seeded by seed)."})
    image_interpolation_mode: str = field(default="lanczos", metadata={
        "help": "Resampling of real images (as the trainer's image_interpolation_mode)."})
    max_reference_images: int | None = field(default=None, metadata={
        "help": "Cap on the real eval images of the FID reference (seeded subset); None = all."})
    max_train_images: int | None = field(default=None, metadata={
        "help": "Cap on the training images of the AMD/replication reference (seeded subset, D_mem kept); None = all."})
    extraction_generations: int = field(default=50, metadata={
        "help": "Generations per D_mem prompt for the extraction attack, AMD and replication (reference code: 50; "
                "Carlini et al.: 500). 0 skips them."})
    extraction_grid: int = field(default=4, metadata={"help": "Tiles per side of the tiled l2 (4 = 16 tiles)."})
    extraction_threshold: float = field(default=0.15, metadata={
        "help": "Clique edge threshold on the 'rms' tiled-l2 scale (pixels in [0, 1]); see metrics.extraction_attack."})
    extraction_match_threshold: float | None = field(default=None, metadata={
        "help": "Carlini's pixel threshold: distance to the training image below which a flagged generation is "
                "extracted (None: extraction_threshold). Where the VAE's own round trip of a training image is "
                "farther than this, the match is made against that round trip instead (metrics.extraction)."})
    extraction_separation: float = field(default=0.5, metadata={
        "help": "Caps each D_mem pair's match threshold at this fraction of the distance to the nearest other "
                "training image (0.5: a match is closer to its own image than to any other one)."})
    extraction_min_clique_size: int = field(default=3, metadata={
        "help": "Smallest clique that flags generations (reference code: 3 of 50; Carlini et al.: 10 of 500)."})
    extraction_reduction: str = field(default="rms", metadata={"help": "Tiled l2 normalization: 'rms' or 'sum'."})
    copies: bool = field(default=True, metadata={
        "help": "Count nearest-neighbour copies beside the calibrated extraction (stage 2, the audit); search trials "
                "skip it (their objectives do not use it)."})
    copy_percentile: float = field(default=DEFAULT_COPY_PERCENTILE, metadata={
        "help": "Nearest-neighbour copies (metrics.nearest_neighbour_copies): a D_mem generation nearest to its own "
                "training image is a copy when closer to it than this percentile of the distances between training "
                "images and their nearest different same-class training image (VAE round trips, tiled l2)."})
    copy_calibration_images: int | None = field(default=2000, metadata={
        "help": "Training images (seeded subset) whose nearest same-class neighbour calibrates the copy bound; "
                "they and their VAE round trips are held in memory (2,000 at 512 px: 12.6 GB; lower it for large "
                "images). None = all."})
    dmem_timesteps: list[int] | None = field(default=None, metadata={
        "help": "Fixed d_mem timestep(s) (1 value or one per D_mem pair); None = uniform random (reference code)."})
    dmem_repeats: int = field(default=1, metadata={"help": "Passes over D_mem with fresh noise/timesteps."})
    dmem_batch_size: int = field(default=16, metadata={
        "help": "D_mem samples per forward and per max aggregate (keep fixed when comparing runs)."})
    agreement: str = field(default="classifier", metadata={
        "help": "'classifier' (built-in domains with labels), 'clip', 'biovil' (chest X-rays) or 'none'."})
    agreement_model: str | None = field(default=None, metadata={
        "help": "Classifier weights folder (default: the shipped tiny-domain encoder) or CLIP model id/folder."})
    replication_encoder: str | None = field(default=None, metadata={
        "help": "Encoder of the replication (copy-detection) space, e.g. 'sscd', 'clip', 'pixels'; None: the one "
                "metrics.encoders.COPY_DETECTION pairs with feature_encoder ('pixels' for 'tiny-domain'), else "
                "feature_encoder itself."})
    replication_round_trip: bool = field(default=True, metadata={
        "help": "Compare D_mem generations with the VAE round trips of the training images (the training set as "
                "the pipeline can render it) rather than with the images themselves."})
    replication_threshold: float = field(default=0.5, metadata={"help": "Similarity above which a generation "
                                                                         "counts as replicated (Somepalli et al.)."})
    generation_batch_size: int = field(default=16, metadata={"help": "Images per pipeline call."})
    encoder_batch_size: int = field(default=64, metadata={"help": "Images per encoder forward."})
    seed: int = field(default=0, metadata={"help": "Seed of prompt selection, generators and d_mem noise."})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Reference statistics/features cache (None: reference_cache_dir())."})
    show_progress: bool = field(default=True, metadata={"help": "tqdm progress bars."})

    def __post_init__(self) -> None:
        """Validate every field with an error naming the bad value."""
        for name in ("num_inference_steps", "images_per_prompt", "extraction_grid", "dmem_repeats",
                     "dmem_batch_size", "generation_batch_size", "encoder_batch_size"):
            _positive_int(getattr(self, name), name)
        _positive_int(self.extraction_generations, "extraction_generations", allow_zero=True)
        for name in ("kid_subsets", "kid_subset_size", "c2st_folds"):
            _positive_int(getattr(self, name), name)
        if self.kid_subset_size < 2 or self.c2st_folds < 2:
            raise ValueError(f"kid_subset_size and c2st_folds must be >= 2, got {self.kid_subset_size}, "
                             f"{self.c2st_folds}.")
        if self.search_objective not in SEARCH_OBJECTIVES:
            raise ValueError(f"search_objective must be one of {SEARCH_OBJECTIVES}, got {self.search_objective!r}.")
        if self.search_memorization not in SEARCH_MEMORIZATION_OBJECTIVES:
            raise ValueError(f"search_memorization must be one of {SEARCH_MEMORIZATION_OBJECTIVES}, got "
                             f"{self.search_memorization!r}.")
        if self.search_memorization == "cliques" and self.extraction_generations < 2:
            raise ValueError(f"search_memorization 'cliques' needs extraction_generations >= 2 (generations per "
                             f"D_mem prompt), got {self.extraction_generations}.")
        if self.in_domain_classifier is not None and not (isinstance(self.in_domain_classifier, str)
                                                          and self.in_domain_classifier):
            raise ValueError(f"in_domain_classifier must be None or a name/path, got {self.in_domain_classifier!r}.")
        if self.in_domain_classifier is not None:
            import os

            from ..metrics.in_domain import in_domain_classifier_path

            if not (os.path.isfile(self.in_domain_classifier)
                    or os.path.isfile(in_domain_classifier_path(self.in_domain_classifier))):
                raise ValueError(f"in_domain_classifier {self.in_domain_classifier!r} is neither a shipped target "
                                 "domain ('digits', 'animal-mnist') nor a .safetensors file.")
        for name in ("num_eval_prompts", "resolution", "max_reference_images", "max_train_images", "quality_images",
                     "copy_calibration_images"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), name)
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {self.guidance_scale!r}.")
        if self.agreement not in AGREEMENT_KINDS:
            raise ValueError(f"agreement must be one of {AGREEMENT_KINDS}, got {self.agreement!r}.")
        if self.extraction_reduction not in ("rms", "sum"):
            raise ValueError(f"extraction_reduction must be 'rms' or 'sum', got {self.extraction_reduction!r}.")
        for name in ("extraction_threshold", "extraction_match_threshold"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"{name} must be a number > 0, got {value!r}.")
        if not isinstance(self.copy_percentile, (int, float)) or not 0 < self.copy_percentile < 100:
            raise ValueError(f"copy_percentile must be in (0, 100), got {self.copy_percentile!r}.")
        if not isinstance(self.extraction_separation, (int, float)) or not 0 < self.extraction_separation <= 1:
            raise ValueError(f"extraction_separation must be in (0, 1], got {self.extraction_separation!r}.")
        _positive_int(self.extraction_min_clique_size, "extraction_min_clique_size")
        if self.extraction_min_clique_size < 2:
            raise ValueError(f"extraction_min_clique_size must be >= 2, got {self.extraction_min_clique_size}.")
        if 0 < self.extraction_generations < self.extraction_min_clique_size:
            raise ValueError(f"extraction_generations={self.extraction_generations} is below "
                             f"extraction_min_clique_size={self.extraction_min_clique_size}: no clique could form.")
        if self.dmem_timesteps is not None:
            steps = [self.dmem_timesteps] if isinstance(self.dmem_timesteps, int) else list(self.dmem_timesteps)
            if not steps or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in steps):
                raise ValueError(f"dmem_timesteps must be None or non-negative ints, got {self.dmem_timesteps!r}.")
            self.dmem_timesteps = steps
        check_interpolation(self.image_interpolation_mode)
        if self.replication_encoder is not None and not (isinstance(self.replication_encoder, str)
                                                         and self.replication_encoder):
            raise ValueError(f"replication_encoder must be None or an encoder name, got {self.replication_encoder!r}.")
        if not 0.0 <= float(self.replication_threshold) <= 1.0:
            raise ValueError(f"replication_threshold must be in [0, 1], got {self.replication_threshold!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown EvaluationConfig field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        """JSON text of every field."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvaluationConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def for_search(cls, **overrides: Any) -> EvaluationConfig:
        """The reference code's cheap trial settings: 100 validation prompts x 1 image, guidance 4, no extraction,
        no ceiling and no noise estimate."""
        base: dict[str, Any] = {"num_eval_prompts": 100, "images_per_prompt": 1, "extraction_generations": 0,
                                "agreement": "none", "show_progress": False, "quality_images": None,
                                "ceiling": False, "quality_noise": False, "copies": False}
        base.update(overrides)
        return cls(**base)


def quality_objective(metrics: dict[str, Any], objective: str) -> float:
    """The search trial's quality objective (lower is better) from evaluation metrics."""
    if objective == "fid":
        return float(metrics["fid"])
    if objective == "kid":
        return float(metrics["kid"])
    if objective == "c2st":
        return float(metrics["c2st_accuracy"])
    if metrics.get("agreement") is None:
        raise ValueError(f"search_objective {objective!r} needs an agreement score (class labels on the validation "
                         "split, or agreement 'clip'); none was computed.")
    if objective == "agreement":
        return 1.0 - float(metrics["agreement"])
    return float(metrics["fid"]) * (1.0 - float(metrics["agreement"]))


def quality_objective_se(agreement: float | None, agreement_kind: str, num_prompts: int, objective: str) -> float | None:
    """Standard error of the search trial's quality objective over its prompts, where it has one: for 1 - agreement
    with classifier agreement, the binomial ``sqrt(a (1 - a) / prompts)`` (exact with one image per prompt, an upper
    bound with more); None for FID, KID, C2ST, FID x (1 - agreement) and CLIP/BioViL agreement."""
    if objective != "agreement" or agreement_kind != "classifier" or agreement is None or num_prompts < 1:
        return None
    return math.sqrt(agreement * (1.0 - agreement) / num_prompts)
