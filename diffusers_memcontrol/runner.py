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

from .errors import ArgumentParser, InputError, user_input
from .figures import write_memorization_figure
from .files import write_json_atomic
from .launching import TrainerTrial, default_n_workers
from .masks import Mask, MaskSpace
from .mitigation import MITIGATIONS
from .reporting import pareto_plot, write_results
from .runs import WorkerPool
from .search import (
    OBJECTIVES,
    SELECTIONS,
    SearchConfig,
    export_study,
    exposure_report,
    mask_of_trial,
    optimize,
    pareto_front,
    select_trial,
)
from .trial_result import TrialResult

BASELINES = ("freeze", "full", "svdiff", "difffit", "attention")
STAGE2_PROTOCOLS = {"split": [], "duplicated": ["--duplicate_dmem"]}  # trainer flags of each stage-2 protocol


def run_search(unet, train_args: list[str], output_dir: str, search_spaces: list[str], layout: str, scope: str,
               config: SearchConfig) -> dict:
    """Stage 1 over one or several spaces; writes best_mask.json, pareto.json, trials.csv; returns the choice."""
    trials, front, row_of = [], [], {}
    spaces = {}
    for method in search_spaces:
        space = MaskSpace.from_unet(unet, method=method, layout=layout)
        spaces[method] = space
        study_config = replace(config, study_name=f"{config.study_name or 'memcontrol'}-{method}-{layout}")
        study = optimize(space, study_config, output_dir,
                         TrainerTrial(train_args, output_dir, method, layout, scope,
                                      gpus_per_trial=config.gpus_per_trial,
                                      accelerate_config=config.accelerate_config))
        export_study(study, space, os.path.join(output_dir, "search", method), config.selection)
        for t in study.trials:
            if t.values is not None:
                trials.append({"study": study.study_name, "method": method, "number": len(trials), "trial": t.number,
                               "dmem": t.values[0], "fid": t.values[1], "mask": mask_of_trial(t, space).bitstring,
                               "default_mask": bool(t.user_attrs.get("seeded")),
                               "trainable_params": t.user_attrs.get("trainable_params"),
                               "dmem_exposures": t.user_attrs.get("dmem_exposures")})
                row_of[(study.study_name, t.number)] = len(trials) - 1
        front.extend((study.study_name, t) for t in pareto_front(study))
    if not row_of:
        raise RuntimeError("No search trial completed; see the trial logs under output_dir/trials.")
    union = [(name, t) for name, t in front if not any(_dominates(o, t) for _, o in front)]
    chosen = select_trial([t for _, t in union], config.selection, [(t["dmem"], t["fid"]) for t in trials])
    chosen_row = next(row_of[(name, t.number)] for name, t in union if t is chosen)
    chosen_method = trials[chosen_row]["method"]
    mask = mask_of_trial(chosen, spaces[chosen_method])
    mask.save(os.path.join(output_dir, "best_mask.json"))
    summary = {
        "search_spaces": search_spaces,
        "layout": layout,
        "scope": scope,
        "selection": config.selection,
        "objectives": list(OBJECTIVES),
        "chosen": {"method": chosen_method, "mask": mask.to_dict(), "dmem": chosen.values[0], "fid": chosen.values[1],
                   "learning_rate": chosen.params.get("learning_rate"), "row": chosen_row},
        "front": [row_of[(name, t.number)] for name, t in union],
        "dmem_exposures": exposure_report([t["dmem_exposures"] for t in trials if t["dmem_exposures"] is not None]),
        "trials": trials,
    }
    write_json_atomic(os.path.join(output_dir, "search_summary.json"), summary)
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

    def collect(index: int, result: TrialResult) -> None:
        row_name, method, mitigation, _, _ = runs[index]
        done[index] = {"method": row_name, "peft_method": method, "mitigation": mitigation,
                       **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) or v is None},
                       "dmem_exposures": result.dmem_exposures}
        write_results([done[i] for i in sorted(done)], output_dir)  # partial tables survive an interrupted run

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
    return [done[i] for i in sorted(done)]


