"""MemControl end to end: stage 1 (search), the choice of one mask, stage 2 (final fine-tunes) and the comparison.

Stage 1 runs one study per search space (`search.optimize`), takes the union of their Pareto fronts and picks one mask
(`search.select_trial`). Stage 2 retrains that mask and every baseline on the full training split, with each
mitigation, evaluates on the test split and writes the paper's Table 1 (`results.md`, `results.json`) and Figure 3
(`pareto.png`). Every fine-tune runs the trainer in its own process (`launching.run_trainer`), claimed through
`runs.run_claimed` so that several commands sharing an output folder train each run once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import as_completed
from dataclasses import replace

import optuna

from ..constants import BEST_MASK_FILE, PARETO_FIGURE, RESULTS_MARKDOWN, SEARCH_SUMMARY_FILE
from ..data.tiny_base import tiny_base_path
from ..errors import InputError, redact_url, user_input
from ..evaluation.figures import write_memorization_figure
from ..evaluation.reporting import ceiling_row, pareto_plot, write_results
from ..files import write_json_atomic
from ..hub.adapters import resolve_mask
from ..trainer.arguments import check_inputs, meta_unet, parse_args
from ..trainer.mitigation import MITIGATIONS
from ..tuners import METHODS, Mask, MaskSpace
from .arguments import BASELINES, STAGE2_PROTOCOLS, parse_search_args, stage2_args
from .claims import WorkerPool
from .launching import TrainerTrial
from .study import (
    OBJECTIVES,
    SearchConfig,
    choose_trial,
    export_study,
    exposure_report,
    mask_of_trial,
    optimize,
    pareto_front,
    resolve_storage,
)
from .trial_result import TrialResult


def run_search(unet, train_args: list[str], output_dir: str, search_spaces: list[str], layout: str, scope: str,
               config: SearchConfig) -> dict:
    """Stage 1 over one or several spaces; writes best_mask.json, pareto.json, trials.csv; returns the choice."""
    trials, front, completed, row_of = [], [], [], {}
    spaces = {}
    for method in search_spaces:
        space = MaskSpace.from_unet(unet, method=method, layout=layout)
        spaces[method] = space
        study_config = replace(config, study_name=f"{config.study_name or 'memcontrol'}-{method}-{layout}")
        study = optimize(space, study_config, output_dir,
                         TrainerTrial(train_args, output_dir, method, layout, scope,
                                      gpus_per_trial=config.gpus_per_trial,
                                      accelerate_config=config.accelerate_config))
        export_study(study, space, os.path.join(output_dir, "search", method), config.selection,
                     config.max_memorization)
        for t in study.trials:
            if t.values is not None:
                trials.append({"study": study.study_name, "method": method, "number": len(trials), "trial": t.number,
                               **dict(zip(OBJECTIVES, t.values)),
                               "memorization_metric": t.user_attrs.get("memorization_metric", "dmem"),
                               "quality_metric": t.user_attrs.get("quality_metric", "fid"),
                               "quality_objective_se": t.user_attrs.get("quality_objective_se"),
                               "dmem": t.user_attrs.get("dmem"), "fid": t.user_attrs.get("fid"),
                               "mask": mask_of_trial(t, space).bitstring,
                               "default_mask": bool(t.user_attrs.get("seeded")),
                               "trainable_params": t.user_attrs.get("trainable_params"),
                               "dmem_exposures": t.user_attrs.get("dmem_exposures"),
                               "within_budget": (None if config.max_memorization is None
                                                 else t.values[0] <= config.max_memorization)})
                row_of[(study.study_name, t.number)] = len(trials) - 1
                completed.append((study.study_name, t))
        front.extend((study.study_name, t) for t in pareto_front(study))
    if not row_of:
        raise RuntimeError("No search trial completed; see the trial logs under output_dir/trials.")
    union = [(name, t) for name, t in front if not any(_dominates(o, t) for _, o in front)]
    chosen, within_budget = choose_trial([t for _, t in union], [t for _, t in completed], config.selection,
                                         config.max_memorization)
    chosen_row = next(row_of[(name, t.number)] for name, t in [*union, *completed] if t is chosen)
    chosen_method = trials[chosen_row]["method"]
    mask = mask_of_trial(chosen, spaces[chosen_method])
    mask.save(os.path.join(output_dir, BEST_MASK_FILE))
    summary = {
        "search_spaces": search_spaces,
        "layout": layout,
        "scope": scope,
        "selection": config.selection,
        "objectives": list(OBJECTIVES),
        # a memorization budget: trials within it are feasible; the choice is the best quality among them
        "max_memorization": config.max_memorization,
        "chosen_within_budget": within_budget,
        # what the objectives measure: EvaluationConfig.search_memorization and search_objective
        "memorization_metric": ",".join(sorted({t["memorization_metric"] for t in trials})),
        "quality_metric": ",".join(sorted({t["quality_metric"] for t in trials})),
        "chosen": {"method": chosen_method, "mask": mask.to_dict(), **dict(zip(OBJECTIVES, chosen.values)),
                   "learning_rate": chosen.params.get("learning_rate"), "row": chosen_row,
                   "quality_objective_se": chosen.user_attrs.get("quality_objective_se")},
        "front": [row_of[(name, t.number)] for name, t in union],
        "dmem_exposures": exposure_report([t["dmem_exposures"] for t in trials if t["dmem_exposures"] is not None]),
        "trials": trials,
    }
    write_json_atomic(os.path.join(output_dir, SEARCH_SUMMARY_FILE), summary)
    return summary


def _dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a.values, b.values)) and tuple(a.values) != tuple(b.values)


def run_final(train_args: list[str], output_dir: str, chosen: dict, layout: str, scope: str,
              baselines: Sequence[str] = BASELINES, mitigations: Sequence[str] = MITIGATIONS,
              n_workers: int = 1, gpus_per_trial: int = 1, accelerate_config: str | None = None,
              protocol: str = "split", pool: WorkerPool | None = None) -> list[dict]:
    """Stage 2: fine-tune the chosen mask and each baseline on the full training split with each mitigation,
    evaluate on the test split; write results.md / results.json and return the rows.

    `protocol` (`STAGE2_PROTOCOLS`): the train split as it is, or with the D_mem pairs duplicated.

    The runs are independent: they train on `pool` (default: a `WorkerPool` of `n_workers`), the Freeze rows last
    (no backward pass: the shortest). Each run is claimed through a lock file next to its folder (`claim_run`), so
    several commands sharing `output_dir` (several machines) never train the same row: a command trains the rows
    it claims, then waits for the others' and writes the whole table too.
    """
    if pool is None:
        with WorkerPool(n_workers, gpus_per_trial, accelerate_config) as own_pool:
            return run_final(train_args, output_dir, chosen, layout, scope, baselines, mitigations,
                             protocol=protocol, pool=own_pool)
    runs = []
    candidates = [(name, name, None) for name in baselines]
    candidates.append(("memcontrol", chosen["method"], Mask.from_dict(chosen["mask"])))
    for row_name, method, mask in candidates:
        for mitigation in mitigations:
            args = [*train_args, "--peft_method", method, "--mask_layout", layout, "--mask_scope", scope,
                    "--mitigation", mitigation, "--eval", "--eval_split", "test", *STAGE2_PROTOCOLS[protocol]]
            if mask is not None:
                args += ["--mask", mask.bitstring]
            if row_name == "memcontrol" and chosen.get("learning_rate"):
                args += ["--learning_rate", repr(chosen["learning_rate"])]
            run_dir = os.path.join(output_dir, "final", f"{row_name}-{mitigation}")
            runs.append((row_name, method, mitigation, args, run_dir))
    done: dict[int, dict] = {}
    ceiling: list[dict] = []  # the same for every row (base VAE, test split): kept from the first that has it

    def collect(index: int, result: TrialResult) -> None:
        row_name, method, mitigation, _, _ = runs[index]
        done[index] = {"method": row_name, "peft_method": method, "mitigation": mitigation,
                       **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) or v is None},
                       "dmem_exposures": result.dmem_exposures}
        if not ceiling and (row := ceiling_row(result.metrics)) is not None:
            ceiling.append(row)
        write_results(ceiling + [done[i] for i in sorted(done)], output_dir)  # partial tables survive a stop

    order = sorted(range(len(runs)), key=lambda i: runs[i][1] == "freeze")
    index_of = {pool.submit(runs[i][3], runs[i][4], wait=False): i for i in order}
    deferred = []  # claimed by another command: collected after this command's own runs
    for future in as_completed(index_of):  # each row's table line as soon as it finishes
        if (result := future.result()) is None:
            deferred.append(index_of[future])
        else:
            collect(index_of[future], result)
    for i, future in [(i, pool.submit(runs[i][3], runs[i][4], wait=True)) for i in sorted(deferred)]:
        collect(i, future.result())
    write_memorization_figure([done[i] for i in sorted(done)], output_dir)
    return ceiling + [done[i] for i in sorted(done)]


def run_memcontrol(unet, train_args: list[str], output_dir: str, search_spaces: list[str], layout: str, scope: str,
                   config: SearchConfig, final: bool = True, baselines: tuple[str, ...] | list[str] = BASELINES,
                   mitigations: tuple[str, ...] | list[str] = MITIGATIONS, hpo_baselines: bool = True,
                   stage2_protocol: str = "split", plot: bool = True, final_args: list[str] | None = None) -> dict:
    """The whole method: search, choose, (optionally) the Pareto plot, stage 2 and the table; returns paths and the
    choice. `final_args`: stage 2's trainer flags (default `train_args`; `search.arguments.stage2_args`)."""
    summary = run_search(unet, train_args, output_dir, search_spaces, layout, scope, config)
    if not plot:  # stage 1 on one of many machines: the study and the choice only
        return {"search": summary}
    plot_baselines = {}
    for t in summary["trials"]:
        if t["default_mask"]:
            plot_baselines[f"{t['method']} (default)"] = tuple(t[k] for k in OBJECTIVES)
    result = {"search": summary}
    with WorkerPool(config.n_workers, config.gpus_per_trial, config.accelerate_config) as pool:
        full_ft = None
        if hpo_baselines:  # Full FT on the same HPO set, for the plot; it trains beside stage 2's first runs
            full_ft = pool.submit([*train_args, "--peft_method", "full", "--mask_layout", layout, "--hpo", "--eval",
                                   "--eval_split", "validation", "--eval_preset", "search"],
                                  os.path.join(output_dir, "trials", "full-ft"))
        if final:
            result["rows"] = run_final(final_args or train_args, output_dir, summary["chosen"], layout, scope, baselines,
                                       mitigations, protocol=stage2_protocol, pool=pool)
            result["results_md"] = os.path.join(output_dir, RESULTS_MARKDOWN)
        if full_ft is not None:
            plot_run = full_ft.result()
            # in the trials' units: the search's memorization and quality objectives
            plot_baselines["Full FT"] = tuple(plot_run.metrics[k] for k in OBJECTIVES)
    result["pareto_plot"] = pareto_plot(summary["trials"], summary["front"], summary["chosen"]["row"],
                                        os.path.join(output_dir, PARETO_FIGURE), baselines=plot_baselines,
                                        quality_metric=summary["quality_metric"],
                                        memorization_metric=summary["memorization_metric"],
                                        budget=summary["max_memorization"])
    result["pareto_baselines"] = plot_baselines
    write_json_atomic(os.path.join(output_dir, "memcontrol_run.json"),
                {k: v for k, v in result.items() if k != "search"})
    return result


