"""Fine-tune a Stable Diffusion UNet with a MemControl adapter (a PEFT method restricted by a mask), then evaluate it.

Extends diffusers' examples/text_to_image/train_text_to_image.py: the model, data and optimisation arguments keep
their names and meanings (docs/flags.md compares them); MemControl adds the PEFT method and its mask, mitigations
(RWA, threshold), the memorization set D_mem and the HPO training set, a latent/text-embedding cache, and the
evaluation. With --search (or --final --mask MASK) the same command runs the whole method (diffusers_memcontrol.runner).

    python -m diffusers_memcontrol.train                                   # embedded default: tiny base + digits
    accelerate launch -m diffusers_memcontrol.train \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir /data/mimic_cxr/train.csv --image_column path --caption_column report \\
        --subject_column subject_id --resolution 512 --center_crop \\
        --peft_method svdiff --mask_layout paper --mask 1011010110111 --output_dir out/svdiff --eval
    python -m diffusers_memcontrol.train --eval --adapter_dir out/svdiff   # evaluate a trained adapter only

Outputs (output_dir): the adapter in peft format (adapter_config.json, adapter_model.safetensors, mask.json),
training_config.json, summary.json, validation.png, metrics.json (with --eval), checkpoint-<step>/ folders and
tracker logs. Captions and prompts are never written to any JSON file or log. A user's mistake (a bad flag, column,
mask, file or dataset) ends the run with one line `error: ...` and exit status 2 (docs/errors.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

from .config import add_config_arguments
from .errors import ArgumentParser, InputError, run_command, user_input

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
SEARCH_GROUP = "search (with --search, or --final --mask MASK: the whole method, see diffusers_memcontrol.runner)"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The trainer's flags (diffusers' names and meanings where they exist) and, for --help, the search's."""
    from .runner import add_search_arguments

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
    g.add_argument("--resolution", type=int, default=None, help="Default: the UNet's sample size x VAE factor.")
    g.add_argument("--center_crop", action="store_true", help="Center crop (default: random crop, as diffusers).")
    g.add_argument("--latent_cache", default="disk", choices=["disk", "memory", "off"],
                   help="Latent/text-embedding cache: disk (content-addressed, reused across runs and search "
                        "trials), memory (encode once, write nothing) or off (encode every step).")
    g.add_argument("--latent_cache_dir", default=None,
                   help="Root of the latent/text-embedding cache (default: $MEMCONTROL_CACHE_DIR or "
                        "~/.cache/diffusers_memcontrol).")

    _add_run_arguments(p)
    add_search_arguments(p.add_argument_group(SEARCH_GROUP))
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
                        "(images that are not cached); 0 decodes in the training loop.")
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
                        "reference code's cheap trial settings: FID and d_mem; no extraction attack or agreement, "
                        "whatever --eval_extraction_generations says).")
    g.add_argument("--feature_encoder", default=None,
                   help="FID/AMD features (default: tiny-domain on built-in domains, else inception).")
    g.add_argument("--eval_num_prompts", type=int, default=None, help="Prompts generated for FID/AMD.")
    g.add_argument("--eval_extraction_generations", type=int, default=None,
                   help="Generations per D_mem prompt in the extraction attack.")
    g.add_argument("--eval_inference_steps", type=int, default=None, help="Sampling steps of the evaluation.")
    g.add_argument("--report_to", default="tensorboard", help='tensorboard, wandb, all, or "none".')
    g.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to output_dir.")
    g.add_argument("--tracker_project_name", default="memcontrol", help="Project name of the trackers.")
    g.add_argument("--push_to_hub", action="store_true", help="Publish the adapter and its card to the Hub.")
    g.add_argument("--hub_model_id", default=None, help="Hub repo of --push_to_hub (default: output_dir's name).")
    g.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one).")
    g.add_argument("--no_progress", action="store_true", help="Disable progress bars.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the trainer's command line; a bad value raises InputError before anything is loaded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate_args(parser, args)
    return args


def _validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument combinations that cannot work: fail before loading anything."""
    import importlib.util

    from .config import parse_threshold
    from .tiny_base import DOMAINS

    search_group = next(g for g in parser._action_groups if g.title == SEARCH_GROUP)
    for action in search_group._group_actions:
        if getattr(args, action.dest) != action.default:
            parser.error(f"{action.option_strings[0]} is a search flag: add --search (or --final --mask MASK).")
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
        from diffusers.utils import is_xformers_available

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


def run_config(args: argparse.Namespace) -> dict:
    """The run's arguments without private values (prompts are replaced by their count, tokens dropped)."""
    config = {k: v for k, v in vars(args).items() if k not in PRIVATE_ARGS}
    config["num_validation_prompts"] = len(args.validation_prompts or [])
    return config


def load_dataset_source(args: argparse.Namespace) -> Any:
    """The user's dataset (--dataset_name / --train_data_dir with their options); InputError names a bad one."""
    from .data import load_image_caption_dataset
    from .tiny_base import DOMAINS

    try:
        return load_image_caption_dataset(args.dataset_name, args.train_data_dir, args.image_column,
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


def load_splits(args: argparse.Namespace) -> tuple[Any, str | None]:
    """train / validation / test splits (subject-grouped with --subject_column); train truncated by max_train_samples."""
    from .columns import check_columns
    from .data import split_dataset
    from .tiny_base import DOMAINS

    builtin = args.train_data_dir is None and (args.dataset_name or "digits") in DOMAINS
    source = (args.dataset_name or "digits") if builtin else load_dataset_source(args)
    with user_input():
        splits = split_dataset(source, subject_column=args.subject_column,
                               validation_fraction=args.validation_fraction, test_fraction=args.test_fraction,
                               seed=args.seed)
        check_columns(splits["train"], [args.image_column, args.caption_column, args.subject_column],
                      args.train_data_dir or args.dataset_name or "the dataset")
    if args.max_train_samples is not None and args.max_train_samples < len(splits["train"]):
        splits["train"] = splits["train"].shuffle(seed=args.seed).select(range(args.max_train_samples))
    return splits, (source if builtin else None)


def build_sets(args: argparse.Namespace, splits: Any) -> tuple[Any, Any]:
    """(training set, D_mem or None): the HPO set with --hpo, else the train split (with D_mem duplicated under
    --duplicate_dmem); D_mem when --hpo, --duplicate_dmem or --eval."""
    from . import data as data_mod

    dmem = None
    if args.hpo or args.duplicate_dmem or args.eval:
        dmem = data_mod.build_memorization_set(
            splits["train"], args.caption_column, dmem_size=min(args.dmem_size, len(splits["train"])),
            selection=args.dmem_selection, unique_captions=args.dmem_unique_captions, seed=args.seed,
            dmem_file=args.dmem_file, image_column=args.image_column)
    if args.hpo:
        train = data_mod.build_hpo_set(splits["train"], dmem, dmem_repeats=args.dmem_repeats,
                                       proxy_fraction=args.proxy_fraction, seed=args.seed)
    else:
        train = splits["train"]
        if dmem is not None and args.dmem_unique_captions:  # the D_mem pairs as the search trained on them
            train = data_mod.with_dmem_captions(train, dmem, args.caption_column)
        if args.duplicate_dmem:
            train = data_mod.with_duplicated_dmem(train, dmem, args.dmem_repeats, seed=args.seed)
    return train, dmem


def evaluation_config(args: argparse.Namespace, domain: str | None) -> Any:
    """EvaluationConfig from --eval_config and the --eval_* / --feature_encoder overrides."""
    from .evaluation import EvaluationConfig

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
    for arg, name in (("eval_num_prompts", "num_eval_prompts"), ("eval_extraction_generations",
                      "extraction_generations"), ("eval_inference_steps", "num_inference_steps")):
        if getattr(args, arg) is not None:
            values[name] = getattr(args, arg)
    if args.eval_preset == "search":  # trials score FID and d_mem only, whatever the stage-2 settings say
        search = EvaluationConfig.for_search()
        values.update(extraction_generations=search.extraction_generations, agreement=search.agreement)
    values.setdefault("seed", args.seed)
    values.setdefault("show_progress", not args.no_progress)
    if args.resolution and "resolution" not in values:
        values["resolution"] = args.resolution
    with user_input("--eval_config and --eval_* flags"):
        return EvaluationConfig(**values)


def run_evaluation(args: argparse.Namespace, pipe: Any, inputs: CheckedInputs, trainable_params: int) -> dict:
    """Evaluate the pipeline, adapters merged, on --eval_split, D_mem and the train split; write metrics.json."""
    from .adapters import merged_adapters
    from .evaluation import evaluate, write_metrics
    from .figures import DMEM_GENERATIONS_FILE

    eval_dataset = inputs.splits[args.eval_split]
    label_column = "label" if "label" in eval_dataset.column_names else None
    with merged_adapters(pipe.unet):
        metrics = evaluate(pipe, eval_dataset, inputs.dmem, inputs.splits["train"], inputs.eval_config,
                           image_column=args.image_column, caption_column=args.caption_column,
                           label_column=label_column, trainable_params=trainable_params,
                           generations_path=os.path.join(args.output_dir, DMEM_GENERATIONS_FILE))
    write_metrics(metrics, os.path.join(args.output_dir, "metrics.json"))
    return metrics


@dataclasses.dataclass
class CheckedInputs:
    """What the command line names, checked before any weight is loaded."""

    model_path: str
    mask: Any
    splits: Any
    domain: str | None
    train_set: Any
    dmem: Any
    eval_config: Any
    config: Any


def check_inputs(args: argparse.Namespace) -> CheckedInputs:
    """Check the model, mask, adapter, data and configs a command line names; a mistake raises InputError.

    The mask and the adapter are checked on the UNet's architecture (its config, on the meta device), so a user's
    mistake is reported in a second, before any model weight is loaded.
    """
    import torch
    from diffusers import UNet2DConditionModel

    from .adapters import check_adapter_fits, resolve_mask
    from .checkpoints import resolve_checkpoint
    from .config import DEFAULT_LR, FineTuneConfig
    from .images import scan_images
    from .tiny_base import tiny_base_path

    model_path = args.pretrained_model_name_or_path or tiny_base_path()
    if args.pretrained_model_name_or_path is None and not os.path.isfile(os.path.join(model_path, "model_index.json")):
        raise FileNotFoundError(f"The shipped tiny base is missing ({model_path}); build it with "
                                "training/pretrain_tiny_base.py or pass --pretrained_model_name_or_path.")
    with user_input(f"--pretrained_model_name_or_path {model_path!r}", catch=(OSError, ValueError)):
        unet_config = UNet2DConditionModel.load_config(model_path, subfolder="unet", revision=args.revision,
                                                       cache_dir=args.cache_dir)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
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
    values["learning_rate"] = args.learning_rate or DEFAULT_LR[args.peft_method]
    if args.max_train_steps is None and args.num_train_epochs is None:
        del values["max_train_steps"]  # the config's default step count
    with user_input():
        config = FineTuneConfig(mask=mask.to_dict() if mask else None, **values)
    return CheckedInputs(model_path, mask, splits, domain, train_set, dmem, eval_config, config)


def make_accelerator(args: argparse.Namespace) -> Any:
    """The run's Accelerator (gradient accumulation, mixed precision, trackers under --output_dir); seeds the run."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in ("none", "") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    set_seed(args.seed)
    return accelerator


def load_pipeline(args: argparse.Namespace, model_path: str, device: Any) -> Any:
    """The frozen pipeline on `device` (fp32: the encoders feed the cache; train() casts the UNet's frozen weights)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_path, revision=args.revision, variant=args.variant,
                                                   cache_dir=args.cache_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    if args.prediction_type is not None:
        pipe.scheduler.register_to_config(prediction_type=args.prediction_type)
    if args.enable_xformers_memory_efficient_attention:
        pipe.unet.enable_xformers_memory_efficient_attention()
    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate_adapter(args: argparse.Namespace, accelerator: Any, pipe: Any, inputs: CheckedInputs,
                     started: float) -> dict:
    """--eval --adapter_dir: evaluate a trained adapter, no training; write metrics.json and summary.json."""
    from .adapters import load_adapter
    from .files import write_json_atomic
    from .masks import trainable_parameters

    load_adapter(pipe.unet, args.adapter_dir)
    metrics = run_evaluation(args, pipe, inputs, trainable_parameters(pipe.unet, by_prefix=True))
    summary = {"adapter_dir": os.path.abspath(args.adapter_dir), "metrics": "metrics.json",
               "wall_time_s": round(time.time() - started, 1)}
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(args.output_dir, "summary.json"), summary)
    accelerator.end_training()
    print(json.dumps({k: metrics.get(k) for k in ("fid", "amd", "agreement", "extracted_images", "dmem",
                                                  "trainable_params")}, indent=2))
    return summary


def start_logging(args: argparse.Namespace, accelerator: Any, inputs: CheckedInputs, data: Any) -> None:
    """Write training_config.json (no private values) and start the trackers, on the main process."""
    from .files import write_json_atomic

    splits, dmem = inputs.splits, inputs.dmem
    training_config = {"fine_tune": json.loads(inputs.config.to_json()), "run": run_config(args),
                       "data": {"train_samples": data.num_samples, "hpo": args.hpo,
                                "dmem_pairs": len(dmem) if dmem is not None else 0,
                                "splits": {k: len(v) for k, v in splits.items() if v is not None},
                                "latents": data.stats.get("latents"), "text": data.stats.get("text")}}
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(args.output_dir, "training_config.json"), training_config)
        if args.report_to not in ("none", ""):
            hyper = {**training_config["fine_tune"], **training_config["run"]}
            scalars = {k: v for k, v in hyper.items() if isinstance(v, (int, float, str, bool))}  # tensorboard's rule
            accelerator.init_trackers(args.tracker_project_name, config=scalars)


def epoch_validation(args: argparse.Namespace, accelerator: Any, pipe: Any, prompts: list[str] | None) -> Any:
    """train()'s `on_epoch_end`: the validation grid every --validation_epochs epochs (None when there is none)."""
    from .training import log_validation

    if not (args.validation_epochs and prompts and args.num_validation_images):
        return None

    def validate(epoch: int, step: int) -> None:
        if epoch % args.validation_epochs == 0 and accelerator.is_main_process:
            pipe.unet.eval()
            log_validation(pipe, accelerator, prompts, args.num_validation_images, args.seed,
                           os.path.join(args.output_dir, f"validation-epoch-{epoch}.png"), step, progress=False)
            pipe.unet.train()

    return validate


def run_summary(args: argparse.Namespace, pipe: Any, log: dict, data: Any) -> dict:
    """summary.json's record of the training run (numbers and names only)."""
    from .hub import base_model_name

    return {
        "base_model": base_model_name(args.pretrained_model_name_or_path), "peft_method": args.peft_method,
        "mask": pipe.unet.peft_config["default"].mask, "trainable_params": log["trainable_params"],
        "losses": log["loss_summary"], "final_loss": log["final_loss"], "global_step": log["global_step"],
        "num_train_epochs": log["num_train_epochs"], "skipped_steps": log["skipped_steps"],
        "mitigation": args.mitigation, "threshold": log.get("threshold"),
        "rwa_augmented_captions": log.get("rwa_augmented_captions"),
        "train_samples": data.num_samples, "hpo": args.hpo, "resumed_from": log["resumed_from"],
        "latents": data.stats.get("latents"), "text": data.stats.get("text"),
        "cache": {k: {"hits": v["hits"], "misses": v["misses"]} for k, v in data.stats.items()
                  if k in ("latent_cache", "text_cache")},
        "steps_per_second": log["steps_per_second"], "train_time_s": log["train_time_s"],
    }


def main(argv: list[str] | None = None) -> dict:
    """Load model and data, check them, fine-tune, save the adapter and outputs, optionally evaluate and publish."""
    if os.environ.get("MEMCONTROL_DIE_WITH_PARENT"):  # a run of a search: it dies with it (launching.run_trainer)
        from .launching import die_with_parent

        die_with_parent()
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"--search", "--final"} & set(argv):  # stage 1 and/or 2 + table
        from .runner import main_search

        return main_search(argv)
    import torch

    from .adapters import merged_adapters, save_adapter
    from .files import write_json_atomic
    from .tiny_base import DOMAINS
    from .training import log_validation, train
    from .training_data import prepare_training_data
    from .trial_result import TrialResult

    # arguments, then everything they name (model, mask, data, configs), checked before any weight is loaded
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    started = time.time()
    inputs = check_inputs(args)
    accelerator = make_accelerator(args)
    pipe = load_pipeline(args, inputs.model_path, accelerator.device)
    if args.adapter_dir:
        return evaluate_adapter(args, accelerator, pipe, inputs, started)

    # data: columns, captions and every image are checked, then encoded once (latent / text-embedding cache)
    with user_input():
        data = prepare_training_data(
            pipe, inputs.train_set, args.image_column, args.caption_column, resolution=args.resolution,
            center_crop=args.center_crop, random_flip=args.random_flip, cache=args.latent_cache,
            cache_dir=args.latent_cache_dir, model_path=inputs.model_path, revision=args.revision,
            interpolation=inputs.config.image_interpolation_mode, progress=not args.no_progress)
    start_logging(args, accelerator, inputs, data)
    prompts = args.validation_prompts
    if prompts is None and inputs.domain is not None:
        prompts = list(DOMAINS[inputs.domain].captions[:4])

    # the adapter with its mask, the optimizer, the scheduler and the loop: diffusers_memcontrol.training.train
    log = train(pipe.unet, pipe.scheduler, data, inputs.config, accelerator=accelerator, mask=inputs.mask,
                output_dir=args.output_dir, checkpointing_steps=args.checkpointing_steps,
                checkpoints_total_limit=args.checkpoints_total_limit,
                resume_from_checkpoint=args.resume_from_checkpoint, progress=not args.no_progress,
                num_workers=args.dataloader_num_workers,
                on_epoch_end=epoch_validation(args, accelerator, pipe, prompts))
    accelerator.wait_for_everyone()
    if any(p.dtype != torch.float32 for p in pipe.unet.parameters()):
        pipe.unet.to(torch.float32)  # inference below in fp32: the adapter and the frozen weights share one dtype

    # save, validate, evaluate, publish
    summary = run_summary(args, pipe, log, data)
    if accelerator.is_main_process:
        save_adapter(pipe.unet, args.output_dir)
        if prompts and args.num_validation_images:
            with merged_adapters(pipe.unet):
                log_validation(pipe, accelerator, prompts, args.num_validation_images, args.seed,
                               os.path.join(args.output_dir, "validation.png"), log["global_step"],
                               progress=not args.no_progress)
            summary["validation"] = "validation.png"
        metrics = None
        if args.eval:
            metrics = run_evaluation(args, pipe, inputs, log["trainable_params"])
            summary["metrics"] = "metrics.json"
            accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))
                             and not isinstance(v, bool)}, step=log["global_step"])
        summary["wall_time_s"] = round(time.time() - started, 1)
        write_json_atomic(os.path.join(args.output_dir, "summary.json"), summary)
        # last: trial_result.json marks the run finished (runs.finished_run)
        TrialResult.from_run(summary, metrics, dmem_copies=args.dmem_repeats if args.hpo or args.duplicate_dmem else 1,
                             samples_per_step=inputs.config.train_batch_size * inputs.config.gradient_accumulation_steps
                             * accelerator.num_processes).save(args.output_dir)
        if args.push_to_hub:  # publish adds hub_url to summary.json
            from .hub import publish

            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            summary["hub_url"] = publish(args.output_dir, repo_id, token=args.hub_token,
                                         base_model=summary["base_model"])
    accelerator.end_training()
    if accelerator.is_main_process:
        print(json.dumps({k: summary[k] for k in ("peft_method", "trainable_params", "losses", "skipped_steps",
                                                  "wall_time_s") if k in summary}, indent=2))
        print(f"adapter written to {os.path.abspath(args.output_dir)}")
    return summary


if __name__ == "__main__":
    run_command(main)
