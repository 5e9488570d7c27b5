"""The fine-tuning loop as a library function, shared by the trainer (`diffusers_memcontrol.train`) and search trials.

A search trial (or the script) does, in this order::

    data = prepare_training_data(pipe, dataset, "image", "text", cache_dir=...)   # once per dataset and worker
    unet = copy.deepcopy(base_unet)                                                # a UNet without adapter
    result = train(unet, pipe.scheduler, data, FineTuneConfig(peft_method="svdiff", mask=mask.to_dict()),
                   accelerator=accelerator, output_dir=..., checkpointing_steps=...)
    save_adapter(unet, output_dir)

`train` sets up the run (`check_training_inputs`, `inject_adapter`, `RunPlan`, `prepare_optimization`, EMA,
mitigations), then loops over micro-batches: `training_step` (latents and text embeddings from the cache or the
encoders, noise, timesteps, `add_noise`, target, threshold mitigation, prediction, loss, NaN guard, backward),
`optimizer_step` at the end of each accumulation window, then the step's record (losses, EMA, logs), checkpoint and
epoch callback. How a micro-batch's rows and random draws are seeded lives in `batches.py`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_dream_and_update_latents, compute_snr
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from ..constants import UNET_FOLDER
from ..files import atomic_path, free_bytes
from ..hub.adapters import save_adapter
from ..hub.pipelines import merged_unet
from ..tuners import trainable_parameters
from .batches import (
    STREAM_STEP,
    Prefetcher,
    Shuffler,
    StepDraws,
    TrainingData,
    batch_pixels,
    draw_batch,
    seeded_generator,
)
from .checkpoints import (
    CHECKPOINT_PREFIX,
    TrainState,
    has_state_part,
    list_checkpoints,
    load_checkpoint_adapter,
    read_state_part,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
    write_state_part,
)
from .config import FineTuneConfig
from .mitigation import RandomWordAugmentation, ThresholdMitigation

logger = logging.getLogger(__name__)


def _weight_dtype(accelerator) -> torch.dtype:
    """The dtype of the frozen weights under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision), torch.float32)


def _make_optimizer(params: list, config: FineTuneConfig, lr: float):
    """AdamW (bitsandbytes' 8-bit AdamW with `use_8bit_adam`) over `params`, as diffusers' script."""
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from None
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
               eps=config.adam_epsilon)


