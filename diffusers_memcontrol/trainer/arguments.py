"""The command line of one fine-tune: flags, their checks, and what they name, checked.

The trainer keeps diffusers' train_text_to_image.py flags and meanings (docs/flags.md); MemControl adds the PEFT
method and its mask, mitigations, D_mem and the HPO set, the cache and the evaluation (the search's own flags:
`search.arguments`). Everything here runs before any model weight is loaded: a user's mistake ends the run with
one `error: ...` line (docs/errors.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import sys
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import is_xformers_available

from ..constants import SKIPPED_IMAGES_FILE
from ..data import datasets as data
from ..data.columns import check_columns
from ..data.images import check_images, scan_images
from ..data.tiny_base import DOMAINS, tiny_base_path
from ..errors import ArgumentParser, InputError, user_input
from ..evaluation.config import EvaluationConfig
from ..files import write_json_atomic
from ..hub.adapters import check_adapter_fits, resolve_mask
from ..metrics.in_domain import in_domain_classifier_path
from .checkpoints import resolve_checkpoint
from .config import DEFAULT_LR, FineTuneConfig, add_config_arguments, parse_threshold

logger = logging.getLogger(__name__)

# arguments never written to training_config.json or to trackers (prompts are private data, tokens are secrets)
PRIVATE_ARGS = ("validation_prompts", "hub_token")
# FineTuneConfig fields given as flags, by --help group: each flag's type, default, choices and help come from the field
CONFIG_FLAGS = {
    "data": ("random_flip", "image_interpolation_mode", "caption_dropout"),
    "memcontrol": ("peft_method", "mask_layout", "mask_scope", "lora_rank", "mitigation", "rwa_num_words", "rwa_prob",
                   "threshold", "threshold_quantile"),
    "training": ("seed", "train_batch_size", "num_train_epochs", "max_train_steps", "gradient_accumulation_steps",
                 "gradient_checkpointing", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "snr_gamma",
                 "noise_offset", "input_perturbation", "dream_training", "dream_detail_preservation",
                 "prediction_type", "use_8bit_adam", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                 "max_grad_norm", "use_ema", "ema_decay"),
}
def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The trainer's flags (diffusers' names and meanings where they exist) and, for --help, the search's."""
    p = ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Hub id or folder of a diffusers Stable Diffusion pipeline (default: the shipped tiny base).")
    g.add_argument("--revision", default=None, help="Revision of the pretrained model (a branch, tag or commit).")
    g.add_argument("--variant", default=None, help="Variant of the model files, e.g. fp16.")
    g.add_argument("--cache_dir", default=None,
                   help="Download cache of models and datasets (from_pretrained / load_dataset), as in diffusers.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="Use xformers' memory-efficient attention in the UNet (needs `pip install xformers`).")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="A built-in domain (digits, fashion-mnist, animal-mnist), a datasets Hub id or a dataset "
                        "folder (default: digits).")
    g.add_argument("--dataset_config_name", default=None,
                   help="The config of --dataset_name (e.g. 160px for frgfm/imagenette), as in datasets.load_dataset.")
    g.add_argument("--train_data_dir", default=None,
                   help="Local imagefolder with metadata.jsonl/csv (file_name + caption) or class sub-folders, or a "
                        ".csv/.jsonl table of image paths and captions.")
    g.add_argument("--image_column", default="image", help="Column holding the images (or their paths).")
    g.add_argument("--caption_column", default="text", help="Column holding the captions.")
    g.add_argument("--caption_template", default=None,
                   help='Build the captions from other columns, e.g. "a photo of a {label}" (a ClassLabel column '
                        "gives its class name): for image-classification datasets without captions.")
    g.add_argument("--subject_column", default=None,
                   help="Subject id column (e.g. MIMIC's subject_id): a subject lands in exactly one split.")
    g.add_argument("--validation_fraction", type=float, default=0.1, help="Fraction of rows held out for validation.")
    g.add_argument("--test_fraction", type=float, default=0.1, help="Fraction of rows held out for the test split.")
    g.add_argument("--max_train_samples", type=int, default=None, help="Truncate the train split (seeded).")
    g.add_argument("--split_seed", type=int, default=None,
                   help="Seed of the train/validation/test split, --max_train_samples and D_mem's draw (default: "
                        "--seed), so that a run with another --seed keeps the same splits and D_mem sets.")
    g.add_argument("--resolution", type=int, default=None, help="Default: the UNet's sample size x VAE factor.")
    g.add_argument("--center_crop", action="store_true", help="Center crop (default: random crop, as diffusers).")
    g.add_argument("--latent_cache", default="disk", choices=["disk", "memory", "off"],
                   help="Latent/text-embedding cache: disk (content-addressed, reused across runs and search "
                        "trials), memory (encode once, write nothing) or off (encode every step).")
    g.add_argument("--latent_cache_dir", default=None,
                   help="Root of the latent/text-embedding cache (default: $MEMCONTROL_CACHE_DIR or "
                        "~/.cache/diffusers_memcontrol).")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="Train without the rows whose image cannot be decoded (their list goes to "
                        "output_dir/skipped_images.json) instead of stopping; a bad D_mem image still stops the run.")

    _add_run_arguments(p)
    return p


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The memorization set, the adapter, the training run, validation, evaluation, logging and hub flags."""
    g = p.add_argument_group("memorization set and HPO set")
    g.add_argument("--dmem_size", type=int, default=100, help="D_mem: number of image-caption pairs.")
    g.add_argument("--dmem_repeats", type=int, default=50, help="Duplicates of each D_mem pair in the HPO set.")
    g.add_argument("--proxy_fraction", type=float, default=0.01, help="Fraction of the train split in the HPO set.")
    g.add_argument("--dmem_selection", default="random", choices=["random", "longest"],
                   help="How D_mem is drawn from the train split: at random, or the longest captions.")
    g.add_argument("--dmem_file", default=None, help="JSON list fixing the D_mem rows (indices or file names).")
    g.add_argument("--dmem_block", type=int, default=0,
                   help="Which disjoint set of --dmem_size pairs D_mem is (0: the search's; 1: held-out pairs for "
                        "stage 2, drawn by the same rule from the rows set 0 did not take).")
    g.add_argument("--dmem_unique_captions", action="store_true",
                   help="Append a distinct word to each D_mem caption (per-prompt memorization on class captions).")
    g.add_argument("--hpo", action="store_true",
                   help="Train on the HPO set (proxy subset + D_mem x repeats) instead of the full train split.")
    g.add_argument("--duplicate_dmem", action="store_true",
                   help="Train on the train split with each D_mem pair repeated --dmem_repeats times: the emulation "
                        "of near-duplicates (as in MIMIC-CXR) so that memorization can be measured; not for a model "
                        "meant for use.")

    add_config_arguments(g, CONFIG_FLAGS["data"])

    g = p.add_argument_group("memcontrol")
    add_config_arguments(g, CONFIG_FLAGS["memcontrol"])
    g.add_argument("--mask", default=None,
                   help="Bit string, mask JSON file, folder holding mask.json, or a Hub repo (default: all ones).")

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="memcontrol-output", help="Where the adapter and every output go.")
    add_config_arguments(g, CONFIG_FLAGS["training"])
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="Threads that decode and transform the next micro-batches while the current one trains "
                        "(images that are not cached), and that check the images before training; 0 decodes in the "
                        "training loop (and checks one image at a time).")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Default: accelerate's config.")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere GPUs.")
    g.add_argument("--checkpointing_steps", type=int, default=None, help="Save a resumable state every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder or "latest".')

    g = p.add_argument_group("validation, evaluation, logging, hub")
    g.add_argument("--validation_prompts", nargs="*", default=None,
                   help="Prompts of the validation grid (default: class captions of a built-in domain; none for "
                        "user data).")
    g.add_argument("--num_validation_images", type=int, default=4,
                   help="Images per validation prompt (0 skips the grid).")
    g.add_argument("--validation_epochs", type=int, default=None,
                   help="Also generate the validation grid every N epochs during training (logged to the trackers, "
                        "written as validation-epoch-<N>.png); default: only after training.")
    g.add_argument("--eval", action="store_true", help="Evaluate after training (or alone with --adapter_dir).")
    g.add_argument("--adapter_dir", default=None, help="With --eval: a trained adapter to evaluate (no training).")
    g.add_argument("--eval_split", default="test", choices=["validation", "test"], help="Split scored for FID.")
    g.add_argument("--eval_config", default=None, help="JSON file of EvaluationConfig fields.")
    g.add_argument("--eval_preset", default="full", choices=["full", "search"],
                   help="Starting EvaluationConfig: 'full' (every metric, the paper's settings) or 'search' (the "
                        "reference code's cheap trial settings: FID, d_mem and the cheap quality metrics; no "
                        "extraction attack, ceiling or noise estimate, whatever --eval_extraction_generations says).")
    g.add_argument("--feature_encoder", default=None,
                   help="FID/AMD features (default: tiny-domain on built-in domains, else inception).")
    g.add_argument("--eval_num_prompts", type=int, default=None, help="Prompts generated for FID/AMD.")
    g.add_argument("--eval_extraction_generations", type=int, default=None,
                   help="Generations per D_mem prompt in the extraction attack.")
    g.add_argument("--eval_inference_steps", type=int, default=None, help="Sampling steps of the evaluation.")
    g.add_argument("--search_quality_objective", default=None, choices=["fid", "kid", "c2st", "agreement",
                                                                        "fid_agreement"],
                   help="Quality objective of search trials (EvaluationConfig.search_objective; default fid): FID, "
                        "KID, C2ST accuracy, 1 - agreement, or FID x (1 - agreement).")
    g.add_argument("--search_memorization_objective", default=None, choices=["dmem", "cliques"],
                   help="Memorization objective of search trials (EvaluationConfig.search_memorization; default "
                        "dmem, the paper's): d_mem, or the share of each D_mem prompt's --eval_extraction_generations "
                        "in their largest clique of near-identical images (metrics.clique_share).")
    g.add_argument("--report_to", default="tensorboard", help='tensorboard, wandb, all, or "none".')
    g.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to output_dir.")
    g.add_argument("--tracker_project_name", default="memcontrol", help="Project name of the trackers.")
    g.add_argument("--push_to_hub", action="store_true", help="Publish the adapter and its card to the Hub.")
    g.add_argument("--hub_model_id", default=None, help="Hub repo of --push_to_hub (default: output_dir's name).")
    g.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one).")
    g.add_argument("--no_progress", action="store_true", help="Disable progress bars.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the trainer's command line; a bad value raises InputError before anything is loaded."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if {"--search", "--final", "--preset"} & set(argv):
        parser.error("--search, --final and --preset run the whole method: use `python training/train_memcontrol.py "
                     "--search ...` or `memcontrol search ...`; this module trains one fine-tune.")
    args = parser.parse_args(argv)
    _validate_args(parser, args)
    return args


def _validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument combinations that cannot work: fail before loading anything."""
    if args.duplicate_dmem and args.hpo:
        parser.error("--duplicate_dmem duplicates D_mem in the train split; --hpo already trains on D_mem x "
                     "--dmem_repeats: pass one of them.")
    if args.adapter_dir and not args.eval:
        parser.error(f"--adapter_dir {args.adapter_dir!r} evaluates a trained adapter: pass --eval with it.")
    if args.report_to == "wandb" and args.hub_token is not None:
        parser.error("You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing "
                     "your token; use `huggingface-cli login` instead.")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        parser.error("--use_8bit_adam needs bitsandbytes, which is not installed: `pip install bitsandbytes`.")
    if args.enable_xformers_memory_efficient_attention:
        if not is_xformers_available():
            parser.error("--enable_xformers_memory_efficient_attention needs xformers, which is not installed: "
                         "`pip install xformers` (or drop the flag).")
    if args.dataset_name is not None and args.train_data_dir is not None:
        parser.error(f"Give --dataset_name ({args.dataset_name!r}) or --train_data_dir ({args.train_data_dir!r}), "
                     "not both.")
    builtin = args.train_data_dir is None and (args.dataset_name or "digits") in DOMAINS
    if builtin and args.dataset_config_name is not None:
        parser.error(f"--dataset_config_name {args.dataset_config_name!r} selects a config of a datasets dataset; "
                     f"the built-in domain {args.dataset_name or 'digits'!r} has none.")
    if builtin and args.caption_template is not None:
        parser.error(f"--caption_template {args.caption_template!r} builds captions for a dataset without them; the "
                     f"built-in domain {args.dataset_name or 'digits'!r} has captions.")
    try:
        args.threshold = parse_threshold(args.threshold)
    except ValueError as err:
        parser.error(f"--threshold: {err}")
    if args.dataloader_num_workers < 0:
        parser.error(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    if args.num_validation_images < 0:
        parser.error(f"--num_validation_images must be >= 0 (0 skips the validation grid), got "
                     f"{args.num_validation_images}.")
    for name in ("checkpointing_steps", "checkpoints_total_limit", "max_train_samples", "validation_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")


def public_argv(argv: list[str]) -> list[str]:
    """`argv` without the values of PRIVATE_ARGS (`--hub_token X`, `--validation_prompts A B`, `--flag=X`)."""
    flags = {f"--{name}" for name in PRIVATE_ARGS}
    kept, skipping = [], False
    for item in argv:
        if item.startswith("--"):
            skipping = item in flags
            if skipping or item.split("=", 1)[0] in flags:
                kept.append(item.split("=", 1)[0])
                continue
        elif skipping:
            continue
        kept.append(item)
    return kept


def argv_digest(argv: list[str]) -> str:
    """SHA-256 of the whole `argv` (private values included): compares runs' arguments without storing them."""
    return hashlib.sha256(json.dumps(list(argv)).encode()).hexdigest()


def run_config(args: argparse.Namespace) -> dict:
    """The run's arguments without private values (prompts are replaced by their count, tokens dropped)."""
    config = {k: v for k, v in vars(args).items() if k not in PRIVATE_ARGS}
    config["num_validation_prompts"] = len(args.validation_prompts or [])
    return config


def load_dataset_source(args: argparse.Namespace) -> Any:
    """The user's dataset (--dataset_name / --train_data_dir with their options); InputError names a bad one."""
    try:
        return data.load_image_caption_dataset(args.dataset_name, args.train_data_dir, args.image_column,
                                          args.caption_column, split="train",
                                          dataset_config_name=args.dataset_config_name,
                                          caption_template=args.caption_template, cache_dir=args.cache_dir)
    except InputError:
        raise
    except (ConnectionError, FileNotFoundError) as err:
        if args.dataset_name is None:
            raise InputError(str(err)) from err
        raise InputError(f"--dataset_name {args.dataset_name!r} is neither a built-in domain ({', '.join(DOMAINS)}) "
                         f"nor a dataset that datasets.load_dataset can open: {err}") from err
    except ValueError as err:
        if args.dataset_config_name is not None and "BuilderConfig" in str(err):
            raise InputError(f"--dataset_config_name {args.dataset_config_name!r}: {err}") from err
        raise InputError(str(err)) from err


def split_seed(args: argparse.Namespace) -> int:
    """The seed of the splits and of D_mem's draw: --split_seed, else --seed."""
    return args.seed if args.split_seed is None else args.split_seed


def load_splits(args: argparse.Namespace) -> tuple[Any, str | None]:
    """train / validation / test splits (subject-grouped with --subject_column); train truncated by max_train_samples.

    Rows are held out (--validation_fraction, --test_fraction) only when something is evaluated (--eval; every run of
    a search passes it): otherwise the train split is every row, as in diffusers' script (a dataset's own
    validation/test splits stay as they are). The row count of each split made is logged once."""
    builtin = args.train_data_dir is None and (args.dataset_name or "digits") in DOMAINS
    source = (args.dataset_name or "digits") if builtin else load_dataset_source(args)
    held_out = bool(args.eval)
    with user_input():
        splits = data.split_dataset(source, subject_column=args.subject_column,
                               validation_fraction=args.validation_fraction if held_out else 0.0,
                               test_fraction=args.test_fraction if held_out else 0.0,
                               seed=split_seed(args))
        check_columns(splits["train"], [args.image_column, args.caption_column, args.subject_column],
                      args.train_data_dir or args.dataset_name or "the dataset")
    if args.max_train_samples is not None and args.max_train_samples < len(splits["train"]):
        splits["train"] = splits["train"].shuffle(seed=split_seed(args)).select(range(args.max_train_samples))
    if len(splits["train"]) == 0:
        sizes = ", ".join(f"{name} {len(rows)}" for name, rows in splits.items() if rows is not None)
        raise InputError(f"No training rows are left after the splits (rows: {sizes}): lower --validation_fraction "
                         "/ --test_fraction, or bring more rows.")
    if held_out:
        logger.info("Splits: %s rows.", ", ".join(f"{name} {len(rows)}" for name, rows in splits.items()))
    return splits, (source if builtin else None)


def build_sets(args: argparse.Namespace, splits: Any, dmem: Any = None) -> tuple[Any, Any]:
    """(training set, D_mem or None): the HPO set with --hpo, else the train split (with D_mem duplicated under
    --duplicate_dmem); D_mem when --hpo, --duplicate_dmem or --eval (drawn here unless given)."""
    if dmem is None and (args.hpo or args.duplicate_dmem or args.eval):
        dmem = data.build_memorization_set(
            splits["train"], args.caption_column, dmem_size=min(args.dmem_size, len(splits["train"])),
            selection=args.dmem_selection, unique_captions=args.dmem_unique_captions, seed=split_seed(args),
            dmem_file=args.dmem_file, image_column=args.image_column, block=args.dmem_block)
    if args.hpo:
        train = data.build_hpo_set(splits["train"], dmem, dmem_repeats=args.dmem_repeats,
                                       proxy_fraction=args.proxy_fraction, seed=args.seed)
    else:
        train = splits["train"]
        if dmem is not None and args.dmem_unique_captions:  # the D_mem pairs as the search trained on them
            train = data.with_dmem_captions(train, dmem, args.caption_column)
        if args.duplicate_dmem:
            train = data.with_duplicated_dmem(train, dmem, args.dmem_repeats, seed=args.seed)
    return train, dmem


def evaluation_config(args: argparse.Namespace, domain: str | None) -> Any:
    """EvaluationConfig from --eval_config and the --eval_* / --feature_encoder overrides."""
    values: dict = {}
    known = {f.name for f in dataclasses.fields(EvaluationConfig)}
    if args.eval_config:
        with user_input(f"--eval_config {args.eval_config!r}"), open(args.eval_config, encoding="utf-8") as f:
            values.update(json.load(f))
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"--eval_config {args.eval_config!r} has unknown field(s) {unknown}; EvaluationConfig "
                             f"fields: {sorted(known)}.")
    if "feature_encoder" not in values:
        values["feature_encoder"] = args.feature_encoder or ("tiny-domain" if domain == "digits" else "inception")
    elif args.feature_encoder:
        values["feature_encoder"] = args.feature_encoder
    if domain != "digits" and "agreement" not in values:
        values["agreement"] = "none"
    if "in_domain_classifier" not in values and domain is not None and args.pretrained_model_name_or_path is None:
        if os.path.isfile(in_domain_classifier_path(domain)):  # fitted on the tiny base's VAE round trips
            values["in_domain_classifier"] = domain
    if args.search_quality_objective is not None:
        values["search_objective"] = args.search_quality_objective
    if args.search_memorization_objective is not None:
        values["search_memorization"] = args.search_memorization_objective
    if values.get("search_objective") in ("agreement", "fid_agreement") and values.get("agreement") == "none":
        raise InputError(f"--search_quality_objective {values['search_objective']} needs an agreement score, which "
                         "only the digits domain has built in: choose fid, kid or c2st, or set \"agreement\" "
                         "('clip', or 'classifier' with a label column and agreement_model) in --eval_config.")
    for arg, name in (("eval_num_prompts", "num_eval_prompts"), ("eval_extraction_generations",
                      "extraction_generations"), ("eval_inference_steps", "num_inference_steps")):
        if getattr(args, arg) is not None:
            values[name] = getattr(args, arg)
    if args.eval_preset == "search":  # trials score FID and d_mem only, whatever the stage-2 settings say
        search = EvaluationConfig.for_search()
        # agreement stays (cheap, and each trial's agreement shows whether its quality objective ranks masks as
        # prompt fidelity does); extraction, the ceiling and the noise estimate are left to stage 2
        cliques = values.get("search_memorization") == "cliques"  # it needs the D_mem prompts' generations
        generations = values.get("extraction_generations", EvaluationConfig.extraction_generations)
        values.update(extraction_generations=generations if cliques else search.extraction_generations,
                      **{name: values.get(name, getattr(search, name))
                         for name in ("quality_images", "ceiling", "quality_noise", "copies")})
    values.setdefault("seed", args.seed)
    values.setdefault("show_progress", not args.no_progress)
    if args.resolution and "resolution" not in values:
        values["resolution"] = args.resolution
    with user_input("--eval_config and --eval_* flags"):
        return EvaluationConfig(**values)




