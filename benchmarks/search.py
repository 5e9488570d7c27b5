"""Wall time per search trial, split into train / eval / overhead, on the tiny base.

Runs a real MemControl study (`search.optimize` with `launching.TrainerTrial`: every trial is the trainer in its own
process, on the HPO set, scored with the search evaluation preset) and splits each trial's wall time, as Optuna
recorded it, into:

- train: the training loop (`summary.json` `train_time_s`),
- eval: generation, features, FID and d_mem (the sum of `metrics.json` `timings`),
- overhead: everything else (process start and imports, model and data loading, cache look-ups, Optuna bookkeeping).

The first trial fills the latent/text cache and the FID reference statistics; the later ones reuse them, so the
warm/cold ratio of the overhead shows what the per-study caches save.

    python benchmarks/search.py                     # writes benchmarks/results/search.json
    python benchmarks/search.py --n_trials 6 --max_train_steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile

import torch


def trial_split(trial_dir: str, duration_s: float) -> dict:
    """Seconds of train / eval / overhead of one trial from the files its trainer process wrote."""
    with open(os.path.join(trial_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    with open(os.path.join(trial_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    train = float(summary["train_time_s"])
    evaluation = float(sum(metrics["timings"].values()))
    return {"total_s": round(duration_s, 2), "train_s": round(train, 2), "eval_s": round(evaluation, 2),
            "overhead_s": round(duration_s - train - evaluation, 2), "eval_timings_s": metrics["timings"],
            "fid_reference_cached": metrics.get("fid_reference_cached"), "cache": summary.get("cache")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_trials", type=int, default=4)
    p.add_argument("--max_train_steps", type=int, default=100)
    p.add_argument("--trainer_args", default="--learning_rate 1e-3 --dmem_size 20 --dmem_unique_captions "
                   "--eval_num_prompts 50 --eval_inference_steps 20",
                   help="Trainer arguments shared by every trial (the README quickstart's).")
    p.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                     "search.json"))
    args = p.parse_args()

    from diffusers import UNet2DConditionModel

    from diffusers_memcontrol import MaskSpace
    from diffusers_memcontrol.data.tiny_base import tiny_base_path
    from diffusers_memcontrol.search.launching import TrainerTrial
    from diffusers_memcontrol.search.study import SearchConfig, optimize

    unet = UNet2DConditionModel.from_pretrained(tiny_base_path(), subfolder="unet")
    space = MaskSpace.from_unet(unet, method="svdiff", layout="paper")
    train_args = [*args.trainer_args.split(), "--max_train_steps", str(args.max_train_steps)]
    with tempfile.TemporaryDirectory() as out:
        # a fresh cache, so the first trial really is cold
        os.environ["MEMCONTROL_CACHE_DIR"] = os.path.join(out, "cache")
        config = SearchConfig(n_trials=args.n_trials, population_size=max(2, args.n_trials // 2),
                              study_name="benchmark")
        study = optimize(space, config, out, TrainerTrial(train_args, out, "svdiff", "paper"))
        trials = []
        for t in sorted(study.trials, key=lambda t: t.number):
            if t.datetime_complete is None:
                continue
            duration = (t.datetime_complete - t.datetime_start).total_seconds()
            trial_dir = os.path.join(out, "trials", study.study_name, f"trial-{t.number:04d}")
            trials.append({"number": t.number, "mask": t.user_attrs.get("mask"), **trial_split(trial_dir, duration)})
    warm = trials[1:] or trials

    def median(key: str, rows: list[dict]) -> float:
        return round(statistics.median(r[key] for r in rows), 2)

    result = {
        "benchmark": "search trial wall time split",
        "model": "tiny base (diffusers_memcontrol/assets/tiny_base)",
        "space": "svdiff/paper",
        "n_trials": len(trials),
        "trainer_args": train_args,
        "host": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()},
        "trials": trials,
        "median_warm": {k: median(k, warm) for k in ("total_s", "train_s", "eval_s", "overhead_s")},
        "cold_trial": {k: trials[0][k] for k in ("total_s", "train_s", "eval_s", "overhead_s")},
        "overhead_fraction_warm": round(median("overhead_s", warm) / median("total_s", warm), 3),
        "overhead_cold_over_warm": round(trials[0]["overhead_s"] / median("overhead_s", warm), 2),
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("median_warm", "cold_trial", "overhead_fraction_warm",
                                             "overhead_cold_over_warm")}, indent=2))
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
