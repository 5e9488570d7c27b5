"""`evaluate` metric: Carlini et al.'s extraction attack (cliques of tiled-l2 near-duplicates per prompt)."""

# ruff: noqa: I001  (evaluate's loader parses imports line by line: keep one import per line)

import datasets
import evaluate
import numpy as np

from diffusers_memcontrol.metrics.distances import DEFAULT_EXTRACTION_THRESHOLD
from diffusers_memcontrol.metrics.distances import extraction_attack
from diffusers_memcontrol.metrics.evaluate_info import feature_metric_info

_DESCRIPTION = """
Extraction attack of Carlini et al. (USENIX Security 2023). Per prompt, generations are compared with the
tiled l2 distance (max over 4x4 tiles of the per-tile RMS difference, pixels in [0, 1]); a generation in a
maximal clique of at least `min_clique_size` near-identical generations is flagged, and counted as extracted
when it lies within `match_threshold` of the prompt's training image.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one entry per prompt, the [G, C, H, W] generations of that prompt.
    references: one entry per prompt, the [C, H, W] training image of that prompt.
    threshold: clique-graph edge threshold (default 0.15, rms scale; a parameter to calibrate).
    min_clique_size: clique size that flags generations (default 10, Carlini et al.).
    grid: tiles per side (default 4, i.e. 16 tiles, Carlini et al.).
    match_threshold: distance to the training image for extraction (default: threshold).
    reduction: "rms" (default) or "sum" tile normalization.
    value_range: pixel range, (0, 1) (default) or (-1, 1).
Returns:
    n_extracted (training images extracted), n_extracted_generations, n_flagged_prompts, n_prompts, per_prompt.
Examples:
    >>> ext = evaluate.load("diffusers_memcontrol/metrics/evaluate/extraction")
    >>> ext.compute(predictions=[gens_prompt0, gens_prompt1], references=[train0, train1])
"""

_CITATION = """
@inproceedings{carlini2023extracting,
  title={Extracting Training Data from Diffusion Models},
  author={Carlini, Nicholas and Hayes, Jamie and Nasr, Milad and Jagielski, Matthew and Sehwag, Vikash and
          Tram{\\`e}r, Florian and Balle, Borja and Ippolito, Daphne and Wallace, Eric},
  booktitle={USENIX Security Symposium},
  year={2023}
}
"""


def _nested(depth: int) -> datasets.Sequence:
    """A float32 sequence nested ``depth`` levels deep."""
    feature = datasets.Value("float32")
    for _ in range(depth):
        feature = datasets.Sequence(feature)
    return feature


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Extraction(evaluate.Metric):
    """Number of training images extracted from per-prompt generations (predictions) and training images."""

    def _info(self) -> evaluate.MetricInfo:
        """Metric card: per prompt a [G, C, H, W] prediction and a [C, H, W] reference image."""
        return feature_metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, "https://arxiv.org/abs/2301.13188",
                                   features=datasets.Features({"predictions": _nested(4), "references": _nested(3)}))

    def _compute(
        self,
        predictions,
        references,
        threshold=DEFAULT_EXTRACTION_THRESHOLD,
        min_clique_size=10,
        grid=4,
        match_threshold=None,
        reduction="rms",
        value_range=(0.0, 1.0),
    ) -> dict:
        """Run the attack on the accumulated prompts."""
        generations = [np.asarray(g, dtype=np.float32) for g in predictions]
        training = np.stack([np.asarray(r, dtype=np.float32) for r in references])
        result = extraction_attack(
            generations,
            training,
            threshold=threshold,
            min_clique_size=min_clique_size,
            grid=grid,
            match_threshold=match_threshold,
            reduction=reduction,
            value_range=tuple(value_range),
        )
        return result.to_dict()
