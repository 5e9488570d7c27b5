"""Collect testbed measurements: each trainer run's memorization (its metrics.json) and the judge's scores.

    python benchmarks/testbed.py RUN_DIR [RUN_DIR ...] [--results benchmarks/results/testbed.json] [--note TEXT]

For each finished trainer run (trained with --eval, so that metrics.json holds the extraction counts) this records
the method, learning rate, steps, batch, the share of D_mem rows in the training set, each pair's exposures, the
extracted count, and the judge's in-domain rate and prompt fidelity (benchmarks/judge.py, 10 generations per digit
prompt, 20 sampling steps), merged by run name into the results file.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from judge import Judge, judge_run

from diffusers_memcontrol.files import write_json_atomic
from diffusers_memcontrol.search.trial_result import TrialResult


def describe(run_dir: str) -> dict:
    """The run's configuration and memorization figures, from the files the trainer wrote."""
    with open(os.path.join(run_dir, "training_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    metrics = {}  # a run trained without --eval: no memorization figures
    if os.path.isfile(os.path.join(run_dir, "metrics.json")):
        with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
            metrics = json.load(f)
    run, fine_tune, data = config["run"], config["fine_tune"], config["data"]
    copies = run["dmem_repeats"] if run.get("hpo") or run.get("duplicate_dmem") else 1
    rows = data["train_samples"]
    return {
        "method": run["peft_method"], "mask": run.get("mask"), "learning_rate": fine_tune["learning_rate"],
        "steps": fine_tune["max_train_steps"], "batch": fine_tune["train_batch_size"],
        "max_train_samples": run.get("max_train_samples"), "dmem_size": data.get("dmem_pairs"),
        "dmem_repeats": copies, "train_rows": rows,
        "dmem_share": round(copies * data.get("dmem_pairs", 0) / rows, 3),
        "dmem_exposures": TrialResult.load(run_dir).dmem_exposures,
        "extracted": metrics.get("extracted_images"), "memorized_prompts": metrics.get("memorized_prompts"),
        "dmem": metrics.get("dmem"), "fid": metrics.get("fid"), "agreement": metrics.get("agreement"),
        "trainable_params": metrics.get("trainable_params"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results", "testbed.json"))
    p.add_argument("--note", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    judge = Judge()
    for run_dir in args.runs:
        row = describe(run_dir)
        row.update(judge_run(judge, run_dir))
        if args.note:
            row["note"] = args.note
        name = os.path.basename(os.path.normpath(run_dir))
        print(name, json.dumps(row), flush=True)
        lock_path = os.path.join(tempfile.gettempdir(), "memcontrol-testbed.lock")
        with open(lock_path, "w") as lock:  # several collectors may run at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            results = {"runs": {}}
            if os.path.isfile(args.results):
                with open(args.results, encoding="utf-8") as f:
                    results = json.load(f)
            results["judge_ceiling"] = judge.ceiling
            results["runs"][name] = row
            write_json_atomic(args.results, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
