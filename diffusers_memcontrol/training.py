"""The fine-tuning loop as a library function, shared by the trainer (`diffusers_memcontrol.train`) and search trials.

A search trial (or the script) does, in this order::

    data = prepare_training_data(pipe, dataset, "image", "text", cache_dir=...)   # once per dataset and worker
    unet = copy.deepcopy(base_unet)                                                # a UNet without adapter
    result = train(unet, pipe.scheduler, data, FineTuneConfig(peft_method="svdiff", mask=mask.to_dict()),
                   accelerator=accelerator, output_dir=..., checkpointing_steps=...)
    save_adapter(unet, output_dir)

The VAE and the text encoder are frozen, so `prepare_training_data` encodes each distinct image once into its latent
*distribution* (mean and std; the loop samples from it at every step, as diffusers does when it encodes on the fly)
and each distinct caption once into its embedding, through the content-addressed disk cache of `cache.py`. It falls
back to encoding on the fly where a cache would be wrong: random crops of non-square images, and captions changed by
random word augmentation (RWA) at a step. `--random_flip` stays cached: both orientations are cached.

Every random draw of a step comes from a generator seeded by (seed, step, process), and the data order of an epoch
from (seed, epoch), so a run resumed from a checkpoint continues exactly where the interrupted run was.

"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapters import save_adapter
from .checkpoints import (
    CHECKPOINT_PREFIX,
    TrainState,
    list_checkpoints,
    load_checkpoint_adapter,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import FineTuneConfig
from .files import atomic_path
from .images import transform_image
from .masks import Mask, trainable_parameters
from .training_data import (
    TrainingData,
    _encode_prompts_on_device,
    encode_latent_distribution,
)


def _seed_from(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, stream, step, process, ...)."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint64)[0] % 2**63)


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_from(*parts))


_STREAM_STEP, _STREAM_EPOCH, _STREAM_CROP = 0, 1, 2


def _weight_dtype(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision), torch.float32)


def _make_optimizer(params: list, config: FineTuneConfig, lr: float):
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


class _Batch:
    """One micro-batch on the device, plus bookkeeping."""

    def __init__(self, noisy, timesteps, cond, target, augmented, noise):
        self.noisy, self.timesteps, self.cond, self.target, self.augmented = noisy, timesteps, cond, target, augmented
        self.noise = noise


def _conditioning(data: TrainingData, idx: torch.Tensor, drop: torch.Tensor, rwa, rwa_seed: int | None
                  ) -> tuple[torch.Tensor, int]:
    """Per-sample text embeddings (CPU float): cached where the caption is unchanged, encoded where RWA changed it."""
    n = len(idx)
    captions = [data.captions[int(i)] for i in idx] if data.captions is not None else None
    changed = [False] * n
    if rwa is not None:
        augmented = rwa.apply_batch(captions, np.random.default_rng(rwa_seed))
        changed = [a != c for a, c in zip(augmented, captions)]
        captions = augmented
    if data.cached_text:
        cond = data.prompt_embeds[data.caption_rows[idx]].float().clone()
    else:
        cond = data.uncond_embeds.float().unsqueeze(0).repeat(n, 1, 1)
    need = [j for j in range(n) if not drop[j] and (changed[j] or not data.cached_text)]
    if need:
        encoded = _encode_prompts_on_device(data.tokenizer, data.text_encoder, [captions[j] for j in need])
        cond[need] = encoded.float().cpu()
    if drop.any():
        cond[drop] = data.uncond_embeds.float().to(cond.dtype)
    return cond, sum(1 for j in range(n) if changed[j] and not drop[j])


def _pixels(data: TrainingData, config: FineTuneConfig, idx: torch.Tensor, micro: int, shard: tuple[int, int]
            ) -> torch.Tensor:
    """The transformed images of one micro-batch, with the flips and crops its seeds draw (encoding on the fly)."""
    n = len(idx)
    process_index, num_processes = shard
    gen = _generator(config.seed, _STREAM_STEP, micro, 0)  # flips: the first draws of the step's generator
    rows = slice(process_index * n, (process_index + 1) * n)
    flips = (torch.rand(n * num_processes, generator=gen)[rows] < 0.5 if config.random_flip
             else torch.zeros(n, dtype=torch.bool))
    crop_gen = _generator(config.seed, _STREAM_CROP, micro, process_index)
    return torch.stack([transform_image(data.images(int(i)), data.resolution, data.center_crop, bool(f), crop_gen,
                                        data.interpolation) for i, f in zip(idx, flips)])


class _Prefetcher:
    """`produce(key)` for the keys `first, first + 1, ...` in order, computed up to 2 x `num_workers` keys ahead by
    threads (num_workers 0: computed when asked)."""

    def __init__(self, produce: Callable[[int], Any], stop: int, num_workers: int):
        from concurrent.futures import ThreadPoolExecutor

        self.produce, self.stop, self.futures = produce, stop, {}
        self.pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self.ahead = 2 * num_workers

    def get(self, key: int) -> Any:
        """The value of `key`, queueing the keys that follow it."""
        if self.pool is None:
            return self.produce(key)
        for upcoming in range(key, min(key + self.ahead + 1, self.stop)):
            if upcoming not in self.futures:
                self.futures[upcoming] = self.pool.submit(self.produce, upcoming)
        return self.futures.pop(key).result()

    def close(self) -> None:
        """Stop the threads (queued work is dropped)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _micro_batch(data: TrainingData, idx: torch.Tensor, config: FineTuneConfig, noise_scheduler, gen: torch.Generator,
                 pixels: torch.Tensor | None, rwa, device, shard: tuple[int, int] = (0, 1)) -> _Batch:
    """Draw everything random of one micro-batch from `gen` in a fixed order, so cached and on-the-fly runs agree.

    `pixels`: the micro-batch's transformed images (`_pixels`) when latents are encoded on the fly. `shard`
    (process_index, num_processes): every process draws for the whole global micro-batch and keeps its own rows, so K
    processes with batch B train on the draws of one process with batch K x B."""
    n = len(idx)
    process_index, num_processes = shard
    mine = slice(process_index * n, (process_index + 1) * n)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(n * num_processes, *shape, generator=gen)[mine]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(n * num_processes, *shape, generator=gen)[mine]

    flips = rand() < 0.5 if config.random_flip else torch.zeros(n, dtype=torch.bool)
    drop = rand() < config.caption_dropout
    rwa_seed = int(torch.randint(0, 2**62, (1,), generator=gen)) if rwa is not None else None
    if data.cached_latents:
        if config.random_flip and not data.has_flip_variants:
            raise ValueError("random_flip needs flipped latents: prepare the data with random_flip=True.")
        rows = data.latent_rows[idx, flips.long()] if data.has_flip_variants else data.latent_rows[idx, 0]
        mean = data.latent_mean[rows].float()
        std = data.latent_std[rows].float() if data.latent_std is not None else None
    else:
        mean, std = encode_latent_distribution(data.vae, pixels)
    x0 = mean + std * randn(*mean.shape[1:]) if std is not None else mean
    cond, augmented = _conditioning(data, idx, drop, rwa, rwa_seed)
    noise = randn(*x0.shape[1:])
    if config.noise_offset:
        noise = noise + config.noise_offset * randn(x0.shape[1], 1, 1)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n * num_processes,),
                              generator=gen)[mine]
    input_noise = noise
    if config.input_perturbation:  # drawn last, so runs without it draw exactly what they drew before
        input_noise = noise + config.input_perturbation * randn(*noise.shape[1:])
    x0, noise, timesteps = x0.to(device), noise.to(device), timesteps.to(device)
    noisy = noise_scheduler.add_noise(x0, input_noise.to(device), timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type!r}.")
    return _Batch(noisy, timesteps, cond.to(device), target, augmented, noise)


