"""Does a search trial's quality objective rank fine-tunes as prompt fidelity does?

Runs search-like trials (the quickstart's trial settings: `--hpo`, validation split, the search evaluation preset)
for a fixed set of methods, masks and learning rates, then reports each candidate objective (FID, KID, C2ST
accuracy, 1 - agreement, FID x (1 - agreement)) per trial and its Spearman rank correlation with prompt fidelity
(1 - agreement, so +1 = ranks exactly as fidelity does) and with the in-domain rate.

    python benchmarks/search_objective_ranks.py                       # ~10 trainer runs
    python benchmarks/search_objective_ranks.py --runs freeze:: full::1e-3 svdiff:11111:1e-2

Writes benchmarks/results/search_objective_ranks.json and .md. Runs that already hold a metrics.json in
--output_dir are reused (rerun with the finished runs to collect a partial set).
"""

from __future__ import annotations

import argparse
import json
import os
import time

# method:mask:learning_rate (empty mask: all positions; empty rate: the trainer's default)
DEFAULT_RUNS = ("freeze::", "full::1e-3", "full::1e-4", "svdiff::1e-3", "svdiff::1e-2", "svdiff:10000:1e-2",
                "difffit::1e-3", "difffit::1e-2", "attention::1e-3", "attention:00001:1e-3")
TRIAL_ARGS = ("--max_train_steps 250 --caption_dropout 0.1 --max_train_samples 100 --dmem_size 5 "
              "--dmem_unique_captions --eval_num_prompts 100 --eval_inference_steps 20")
OBJECTIVES = ("fid", "kid", "c2st", "agreement", "fid_agreement")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS))
    p.add_argument("--trainer_args", default=TRIAL_ARGS)
    p.add_argument("--output_dir", default="outputs/search_objective_ranks")
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)

    from scipy.stats import spearmanr

    from diffusers_memcontrol.evaluation.evaluator import quality_objective
    from diffusers_memcontrol.files import write_json_atomic, write_text_atomic
    from diffusers_memcontrol.search.launching import run_trainer

    rows = []
    for spec in args.runs:
        method, mask, lr = spec.split(":")
        flags = [*args.trainer_args.split(), "--peft_method", method, "--hpo", "--eval", "--eval_split", "validation",
                 "--eval_preset", "search"]
        flags += ["--mask", mask] if mask else []
        flags += ["--learning_rate", lr] if lr else []
        start = time.perf_counter()
        run_dir = os.path.join(args.output_dir, spec.replace(":", "_"))
        if os.path.isfile(os.path.join(run_dir, "metrics.json")):  # a finished run of an earlier call: reused
            with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
                metrics = json.load(f)
        else:
            metrics = run_trainer(flags, run_dir)
        row = {"run": spec, "seconds": round(time.perf_counter() - start, 1),
               **{k: metrics.get(k) for k in ("fid", "kid", "c2st_accuracy", "agreement", "in_domain", "dmem")}}
        row.update({f"objective_{o}": quality_objective(metrics, o) for o in OBJECTIVES})
        rows.append(row)
        print(row, flush=True)
    fidelity = [1.0 - r["agreement"] for r in rows]
    out_of_domain = [1.0 - r["in_domain"] for r in rows]
    ranks = {o: {"spearman_vs_1_minus_agreement": float(spearmanr([r[f"objective_{o}"] for r in rows],
                                                                  fidelity).statistic),
                 "spearman_vs_1_minus_in_domain": float(spearmanr([r[f"objective_{o}"] for r in rows],
                                                                  out_of_domain).statistic)} for o in OBJECTIVES}
    record = {"trainer_args": args.trainer_args, "rows": rows, "rank_correlation": ranks}
    os.makedirs(args.results, exist_ok=True)
    write_json_atomic(os.path.join(args.results, "search_objective_ranks.json"), record)
    lines = ["| Run | FID | KID | C2ST | agreement | in-domain |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['fid']:.4g} | {r['kid']:.4g} | {r['c2st_accuracy']:.3g} | {r['agreement']:.3g} | "
              f"{r['in_domain']:.3g} |" for r in rows]
    lines += ["", "| Objective | Spearman vs 1 - agreement | Spearman vs 1 - in-domain |", "|---|---|---|"]
    lines += [f"| {o} | {v['spearman_vs_1_minus_agreement']:.3f} | {v['spearman_vs_1_minus_in_domain']:.3f} |"
              for o, v in ranks.items()]
    table = "\n".join(lines) + "\n"
    write_text_atomic(os.path.join(args.results, "search_objective_ranks.md"), table)
    print(table)
    return record


if __name__ == "__main__":
    main()