def summarize_losses(losses: Sequence[float]) -> dict:
    """First/last/min/mean losses and the mean over the last 10% of steps (numbers only)."""
    if not len(losses):
        return {"steps": 0}
    arr = np.asarray(losses, dtype=np.float64)
    tail = arr[-max(1, len(arr) // 10):]
    return {"steps": len(arr), "first": float(arr[0]), "last": float(arr[-1]), "min": float(arr.min()),
            "mean": float(arr.mean()), "mean_last_10pct": float(tail.mean())}


def check_training_inputs(unet: torch.nn.Module, data: TrainingData, config: FineTuneConfig, adapter_name: str,
                          output_dir: str | None, checkpoints: bool) -> None:
    """Refuse a run that cannot work (ValueError) before the UNet is touched."""
    if checkpoints and not output_dir:
        raise ValueError("Checkpointing and resuming need an output_dir.")
    if getattr(unet, "peft_config", None) and adapter_name in unet.peft_config:
        raise ValueError(f"The UNet already holds an adapter named {adapter_name!r}; train a fresh copy of the base.")
    from_images = data.images is not None or data.latent_std is not None
    if from_images and data.interpolation != config.image_interpolation_mode:
        raise ValueError(f"The data was prepared with interpolation {data.interpolation!r} but the config asks for "
                         f"{config.image_interpolation_mode!r}; pass interpolation=config.image_interpolation_mode to "
                         "prepare_training_data.")
    if config.mitigation == "rwa" and data.tokenizer is None:
        raise ValueError("RWA needs the tokenizer and text encoder in TrainingData (prepare_training_data sets them).")
    if config.mitigation == "rwa" and (data.captions is None or data.text_encoder is None):
        raise ValueError("RWA needs the raw captions and a text encoder in TrainingData.")


def _prepare_output_dir(accelerator: Any, output_dir: str) -> None:
    """Create `output_dir` and remove the temporary folders of a checkpoint save that was killed mid-way."""
    os.makedirs(output_dir, exist_ok=True)
    if accelerator.is_main_process:
        for name in os.listdir(output_dir):
            if name.startswith(f".{CHECKPOINT_PREFIX}") and os.path.isdir(os.path.join(output_dir, name)):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def training_noise_scheduler(noise_scheduler: Any, config: FineTuneConfig) -> Any:
    """DDPM with the model's schedule (the pipeline's may be an inference scheduler) and the config's prediction."""
    noise_scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    if config.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=config.prediction_type)
    return noise_scheduler


def inject_adapter(unet: torch.nn.Module, config: FineTuneConfig, adapter_name: str, weight_dtype: torch.dtype
                   ) -> list[torch.nn.Parameter]:
    """Add the adapter to `unet`; return its tensors in fp32, the frozen rest cast to `weight_dtype` (as diffusers)."""
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # LoRA's random init follows the config's seed, not the global RNG
        torch.manual_seed(config.seed)
        unet.add_adapter(config.adapter_config(), adapter_name=adapter_name)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if weight_dtype != torch.float32:
        for p in unet.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(weight_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return params


@dataclass(frozen=True)
class RunPlan:
    """How a run is cut: per-process batch, micro-batches per epoch, optimizer steps per epoch and in all; the LR."""

    batch: int
    batches_per_epoch: int
    steps_per_epoch: int
    max_steps: int
    learning_rate: float

    @classmethod
    def of(cls, config: FineTuneConfig, num_samples: int, num_processes: int) -> RunPlan:
        """The plan of `config` on `num_samples` samples shared by `num_processes` processes."""
        batch = min(config.train_batch_size, num_samples)
        batches_per_epoch = math.ceil(num_samples / (batch * num_processes))
        steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
        max_steps = config.max_train_steps if config.max_train_steps is not None else \
            config.num_train_epochs * steps_per_epoch
        lr = config.learning_rate
        if config.scale_lr:
            lr = lr * config.gradient_accumulation_steps * config.train_batch_size * num_processes
        return cls(batch, batches_per_epoch, steps_per_epoch, max_steps, lr)


def prepare_optimization(accelerator: Any, unet: torch.nn.Module, params: list, config: FineTuneConfig,
                         plan: RunPlan) -> tuple[Any, Any, Any]:
    """(model, optimizer, LR scheduler) prepared by accelerate; with nothing to train, the model alone (forward)."""
    if not params:  # freeze, or an empty mask in strict scope: prepared so checkpoints still carry the position
        return accelerator.prepare_model(unet, evaluation_mode=True), None, None
    num_processes = accelerator.num_processes
    optimizer = _make_optimizer(params, config, plan.learning_rate)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * num_processes,
                                 num_training_steps=max(1, plan.max_steps) * num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    return model, optimizer, lr_scheduler


def _make_ema(config: FineTuneConfig, params: list, device: Any) -> Any:
    """diffusers' EMAModel of the adapter's tensors when `use_ema` (None otherwise, or when nothing trains)."""
    if not (config.use_ema and params):
        return None
    ema = EMAModel(params, decay=config.ema_decay)
    ema.to(device)
    return ema


def _make_mitigations(config: FineTuneConfig, data: TrainingData) -> tuple[Any, Any]:
    """(threshold mitigation, random word augmentation): the one `config.mitigation` names, the other None."""
    threshold = ThresholdMitigation(config.threshold, config.threshold_quantile) \
        if config.mitigation == "threshold" else None
    rwa = RandomWordAugmentation(data.tokenizer, num_words=config.rwa_num_words, p=config.rwa_prob) \
        if config.mitigation == "rwa" else None
    return threshold, rwa


@dataclass
class _Run:
    """What every step of one run uses: the models, the optimisation, the mitigations and the resumable state."""

    accelerator: Any
    unet: torch.nn.Module
    model: Any  # `unet` as accelerate prepared it
    params: list
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    noise_scheduler: Any
    data: TrainingData
    config: FineTuneConfig
    plan: RunPlan
    threshold: Any
    rwa: Any
    state: TrainState
    output_dir: str | None
    uncond: torch.Tensor  # the empty caption's embedding, on the device


def _setup_run(accelerator: Any, unet: torch.nn.Module, noise_scheduler: Any, data: TrainingData,
               config: FineTuneConfig, adapter_name: str, output_dir: str | None) -> _Run:
    """Inject the adapter and build what the steps use: noise scheduler, optimizer, LR schedule, EMA, mitigations."""
    noise_scheduler = training_noise_scheduler(noise_scheduler, config)
    params = inject_adapter(unet, config, adapter_name, _weight_dtype(accelerator))
    plan = RunPlan.of(config, data.num_samples, accelerator.num_processes)
    model, optimizer, lr_scheduler = prepare_optimization(accelerator, unet, params, config, plan)
    ema = _make_ema(config, params, accelerator.device)
    threshold, rwa = _make_mitigations(config, data)
    return _Run(accelerator=accelerator, unet=unet, model=model, params=params, optimizer=optimizer,
                lr_scheduler=lr_scheduler, ema=ema, noise_scheduler=noise_scheduler, data=data, config=config,
                plan=plan, threshold=threshold, rwa=rwa, state=TrainState(threshold), output_dir=output_dir,
                uncond=data.uncond_embeds.to(accelerator.device))


def _pixel_prefetcher(run: _Run, shuffler: Shuffler, total_micro: int, num_workers: int) -> Prefetcher:
    """The transformed images of each micro-batch, prefetched by `num_workers` threads (None: latents are cached)."""
    data, config, accelerator = run.data, run.config, run.accelerator

    def pixels_of(micro: int) -> torch.Tensor | None:
        if data.cached_latents:
            return None
        return batch_pixels(data, config, shuffler.indices(micro), micro,
                            (accelerator.process_index, accelerator.num_processes))

    return Prefetcher(pixels_of, total_micro, num_workers if not data.cached_latents else 0)


def _kept_by_threshold(run: _Run, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
                       ) -> tuple[torch.Tensor, int]:
    """The samples the threshold mitigation keeps on this process, and how many it keeps over all processes."""
    accelerator = run.accelerator
    with accelerator.autocast():
        kept = run.threshold.filter(accelerator.unwrap_model(run.model), noisy_latents, timesteps, cond, run.uncond)
    total_kept = len(kept)
    if accelerator.num_processes > 1:
        total_kept = int(accelerator.reduce(torch.tensor([len(kept)], device=accelerator.device), "sum").item())
    return kept, total_kept


def _check_finite(run: _Run, loss: torch.Tensor, micro: int) -> None:
    """The NaN guard: a NaN/inf loss on any process raises FloatingPointError naming the step and last checkpoint."""
    accelerator = run.accelerator
    check = accelerator.gather(loss.detach().reshape(1)) if accelerator.num_processes > 1 else loss.detach()
    if not torch.isfinite(check).all():
        last = list_checkpoints(run.output_dir)[-1] if run.output_dir and list_checkpoints(run.output_dir) else None
        raise FloatingPointError(
            f"Loss is {loss.item()} at step {run.state.global_step + 1} (micro-batch {micro + 1}); "
            f"training stopped and no adapter was written. Last good checkpoint: "
            f"{last or 'none'}. Lower the learning rate or use fp32/bf16.")


def training_step(run: _Run, micro: int, idx: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor | None:
    """One micro-batch, as diffusers' loop reads: latents and text embeddings, noise, timesteps, `add_noise`, target,
    (the threshold mitigation), prediction, loss (min-SNR weighted, DREAM), NaN guard, backward.

    Every random draw comes from the micro-batch's own generator in a fixed order, so a resumed run, a cached run and a
    run on K processes draw the same. Returns the loss, or None when the threshold mitigation dropped the whole
    micro-batch on every process.
    """
    accelerator, config, noise_scheduler = run.accelerator, run.config, run.noise_scheduler
    draws = StepDraws(seeded_generator(config.seed, STREAM_STEP, micro, 0), len(idx),
                      (accelerator.process_index, accelerator.num_processes))
    latents, cond, augmented = draw_batch(run.data, idx, config, draws, pixels, run.rwa)
    run.state.augmented_captions += augmented
    noise = draws.randn(*latents.shape[1:])
    if config.noise_offset:
        noise = noise + config.noise_offset * draws.randn(latents.shape[1], 1, 1)
    timesteps = draws.randint(noise_scheduler.config.num_train_timesteps)
    input_noise = noise
    if config.input_perturbation:  # drawn last, so runs without it draw exactly what they drew before
        input_noise = noise + config.input_perturbation * draws.randn(*noise.shape[1:])
    latents, cond, noise, input_noise, timesteps = (x.to(accelerator.device)
                                                    for x in (latents, cond, noise, input_noise, timesteps))
    noisy_latents = noise_scheduler.add_noise(latents, input_noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type!r}.")

    kept = None
    if run.threshold is not None:
        kept, total_kept = _kept_by_threshold(run, noisy_latents, timesteps, cond)
        if total_kept == 0:
            run.state.skipped_micro_batches += 1
            return None
        if len(kept):  # a process that dropped everything while others did not keeps all rows, at weight 0 (DDP sync)
            noisy_latents, timesteps, cond, target, noise = (x[kept] for x in (noisy_latents, timesteps, cond,
                                                                                target, noise))
    with accelerator.autocast():  # prepare() already autocasts a trained model; freeze is not prepared
        if config.dream_training:
            noisy_latents, target = compute_dream_and_update_latents(
                run.model, noise_scheduler, timesteps, noise, noisy_latents, target, cond,
                config.dream_detail_preservation)
        model_pred = run.model(noisy_latents, timesteps, encoder_hidden_states=cond, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        loss = loss.mean(dim=list(range(1, model_pred.ndim)))
        if config.snr_gamma is not None:
            snr = compute_snr(noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=config.snr_gamma)
            weights = weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
            loss = loss * weights
        loss = loss.mean()
    if kept is not None and len(kept) == 0:
        loss = loss * 0.0
    _check_finite(run, loss, micro)
    if loss.requires_grad:
        accelerator.backward(loss)
    return loss


def optimizer_step(run: _Run, has_grad: bool) -> None:
    """Clip, step the optimizer and the LR schedule, zero the gradients; without gradients only the schedule steps."""
    if has_grad:
        run.accelerator.clip_grad_norm_(run.params, run.config.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
    else:  # a skipped step: no update, but the schedule stays aligned with the step count
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
            run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def _record_step(run: _Run, window_losses: list[float], has_grad: bool) -> None:
    """Count a finished optimizer step: its mean loss (or a skipped step), the EMA update, the tracker logs."""
    state = run.state
    state.global_step += 1
    if window_losses:
        state.losses.append(float(np.mean(window_losses)))
    else:
        state.skipped_steps += 1
    if run.ema is not None and has_grad:
        run.ema.step(run.params)
    logs = {"train_loss": state.losses[-1] if window_losses else float("nan")}
    if run.lr_scheduler is not None:
        logs["lr"] = run.lr_scheduler.get_last_lr()[0]
    if run.threshold is not None:
        logs["dropped_fraction"] = run.threshold.stats()["dropped_fraction"]
        logs["skipped_steps"] = state.skipped_steps
    if run.accelerator.trackers:
        run.accelerator.log(logs, step=state.global_step)


def _rng_state() -> dict:
    """The RNG states of this process (Python, NumPy, torch CPU and CUDA)."""
    import random

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    """Inverse of `_rng_state`."""
    import random

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state_parts(run: _Run) -> dict[str, Any]:
    """The objects with a state_dict that a checkpoint holds, by part name."""
    parts = {"train_state": run.state, "optimizer": run.optimizer, "lr_scheduler": run.lr_scheduler,
             "ema": run.ema, "scaler": getattr(run.accelerator, "scaler", None)}
    return {name: obj for name, obj in parts.items() if obj is not None}


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def checkpoint_bytes(run: _Run) -> int:
    """About the bytes one checkpoint of `run` takes: the adapter (twice for a full fine-tune: also `unet/` in
    diffusers' format), then every state part (optimizer, EMA, ...)."""
    adapter = _tensor_bytes([p.detach() for p in run.params])
    return adapter * (1 + (run.config.peft_method == "full")) + sum(
        _tensor_bytes(obj.state_dict()) for obj in _state_parts(run).values()) + 2**16


def planned_output_bytes(run: _Run, checkpointing_steps: int | None, total_limit: int | None) -> tuple[int, int]:
    """(bytes a run writes at its peak, checkpoints kept at once): the checkpoints still to save, at most
    `total_limit` + 1 at a time (the oldest goes once the new one is in place), plus the final adapter. Before
    the first step the optimizer holds no state yet: Adam's two moments per trained value are counted instead."""
    adapter = _tensor_bytes([p.detach() for p in run.params])
    per_checkpoint = adapter * (3 + (run.ema is not None) + (run.config.peft_method == "full")) + 2**16
    remaining = (run.plan.max_steps // checkpointing_steps - run.state.global_step // checkpointing_steps
                 if checkpointing_steps else 0)
    kept = min(remaining, total_limit + 1) if total_limit else remaining
    return per_checkpoint * kept + adapter + 2**16, kept


def _warn_when_disk_is_short(run: _Run, checkpointing_steps: int | None, total_limit: int | None) -> None:
    """Warn at the start of a run when its output folder's disk has less free space than the run will write."""
    needed, kept = planned_output_bytes(run, checkpointing_steps, total_limit)
    free = free_bytes(run.output_dir)
    if free < needed:
        logger.warning("%s has %s bytes free, and this run writes about %s bytes there (%d checkpoint(s) at once and "
                       "the final adapter): it will stop with an error when the disk is full. Free some space, lower "
                       "--checkpoints_total_limit or pick another --output_dir.", run.output_dir, f"{free:,}",
                       f"{needed:,}", kept)


def write_training_state(run: _Run, folder: str, adapter_name: str) -> None:
    """Write the whole resumable state into `folder`: the adapter (peft format), then each part as JSON +
    safetensors (no pickle): optimizer, LR schedule, EMA, gradient scaler, RNG states and the TrainState. A `full`
    fine-tune's checkpoint also holds `unet/` in diffusers' format (UNet2DConditionModel.from_pretrained loads it)."""
    save_adapter(run.unet, folder, adapter_name)
    if run.config.peft_method == "full":
        merged_unet(run.unet, adapter_name).save_pretrained(os.path.join(folder, UNET_FOLDER), safe_serialization=True)
    for name, obj in _state_parts(run).items():
        write_state_part(folder, name, obj.state_dict())
    write_state_part(folder, "rng", _rng_state())


def _resume(run: _Run, resume_from_checkpoint: str | None, adapter_name: str) -> str | None:
    """Load the checkpoint `resume_from_checkpoint` names ("latest" or a folder), if any; return its folder.

    Every file is checked against the checkpoint's manifest before anything is loaded; nothing is unpickled."""
    resumed_from = resolve_checkpoint(run.output_dir, resume_from_checkpoint)
    if resumed_from is not None:
        manifest = verify_checkpoint(resumed_from)
        parts = _state_parts(run)
        missing = [name for name in parts if not has_state_part(manifest, name)]
        if missing:
            raise ValueError(f"Checkpoint {resumed_from!r} has no {missing} state: it was written by a run with other "
                             "settings (optimizer, EMA, mixed precision); resume with the same settings.")
        states = {name: read_state_part(resumed_from, name, manifest) for name in parts}
        rng = read_state_part(resumed_from, "rng", manifest) if has_state_part(manifest, "rng") else None
        load_checkpoint_adapter(run.unet, resumed_from, adapter_name, manifest)
        for name, obj in parts.items():
            obj.load_state_dict(states[name])
        if rng is not None and run.accelerator.is_main_process:
            _set_rng_state(rng)
        if run.ema is not None:
            run.ema.to(run.accelerator.device)
    run.accelerator.step = run.state.micro_step
    return resumed_from


def _finish(run: _Run) -> None:
    """Leave the final adapter in the UNet (EMA weights when `use_ema`), unwrapped, in eval mode."""
    if run.ema is not None:
        run.ema.copy_to(run.params)
    if _weight_dtype(run.accelerator) != torch.float32:
        run.accelerator.unwrap_model(run.model, keep_fp32_wrapper=False)  # drop the autocast wrapper of prepare()
    if run.config.gradient_checkpointing:
        run.unet.disable_gradient_checkpointing()
    run.unet.eval()


def _run_log(run: _Run, resumed_from: str | None, steps_run: int, train_time: float, started: float) -> dict:
    """The log `train` returns (numbers only)."""
    state, plan, data = run.state, run.plan, run.data
    result = {
        "losses": list(state.losses),
        "loss_summary": summarize_losses(state.losses),
        "final_loss": float(np.mean(state.losses[-50:])) if state.losses else math.nan,
        "trainable_params": trainable_parameters(run.unet),
        "global_step": state.global_step,
        "max_train_steps": plan.max_steps,
        "num_train_epochs": math.ceil(plan.max_steps / plan.steps_per_epoch) if plan.steps_per_epoch else 0,
        "steps_per_epoch": plan.steps_per_epoch,
        "learning_rate": plan.learning_rate,
        "skipped_steps": state.skipped_steps,
        "skipped_micro_batches": state.skipped_micro_batches,
        "resumed_from": os.path.basename(resumed_from) if resumed_from else None,
        "train_time_s": round(train_time, 3),
        "steps_per_second": round(steps_run / train_time, 3) if train_time > 0 and steps_run else None,
        "wall_time_s": round(time.time() - started, 3),
        "latents": data.stats.get("latents", "cached"),
        "text": data.stats.get("text", "cached"),
    }
    if run.threshold is not None:
        result["threshold"] = run.threshold.stats()
    if run.rwa is not None:
        result["rwa_augmented_captions"] = state.augmented_captions
    return result


def _micro_steps_to_run(run: _Run, resumed_from: str | None) -> int:
    """Where the loop stops: `max_steps` optimizer steps; resumed at or past them, one step more, as diffusers' loop
    (it checks --max_train_steps only after a step), with a warning line instead of a silent exit."""
    per_step = run.config.gradient_accumulation_steps
    total = run.plan.max_steps * per_step
    if resumed_from is not None and run.state.micro_step >= total:
        logger.warning("Resumed from %s at step %d, at or past --max_train_steps %d: training one more step "
                       "(as diffusers' train_text_to_image.py does); raise --max_train_steps to train longer.",
                       os.path.basename(resumed_from), run.state.global_step, run.plan.max_steps)
        total = run.state.micro_step + per_step
    return total


def train(unet: torch.nn.Module, noise_scheduler: Any, data: TrainingData, config: FineTuneConfig, *,
          accelerator: Any = None, adapter_name: str = "default",
          output_dir: str | None = None, checkpointing_steps: int | None = None,
          checkpoints_total_limit: int | None = None, resume_from_checkpoint: str | None = None,
          progress: bool = True, on_epoch_end: Callable[[int, int], None] | None = None,
          num_workers: int = 0) -> dict:
    """Inject the adapter of `config` into `unet` and train it on `data`; return the run's log (numbers only).

    `on_epoch_end(epoch, global_step)` is called after the optimizer step that completes each epoch (validation).
    `num_workers` threads decode and transform the next micro-batches' images while one trains (uncached latents).

    Only the adapter's tensors train (fp32 master copies; the frozen UNet is cast to the mixed-precision dtype).
    Checkpoints (adapter, optimizer, scheduler, EMA, RNG and data position, as safetensors + JSON with a manifest of
    digests) go to `output_dir/checkpoint-<step>` every `checkpointing_steps`; `resume_from_checkpoint` ("latest": the
    newest complete one, or a folder) continues one exactly. A NaN/inf loss raises FloatingPointError naming the step (checkpoints stay as they were).
    The final adapter is left in `unet` (EMA weights when `use_ema`); write it with `save_adapter`.
    """
    started = time.time()
    if accelerator is None:
        accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    check_training_inputs(unet, data, config, adapter_name, output_dir,
                          bool(checkpointing_steps or resume_from_checkpoint))
    if output_dir:
        _prepare_output_dir(accelerator, output_dir)
    run = _setup_run(accelerator, unet, noise_scheduler, data, config, adapter_name, output_dir)
    state, plan, model, optimizer = run.state, run.plan, run.model, run.optimizer

    pixels: Prefetcher | None = None
    try:
        resumed_from = _resume(run, resume_from_checkpoint, adapter_name)
        if output_dir and accelerator.is_main_process:
            _warn_when_disk_is_short(run, checkpointing_steps, checkpoints_total_limit)
        total_micro = _micro_steps_to_run(run, resumed_from)
        bar = tqdm(total=plan.max_steps, initial=state.global_step, desc=f"train {config.peft_method}",
                   disable=not progress or not accelerator.is_local_main_process)
        shuffler = Shuffler(config.seed, data.num_samples, plan.batch, plan.batches_per_epoch,
                            accelerator.num_processes, accelerator.process_index)
        pixels = _pixel_prefetcher(run, shuffler, total_micro, num_workers)
        window_losses: list[float] = []
        window_has_grad = False
        step_started, first_step = time.time(), state.global_step
        epochs_done = state.micro_step // plan.batches_per_epoch
        for micro in range(state.micro_step, total_micro):
            with accelerator.accumulate(model) if optimizer is not None else contextlib.nullcontext():
                loss = training_step(run, micro, shuffler.indices(micro), pixels.get(micro))
                if loss is not None:
                    window_losses.append(float(loss.detach().item()))
                    window_has_grad |= loss.requires_grad
                sync = (micro + 1) % config.gradient_accumulation_steps == 0
                if sync and optimizer is not None:
                    optimizer_step(run, window_has_grad)
            state.micro_step = micro + 1
            if not sync:
                continue
            _record_step(run, window_losses, window_has_grad)
            window_losses, window_has_grad = [], False
            bar.update(1)
            if state.global_step % 20 == 0 and state.losses:
                bar.set_postfix(loss=f"{np.mean(state.losses[-20:]):.4f}")
            if checkpointing_steps and state.global_step % checkpointing_steps == 0:
                if accelerator.is_main_process:
                    save_checkpoint(output_dir, state.global_step, checkpoints_total_limit,
                                    lambda folder: write_training_state(run, folder, adapter_name),
                                    needed=checkpoint_bytes(run))
                accelerator.wait_for_everyone()
            if on_epoch_end is not None and state.micro_step // plan.batches_per_epoch > epochs_done:
                epochs_done = state.micro_step // plan.batches_per_epoch
                on_epoch_end(epochs_done, state.global_step)
        bar.close()
        steps_run, train_time = state.global_step - first_step, time.time() - step_started
    finally:
        if pixels is not None:
            pixels.close()
    _finish(run)
    return _run_log(run, resumed_from, steps_run, train_time, started)


def generate_validation_grid(pipe: Any, prompts: Sequence[str], num_images_per_prompt: int = 4, seed: int = 0,
                             num_inference_steps: int = 20, guidance_scale: float = 4.0, output_path: str | None = None,
                             progress: bool = True) -> Any:
    """Generate `num_images_per_prompt` images per prompt (seeded) and return them as one grid (rows = prompts).

    Written atomically to `output_path` (PNG) when given. Runs under autocast when the UNet's frozen weights are
    half precision.
    """
    device = pipe.unet.device
    dtype = next((p.dtype for p in pipe.unet.parameters() if not p.requires_grad), torch.float32)
    pipe.set_progress_bar_config(disable=not progress)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        images = pipe(list(prompts), num_images_per_prompt=num_images_per_prompt,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=torch.Generator(device="cpu").manual_seed(seed), output_type="pil").images
    grid = make_image_grid(images, rows=len(prompts), cols=num_images_per_prompt)
    if output_path is not None:
        with atomic_path(output_path, suffix=".png") as tmp:
            grid.save(tmp, format="PNG")
    return grid


def log_validation(pipe: Any, accelerator: Any, prompts: Sequence[str], num_images_per_prompt: int, seed: int,
                   output_path: str, step: int, progress: bool = True) -> None:
    """Write the validation grid (`generate_validation_grid`) to `output_path` and log it to tensorboard at `step`."""
    grid = generate_validation_grid(pipe, prompts, num_images_per_prompt, seed=seed, output_path=output_path,
                                    progress=progress)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
