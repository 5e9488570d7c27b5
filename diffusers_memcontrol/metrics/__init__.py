"""Memorization and quality metrics of the MemControl paper, usable on any diffusers UNet/pipeline and image set.

Memorization: `dmem_search` (the reference code's search objective), `wen_detection_scores` + `detection_auc`
(Wen et al., ICLR 2024), `average_min_cosine_distance` (AMD, eq. 5), `extraction_attack` (Carlini et al. with true
cliques), `replication_scores` (Somepalli et al.). Quality: `frechet_distance` with streaming, cached statistics,
`kernel_inception_distance` (KID), `c2st_accuracy` (classifier two-sample test), the in-domain rate
(`in_domain_rate`), and text-image agreement (`clip_score`, `classifier_agreement`, `biovil_score`). Features come
from `load_encoder`.
"""

from .agreement import biovil_score, classifier_agreement, clip_score
from .distances import (
    ExtractionResult,
    average_min_cosine_distance,
    clique_share,
    extraction_attack,
    find_cliques,
    min_cosine_distances,
    nearest_neighbors,
    replication_scores,
    tiled_l2,
)
from .encoders import ImageEncoder, available_encoders, load_encoder, register_encoder
from .fid import FeatureStatistics, cached_reference_statistics, frechet_distance, frechet_distance_from_stats
from .in_domain import InDomainClassifier, in_domain_rate, load_in_domain_classifier
from .memorization import DmemResult, detection_auc, dmem_search, wen_detection_scores
from .quality import c2st_accuracy, disjoint_halves, kernel_inception_distance

__all__ = [
    "DmemResult",
    "ExtractionResult",
    "FeatureStatistics",
    "ImageEncoder",
    "InDomainClassifier",
    "available_encoders",
    "average_min_cosine_distance",
    "biovil_score",
    "c2st_accuracy",
    "cached_reference_statistics",
    "classifier_agreement",
    "clip_score",
    "clique_share",
    "detection_auc",
    "disjoint_halves",
    "dmem_search",
    "extraction_attack",
    "find_cliques",
    "frechet_distance",
    "frechet_distance_from_stats",
    "in_domain_rate",
    "kernel_inception_distance",
    "load_encoder",
    "load_in_domain_classifier",
    "min_cosine_distances",
    "nearest_neighbors",
    "register_encoder",
    "replication_scores",
    "tiled_l2",
    "wen_detection_scores",
]
