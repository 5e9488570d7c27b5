"""What the `evaluate` modules in `metrics/evaluate/<name>/` share: their metric card and input checks."""

from __future__ import annotations

from typing import Any

import datasets
import evaluate


def feature_metric_info(description: str, citation: str, inputs_description: str, url: str,
                        dtype: str = "float32", features: Any = None) -> evaluate.MetricInfo:
    """The metric card of a metric over one feature vector per prediction row (or over the given `features`)."""
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=features or datasets.Features({"predictions": datasets.Sequence(datasets.Value(dtype))}),
        reference_urls=[url],
    )


def require_reference_features(reference_features: Any) -> Any:
    """The training/reference features a distance metric is computed against; a clear error without them."""
    if reference_features is None:
        raise ValueError("reference_features=[M, D] training features is required")
    return reference_features
