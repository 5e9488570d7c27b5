"""The command line of the whole method (stage 1, stage 2, presets): the search's flags and their checks.

Every fine-tune the search runs takes the trainer's flags (`trainer.arguments`); they are checked once here, before any
trial. `build_parser` puts both together for `training/train_memcontrol.py --help`.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from ..errors import ArgumentParser, InputError
from ..trainer.arguments import build_parser as trainer_parser
from ..trainer.arguments import parse_args
from ..trainer.mitigation import MITIGATIONS
from .launching import default_n_workers
from .study import SELECTIONS, SearchConfig

SEARCH_GROUP = "search (with --search, or --final --mask MASK: the whole method, see diffusers_memcontrol.search)"
BASELINES = ("freeze", "full", "svdiff", "difffit", "attention")

STAGE2_PROTOCOLS = {"split": [], "duplicated": ["--duplicate_dmem"]}  # trainer flags of each stage-2 protocol


# the quickstart's stage-2 settings on the tiny base (docs/testbed.md): D_mem duplicates are a quarter of stage 2's
# rows, each method trains at its own rate, and trials score quality by prompt fidelity (docs/metrics.md)
QUICKSTART_STAGE2 = ["--max_train_steps", "250", "--train_batch_size", "64", "--learning_rates",
                     "svdiff=3e-2,difffit=3e-2,attention=3e-3,full=1e-3", "--caption_dropout", "0.1", "--dmem_size",
                     "5", "--dmem_repeats", "85", "--dmem_unique_captions", "--stage2_protocol", "duplicated",
                     "--mitigations", "none", "--eval_num_prompts", "50", "--eval_inference_steps", "20",
                     "--eval_extraction_generations", "10"]

# named command lines: `--preset NAME` expands to these flags, and any flag after it adds to or overrides them
PRESETS = {
    # the whole method on the tiny base and the digits (docs/results.md); its trials train on stage 2's set
    # (--proxy_fraction 1) and score memorization by cliques and quality by prompt fidelity (docs/testbed.md)
    "quickstart": ["--search", "--search_space", "svdiff,difffit,attention", "--n_trials", "4", "--population_size",
                   "2", "--n_workers", "2", "--selection", "normalized_mean", "--proxy_fraction", "1",
                   "--search_memorization_objective", "cliques", "--search_quality_objective", "agreement",
                   *QUICKSTART_STAGE2, "--output_dir", "outputs/quickstart"],
    # the quickstart's mask on animal-MNIST (the paper's transfer), with as many training rows as the digits have
    "transfer": ["--final", "--mask", "outputs/quickstart", "--dataset_name", "animal-mnist", "--feature_encoder",
                 "tiny-domain", "--max_train_samples", "1293", "--n_workers", "2", *QUICKSTART_STAGE2,
                 "--output_dir", "outputs/transfer"],
}


def expand_preset(argv: list[str]) -> list[str]:
    """Replace `--preset NAME` by the flags it names (printed, to copy and change); other flags come after it."""
    if "--preset" not in argv:
        return list(argv)
    at = argv.index("--preset")
    name = argv[at + 1] if at + 1 < len(argv) else None
    if name not in PRESETS:
        raise InputError(f"--preset {name!r}: unknown preset; expected one of {', '.join(PRESETS)}.")
    print(f"--preset {name} expands to: {' '.join(PRESETS[name])}", flush=True)
    return [*argv[:at], *PRESETS[name], *argv[at + 2:]]


def runs_whole_method(argv: list[str]) -> bool:
    """Whether a command line asks for the whole method (search and/or stage 2) rather than one fine-tune."""
    return bool({"--search", "--final"} & set(argv))



def add_search_arguments(parser) -> None:
    """The search's own flags (a parser or an argument group): `parse_search_args` and the trainer's --help share them."""
    defaults = {f.name: f for f in dataclasses.fields(SearchConfig)}

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
    parser.add_argument("--max_memorization", type=float, default=None, help=help_of("max_memorization"))
    parser.add_argument("--final", dest="final", action="store_true", default=True,
                        help="Stage 2 after the search (default), or alone with --mask (the paper's transfer).")
    parser.add_argument("--no_final", dest="final", action="store_false", help="Stop after the search.")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="Comma-separated baselines of the table (stage 2).")
    parser.add_argument("--mitigations", default=",".join(MITIGATIONS),
                        help="Comma-separated mitigations each stage-2 row is trained with.")
    parser.add_argument("--stage2_holdout", action="store_true",
                        help="Stage 2 out of sample: the search's splits, D_mem pairs the search never saw (trainer "
                             "--dmem_block 1) and a fresh seed for training and generation (--seed + 1).")
    parser.add_argument("--stage2_protocol", default="split", choices=list(STAGE2_PROTOCOLS),
                        help="Stage 2 trains on the train split as it is (split: the paper's protocol, where the data "
                             "hold near-duplicates, as MIMIC-CXR does) or with each D_mem pair repeated --dmem_repeats "
                             "times (duplicated: emulates them, so that memorization can show on data without any).")



def parse_search_args(argv: list[str]) -> tuple:
    """Split a `--search` command line into the search's own arguments and those passed to every fine-tune.

    The flags shared with the trainer (--mask, --peft_method, --mask_layout, --mask_scope, --output_dir, --seed) take
    the trainer's defaults; --help shows the trainer's flags and the search's together.
    """
    trainer = trainer_parser()
    if {"-h", "--help"} & set(argv):
        build_parser().print_help()
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
    if args.stage2_holdout:
        for flag in ("--dmem_block", "--split_seed", "--dmem_file"):
            if flag in passthrough:
                p.error(f"{flag} is set by --stage2_holdout for stage 2 (and --dmem_file fixes one D_mem for both "
                        "stages): pass one of them.")
    train_args = passthrough + ["--seed", str(args.seed)]
    parse_args(train_args)  # every fine-tune's flags are checked once here, not in a failed trial
    return args, train_args



def stage2_args(args, train_args: list[str]) -> list[str]:
    """Every stage-2 run's trainer flags: the search's, plus, with --stage2_holdout, the search's splits, held-out D_mem
    pairs and a fresh seed."""
    if not args.stage2_holdout:
        return list(train_args)
    return [*train_args, "--split_seed", str(args.seed), "--seed", str(args.seed + 1), "--dmem_block", "1"]


def build_parser(prog: str | None = None) -> ArgumentParser:
    """The trainer's flags and, in a group of their own, the search's: the example script's --help."""
    parser = trainer_parser(prog)
    add_search_arguments(parser.add_argument_group(SEARCH_GROUP))
    return parser


def reject_search_flags(argv: list[str]) -> None:
    """Refuse a search flag on the command line of one fine-tune, with a pointer to --search."""
    parser = ArgumentParser(add_help=False, allow_abbrev=False)
    add_search_arguments(parser)
    args, _ = parser.parse_known_args(argv)
    for action in parser._actions:
        if action.dest not in ("search", "final") and getattr(args, action.dest) != action.default:
            raise InputError(f"{action.option_strings[0]} is a search flag: add --search (or --final --mask MASK) to "
                             "training/train_memcontrol.py, or use `memcontrol search`.")
