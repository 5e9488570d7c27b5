"""`memcontrol audit MODEL`: did a fine-tune memorize training images, and which ones?

Any diffusers Stable Diffusion fine-tune can be audited, whoever trained it:

* a MemControl run folder (``training_config.json`` + adapter, or + a pipeline for a full fine-tune): its own data
  settings and D_mem are read back, so ``memcontrol audit outputs/quickstart/final/full-none`` needs no other argument;
* a MemControl adapter folder or Hub repo (``adapter_config.json`` of peft type ``memcontrol``);
* a peft LoRA folder (``adapter_config.json`` with ``peft_type: LORA``);
* a LoRA as diffusers saves it (``pytorch_lora_weights.safetensors``), loaded with ``pipe.load_lora_weights``;
* a full UNet folder (``config.json`` of a ``UNet2DConditionModel``) or a whole pipeline folder (``model_index.json``).

The prompts attacked are D_mem (``--dmem_file``, ``--dmem_size`` with the trainer's selection rules, or a run's own),
or, with ``--scan``, the ``--scan_top_k`` training captions that Wen et al.'s first-step detection score ranks highest
(every distinct caption of the training split is scored, batched). Each attacked prompt gets the calibrated
extraction attack of the evaluation (:mod:`metrics.extraction`): ``extracted_images`` counts the prompts with a
generation that copies its training image, ``memorized_prompts`` those whose generations form a clique. Beside it,
``copied_images`` counts the prompts with a nearest-neighbour copy
(:func:`metrics.extraction.nearest_neighbour_copies`: a generation nearest to its own training image among the
training split's VAE round trips, and closer to it than same-class training images usually are to each other;
classes from the split's ``label`` column, else none). The same
attack runs on the base model with the same seeds: a clique the base already forms is not the fine-tune's
memorization and is subtracted from ``memorized_prompts``.

Outputs (``--output_dir``, default ``MODEL/audit`` for a local folder): ``audit.json`` (counts, the base's counts,
detection scores, settings; never a caption unless ``--include_prompts``), ``audit.md`` (a one-page report) and
``memorization.png`` with ``dmem_generations.safetensors`` (training images next to generations: local only, never
published). Exit status: 0, or 3 with ``--fail_on_extraction`` when anything was extracted; 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import is_xformers_available
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from ..constants import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AUDIT_FILE,
    AUDIT_REPORT,
    DMEM_GENERATIONS_FILE,
    LORA_WEIGHTS_FILE,
    MEMORIZATION_FIGURE,
    PIPELINE_INDEX_FILE,
    TRAINING_CONFIG_FILE,
)
from ..data.columns import check_captions
from ..data.datasets import with_dmem_captions
from ..data.tiny_base import tiny_base_path
from ..errors import ArgumentParser, InputError, run_command, user_input
from ..evaluation.config import EvaluationConfig
from ..evaluation.evaluator import generate_images, pipe_default_resolution, real_images, subset_rows
from ..evaluation.figures import COPY, memorization_figure, save_dmem_generations
from ..files import write_json_atomic, write_text_atomic
from ..hub.loaders import load_unet_adapter
from ..hub.pipelines import is_pipeline_folder
from ..metrics.extraction import cached_render, calibrated_extraction, nearest_neighbour_copies, vae_round_trip
from ..metrics.memorization import detection_auc, wen_detection_scores
from ..trainer.arguments import build_parser as trainer_parser
from ..trainer.arguments import build_sets, load_splits
from .report import render_report

__all__ = ["AuditSettings", "build_parser", "detect_model_kind", "load_audited_pipeline", "main", "run_audit"]

EXTRACTION_EXIT_STATUS = 3  # --fail_on_extraction and something was extracted
MODEL_KINDS = ("run", "memcontrol", "peft_lora", "diffusers_lora", "unet", "pipeline")
# the trainer's flags the audit takes as they are (the data, D_mem selection and model loading)
DATA_FLAGS = ("pretrained_model_name_or_path", "revision", "variant", "cache_dir",
              "enable_xformers_memory_efficient_attention", "dataset_name", "dataset_config_name", "train_data_dir",
              "image_column", "caption_column", "caption_template", "subject_column", "validation_fraction",
              "test_fraction", "max_train_samples", "resolution", "center_crop", "dmem_size", "dmem_selection",
              "dmem_file", "dmem_unique_captions", "dmem_block", "seed", "split_seed", "mixed_precision")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass
class AuditSettings:
    """What the audit generates and how it scores it (JSON round trip; the attack's thresholds: EvaluationConfig)."""

    generations: int = field(default=50, metadata={"help": "Generations per attacked prompt (reference code: 50)."})
    num_inference_steps: int = field(default=50, metadata={"help": "Sampling steps of the attack's generations."})
    guidance_scale: float = field(default=4.0, metadata={"help": "Classifier-free guidance of the generations."})
    generation_batch_size: int = field(default=16, metadata={"help": "Images per pipeline call."})
    scan: bool = field(default=False, metadata={"help": "Rank every training caption by Wen et al.'s score."})
    scan_top_k: int = field(default=20, metadata={"help": "Scanned captions that get the extraction attack."})
    scan_generations: int = field(default=1, metadata={"help": "Noises per caption in the scan (Wen et al.: 4)."})
    scan_steps: int = field(default=50, metadata={"help": "Scheduler steps setting the scan's first timestep."})
    scan_guidance_scale: float = field(default=7.5, metadata={"help": "Guidance of the scan (Wen et al.: 7.5)."})
    scan_batch_size: int = field(default=64, metadata={"help": "Captions per batched UNet call of the scan."})
    against_base: bool = field(default=True, metadata={"help": "Attack the base model too and subtract its cliques."})
    seed: int = field(default=0, metadata={"help": "Seed of the generations and of the scan's noise."})

    def __post_init__(self) -> None:
        """Validate the counts."""
        for name in ("generations", "num_inference_steps", "generation_batch_size", "scan_top_k", "scan_generations",
                     "scan_steps", "scan_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name} must be an int >= 1, got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-able dict."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------
def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def detect_model_kind(model: str) -> str:
    """Which of MODEL_KINDS a local folder holds (a Hub id is a MemControl repo: 'memcontrol')."""
    if not os.path.isdir(model):
        if os.path.exists(model):
            raise ValueError(f"MODEL {model!r} is a file: pass the folder holding it.")
        if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
            return "memcontrol"
        raise FileNotFoundError(f"MODEL {model!r} is neither a folder nor a Hub repository id (org/name).")
    names = set(os.listdir(model))
    if ADAPTER_CONFIG_FILE in names:
        peft_type = str(_read_json(os.path.join(model, ADAPTER_CONFIG_FILE)).get("peft_type", ""))
        if peft_type.upper() == "LORA":
            return "peft_lora"
        if peft_type.lower() != "memcontrol":
            raise ValueError(f"MODEL {model!r} holds a peft adapter of type {peft_type!r}; the audit reads LoRA and "
                             "MemControl adapters.")
        return "run" if TRAINING_CONFIG_FILE in names else "memcontrol"
    if LORA_WEIGHTS_FILE in names:
        return "diffusers_lora"
    if PIPELINE_INDEX_FILE in names:  # a MemControl full fine-tune is a pipeline folder with its run files
        return "run" if TRAINING_CONFIG_FILE in names else "pipeline"
    if "config.json" in names and _read_json(os.path.join(model, "config.json")).get("_class_name") == \
            "UNet2DConditionModel":
        return "unet"
    if "unet" in names and os.path.isfile(os.path.join(model, "unet", "config.json")):
        return "unet"
    raise ValueError(f"MODEL {model!r} holds no model the audit knows: a MemControl run or adapter "
                     "(adapter_config.json), a peft LoRA, a diffusers LoRA (pytorch_lora_weights.safetensors), a "
                     "UNet folder (config.json) or a pipeline folder (model_index.json).")


def _torch_dtype(mixed_precision: str | None) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "no", torch.float32)


def _load_pipeline(path: str, args: argparse.Namespace) -> Any:
    with user_input(f"--pretrained_model_name_or_path {path!r}", catch=(OSError, ValueError)):
        return StableDiffusionPipeline.from_pretrained(path, revision=args.revision, variant=args.variant,
                                                       cache_dir=args.cache_dir, safety_checker=None,
                                                       requires_safety_checker=False)


def _load_peft_lora(unet: Any, folder: str) -> None:
    """A peft LoRA folder (adapter_config.json + adapter_model.safetensors) injected into `unet`."""
    weights = os.path.join(folder, ADAPTER_WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"The peft LoRA folder {folder!r} has no adapter_model.safetensors (only safetensors "
                                "are read).")
    config = LoraConfig.from_pretrained(folder)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(weights).items()}
    inject_adapter_in_model(config, unet, adapter_name="audit")
    result = set_peft_model_state_dict(unet, state, adapter_name="audit")
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"The LoRA in {folder!r} does not fit this UNet: unexpected keys "
                         f"{result.unexpected_keys[:3]}.")