def main_search(argv: list[str]) -> dict:
    """`train_memcontrol.py --search ...` / `memcontrol search ...`: the whole MemControl run."""
    args, train_args = parse_search_args(argv)
    if args.mask:
        return main_transfer(args, train_args)
    spaces = (args.search_space or args.peft_method or "svdiff").split(",")
    unknown = [s for s in spaces if s not in METHODS or s in ("full", "freeze")]
    if unknown:
        raise InputError(f"--search_space: unknown or unsearchable method(s) {unknown}; expected svdiff, difffit, "
                         "attention or lora (comma-separated).")
    unet = _base_unet(train_args)
    with user_input():
        config = SearchConfig(n_trials=args.n_trials, population_size=args.population_size,
                              search_learning_rate=args.search_learning_rate, storage=args.storage,
                              study_name=args.study_name, seed=args.seed, n_workers=args.n_workers,
                              selection=args.selection, gpus_per_trial=args.gpus_per_trial,
                              accelerate_config=args.accelerate_config, heartbeat_interval=args.heartbeat_interval,
                              grace_period=args.grace_period, max_memorization=args.max_memorization)
    with user_input(f"--storage {redact_url(args.storage or '')!r}", catch=(ValueError, ConnectionError)):
        resolve_storage(args.storage, args.output_dir, config)
    # a dataset or a flag that does not fit fails here, not in every trial
    check_inputs(parse_args([*train_args, "--hpo", "--eval", "--eval_split", "validation", "--eval_preset", "search",
                             "--output_dir", args.output_dir]))  # --skip_bad_images lists the skipped rows there
    os.makedirs(args.output_dir, exist_ok=True)
    baselines = [b for b in args.baselines.split(",") if b]
    mitigations = [m for m in args.mitigations.split(",") if m]
    if args.stage == "2":
        _check_stage_one(config, args, spaces)
    result = run_memcontrol(unet, train_args, args.output_dir, spaces, args.mask_layout, args.mask_scope, config,
                            final=args.final and args.stage != "1", baselines=baselines, mitigations=mitigations,
                            stage2_protocol=args.stage2_protocol, plot=args.stage != "1",
                            final_args=stage2_args(args, train_args))
    search, chosen = result["search"], result["search"]["chosen"]
    print(f"chosen mask: {chosen['method']} {Mask.from_dict(chosen['mask']).bitstring} (memorization objective "
          f"{search['memorization_metric']} {chosen['memorization_objective']:.4g}, quality objective "
          f"{search['quality_metric']} {chosen['quality_objective']:.4g}; both lower is better)")
    if search["chosen_within_budget"] is False:
        print(f"no search trial kept --max_memorization {config.max_memorization:g}: the chosen mask is the least "
              "memorizing trial, and it memorizes more than the budget allows")
    if "pareto_plot" in result:
        print(f"Pareto plot: {os.path.abspath(result['pareto_plot'])}")
    if "results_md" in result:
        _print_table(result["results_md"])
    return result