def _batch_loss(model, batch: _Batch, noise_scheduler, config: FineTuneConfig,
                keep: torch.Tensor | None = None) -> torch.Tensor:
    """MSE (min-SNR weighted when snr_gamma; DREAM-corrected when dream_training) over the kept samples."""
    noisy, t, cond, target, noise = batch.noisy, batch.timesteps, batch.cond, batch.target, batch.noise
    if keep is not None:
        noisy, t, cond, target, noise = noisy[keep], t[keep], cond[keep], target[keep], noise[keep]
    if config.dream_training:
        from diffusers.training_utils import compute_dream_and_update_latents

        noisy, target = compute_dream_and_update_latents(model, noise_scheduler, t, noise, noisy, target, cond,
                                                         config.dream_detail_preservation)
    pred = model(noisy, t, encoder_hidden_states=cond, return_dict=False)[0]
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    if config.snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, t)
        weights = torch.clamp(snr, max=config.snr_gamma)
        weights = weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
        per_sample = per_sample * weights
    return per_sample.mean()


def train(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    data: TrainingData,
    config: FineTuneConfig,
    *,
    accelerator: Any = None,
    mask: Mask | None = None,
    adapter_name: str = "default",
    output_dir: str | None = None,
    checkpointing_steps: int | None = None,
    checkpoints_total_limit: int | None = None,
    resume_from_checkpoint: str | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, int], None] | None = None,
    num_workers: int = 0,
) -> dict:
    """Inject the adapter of `config` into `unet` and train it on `data`; return the run's log (numbers only).

    `on_epoch_end(epoch, global_step)` is called after the optimizer step that completes each epoch (validation).
    `num_workers` threads decode and transform the next micro-batches' images while one trains (uncached latents).

    Only the adapter's tensors train (fp32 master copies; the frozen UNet is cast to the mixed-precision dtype).
    Checkpoints (`accelerator.save_state`: adapter, optimizer, scheduler, EMA, RNG and data position) go to
    `output_dir/checkpoint-<step>` every `checkpointing_steps`; `resume_from_checkpoint` ("latest" or a folder)
    continues one exactly. A NaN/inf loss raises FloatingPointError naming the step (checkpoints stay as they were).
    The final adapter is left in `unet` (EMA weights when `use_ema`); write it with `save_adapter`.
    """
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from .mitigation import RandomWordAugmentation, ThresholdMitigation

    started = time.time()
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    if (checkpointing_steps or resume_from_checkpoint) and not output_dir:
        raise ValueError("Checkpointing and resuming need an output_dir.")
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        if accelerator.is_main_process:  # temporary folders of a save that was killed mid-way
            for name in os.listdir(output_dir):
                if name.startswith(f".{CHECKPOINT_PREFIX}") and os.path.isdir(os.path.join(output_dir, name)):
                    shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if getattr(unet, "peft_config", None) and adapter_name in unet.peft_config:
        raise ValueError(f"The UNet already holds an adapter named {adapter_name!r}; train a fresh copy of the base.")
    if (data.images is not None or data.latent_std is not None) and data.interpolation != config.image_interpolation_mode:
        raise ValueError(f"The data was prepared with interpolation {data.interpolation!r} but the config asks for "
                         f"{config.image_interpolation_mode!r}; pass interpolation=config.image_interpolation_mode to "
                         "prepare_training_data.")
    if config.mitigation == "rwa" and data.tokenizer is None:
        raise ValueError("RWA needs the tokenizer and text encoder in TrainingData (prepare_training_data sets them).")
    if config.mitigation == "rwa" and (data.captions is None or data.text_encoder is None):
        raise ValueError("RWA needs the raw captions and a text encoder in TrainingData.")

    # the training noise scheduler: DDPM with the model's schedule (the pipeline's may be an inference scheduler)
    noise_scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    if config.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=config.prediction_type)

    # adapter; trainable tensors in fp32, the frozen rest in the mixed-precision dtype (as diffusers does)
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # LoRA's random init follows the config's seed, not the global RNG
        torch.manual_seed(config.seed)
        unet.add_adapter(config.adapter_config(mask), adapter_name=adapter_name)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    weight_dtype = _weight_dtype(accelerator)
    if weight_dtype != torch.float32:
        for p in unet.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(weight_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    num_processes, process_index = accelerator.num_processes, accelerator.process_index
    batch = min(config.train_batch_size, data.num_samples)
    batches_per_epoch = math.ceil(data.num_samples / (batch * num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps if config.max_train_steps is not None else \
        config.num_train_epochs * steps_per_epoch
    lr = config.learning_rate
    if config.scale_lr:
        lr = lr * config.gradient_accumulation_steps * config.train_batch_size * num_processes

    optimizer = lr_scheduler = None
    if params:
        optimizer = _make_optimizer(params, config, lr)
        lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                     num_warmup_steps=config.lr_warmup_steps * num_processes,
                                     num_training_steps=max(1, max_steps) * num_processes)
        model, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    else:  # nothing trains (freeze, or an empty mask in strict scope): forward only
        # registered all the same, so checkpoints still carry the (empty) adapter and the position
        model = accelerator.prepare_model(unet, evaluation_mode=True)
    ema = None
    if config.use_ema and params:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=config.ema_decay)
        ema.to(accelerator.device)
    mitigation = ThresholdMitigation(config.threshold, config.threshold_quantile) \
        if config.mitigation == "threshold" else None
    rwa = RandomWordAugmentation(data.tokenizer, num_words=config.rwa_num_words, p=config.rwa_prob) \
        if config.mitigation == "rwa" else None
    state = TrainState(mitigation)

    def save_hook(models, weights, folder):
        for i in reversed(range(len(models))):
            if accelerator.unwrap_model(models[i]) is unet:
                if accelerator.is_main_process:
                    save_adapter(unet, folder, adapter_name)
                if i < len(weights):
                    weights.pop(i)

    def load_hook(models, folder):
        for i in reversed(range(len(models))):
            if accelerator.unwrap_model(models[i]) is unet:
                load_checkpoint_adapter(unet, folder, adapter_name)
                models.pop(i)

    handles = [accelerator.register_save_state_pre_hook(save_hook),
               accelerator.register_load_state_pre_hook(load_hook)]
    accelerator.register_for_checkpointing(state, *([ema] if ema is not None else []))

    pixels: _Prefetcher | None = None
    try:
        resumed_from = resolve_checkpoint(output_dir, resume_from_checkpoint)
        if resumed_from is not None:
            accelerator.load_state(resumed_from)
            if ema is not None:
                ema.to(accelerator.device)
        accelerator.step = state.micro_step
        total_micro = max_steps * config.gradient_accumulation_steps
        bar = tqdm(total=max_steps, initial=state.global_step, desc=f"train {config.peft_method}",
                   disable=not progress or not accelerator.is_local_main_process)
        permutations: dict[int, torch.Tensor] = {}
        window_losses: list[float] = []
        window_has_grad = False
        uncond = data.uncond_embeds.to(accelerator.device)
        device = accelerator.device
        step_started = time.time()
        first_step = state.global_step
        epochs_done = state.micro_step // batches_per_epoch
        def indices(micro: int) -> torch.Tensor:
            epoch, k = divmod(micro, batches_per_epoch)
            if epoch not in permutations:
                permutations.clear()
                permutations[epoch] = torch.randperm(data.num_samples, generator=_generator(
                    config.seed, _STREAM_EPOCH, epoch))
            perm = permutations[epoch]
            if num_processes == 1:
                return perm[k * batch:(k + 1) * batch]
            # every process gets a full batch (the last one wraps around), as accelerate's even_batches
            return perm[(k * batch * num_processes + process_index * batch + torch.arange(batch)) % data.num_samples]

        def pixels_of(micro: int) -> torch.Tensor | None:
            return None if data.cached_latents else _pixels(data, config, indices(micro), micro,
                                                            (process_index, num_processes))

        pixels = _Prefetcher(pixels_of, total_micro, num_workers if not data.cached_latents else 0)
        for micro in range(state.micro_step, total_micro):
            idx = indices(micro)
            gen = _generator(config.seed, _STREAM_STEP, micro, 0)  # the global micro-batch's draws (`_micro_batch`)
            context = accelerator.accumulate(model) if optimizer is not None else contextlib.nullcontext()
            with context:
                b = _micro_batch(data, idx, config, noise_scheduler, gen, pixels.get(micro), rwa, device,
                                 (process_index, num_processes))
                state.augmented_captions += b.augmented
                keep = None
                skip = False
                if mitigation is not None:
                    with accelerator.autocast():
                        kept = mitigation.filter(accelerator.unwrap_model(model), b.noisy, b.timesteps, b.cond,
                                                 uncond)
                    total_kept = len(kept)
                    if num_processes > 1:
                        total_kept = int(accelerator.reduce(torch.tensor([len(kept)], device=device), "sum").item())
                    skip = total_kept == 0
                    keep = kept if len(kept) else torch.arange(len(idx), device=device)
                if skip:
                    state.skipped_micro_batches += 1
                else:
                    with accelerator.autocast():  # prepare() already autocasts a trained model; freeze is not prepared
                        loss = _batch_loss(model, b, noise_scheduler, config, keep)
                    if mitigation is not None and keep is not None and len(kept) == 0:
                        loss = loss * 0.0  # this process dropped everything but others did not (DDP sync)
                    check = accelerator.gather(loss.detach().reshape(1)) if num_processes > 1 else loss.detach()
                    if not torch.isfinite(check).all():
                        last = list_checkpoints(output_dir)[-1] if output_dir and list_checkpoints(output_dir) \
                            else None
                        raise FloatingPointError(
                            f"Loss is {loss.item()} at step {state.global_step + 1} (micro-batch {micro + 1}); "
                            f"training stopped and no adapter was written. Last good checkpoint: "
                            f"{last or 'none'}. Lower the learning rate or use fp32/bf16.")
                    window_losses.append(float(loss.detach().item()))
                    if loss.requires_grad:
                        accelerator.backward(loss)
                        window_has_grad = True
                sync = (micro + 1) % config.gradient_accumulation_steps == 0
                if sync and optimizer is not None:
                    if window_has_grad:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                    else:  # a skipped step: no update, but the schedule stays aligned with the step count
                        with warnings.catch_warnings():
                            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
                            lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            state.micro_step = micro + 1
            if not sync:
                continue
            state.global_step += 1
            if window_losses:
                state.losses.append(float(np.mean(window_losses)))
            else:
                state.skipped_steps += 1
            if ema is not None and window_has_grad:
                ema.step(params)
            logs = {"train_loss": state.losses[-1] if window_losses else float("nan")}
            if lr_scheduler is not None:
                logs["lr"] = lr_scheduler.get_last_lr()[0]
            if mitigation is not None:
                logs["dropped_fraction"] = mitigation.stats()["dropped_fraction"]
                logs["skipped_steps"] = state.skipped_steps
            if accelerator.trackers:
                accelerator.log(logs, step=state.global_step)
            window_losses, window_has_grad = [], False
            bar.update(1)
            if state.global_step % 20 == 0 and state.losses:
                bar.set_postfix(loss=f"{np.mean(state.losses[-20:]):.4f}")
            if checkpointing_steps and state.global_step % checkpointing_steps == 0:
                if accelerator.is_main_process:
                    save_checkpoint(accelerator, output_dir, state.global_step, checkpoints_total_limit)
                accelerator.wait_for_everyone()
            if on_epoch_end is not None and state.micro_step // batches_per_epoch > epochs_done:
                epochs_done = state.micro_step // batches_per_epoch
                on_epoch_end(epochs_done, state.global_step)
        bar.close()
        steps_run = state.global_step - first_step
        train_time = time.time() - step_started
    finally:
        if pixels is not None:
            pixels.close()
        for h in handles:
            h.remove()
    if ema is not None:
        ema.copy_to(params)
    if weight_dtype != torch.float32:
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # drop the autocast wrapper of prepare()
    if config.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    unet.eval()
    result = {
        "losses": list(state.losses),
        "loss_summary": summarize_losses(state.losses),
        "final_loss": float(np.mean(state.losses[-50:])) if state.losses else math.nan,
        "trainable_params": trainable_parameters(unet),
        "global_step": state.global_step,
        "max_train_steps": max_steps,
        "num_train_epochs": math.ceil(max_steps / steps_per_epoch) if steps_per_epoch else 0,
        "steps_per_epoch": steps_per_epoch,
        "learning_rate": lr,
        "skipped_steps": state.skipped_steps,
        "skipped_micro_batches": state.skipped_micro_batches,
        "resumed_from": os.path.basename(resumed_from) if resumed_from else None,
        "train_time_s": round(train_time, 3),
        "steps_per_second": round(steps_run / train_time, 3) if train_time > 0 and steps_run else None,
        "wall_time_s": round(time.time() - started, 3),
        "latents": data.stats.get("latents", "cached"),
        "text": data.stats.get("text", "cached"),
    }
    if mitigation is not None:
        result["threshold"] = mitigation.stats()
    if rwa is not None:
        result["rwa_augmented_captions"] = state.augmented_captions
    return result


def generate_validation_grid(pipe: Any, prompts: Sequence[str], num_images_per_prompt: int = 4, seed: int = 0,
                             num_inference_steps: int = 20, guidance_scale: float = 4.0, output_path: str | None = None,
                             progress: bool = True) -> Any:
    """Generate `num_images_per_prompt` images per prompt (seeded) and return them as one grid (rows = prompts).

    Written atomically to `output_path` (PNG) when given. Runs under autocast when the UNet's frozen weights are
    half precision.
    """
    from diffusers.utils import make_image_grid

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
