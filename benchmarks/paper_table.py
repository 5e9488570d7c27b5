"""The paper's Table 1 grid (every method x every mitigation, stage 2) with several seeds: mean ± std per cell.

One seed's table cannot tell a difference between methods from noise: the seed draws D_mem, the noise of every
training step and the generations. This runs stage 2 (`train_memcontrol.py --final --mask MASK`, the same runs as
the quickstart's stage 2) once per seed and reports each metric's mean and sample standard deviation over the seeds.

    python benchmarks/paper_table.py --mask outputs/quickstart           # the mask the quickstart chose
    python benchmarks/paper_table.py --mask outputs/quickstart --seeds 0,1,2 --mitigations none

Each run uses the quickstart's stage-2 flags (`--trainer_args` replaces them; this script's own flags come last).

Writes benchmarks/results/paper_table.json (every seed's rows and the summary) and paper_table.md (the table).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

METRICS = ("fid", "kid", "c2st_accuracy", "in_domain", "amd", "agreement", "extracted_images", "copied_images",
           "memorized_prompts", "dmem", "dmem_exposures", "fid_noise", "kid_noise")
# the ceiling row (real test images through the base's VAE) is a row of every seed's table, as "ceiling"
def quickstart_stage2_args() -> str:
    """The quickstart's stage-2 flags (arguments.QUICKSTART_STAGE2, their one home)."""
    from diffusers_memcontrol.search.arguments import QUICKSTART_STAGE2

    return " ".join(QUICKSTART_STAGE2)


def summarize(runs: dict[int, list[dict]]) -> list[dict]:
    """One row per (method, mitigation): mean, std (sample, over seeds) and n of each metric present in every seed."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for rows in runs.values():
        for row in rows:
            cells.setdefault((row["method"], row["mitigation"]), []).append(row)
    summary = []
    for (method, mitigation), rows in cells.items():
        out = {"method": method, "mitigation": mitigation, "seeds": len(rows),
               "trainable_params": rows[0].get("trainable_params")}
        for name in METRICS:
            values = [float(r[name]) for r in rows if r.get(name) is not None]
            if len(values) == len(rows):
                out[name] = {"mean": statistics.fmean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        summary.append(out)
    return summary


def markdown(summary: list[dict]) -> str:
    """The summary as a Markdown table of mean ± std, the ceiling first."""
    from diffusers_memcontrol.evaluation.reporting import ROW_NAMES, ROW_ORDER

    names = [n for n in METRICS if any(n in row for row in summary)]
    lines = ["| Method | Mitigation | " + " | ".join(names) + " | Trainable params |",
             "|---|---|" + "---|" * len(names) + "---|"]
    order = {m: i for i, m in enumerate(ROW_ORDER)}
    for row in sorted(summary, key=lambda r: order.get(r["method"], len(order))):
        cells = [f"{row[n]['mean']:.4g} ± {row[n]['std']:.2g}" if n in row else "—" for n in names]
        params = row["trainable_params"]
        lines.append(f"| {ROW_NAMES.get(row['method'], row['method'])} | {row['mitigation']} | " + " | ".join(cells)
                     + f" | {'—' if params is None else f'{params:,}'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mask", required=True, help="The MemControl mask (bit string of a method, JSON, or a folder "
                                                 "holding best_mask.json, e.g. the quickstart's output).")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--mitigations", default="none,rwa,threshold")
    p.add_argument("--stage2_protocol", default="duplicated", choices=["split", "duplicated"])
    p.add_argument("--n_workers", type=int, default=2)
    p.add_argument("--trainer_args", default=None,
                   help="Trainer arguments of every stage-2 run (default: the quickstart preset's).")
    p.add_argument("--output_dir", default="outputs/paper_table")
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    args.trainer_args = args.trainer_args if args.trainer_args is not None else quickstart_stage2_args()

    from diffusers_memcontrol.files import write_json_atomic, write_text_atomic
    from diffusers_memcontrol.search.stages import main_search

    runs, seconds = {}, {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        start = time.perf_counter()
        result = main_search([*args.trainer_args.split(), "--final", "--mask", args.mask, "--mitigations",
                              args.mitigations, "--stage2_protocol", args.stage2_protocol, "--n_workers",
                              str(args.n_workers), "--seed", str(seed),
                              "--output_dir", os.path.join(args.output_dir, f"seed-{seed}")])
        runs[seed], seconds[seed] = result["rows"], round(time.perf_counter() - start, 1)
    summary = summarize(runs)
    os.makedirs(args.results, exist_ok=True)
    record = {"mask": args.mask, "trainer_args": args.trainer_args, "stage2_protocol": args.stage2_protocol,
              "seconds_per_seed": seconds, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                      "torch": torch.__version__},
              "summary": summary, "runs": {str(k): v for k, v in runs.items()}}
    write_json_atomic(os.path.join(args.results, "paper_table.json"), record)
    table = markdown(summary)
    write_text_atomic(os.path.join(args.results, "paper_table.md"), table)
    print(table)


if __name__ == "__main__":
    main()
