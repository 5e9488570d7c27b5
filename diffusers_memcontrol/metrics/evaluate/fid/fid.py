"""`evaluate` metric: Frechet distance (FID) between generated features and reference features or statistics."""

# ruff: noqa: I001  (evaluate's loader parses imports line by line: keep one import per line)

import evaluate
import numpy as np

from diffusers_memcontrol.metrics.fid import FeatureStatistics
from diffusers_memcontrol.metrics.fid import frechet_distance_from_stats
from diffusers_memcontrol.metrics.evaluate_info import feature_metric_info

_DESCRIPTION = """
Frechet distance between Gaussians fitted to two sets of image features (FID when the features come from
InceptionV3; the MemControl paper uses a chest X-ray DenseNet-121). Computed in float64 with a real-valued
matrix square root. Inputs are precomputed features: the encoder is not part of this metric.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated-image features, one [D] vector per row.
    reference_features: [M, D] reference (real-image) features. Give this or `reference_statistics`.
    reference_statistics: a `FeatureStatistics` or the path of one saved with `FeatureStatistics.save`
        (e.g. from `cached_reference_statistics`), to reuse reference statistics across runs.
    eps: diagonal offset used only if the eigen-decomposition fails (default 1e-6).
Returns:
    fid: the Frechet distance (float, >= 0).
Examples:
    >>> fid = evaluate.load("diffusers_memcontrol/metrics/evaluate/fid")
    >>> fid.compute(predictions=gen_feats, reference_features=real_feats)
    {'fid': ...}
"""

_CITATION = """
@inproceedings{heusel2017gans,
  title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium},
  author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and Hochreiter, Sepp},
  booktitle={NeurIPS},
  year={2017}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Fid(evaluate.Metric):
    """Frechet distance between generated features (predictions) and reference features or statistics."""

    def _info(self) -> evaluate.MetricInfo:
        """Metric card: one feature vector per prediction row."""
        return feature_metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, "https://arxiv.org/abs/1706.08500",
                                   dtype="float64")

    def _compute(self, predictions, reference_features=None, reference_statistics=None, eps=1e-6) -> dict:
        """FID of the accumulated predictions against the reference."""
        if (reference_features is None) == (reference_statistics is None):
            raise ValueError("pass exactly one of reference_features=[M, D] array or reference_statistics")
        generated = FeatureStatistics.from_features(np.asarray(predictions, dtype=np.float64))
        if reference_statistics is None:
            reference = FeatureStatistics.from_features(reference_features)
        elif isinstance(reference_statistics, FeatureStatistics):
            reference = reference_statistics
        else:
            reference = FeatureStatistics.load(reference_statistics)
        return {"fid": frechet_distance_from_stats(generated, reference, eps=eps)}