def run_memcontrol(unet, train_args: list[str], output_dir: str, search_spaces: list[str], layout: str, scope: str,
                   config: SearchConfig, final: bool = True, baselines: tuple[str, ...] | list[str] = BASELINES,
                   mitigations: tuple[str, ...] | list[str] = MITIGATIONS, hpo_baselines: bool = True,
                   stage2_protocol: str = "split", plot: bool = True) -> dict:
    """The whole method: search, choose, (optionally) the Pareto plot, stage 2 and the table; returns paths and the
    choice."""
    summary = run_search(unet, train_args, output_dir, search_spaces, layout, scope, config)
    if not plot:  # stage 1 on one of many machines: the study and the choice only
        return {"search": summary}
    plot_baselines = {}
    for t in summary["trials"]:
        if t["default_mask"]:
            plot_baselines[f"{t['method']} (default)"] = (t["dmem"], t["fid"])
    result = {"search": summary}
    with WorkerPool(config.n_workers, config.gpus_per_trial, config.accelerate_config) as pool:
        full_ft = None
        if hpo_baselines:  # Full FT on the same HPO set, for the plot; it trains beside stage 2's first runs
            full_ft = pool.submit([*train_args, "--peft_method", "full", "--mask_layout", layout, "--hpo", "--eval",
                                   "--eval_split", "validation", "--eval_preset", "search"],
                                  os.path.join(output_dir, "trials", "full-ft"))
        if final:
            result["rows"] = run_final(train_args, output_dir, summary["chosen"], layout, scope, baselines,
                                       mitigations, protocol=stage2_protocol, pool=pool)
            result["results_md"] = os.path.join(output_dir, "results.md")
        if full_ft is not None:
            plot_run = full_ft.result()
            plot_baselines["Full FT"] = (plot_run.dmem, plot_run.fid)
    result["pareto_plot"] = pareto_plot(summary["trials"], summary["front"], summary["chosen"]["row"],
                                        os.path.join(output_dir, "pareto.png"), baselines=plot_baselines)
    result["pareto_baselines"] = plot_baselines
    write_json_atomic(os.path.join(output_dir, "memcontrol_run.json"),
                {k: v for k, v in result.items() if k != "search"})
    return result


def add_search_arguments(parser) -> None:
    """The search's own flags (a parser or an argument group): `parse_search_args` and the trainer's --help share them."""
    from dataclasses import fields

    defaults = {f.name: f for f in fields(SearchConfig)}

    def help_of(name: str) -> str:
        return defaults[name].metadata["help"]

    parser.add_argument("--search", action="store_true",
                        help="Run MemControl: stage 1 (mask search), then stage 2 and the table (unless --no_final).")
    parser.add_argument("--search_space", default=None,
                        help="Comma-separated PEFT methods to search (default: --peft_method or svdiff); several = "
                             "the paper's global search (union of the Pareto fronts).")
    parser.add_argument("--n_trials", type=int, default=defaults["n_trials"].default, help=help_of("n_trials"))
    parser.add_argument("--population_size", type=int, default=None, help=help_of("population_size"))
    parser.add_argument("--search_learning_rate", action="store_true", help=help_of("search_learning_rate"))
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL (sqlite:///..., postgresql://...) or journal file (default: "
                             "output_dir/study.db).")
    parser.add_argument("--study_name", default=None, help="Prefix of the study names (default: memcontrol).")
    parser.add_argument("--n_workers", type=int, default=None,
                        help="Concurrent fine-tunes on this machine, in the search and in stage 2 (--gpus_per_trial "
                             "GPUs each, or a share of the CPU cores). Default: visible GPUs // --gpus_per_trial, 1 "
                             "without GPUs.")
    parser.add_argument("--gpus_per_trial", type=int, default=1,
                        help="Processes of each fine-tune (trial or stage-2 run): > 1 runs it with `accelerate launch "
                             "--num_processes K` on the worker's own K GPUs (data parallel; gloo processes on CPU).")
    parser.add_argument("--accelerate_config", default=None,
                        help="accelerate config file (`accelerate config`) every fine-tune is launched with.")
    parser.add_argument("--stage", default="all", choices=["1", "2", "all"],
                        help="1: the search only (run it on many machines sharing --storage); 2: stage 2 and the table "
                             "from the finished study (several commands sharing --output_dir split the rows); all: "
                             "both.")
    parser.add_argument("--heartbeat_interval", type=int, default=defaults["heartbeat_interval"].default,
                        help=help_of("heartbeat_interval"))
    parser.add_argument("--grace_period", type=int, default=defaults["grace_period"].default,
                        help=help_of("grace_period"))
    parser.add_argument("--selection", default=defaults["selection"].default, choices=list(SELECTIONS),
                        help=help_of("selection"))
    parser.add_argument("--final", dest="final", action="store_true", default=True,
                        help="Stage 2 after the search (default), or alone with --mask (the paper's transfer).")
    parser.add_argument("--no_final", dest="final", action="store_false", help="Stop after the search.")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="Comma-separated baselines of the table (stage 2).")
    parser.add_argument("--mitigations", default=",".join(MITIGATIONS),
                        help="Comma-separated mitigations each stage-2 row is trained with.")
    parser.add_argument("--stage2_protocol", default="split", choices=list(STAGE2_PROTOCOLS),
                        help="Stage 2 trains on the train split as it is (split: the paper's protocol, where the data "
                             "hold near-duplicates, as MIMIC-CXR does) or with each D_mem pair repeated --dmem_repeats "
                             "times (duplicated: emulates them, so that memorization can show on data without any).")