def _check_stage_one(config: SearchConfig, args, spaces: list[str]) -> None:
    """`--stage 2` needs the finished studies of stage 1 (it runs no trial)."""
    storage = resolve_storage(config.storage, args.output_dir, config)
    for method in spaces:
        name = f"{config.study_name or 'memcontrol'}-{method}-{args.mask_layout}"
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            where = redact_url(args.storage or "output_dir/study.db")
            raise InputError(f"--stage 2: no study {name!r} in --storage {where}; "
                             "run --stage 1 first (same --storage, --study_name and --search_space).") from None
        done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        if done < config.n_trials:
            raise InputError(f"--stage 2: study {name!r} has {done} of --n_trials {config.n_trials} completed "
                             "trials; let --stage 1 finish first.")


def main_transfer(args, train_args: list[str]) -> dict:
    """`train_memcontrol.py --final --mask MASK ...`: stage 2 and the table with a mask found elsewhere (Sec. 4.4)."""
    with user_input("--mask", catch=(ValueError, FileNotFoundError, ConnectionError)):
        mask = resolve_mask(args.mask, _base_unet(train_args), None, args.mask_layout)
    # a dataset that does not fit fails here, not in every run
    check_inputs(parse_args([*train_args, "--eval", "--output_dir", args.output_dir]))
    chosen = {"method": mask.method, "mask": mask.to_dict(), "source": args.mask}
    os.makedirs(args.output_dir, exist_ok=True)
    rows = run_final(stage2_args(args, train_args), args.output_dir, chosen, mask.layout, args.mask_scope,
                     [b for b in args.baselines.split(",") if b], [m for m in args.mitigations.split(",") if m],
                     n_workers=args.n_workers, gpus_per_trial=args.gpus_per_trial,
                     accelerate_config=args.accelerate_config, protocol=args.stage2_protocol)
    result = {"transfer": chosen, "rows": rows, "results_md": os.path.join(args.output_dir, RESULTS_MARKDOWN)}
    write_json_atomic(os.path.join(args.output_dir, "memcontrol_run.json"), result)
    print(f"transferred mask: {mask.method} {mask.bitstring} (from {args.mask})")
    _print_table(result["results_md"])
    return result


def _base_unet(train_args: list[str]):
    """The fine-tunes' base UNet on the meta device: the architecture whose mask positions the search walks."""
    args = parse_args(train_args)
    return meta_unet(args.pretrained_model_name_or_path or tiny_base_path(), args.revision, args.cache_dir)


def _print_table(results_md: str) -> None:
    with open(results_md, encoding="utf-8") as f:
        print(f.read())
    print(f"table: {os.path.abspath(results_md)}")