def load_audited_pipeline(model: str, kind: str, base: str, args: argparse.Namespace) -> Any:
    """The pipeline to audit: `base` with MODEL's adapter folded in, or MODEL's own UNet/pipeline (float32, CPU)."""
    if kind == "pipeline" or (kind == "run" and is_pipeline_folder(model)):
        return _load_pipeline(model, args)
    pipe = _load_pipeline(base, args)
    with user_input(f"MODEL {model!r}", catch=(OSError, ValueError, KeyError, RuntimeError)):
        if kind in ("run", "memcontrol"):

            load_unet_adapter(pipe.unet, model, local_files_only=os.path.isdir(model))
        elif kind == "peft_lora":
            _load_peft_lora(pipe.unet, model)
        elif kind == "diffusers_lora":
            pipe.load_lora_weights(model)
        else:  # a full UNet

            sub = "unet" if os.path.isdir(os.path.join(model, "unet")) else None
            pipe.unet = UNet2DConditionModel.from_pretrained(model, subfolder=sub)
    for module in pipe.unet.modules():  # fold every adapter in: plain weights, no adapter cost per step
        if isinstance(module, BaseTunerLayer) and not module.merged:
            module.merge()
    return pipe


def _prepare(pipe: Any, args: argparse.Namespace, device: torch.device) -> Any:
    """Inference settings: dtype, device, xformers, no progress bar of its own, no gradients."""
    dtype = _torch_dtype(args.mixed_precision)
    pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    if args.enable_xformers_memory_efficient_attention:
        pipe.unet.enable_xformers_memory_efficient_attention()
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# the data and the prompts
# ----------------------------------------------------------------------------------------------------------------
def _trainer_namespace(args: argparse.Namespace, run: dict | None, explicit: set[str]) -> argparse.Namespace:
    """The trainer's arguments (its defaults, a run's own values, then the flags given here) for its data helpers."""
    ns = trainer_parser().parse_args([])
    ns.eval = True  # a model trained elsewhere: its data split as the trainer's --eval splits it
    if run:
        for key, value in run.items():
            if hasattr(ns, key):
                setattr(ns, key, value)
    for name in DATA_FLAGS:
        if name in explicit or not run:
            value = getattr(args, name)
            if name == "dmem_size" and value is None:
                value = ns.dmem_size if run else 100
            setattr(ns, name, value)
    return ns