def check_split_images(args: argparse.Namespace, splits: Any, train_set: Any, dmem: Any) -> tuple[Any, Any, Any]:
    """Decode every image of the train split (and of --eval_split with --eval) before any weight loads.

    A bad image raises InputError naming its file and row; with --skip_bad_images its rows are dropped, listed in
    output_dir/skipped_images.json, and the training set is rebuilt around the same D_mem (a bad D_mem image always
    raises). Images that decoded are remembered by content key in the latent cache's folder (--latent_cache disk).
    Returns (splits, training set, D_mem).
    """
    from ..cache import FileHashMemo, default_cache_dir

    names = ["train"] + ([args.eval_split] if args.eval and splits.get(args.eval_split) is not None else [])
    memo = None
    if args.latent_cache == "disk":
        memo = FileHashMemo(os.path.join(args.latent_cache_dir or default_cache_dir(), "file_hashes.sqlite"))
    try:
        bad = {name: check_images(splits[name], args.image_column, memo=memo, split=name,
                                  workers=max(1, args.dataloader_num_workers), progress=not args.no_progress).bad
               for name in names}
    finally:
        if memo is not None:
            memo.close()
    bad = {name: rows for name, rows in bad.items() if rows}
    if not bad:
        return splits, train_set, dmem
    first = next(rows[0] for name, rows in bad.items())
    count = sum(len(rows) for rows in bad.values())
    dmem_rows = set(dmem["dmem_index"]) if dmem is not None else set()
    in_dmem = [b for b in bad.get("train", []) if b.row in dmem_rows]
    if in_dmem:
        raise InputError(f"{in_dmem[0].reason} It is a D_mem pair ({len(in_dmem)} D_mem image(s) cannot be decoded), "
                         "and D_mem pairs are never dropped, not even with --skip_bad_images: fix or replace the "
                         "file, or choose D_mem's rows with --dmem_file.")
    if not args.skip_bad_images:
        more = f" ({count - 1} more image(s) cannot be decoded either.)" if count > 1 else ""
        raise InputError(f"{first.reason}{more} Fix or remove the file, or pass --skip_bad_images to train without "
                         "such rows.")
    listing = [{"split": name, "row": b.row, "image": b.name, "reason": b.reason}
               for name, rows in bad.items() for b in rows]
    path = write_json_atomic(os.path.join(args.output_dir, SKIPPED_IMAGES_FILE), listing)
    logger.warning("--skip_bad_images: %d row(s) whose image cannot be decoded are left out (%s); listed in %s.",
                   count, ", ".join(f"{len(rows)} of the {name} split" for name, rows in bad.items()), path)
    splits = dict(splits)
    for name, rows in bad.items():
        if len(rows) == len(splits[name]):
            raise InputError(f"No rows of the {name} split are left: every one of its {len(rows)} image(s) cannot "
                             f"be decoded ({rows[0].reason})")
        splits[name], kept_dmem = data.without_rows(splits[name], [b.row for b in rows], dmem)
        dmem = kept_dmem if name == "train" else dmem
    with user_input():
        train_set, dmem = build_sets(args, splits, dmem)
    return splits, train_set, dmem


