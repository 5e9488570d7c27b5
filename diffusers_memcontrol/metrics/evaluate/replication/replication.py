"""`evaluate` metric: Somepalli et al.'s replication score (top-1 cosine similarity to the training set)."""

import evaluate
import numpy as np

from diffusers_memcontrol.metrics.distances import replication_scores
from diffusers_memcontrol.metrics.evaluate_info import feature_metric_info, require_reference_features

_DESCRIPTION = """
Replication metric of Somepalli et al. (NeurIPS 2023): the top-1 cosine similarity of each generation to the
training set, summarized by its mean, 95th percentile and the fraction above 0.5. Somepalli et al. use SSCD
copy-detection features; pass features from the encoder you use. Chunked over both axes.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated-image features, one [D] vector per row.
    reference_features: [M, D] training-image features (numpy or torch).
    threshold: similarity above which a generation counts as a replication (default 0.5).
    chunk_size: generated rows per block (default 4096).
    train_chunk_size: training rows per block (default 4096).
Returns:
    mean, p95, fraction_above, threshold, n_generations.
Examples:
    >>> rep = evaluate.load("diffusers_memcontrol/metrics/evaluate/replication")
    >>> rep.compute(predictions=gen_feats, reference_features=train_feats)
    {'mean': ..., 'p95': ..., 'fraction_above': ..., 'threshold': 0.5, 'n_generations': ...}
"""

_CITATION = """
@inproceedings{somepalli2023understanding,
  title={Understanding and Mitigating Copying in Diffusion Models},
  author={Somepalli, Gowthami and Singla, Vasu and Goldblum, Micah and Geiping, Jonas and Goldstein, Tom},
  booktitle={NeurIPS},
  year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Replication(evaluate.Metric):
    """Top-1 cosine similarity statistics of generated features (predictions) against training features."""

    def _info(self) -> evaluate.MetricInfo:
        """Metric card: one feature vector per prediction row."""
        return feature_metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, "https://arxiv.org/abs/2305.20086")

    def _compute(
        self, predictions, reference_features=None, threshold=0.5, chunk_size=4096, train_chunk_size=4096
    ) -> dict:
        """Replication statistics of the accumulated predictions."""
        require_reference_features(reference_features)
        return replication_scores(
            np.asarray(predictions, dtype=np.float32),
            reference_features,
            threshold=threshold,
            chunk_size=chunk_size,
            train_chunk_size=train_chunk_size,
        )
