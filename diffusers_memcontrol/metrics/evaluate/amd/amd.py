"""`evaluate` metric: average minimum cosine distance (AMD, MemControl eq. 5) of generations to training data."""

import evaluate
import numpy as np

from diffusers_memcontrol.metrics.distances import average_min_cosine_distance
from diffusers_memcontrol.metrics.evaluate_info import feature_metric_info, require_reference_features

_DESCRIPTION = """
Average minimum cosine distance (AMD, eq. 5 of the MemControl paper): for each generated feature vector the
cosine distance (1 - cos) to its nearest training feature vector, averaged over generations. Higher means less
memorization. Chunked over both axes, so large training sets run in bounded memory.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated-image features, one [D] vector per row.
    reference_features: [M, D] training-image features (numpy or torch).
    chunk_size: generated rows per block (default 4096).
    train_chunk_size: training rows per block (default 4096).
Returns:
    amd: the average minimum cosine distance (float in [0, 2]).
Examples:
    >>> amd = evaluate.load("diffusers_memcontrol/metrics/evaluate/amd")
    >>> amd.compute(predictions=gen_feats, reference_features=train_feats)
    {'amd': ...}
"""

_CITATION = """
@article{dutt2024memcontrol,
  title={MemControl: Mitigating Memorization in Diffusion Models via Automated Parameter Selection},
  author={Dutt, Raman and Sanchez, Pedro and Bohdal, Ondrej and Tsaftaris, Sotirios A and Hospedales, Timothy},
  journal={arXiv preprint arXiv:2405.19458},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Amd(evaluate.Metric):
    """AMD of generated features (predictions) against training features."""

    def _info(self) -> evaluate.MetricInfo:
        """Metric card: one feature vector per prediction row."""
        return feature_metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, "https://arxiv.org/abs/2405.19458")

    def _compute(self, predictions, reference_features=None, chunk_size=4096, train_chunk_size=4096) -> dict:
        """AMD of the accumulated predictions."""
        require_reference_features(reference_features)
        value = average_min_cosine_distance(
            np.asarray(predictions, dtype=np.float32),
            reference_features,
            chunk_size=chunk_size,
            train_chunk_size=train_chunk_size,
        )
        return {"amd": value}
