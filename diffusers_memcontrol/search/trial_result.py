"""What a trainer run reports back to the search and to stage 2: `trial_result.json`, one `TrialResult`.

The trainer (`python -m diffusers_memcontrol.train`) writes it last, after the adapter, metrics.json and summary.json:
its presence marks the run finished (`claims.finished_run`), and it holds everything the search (the objectives, the
trial's user attributes) and the table (the row's metrics, the D_mem exposures) read from a run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..constants import TRIAL_RESULT_FILE
from ..files import write_json_atomic

logger = logging.getLogger(__name__)

# metrics keys of version 0.1.0 runs: the objectives' values and names, read under today's names
RENAMED_METRICS = {"search_memorization": "memorization_objective", "search_quality": "quality_objective",
                   "search_memorization_objective": "memorization_metric", "search_objective": "quality_metric"}


@dataclass
class TrialResult:
    """One trainer run's result; round-trips to JSON (`trial_result.json`)."""

    dmem: float | None = field(default=None, metadata={"help": "d_mem on D_mem (with --eval; not an objective)."})
    fid: float | None = field(default=None, metadata={"help": "FID on --eval_split (with --eval; not an objective)."})
    trainable_params: int = field(default=0, metadata={"help": "Parameters the adapter trained."})
    global_step: int = field(default=0, metadata={"help": "Optimizer steps taken."})
    train_samples: int = field(default=0, metadata={"help": "Rows of the training set (D_mem copies included)."})
    dmem_exposures: float = field(default=0.0, metadata={
        "help": "How often each D_mem pair was shown: samples trained on x copies of the pair / training-set size."})
    metrics: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Every scalar of metrics.json (the table's columns), empty without --eval."})

    @classmethod
    def from_run(cls, summary: Mapping, metrics: Mapping | None, samples_per_step: int, dmem_copies: int
                 ) -> TrialResult:
        """The result of a training run from its summary.json record and metrics (None without --eval).

        `samples_per_step`: samples per optimizer step over all processes (batch x accumulation x processes);
        `dmem_copies`: copies of each D_mem pair in the training set (--dmem_repeats under --hpo or --duplicate_dmem,
        else 1)."""
        def scalar(value: Any) -> bool:
            return value is None or isinstance(value, (int, float, str, bool))

        scalars = {k: v for k, v in (metrics or {}).items() if scalar(v)}
        if isinstance((metrics or {}).get("ceiling"), Mapping):  # the quality ceiling (stage 2's first table row)
            scalars["ceiling"] = {k: v for k, v in metrics["ceiling"].items() if scalar(v)}
        steps, images = int(summary["global_step"]), int(summary["train_samples"])
        return cls(dmem=scalars.get("dmem"), fid=scalars.get("fid"), trainable_params=int(summary["trainable_params"]),
                   global_step=steps, train_samples=images,
                   dmem_exposures=round(steps * samples_per_step * dmem_copies / images, 1), metrics=scalars)

    def record(self) -> dict[str, Any]:
        """The run's figures as one flat dict: its metrics, then the training-set size and the D_mem exposures."""
        return {**self.metrics, "trainable_params": self.trainable_params, "train_samples": self.train_samples,
                "dmem_exposures": self.dmem_exposures}

    def save(self, run_dir: str) -> str:
        """Write run_dir/trial_result.json atomically; returns its path."""
        return write_json_atomic(os.path.join(run_dir, TRIAL_RESULT_FILE), asdict(self))

    @classmethod
    def load(cls, run_dir: str) -> TrialResult:
        """Read run_dir/trial_result.json (unknown keys are an error: the file is written by this package)."""
        with open(os.path.join(run_dir, TRIAL_RESULT_FILE), encoding="utf-8") as f:
            data = json.load(f)
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise ValueError(f"{os.path.join(run_dir, TRIAL_RESULT_FILE)} is not a trial result (keys: "
                             f"{sorted(data) if isinstance(data, dict) else type(data).__name__}).")
        old = sorted(set(RENAMED_METRICS) & set(data.get("metrics") or {}))
        if old:
            logger.warning("%s was written by diffusers-memcontrol 0.1.0: reading its metrics %s as %s.",
                           os.path.join(run_dir, TRIAL_RESULT_FILE), old, [RENAMED_METRICS[k] for k in old])
            data["metrics"] = {RENAMED_METRICS.get(k, k): v for k, v in data["metrics"].items()}
        return cls(**data)