def parse_search_args(argv: list[str]) -> tuple:
    """Split a `--search` command line into the search's own arguments and those passed to every fine-tune.

    The flags shared with the trainer (--mask, --peft_method, --mask_layout, --mask_scope, --output_dir, --seed) take
    the trainer's defaults; --help shows the trainer's flags and the search's together.
    """
    import sys

    from .train import build_parser, parse_args

    trainer = build_parser()
    if {"-h", "--help"} & set(argv):
        trainer.print_help()
        sys.exit(0)
    p = ArgumentParser(prog="memcontrol search", add_help=False)
    add_search_arguments(p)
    for flag in ("--mask", "--peft_method", "--mask_layout", "--mask_scope", "--output_dir", "--seed"):
        action = next(a for a in trainer._actions if flag in a.option_strings)
        p.add_argument(flag, default=None if flag == "--peft_method" else action.default, type=action.type,
                       choices=action.choices, help=action.help)
    args, passthrough = p.parse_known_args(argv)
    if args.mask and args.search:
        p.error(f"--mask {args.mask!r} reuses a found mask and --search finds one: pass one of them.")
    if not args.mask and not args.search:
        p.error("pass --search (find a mask, then stage 2) or --final --mask MASK (stage 2 with a given mask).")
    for flag in ("n_workers", "gpus_per_trial", "heartbeat_interval", "grace_period"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.accelerate_config is not None and not os.path.isfile(args.accelerate_config):
        p.error(f"--accelerate_config {args.accelerate_config!r}: no such file; pass a file written by `accelerate "
                "config`.")
    if args.stage != "all" and not args.search:
        p.error(f"--stage {args.stage} splits a --search run; without --search, stage 2 is the run.")
    if args.stage == "1" and not args.final:
        p.error("--stage 1 with --no_final: pass one of them (--stage 1 already stops after the search).")
    if args.n_workers is None:
        args.n_workers = default_n_workers(args.gpus_per_trial)
    if args.mask and not args.final:
        p.error("--mask with --no_final would do nothing: stage 2 is the run.")
    for flag, values, known in (("--baselines", args.baselines, BASELINES), ("--mitigations", args.mitigations,
                                                                            MITIGATIONS)):
        bad = [v for v in values.split(",") if v and v not in known]
        if bad:
            p.error(f"{flag}: unknown value(s) {bad}; expected a comma-separated subset of {', '.join(known)}.")
    for flag in ("--hpo", "--eval", "--eval_split", "--eval_preset", "--mitigation", "--adapter_dir",
                 "--duplicate_dmem"):
        if flag in passthrough:
            p.error(f"{flag} is set by the search for each run (--duplicate_dmem by --stage2_protocol duplicated); "
                    "remove it from a --search command line.")
    train_args = passthrough + ["--seed", str(args.seed)]
    parse_args(train_args)  # every fine-tune's flags are checked once here, not in a failed trial
    return args, train_args


def main_search(argv: list[str]) -> dict:
    """`train_memcontrol.py --search ...` / `memcontrol search ...`: the whole MemControl run."""
    from .masks import METHODS
    from .search import resolve_storage
    from .train import check_inputs, parse_args

    args, train_args = parse_search_args(argv)
    if args.mask:
        return main_transfer(args, train_args)
    spaces = (args.search_space or args.peft_method or "svdiff").split(",")
    unknown = [s for s in spaces if s not in METHODS or s in ("full", "freeze")]
    if unknown:
        raise InputError(f"--search_space: unknown or unsearchable method(s) {unknown}; expected svdiff, difffit, "
                         "attention or lora (comma-separated).")
    unet = _meta_unet(train_args)
    with user_input():
        config = SearchConfig(n_trials=args.n_trials, population_size=args.population_size,
                              search_learning_rate=args.search_learning_rate, storage=args.storage,
                              study_name=args.study_name, seed=args.seed, n_workers=args.n_workers,
                              selection=args.selection, gpus_per_trial=args.gpus_per_trial,
                              accelerate_config=args.accelerate_config, heartbeat_interval=args.heartbeat_interval,
                              grace_period=args.grace_period)
    with user_input(f"--storage {args.storage!r}", catch=(ValueError, ConnectionError)):
        resolve_storage(args.storage, args.output_dir, config)
    # a dataset or a flag that does not fit fails here, not in every trial
    check_inputs(parse_args([*train_args, "--hpo", "--eval", "--eval_split", "validation", "--eval_preset", "search"]))
    os.makedirs(args.output_dir, exist_ok=True)
    baselines = [b for b in args.baselines.split(",") if b]
    mitigations = [m for m in args.mitigations.split(",") if m]
    if args.stage == "2":
        _check_stage_one(config, args, spaces)
    result = run_memcontrol(unet, train_args, args.output_dir, spaces, args.mask_layout, args.mask_scope, config,
                            final=args.final and args.stage != "1", baselines=baselines, mitigations=mitigations,
                            stage2_protocol=args.stage2_protocol, plot=args.stage != "1")
    chosen = result["search"]["chosen"]
    print(f"chosen mask: {chosen['method']} {Mask.from_dict(chosen['mask']).bitstring} "
          f"(d_mem {chosen['dmem']:.4g}, FID {chosen['fid']:.4g})")
    if "pareto_plot" in result:
        print(f"Pareto plot: {os.path.abspath(result['pareto_plot'])}")
    if "results_md" in result:
        _print_table(result["results_md"])
    return result


def _check_stage_one(config: SearchConfig, args, spaces: list[str]) -> None:
    """`--stage 2` needs the finished studies of stage 1 (it runs no trial)."""
    import optuna

    from .search import resolve_storage

    storage = resolve_storage(config.storage, args.output_dir, config)
    for method in spaces:
        name = f"{config.study_name or 'memcontrol'}-{method}-{args.mask_layout}"
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise InputError(f"--stage 2: no study {name!r} in --storage {args.storage or 'output_dir/study.db'}; "
                             "run --stage 1 first (same --storage, --study_name and --search_space).") from None
        done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        if done < config.n_trials:
            raise InputError(f"--stage 2: study {name!r} has {done} of --n_trials {config.n_trials} completed "
                             "trials; let --stage 1 finish first.")


def main_transfer(args, train_args: list[str]) -> dict:
    """`train_memcontrol.py --final --mask MASK ...`: stage 2 and the table with a mask found elsewhere (Sec. 4.4)."""
    from .adapters import resolve_mask
    from .train import check_inputs, parse_args

    with user_input("--mask", catch=(ValueError, FileNotFoundError, ConnectionError)):
        mask = resolve_mask(args.mask, _meta_unet(train_args), None, args.mask_layout)
    check_inputs(parse_args([*train_args, "--eval"]))  # a dataset that does not fit fails here, not in every run
    chosen = {"method": mask.method, "mask": mask.to_dict(), "source": args.mask}
    os.makedirs(args.output_dir, exist_ok=True)
    rows = run_final(train_args, args.output_dir, chosen, mask.layout, args.mask_scope,
                     [b for b in args.baselines.split(",") if b], [m for m in args.mitigations.split(",") if m],
                     n_workers=args.n_workers, gpus_per_trial=args.gpus_per_trial,
                     accelerate_config=args.accelerate_config, protocol=args.stage2_protocol)
    result = {"transfer": chosen, "rows": rows, "results_md": os.path.join(args.output_dir, "results.md")}
    write_json_atomic(os.path.join(args.output_dir, "memcontrol_run.json"), result)
    print(f"transferred mask: {mask.method} {mask.bitstring} (from {args.mask})")
    _print_table(result["results_md"])
    return result


def _meta_unet(train_args: list[str]):
    """The UNet of --pretrained_model_name_or_path (default: the tiny base) on the meta device, to list positions."""
    import torch
    from diffusers import UNet2DConditionModel

    from .tiny_base import tiny_base_path

    model = next((train_args[i + 1] for i, a in enumerate(train_args[:-1]) if a == "--pretrained_model_name_or_path"),
                 None) or tiny_base_path()
    with user_input(f"--pretrained_model_name_or_path {model!r}", catch=(OSError, ValueError)):
        config = UNet2DConditionModel.load_config(model, subfolder="unet")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _print_table(results_md: str) -> None:
    with open(results_md, encoding="utf-8") as f:
        print(f.read())
    print(f"table: {os.path.abspath(results_md)}")