def _data(ns: argparse.Namespace, want_dmem: bool) -> tuple[Any, Any, Any]:
    """(train split with D_mem's captions, D_mem or None, the set the model trained on) by the trainer's rules."""
    splits, _ = load_splits(ns)  # a run's rows as it split them (held out only if it evaluated)
    ns.eval = want_dmem
    with user_input():
        trained_on, dmem = build_sets(ns, splits)
    pool = splits["train"]
    if dmem is not None and ns.dmem_unique_captions:
        pool = with_dmem_captions(pool, dmem, ns.caption_column)
    return pool, dmem, trained_on


def _distinct_captions(pool: Any, caption_column: str) -> tuple[list[str], list[int]]:
    """The distinct captions of the pool and, for each, its first row."""
    captions = check_captions(pool[caption_column], caption_column, "the training split")
    first: dict[str, int] = {}
    for row, caption in enumerate(captions):
        first.setdefault(caption, row)
    return list(first), list(first.values())


def _scan_scores(pipe: Any, captions: list[str], settings: AuditSettings, progress: bool, desc: str) -> np.ndarray:
    """Wen et al.'s first-step detection score of every caption (higher = more likely memorized), batched."""
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    scores = wen_detection_scores(pipe, captions, num_inference_steps=settings.scan_steps,
                                  guidance_scale=settings.scan_guidance_scale,
                                  num_images_per_prompt=settings.scan_generations, first_step_only=True,
                                  generator=generator, batch_size=settings.scan_batch_size, show_progress=progress)
    return scores.double().numpy()