@dataclasses.dataclass
class CheckedInputs:
    """What the command line names, checked before any weight is loaded."""

    model_path: str
    unet: Any  # on the meta device: the architecture the mask and adapter were checked on
    splits: Any
    domain: str | None
    train_set: Any
    dmem: Any
    eval_config: Any
    config: Any


def meta_unet(model_path: str, revision: str | None = None, cache_dir: str | None = None) -> UNet2DConditionModel:
    """The UNet of `model_path` on the meta device (its config only): positions and shapes, no weights loaded."""
    with user_input(f"--pretrained_model_name_or_path {model_path!r}", catch=(OSError, ValueError)):
        config = UNet2DConditionModel.load_config(model_path, subfolder="unet", revision=revision, cache_dir=cache_dir)
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def check_inputs(args: argparse.Namespace) -> CheckedInputs:
    """Check the model, mask, adapter, data and configs a command line names; a mistake raises InputError.

    The mask and the adapter are checked on the UNet's architecture (its config, on the meta device), so a user's
    mistake is reported in a second, before any model weight is loaded.
    """
    model_path = args.pretrained_model_name_or_path or tiny_base_path()
    if args.pretrained_model_name_or_path is None and not os.path.isfile(os.path.join(model_path, "model_index.json")):
        raise FileNotFoundError(f"The shipped tiny base is missing ({model_path}); build it with "
                                "training/pretrain_tiny_base.py or pass --pretrained_model_name_or_path.")
    unet = meta_unet(model_path, args.revision, args.cache_dir)
    mask = None
    if args.adapter_dir:
        with user_input(f"--adapter_dir {args.adapter_dir!r}"):
            check_adapter_fits(unet, args.adapter_dir)
    else:
        with user_input("--mask", catch=(ValueError, FileNotFoundError, ConnectionError)):
            mask = resolve_mask(args.mask, unet, args.peft_method, args.mask_layout)
    with user_input("--resume_from_checkpoint"):
        resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    splits, domain = load_splits(args)
    with user_input():
        train_set, dmem = build_sets(args, splits)
    splits, train_set, dmem = check_split_images(args, splits, train_set, dmem)
    eval_config = None
    if args.eval:  # the evaluation reads these images too: name an unreadable file now, not after training
        eval_config = evaluation_config(args, domain)
        for name, dataset in ((args.eval_split, splits.get(args.eval_split)), ("D_mem", dmem)):
            if dataset is None or len(dataset) == 0:
                raise InputError(f"There is no {name!r} split to evaluate on: raise --validation_fraction / "
                                 "--test_fraction or pick another --eval_split.")
            with user_input():
                scan_images(dataset, args.image_column, progress=False)
    values = {name: getattr(args, name) for names in CONFIG_FLAGS.values() for name in names}
    values["learning_rate"] = (args.learning_rate or args.learning_rates.get(args.peft_method)
                               or DEFAULT_LR[args.peft_method])
    if args.max_train_steps is None and args.num_train_epochs is None:
        del values["max_train_steps"]  # the config's default step count
    with user_input():
        config = FineTuneConfig(mask=mask.to_dict() if mask else None, **values)
    return CheckedInputs(model_path, unet, splits, domain, train_set, dmem, eval_config, config)
