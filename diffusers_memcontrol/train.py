"""Fine-tune a Stable Diffusion UNet with a MemControl adapter (a PEFT method restricted by a mask), then evaluate it.

Extends diffusers' examples/text_to_image/train_text_to_image.py: the model, data and optimisation arguments keep
their names and meanings (docs/flags.md compares them); MemControl adds the PEFT method and its mask, mitigations
(RWA, threshold), the memorization set D_mem and the HPO training set, a latent/text-embedding cache, and the
evaluation. The whole method (search, stage 2, table: `diffusers_memcontrol.search.stages`) runs from the example script
`training/train_memcontrol.py --search ...` or `memcontrol search ...`; this module is the trainer of one fine-tune.

    python -m diffusers_memcontrol.train                                   # embedded default: tiny base + digits
    accelerate launch -m diffusers_memcontrol.train \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir /data/mimic_cxr/train.csv --image_column path --caption_column report \\
        --subject_column subject_id --resolution 512 --center_crop \\
        --peft_method svdiff --mask_layout paper --mask 1011010110111 --output_dir out/svdiff --eval
    python -m diffusers_memcontrol.train --eval --adapter_dir out/svdiff   # evaluate a trained adapter only

Outputs (output_dir): the adapter in peft format (adapter_config.json, adapter_model.safetensors, mask.json; with
--peft_method full, the pipeline in diffusers' save_pretrained layout and mask.json), training_config.json,
summary.json, validation.png, metrics.json (with --eval), checkpoint-<step>/ folders and tracker logs. Captions and
prompts are never written to any JSON file or log. A user's mistake (a bad flag, column, mask, file or dataset) ends
the run with one line `error: ...` and exit status 2 (docs/errors.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from .constants import (
    DMEM_GENERATIONS_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    TRAINING_CONFIG_FILE,
    UNET_FOLDER,
    VALIDATION_IMAGE,
)
from .data.tiny_base import DOMAINS
from .errors import run_command, user_input
from .evaluation.evaluator import evaluate, write_metrics
from .files import write_json_atomic
from .hub.adapters import merged_adapters, save_adapter
from .hub.card import base_model_name
from .hub.loaders import load_adapter
from .hub.pipelines import is_pipeline_folder, save_pipeline
from .hub.publish import publish
from .search.arguments import reject_search_flags
from .search.launching import die_with_parent
from .search.trial_result import TrialResult
from .trainer.arguments import CheckedInputs, check_inputs, parse_args, run_config, split_seed
from .trainer.batches import prepare_training_data
from .trainer.loop import log_validation, train
from .tuners import trainable_parameters
from .tuners.memcontrol.lora_export import save_lora_weights_diffusers


def run_evaluation(args: argparse.Namespace, pipe: Any, inputs: CheckedInputs, trainable_params: int) -> dict:
    """Evaluate the pipeline, adapters merged, on --eval_split, D_mem and the train split; write metrics.json."""
    eval_dataset = inputs.splits[args.eval_split]
    label_column = "label" if "label" in eval_dataset.column_names else None
    with merged_adapters(pipe.unet):
        metrics = evaluate(pipe, eval_dataset, inputs.dmem, inputs.splits["train"], inputs.eval_config,
                           image_column=args.image_column, caption_column=args.caption_column,
                           label_column=label_column, trainable_params=trainable_params,
                           generations_path=os.path.join(args.output_dir, DMEM_GENERATIONS_FILE))
    write_metrics(metrics, os.path.join(args.output_dir, METRICS_FILE))
    return metrics


def make_accelerator(args: argparse.Namespace) -> Any:
    """The run's Accelerator (gradient accumulation, mixed precision, trackers under --output_dir); seeds the run."""
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
    """--eval --adapter_dir: evaluate a trained adapter (or a full fine-tune's pipeline folder), no training; write
    metrics.json and summary.json."""
    if is_pipeline_folder(args.adapter_dir):  # a full fine-tune: its own UNet replaces the base's
        pipe.unet = UNet2DConditionModel.from_pretrained(args.adapter_dir, subfolder=UNET_FOLDER).to(pipe.device)
        pipe.unet.requires_grad_(False)
        trainable = sum(p.numel() for p in pipe.unet.parameters())
        summary_path = os.path.join(args.adapter_dir, SUMMARY_FILE)  # the run's own count (a mask trains fewer)
        if os.path.isfile(summary_path):
            with open(summary_path, encoding="utf-8") as f:
                trainable = json.load(f).get("trainable_params", trainable)
    else:
        load_adapter(pipe.unet, args.adapter_dir)
        trainable = trainable_parameters(pipe.unet, by_prefix=True)
    metrics = run_evaluation(args, pipe, inputs, trainable)
    summary = {"adapter_dir": os.path.abspath(args.adapter_dir), "metrics": METRICS_FILE,
               "wall_time_s": round(time.time() - started, 1)}
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(args.output_dir, SUMMARY_FILE), summary)
    accelerator.end_training()
    print(json.dumps({k: metrics.get(k) for k in ("fid", "amd", "agreement", "extracted_images", "dmem",
                                                  "trainable_params")}, indent=2))
    return summary