def _attack(pipe: Any, captions: list[str], pool: Any, rows: list[int], image_column: str, settings: AuditSettings,
            config: Any, resolution: int, progress: bool, desc: str) -> tuple[dict, torch.Tensor, torch.Tensor, Any]:
    """The calibrated extraction attack and the nearest-neighbour copies of the evaluation on `captions` (training
    images: `rows` of `pool`); the copies are bit 4 of the flags."""
    images = generate_images(pipe, captions, settings.generations, num_inference_steps=settings.num_inference_steps,
                             guidance_scale=settings.guidance_scale, resolution=resolution,
                             batch_size=settings.generation_batch_size, seed=settings.seed + 1,
                             show_progress=progress, desc=desc)
    generations = images.reshape(len(captions), settings.generations, *images.shape[1:])
    training = torch.cat(list(real_images(pool, image_column, rows, resolution, config)))

    render = cached_render(lambda x: vae_round_trip(pipe.vae, x, config.encoder_batch_size))

    with torch.no_grad():
        summary, flags = calibrated_extraction(
            generations, training, render,
            real_images(pool, image_column, subset_rows(len(pool), config.max_train_images, config.seed, keep=rows),
                         resolution, config),
            threshold=config.extraction_threshold,
            pixel_threshold=config.extraction_match_threshold or config.extraction_threshold,
            separation=config.extraction_separation, min_clique_size=config.extraction_min_clique_size,
            grid=config.extraction_grid, reduction=config.extraction_reduction)
        references = subset_rows(len(pool), config.max_train_images, config.seed, keep=rows)
        queries = references[subset_rows(len(references), config.copy_calibration_images, config.seed)]
        every = len(queries) == len(references)  # then the reference itself calibrates: rendered once
        column = "label" if "label" in pool.column_names else None
        copies, copied = nearest_neighbour_copies(
            generations, training, render, real_images(pool, image_column, references, resolution, config),
            labels=None if column is None else pool.select(rows)[column],
            reference_labels=None if column is None else pool.select(references)[column],
            queries=None if every else torch.cat(list(real_images(pool, image_column, queries, resolution, config))),
            query_labels=None if column is None or every else pool.select(queries)[column],
            percentile=config.copy_percentile, grid=config.extraction_grid, reduction=config.extraction_reduction)
    flags |= copied.to(torch.uint8) * COPY
    return {**summary, "copies": {**copies, "class_column": column}}, flags, generations, training


# ----------------------------------------------------------------------------------------------------------------
# the audit
# ----------------------------------------------------------------------------------------------------------------
def _spread(values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {"min": None, "median": None, "max": None, "mean": None}
    return {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max()),
            "mean": float(values.mean())}