def start_logging(args: argparse.Namespace, accelerator: Any, inputs: CheckedInputs, data: Any) -> None:
    """Write training_config.json (no private values) and start the trackers, on the main process."""
    splits, dmem = inputs.splits, inputs.dmem
    training_config = {"fine_tune": json.loads(inputs.config.to_json()), "run": run_config(args),
                       "data": {"train_samples": data.num_samples, "hpo": args.hpo,
                                "dmem_pairs": len(dmem) if dmem is not None else 0,
                                # D_mem's rows of the train split, and every seed: what a result was measured on
                                "dmem_rows": list(dmem["dmem_index"]) if dmem is not None else [],
                                "seeds": {"training": args.seed, "split_and_dmem": split_seed(args),
                                          "evaluation": inputs.eval_config.seed if inputs.eval_config else None},
                                "splits": {k: len(v) for k, v in splits.items() if v is not None},
                                "latents": data.stats.get("latents"), "text": data.stats.get("text")}}
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(args.output_dir, TRAINING_CONFIG_FILE), training_config)
        if args.report_to not in ("none", ""):
            hyper = {**training_config["fine_tune"], **training_config["run"]}
            scalars = {k: v for k, v in hyper.items() if isinstance(v, (int, float, str, bool))}  # tensorboard's rule
            accelerator.init_trackers(args.tracker_project_name, config=scalars)


def epoch_validation(args: argparse.Namespace, accelerator: Any, pipe: Any, prompts: list[str] | None) -> Any:
    """train()'s `on_epoch_end`: the validation grid every --validation_epochs epochs (None when there is none)."""
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
        die_with_parent()
    # arguments, then everything they name (model, mask, data, configs), checked before any weight is loaded
    argv = sys.argv[1:] if argv is None else list(argv)
    reject_search_flags(argv)
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

    # the adapter with its mask, the optimizer, the scheduler and the loop: diffusers_memcontrol.trainer.loop.train
    log = train(pipe.unet, pipe.scheduler, data, inputs.config, accelerator=accelerator, output_dir=args.output_dir,
                checkpointing_steps=args.checkpointing_steps,
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
        if args.peft_method == "full":  # diffusers' layout: DiffusionPipeline.from_pretrained(output_dir) loads it
            save_pipeline(pipe, args.output_dir)
        else:
            save_adapter(pipe.unet, args.output_dir)
        if args.peft_method == "lora":  # also in diffusers' LoRA format: pipe.load_lora_weights(output_dir) loads it
            save_lora_weights_diffusers(pipe.unet, args.output_dir)
        if prompts and args.num_validation_images:
            with merged_adapters(pipe.unet):
                log_validation(pipe, accelerator, prompts, args.num_validation_images, args.seed,
                               os.path.join(args.output_dir, VALIDATION_IMAGE), log["global_step"],
                               progress=not args.no_progress)
            summary["validation"] = VALIDATION_IMAGE
        metrics = None
        if args.eval:
            metrics = run_evaluation(args, pipe, inputs, log["trainable_params"])
            summary["metrics"] = METRICS_FILE
            accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))
                             and not isinstance(v, bool)}, step=log["global_step"])
        summary["wall_time_s"] = round(time.time() - started, 1)
        write_json_atomic(os.path.join(args.output_dir, SUMMARY_FILE), summary)
        # last: trial_result.json marks the run finished (runs.finished_run)
        TrialResult.from_run(summary, metrics, dmem_copies=args.dmem_repeats if args.hpo or args.duplicate_dmem else 1,
                             samples_per_step=inputs.config.train_batch_size * inputs.config.gradient_accumulation_steps
                             * accelerator.num_processes).save(args.output_dir)
        if args.push_to_hub:  # publish adds hub_url to summary.json
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            summary["hub_url"] = publish(args.output_dir, repo_id, token=args.hub_token,
                                         base_model=summary["base_model"])
    accelerator.end_training()
    if accelerator.is_main_process:
        print(json.dumps({k: summary[k] for k in ("peft_method", "trainable_params", "losses", "skipped_steps",
                                                  "wall_time_s") if k in summary}, indent=2))
        written = "pipeline" if args.peft_method == "full" else "adapter"
        print(f"{written} written to {os.path.abspath(args.output_dir)}")
    return summary


if __name__ == "__main__":
    run_command(main)