def run_audit(args: argparse.Namespace, explicit: set[str] | None = None) -> dict[str, Any]:
    """Audit MODEL (module docstring); write audit.json, audit.md, memorization.png; return the report."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    explicit = explicit if explicit is not None else set()
    model = args.model
    with user_input(catch=(ValueError, FileNotFoundError, OSError)):  # the messages name MODEL
        kind = detect_model_kind(model)
    run = None
    if kind == "run":
        with user_input(f"MODEL {model!r}: training_config.json"):
            run = _read_json(os.path.join(model, TRAINING_CONFIG_FILE)).get("run") or {}
    ns = _trainer_namespace(args, run, explicit)
    base = ns.pretrained_model_name_or_path or tiny_base_path()
    dmem_given = run is not None or args.dmem_file is not None or args.dmem_size is not None
    if not (dmem_given or args.scan):
        raise InputError(f"Which prompts should be attacked? MODEL {model!r} is not a MemControl run folder: pass "
                         "--dmem_file, --dmem_size N or --scan.")
    for flag, recorded in (("generations", "eval_extraction_generations"), ("num_inference_steps",
                                                                           "eval_inference_steps")):
        if run and flag not in explicit and run.get(recorded):  # a run's own evaluation settings: its metrics.json
            setattr(args, flag, run[recorded])
    with user_input("--eval_config and the attack flags"):
        settings = AuditSettings(**{k: getattr(args, k) for k in AuditSettings.__dataclass_fields__ if k != "seed"},
                                 seed=ns.seed)
        config = _attack_config(args, run)
    with user_input(f"--device {args.device!r}", catch=(RuntimeError,)):
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.mixed_precision == "fp16" and device.type == "cpu":
        raise InputError("--mixed_precision fp16 needs a GPU; on a CPU use bf16 or no.")
    if args.enable_xformers_memory_efficient_attention:

        if not is_xformers_available():
            raise InputError("--enable_xformers_memory_efficient_attention needs xformers, which is not installed: "
                             "`pip install xformers` (or drop the flag).")
    progress = not args.no_progress

    if not progress:

        datasets.disable_progress_bars()
        diffusers_logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

    clock = time.perf_counter()
    pipe = _prepare(load_audited_pipeline(model, kind, base, ns), args, device)  # a bad MODEL fails before the data
    timings["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    pool, dmem, _ = _data(ns, dmem_given)
    caption_column, image_column = ns.caption_column, ns.image_column
    timings["data"] = time.perf_counter() - clock
    resolution = ns.resolution or config.resolution or pipe_default_resolution(pipe)

    dmem_rows = [int(r) for r in dmem["dmem_index"]] if dmem is not None else []
    detection: dict[str, Any] | None = None
    scores_by_row: dict[int, float] = {}
    if settings.scan:
        clock = time.perf_counter()
        captions, rows = _distinct_captions(pool, caption_column)
        scores = _scan_scores(pipe, captions, settings, progress, "scan (Wen et al.)")
        order = np.argsort(-scores, kind="stable")
        scores_by_row = {rows[i]: float(scores[i]) for i in range(len(rows))}
        top = [rows[i] for i in order[:settings.scan_top_k]]
        timings["scan"] = time.perf_counter() - clock
        detection = {"method": "wen_first_step", "n_scanned": len(captions), "top_k": len(top),
                     "scores": _spread(scores), "top_k_scores": [float(scores[i]) for i in order[:len(top)]],
                     "seconds_per_1000_captions": round(1000 * timings["scan"] / len(captions), 3)}
        if dmem is not None:
            truth = set(pool.select(dmem_rows)[caption_column])
            positive = np.asarray([c in truth for c in captions])
            detection["dmem_in_top_k"] = int(sum(positive[i] for i in order[:len(top)]))
            detection["dmem_ranks"] = sorted(int(np.flatnonzero(order == i)[0]) + 1 for i in np.flatnonzero(positive))
            if positive.any() and (~positive).any():

                detection.update(detection_auc(scores[positive], scores[~positive]))
        attack_rows = top
    else:
        attack_rows = dmem_rows
    attack_captions = list(pool.select(attack_rows)[caption_column])

    clock = time.perf_counter()
    summary, flags, generations, training = _attack(pipe, attack_captions, pool, attack_rows, image_column, settings,
                                                    config, resolution, progress, "generate (audited model)")
    timings["attack"] = time.perf_counter() - clock
    output_dir = args.output_dir or _default_output_dir(model)
    os.makedirs(output_dir, exist_ok=True)
    # training images and generations that may copy them: local files only (hub.PRIVATE_FILES)
    save_dmem_generations(os.path.join(output_dir, DMEM_GENERATIONS_FILE), generations, training, flags)
    del pipe

    base_summary, base_flags = None, None
    base_detection = None
    if settings.against_base:
        clock = time.perf_counter()
        base_pipe = _prepare(_load_pipeline(base, ns), args, device)
        base_summary, base_flags, base_generations, _ = _attack(
            base_pipe, attack_captions, pool, attack_rows, image_column, settings, config, resolution, progress,
            "generate (base model)")
        os.makedirs(os.path.join(output_dir, "base"), exist_ok=True)
        save_dmem_generations(os.path.join(output_dir, "base", DMEM_GENERATIONS_FILE), base_generations, training,
                              base_flags)
        if detection is not None and "auc" in detection:  # the base's AUC on the same captions and noises

            captions, _ = _distinct_captions(pool, caption_column)
            base_all = _scan_scores(base_pipe, captions, settings, False, "scan (base)")
            truth = set(pool.select(dmem_rows)[caption_column])
            positive = np.asarray([c in truth for c in captions])
            base_detection = detection_auc(base_all[positive], base_all[~positive])
        del base_pipe
        timings["base"] = time.perf_counter() - clock

    clique = (flags & 1).bool().any(1)
    extracted = (flags & 2).bool().any(1)
    copied = (flags & COPY).bool().any(1)
    base_clique = (base_flags & 1).bool().any(1) if base_flags is not None else torch.zeros_like(clique)
    base_extracted = (base_flags & 2).bool().any(1) if base_flags is not None else torch.zeros_like(clique)
    per_prompt = []
    for p, row in enumerate(attack_rows):
        entry = {"row": int(row), "dmem": row in dmem_rows, "clique": bool(clique[p]), "extracted": bool(extracted[p]),
                 "copied": bool(copied[p]), "base_clique": bool(base_clique[p]),
                 "base_extracted": bool(base_extracted[p])}
        if row in scores_by_row:
            entry["detection_score"] = scores_by_row[row]
        if args.include_prompts:
            entry["caption"] = attack_captions[p]
        per_prompt.append(entry)
    report: dict[str, Any] = {
        "model": {"path": model, "kind": kind, "base_model": base},
        "extracted_images": int(extracted.sum()),
        "copied_images": int(copied.sum()),
        "memorized_prompts": int((clique & ~base_clique).sum()),
        "memorized_prompts_before_base_subtraction": int(clique.sum()),
        "base_only_cliques_subtracted": int((clique & base_clique).sum()),
        "extracted_images_also_by_base": int((extracted & base_extracted).sum()),
        "dmem_size": len(dmem_rows) if dmem is not None else None,
        "prompts": "scan" if settings.scan else ("run" if run is not None else "dmem"),
        "attacked_prompts": len(attack_rows),
        "generations_per_prompt": settings.generations,
        "extraction": {k: v for k, v in summary.items() if k != "copies"},
        "copies": summary["copies"],
        "base": None if base_summary is None else {
            "extracted_images": int(base_summary["n_extracted"]),
            "copied_images": int(base_summary["copies"]["n_copied"]),
            "memorized_prompts": int(base_summary["n_flagged_prompts"]),
            "extraction": {k: v for k, v in base_summary.items() if k != "copies"}, "copies": base_summary["copies"],
            "detection": base_detection},
        "detection": detection,
        "per_prompt": per_prompt,
        "settings": {**settings.to_dict(), "attack": config.to_dict(), "resolution": int(resolution),
                     "mixed_precision": args.mixed_precision or "no", "device": str(device),
                     "data": {k: getattr(ns, k) for k in DATA_FLAGS if k not in ("mixed_precision",)},
                     "include_prompts": bool(args.include_prompts)},
        "timings": {},
    }
    clock = time.perf_counter()
    figure = os.path.join(output_dir, MEMORIZATION_FIGURE)
    runs = {"fine-tune": output_dir}
    if base_flags is not None:
        runs["base"] = os.path.join(output_dir, "base")
    memorization_figure(runs, figure, n_pairs=min(4, len(attack_rows)))
    report["memorization_figure"] = MEMORIZATION_FIGURE
    timings["figure"] = time.perf_counter() - clock
    timings["total"] = time.perf_counter() - started
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    write_json_atomic(os.path.join(output_dir, AUDIT_FILE), report)
    write_text_atomic(os.path.join(output_dir, AUDIT_REPORT), render_report(report))
    report["output_dir"] = output_dir
    return report


def _default_output_dir(model: str) -> str:
    if os.path.isdir(model):
        return os.path.join(model, "audit")
    return "audit-" + model.replace("/", "--")


def _attack_config(args: argparse.Namespace, run: dict | None) -> Any:
    """The attack's thresholds (EvaluationConfig): --eval_config, else a run's own, else the evaluation's defaults."""
    values: dict[str, Any] = {}
    source = args.eval_config or ((run or {}).get("eval_config"))
    if source:
        with user_input(f"--eval_config {source!r}"), open(source, encoding="utf-8") as f:
            values.update(json.load(f))
    for name in ("extraction_threshold", "extraction_match_threshold", "extraction_separation",
                 "extraction_min_clique_size", "max_train_images", "copy_percentile"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    values.update(extraction_generations=args.generations, show_progress=not args.no_progress)
    known = set(EvaluationConfig.__dataclass_fields__)
    return EvaluationConfig(**{k: v for k, v in values.items() if k in known})


# ----------------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------------
def build_parser(prog: str = "memcontrol audit") -> argparse.ArgumentParser:
    """`memcontrol audit`'s flags: MODEL, the trainer's data and D_mem flags, the scan and the attack."""
    p = ArgumentParser(prog=prog, description="Measure the memorization of a fine-tune before it is published.")
    p.add_argument("model", help="A MemControl run or adapter folder (or Hub repo), a peft LoRA folder, a diffusers "
                                 "LoRA folder (pytorch_lora_weights.safetensors), a UNet or a pipeline folder.")
    trainer = {a.dest: a for a in trainer_parser()._actions}
    group = p.add_argument_group("model and data (the trainer's flags; a run folder's own values by default)")
    for name in DATA_FLAGS:
        action = trainer[name]
        if name == "dmem_size":
            action.default = None
            action.help = "D_mem: this many training pairs by the trainer's --dmem_selection rule."
        group._add_action(action)
    g = p.add_argument_group("scan and attack")
    defaults = AuditSettings()
    for name, spec in AuditSettings.__dataclass_fields__.items():
        if name == "seed":  # the trainer's --seed (a run's own): its D_mem, splits and evaluation seed
            continue
        default = getattr(defaults, name)
        if isinstance(default, bool):
            if name == "against_base":
                g.add_argument("--no_base", dest=name, action="store_false",
                               help="Skip the base model (no base-only cliques subtracted).")
            else:
                g.add_argument(f"--{name}", action="store_true", help=spec.metadata["help"])
        else:
            g.add_argument(f"--{name}", type=type(default), default=default, help=spec.metadata["help"])
    for name in ("extraction_threshold", "extraction_match_threshold", "extraction_separation"):
        g.add_argument(f"--{name}", type=float, default=None, help="As in EvaluationConfig (default: its value).")
    g.add_argument("--extraction_min_clique_size", type=int, default=None, help="As in EvaluationConfig.")
    g.add_argument("--copy_percentile", type=float, default=None,
                   help="Nearest-neighbour copies: the percentile of same-class nearest-neighbour distances a copy "
                        "must be closer than (EvaluationConfig.copy_percentile, default 5).")
    g.add_argument("--max_train_images", type=int, default=None,
                   help="Cap on the training images each match is calibrated against (the nearest other training "
                        "image; seeded subset, the attacked rows kept); default: all. At real scale each is rendered "
                        "by the VAE once per model.")
    g.add_argument("--eval_config", default=None,
                   help="JSON file of EvaluationConfig fields (the attack's thresholds).")
    o = p.add_argument_group("outputs")
    o.add_argument("--output_dir", default=None, help="Default: MODEL/audit (a Hub repo: ./audit-ORG--NAME).")
    o.add_argument("--include_prompts", action="store_true",
                   help="Write the attacked captions into audit.json and audit.md (private data: off by default).")
    o.add_argument("--fail_on_extraction", action="store_true",
                   help=f"Exit with status {EXTRACTION_EXIT_STATUS} when any training image was extracted.")
    o.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    o.add_argument("--no_progress", action="store_true", help="Disable progress bars.")
    return p


def _explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the flags written on the command line (so a run folder's own values yield to them)."""
    given = set()
    for action in parser._actions:
        for option in action.option_strings:
            if any(a == option or a.startswith(option + "=") for a in argv):
                given.add(action.dest)
    return given


def main(argv: list[str] | None = None) -> int:
    """`memcontrol audit`: print the headline figures; 3 with --fail_on_extraction when something was extracted."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    report = run_audit(args, _explicit_flags(parser, argv))
    base = report.get("base") or {}
    print(json.dumps({"extracted_images": report["extracted_images"],
                      "copied_images": report["copied_images"],
                      "memorized_prompts": report["memorized_prompts"],
                      "base_extracted_images": base.get("extracted_images"),
                      "base_memorized_prompts": base.get("memorized_prompts"),
                      "detection_auc": (report.get("detection") or {}).get("auc")}, indent=2))
    print(f"audit written to {os.path.join(report['output_dir'], AUDIT_FILE)}")
    if args.fail_on_extraction and report["extracted_images"]:
        return EXTRACTION_EXIT_STATUS
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
