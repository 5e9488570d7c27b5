"""Memorization metrics built on the text-conditional noise prediction.

Two related but *different* metrics live here, named apart on purpose:

* :func:`dmem_search` -- the cheap metric MemControl's search uses as its memorization objective
  (``d_mem`` in the paper, Eq. 6, as implemented by the authors' code): clean training latents of
  ``D_mem`` are noised at random timesteps and, per sample, the L2 norm of
  ``eps(x_t, t, prompt) - eps(x_t, t, "")`` is measured. No sampling trajectory is involved.
* :func:`wen_detection_scores` -- Wen et al. (ICLR 2024) detection metric: the same norm, but
  recorded along a DDIM-like *generation* trajectory started from pure noise, averaged over steps
  and generations.

:func:`detection_auc` scores a detector the way Wen et al. report it (AUC and TPR at 1% FPR).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "DmemResult",
    "detection_auc",
    "dmem_search",
    "wen_detection_scores",
]


# ----------------------------------------------------------------------------------------------
# helpers shared with diffusers_memcontrol.trainer.mitigation
# ----------------------------------------------------------------------------------------------


def _module_device_dtype(module: Any) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a model (diffusers ModelMixin, peft wrapper or plain module)."""
    device = getattr(module, "device", None)
    dtype = getattr(module, "dtype", None)
    if isinstance(device, torch.device) and isinstance(dtype, torch.dtype):
        return device, dtype
    for param in module.parameters():
        return param.device, param.dtype
    return torch.device("cpu"), torch.float32


def _predict(unet: Any, sample: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """One UNet call returning the raw model output tensor."""
    out = unet(sample, timesteps, encoder_hidden_states=embeds, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


def _expand_uncond(uncond_embeds: torch.Tensor, batch: int, name: str = "uncond_embeds") -> torch.Tensor:
    """Broadcast a [1, L, D] (or [L, D]) unconditional embedding to [batch, L, D]."""
    if uncond_embeds.dim() == 2:
        uncond_embeds = uncond_embeds.unsqueeze(0)
    if uncond_embeds.dim() != 3:
        raise ValueError(f"{name} must have shape [1, L, D] or [B, L, D], got {tuple(uncond_embeds.shape)}")
    if uncond_embeds.shape[0] == 1 and batch != 1:
        return uncond_embeds.expand(batch, -1, -1)
    if uncond_embeds.shape[0] != batch:
        raise ValueError(f"{name} has batch size {uncond_embeds.shape[0]}; expected 1 or {batch}")
    return uncond_embeds


@torch.no_grad()
def _conditional_delta_norms(
    unet: Any,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor,
) -> torch.Tensor:
    """Per-sample L2 norm of eps(x_t, t, prompt) - eps(x_t, t, uncond), one batched forward (float32)."""
    batch = noisy_latents.shape[0]
    device, dtype = _module_device_dtype(unet)
    if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != batch:
        raise ValueError(
            f"prompt_embeds must have shape [{batch}, L, D] to match the latents, got {tuple(prompt_embeds.shape)}"
        )
    uncond = _expand_uncond(uncond_embeds, batch)
    if uncond.shape[1:] != prompt_embeds.shape[1:]:
        raise ValueError(
            f"uncond_embeds shape {tuple(uncond.shape[1:])} does not match prompt_embeds "
            f"{tuple(prompt_embeds.shape[1:])}"
        )
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor(timesteps)
    timesteps = timesteps.to(device).reshape(-1)
    if timesteps.numel() == 1:
        timesteps = timesteps.expand(batch)
    if timesteps.numel() != batch:
        raise ValueError(f"timesteps must hold 1 or {batch} values, got {timesteps.numel()}")
    x = noisy_latents.to(device=device, dtype=dtype)
    sample = torch.cat([x, x], dim=0)
    t = torch.cat([timesteps, timesteps], dim=0)
    embeds = torch.cat([prompt_embeds, uncond], dim=0).to(device=device, dtype=dtype)
    pred_cond, pred_uncond = _predict(unet, sample, t, embeds).chunk(2, dim=0)
    norms = (pred_cond.float() - pred_uncond.float()).flatten(1).norm(p=2, dim=1)
    return norms.masked_fill(_same_rows(prompt_embeds, uncond).to(norms.device), 0.0)


def _same_rows(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Rows whose two embeddings are identical: their delta is exactly 0 (batched kernels leave ~1e-6 noise)."""
    return (cond == uncond.to(cond.device, cond.dtype)).flatten(1).all(dim=1).to(cond.device)


# ----------------------------------------------------------------------------------------------
# d_mem, search variant
# ----------------------------------------------------------------------------------------------


@dataclass
class DmemResult:
    """Result of :func:`dmem_search`: per-sample norms and the two aggregates the search can optimise."""

    values: torch.Tensor = field(metadata={"help": "per-sample norms, [N * num_repeats], repeat-major order"})
    timesteps: torch.Tensor = field(metadata={"help": "timestep used for each value, [N * num_repeats]"})
    batch_max: torch.Tensor = field(metadata={"help": "max of `values` within each batch, [num_batches]"})
    max: float = field(metadata={"help": "mean over batches of the per-batch max (the reference's 'max_norm')"})
    mean: float = field(metadata={"help": "mean over all per-sample values"})
    batch_size: int = field(default=0, metadata={"help": "batch size the batches of `batch_max` were cut with"})

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (aggregates plus per-sample values as lists)."""
        return {
            "max": self.max,
            "mean": self.mean,
            "batch_size": self.batch_size,
            "values": self.values.tolist(),
            "timesteps": self.timesteps.tolist(),
            "batch_max": self.batch_max.tolist(),
        }


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (reproducible), then moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)


def dmem_search(
    unet: Any,
    noise_scheduler: Any,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor,
    timesteps: int | Sequence[int] | torch.Tensor | None = None,
    num_repeats: int = 1,
    generator: torch.Generator | None = None,
    batch_size: int = 16,
) -> DmemResult:
    """Search-time d_mem: norm of (conditional - unconditional) noise prediction on noised D_mem latents.

    Mirrors the MemControl authors' search code: for each batch of clean (already VAE-scaled)
    latents, draw Gaussian noise and a timestep per sample (uniform over
    ``noise_scheduler.config.num_train_timesteps`` unless ``timesteps`` is given), noise them with
    ``noise_scheduler.add_noise``, and take per sample the L2 norm over the whole latent of
    ``eps(x_t, t, prompt) - eps(x_t, t, uncond)``. Conditional and unconditional predictions come
    from one forward on the concatenated batch, under ``torch.no_grad``, on the UNet's device and
    dtype. This is *not* Wen et al.'s trajectory metric (see :func:`wen_detection_scores`).
    Samples whose prompt embedding equals the unconditional one score exactly 0 (the batched
    forward would otherwise leave ~1e-6 of kernel noise).

    Aggregates: ``max`` = the max within each batch of ``batch_size`` consecutive samples, averaged
    over batches (the reference's ``max_norm`` objective; it depends on ``batch_size``, keep it fixed
    when comparing runs); ``mean`` = mean over all per-sample values. With ``num_repeats > 1`` the
    dataset is walked ``num_repeats`` times with fresh noise/timesteps; values are repeat-major.

    Args:
        unet: noise predictor called as ``unet(x_t, t, encoder_hidden_states=...)``.
        noise_scheduler: a diffusers training scheduler (``add_noise``, ``config.num_train_timesteps``).
        latents: clean latents ``[N, C, H, W]``.
        prompt_embeds: text embeddings ``[N, L, D]`` of each sample's caption.
        uncond_embeds: embeddings of the empty prompt, ``[1, L, D]`` or ``[N, L, D]``.
        timesteps: fixed timestep(s): an int, or ``N`` or ``N * num_repeats`` values; None samples them.
        num_repeats: passes over the data.
        generator: torch generator for noise and timesteps (reproducible results).
        batch_size: samples per forward and per ``max`` aggregate.
    """
    if not torch.is_tensor(latents) or latents.dim() != 4:
        shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
        raise ValueError(f"latents must be a [N, C, H, W] tensor, got {shape}")
    n = latents.shape[0]
    if n == 0:
        raise ValueError("latents is empty; d_mem needs at least one sample")
    if not torch.is_tensor(prompt_embeds) or prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != n:
        shape = tuple(prompt_embeds.shape) if torch.is_tensor(prompt_embeds) else type(prompt_embeds).__name__
        raise ValueError(f"prompt_embeds must have shape [{n}, L, D] (one per latent), got {shape}")
    if not isinstance(num_repeats, int) or num_repeats < 1:
        raise ValueError(f"num_repeats must be a positive int, got {num_repeats!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    uncond_full = _expand_uncond(uncond_embeds, n)
    num_train = int(noise_scheduler.config.num_train_timesteps)

    fixed: torch.Tensor | None = None
    if timesteps is not None:
        fixed = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1)
        if fixed.numel() == 1:
            fixed = fixed.expand(n * num_repeats)
        elif fixed.numel() == n:
            fixed = fixed.repeat(num_repeats)
        elif fixed.numel() != n * num_repeats:
            raise ValueError(
                f"timesteps must hold 1, {n} or {n * num_repeats} values, got {fixed.numel()}"
            )
        if fixed.min() < 0 or fixed.max() >= num_train:
            raise ValueError(f"timesteps must lie in [0, {num_train - 1}], got range "
                             f"[{int(fixed.min())}, {int(fixed.max())}]")

    device, dtype = _module_device_dtype(unet)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    values, used_t, batch_max = [], [], []
    for rep in range(num_repeats):
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            bsz = stop - start
            clean = latents[start:stop].to(device=device, dtype=torch.float32)
            noise = _randn(clean.shape, generator, device)
            if fixed is None:
                t = torch.randint(0, num_train, (bsz,), generator=generator, device=gen_device).to(device)
            else:
                t = fixed[rep * n + start: rep * n + stop].to(device)
            noisy = noise_scheduler.add_noise(clean, noise, t)
            norms = _conditional_delta_norms(
                unet, noisy.to(dtype), t, prompt_embeds[start:stop], uncond_full[start:stop]
            ).cpu()
            values.append(norms)
            used_t.append(t.cpu())
            batch_max.append(norms.max())
    all_values = torch.cat(values)
    bmax = torch.stack(batch_max)
    return DmemResult(
        values=all_values,
        timesteps=torch.cat(used_t),
        batch_max=bmax,
        max=float(bmax.mean()),
        mean=float(all_values.mean()),
        batch_size=batch_size,
    )


# ----------------------------------------------------------------------------------------------
# Wen et al. detection along the generation trajectory
# ----------------------------------------------------------------------------------------------


def _get(obj: Any, name: str) -> Any:
    """Attribute or mapping entry `name` of a pipeline / components holder, or None."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _encode_with_components(
    tokenizer: Any, text_encoder: Any, prompts: list[str], device: torch.device
) -> torch.Tensor:
    """CLIP-style prompt encoding (padding to max length, last hidden state), like encode_prompt."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    out = text_encoder(ids)
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


@torch.no_grad()
def _encode_pair(
    components: Any, prompts: list[str], num_images_per_prompt: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and empty-prompt embeddings, each [len(prompts) * num_images_per_prompt, L, D]."""
    encode_prompt = _get(components, "encode_prompt")
    if callable(encode_prompt):
        cond, uncond = encode_prompt(prompts, device, num_images_per_prompt, True, negative_prompt=None)
        return cond, uncond
    tokenizer, text_encoder = _get(components, "tokenizer"), _get(components, "text_encoder")
    if tokenizer is None or text_encoder is None:
        raise ValueError(
            "pipeline_or_components needs `encode_prompt` (a diffusers pipeline) or both `tokenizer` and "
            "`text_encoder`"
        )
    cond = _encode_with_components(tokenizer, text_encoder, prompts, device)
    uncond = _encode_with_components(tokenizer, text_encoder, [""] * len(prompts), device)
    return (
        cond.repeat_interleave(num_images_per_prompt, dim=0),
        uncond.repeat_interleave(num_images_per_prompt, dim=0),
    )


def _latent_hw(components: Any, unet: Any, height: int | None, width: int | None) -> tuple[int, int]:
    """Latent spatial size: from pixel height/width and the VAE factor, else the UNet's sample_size."""
    if height is None and width is None:
        size = unet.config.sample_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    factor = _get(components, "vae_scale_factor")
    if factor is None:
        vae = _get(components, "vae")
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    size = unet.config.sample_size
    default = size if isinstance(size, int) else size[0]
    h = height if height is not None else default * factor
    w = width if width is not None else default * factor
    if h % factor or w % factor:
        raise ValueError(f"height/width ({h}, {w}) must be divisible by the VAE scale factor {factor}")
    return h // factor, w // factor


def wen_detection_scores(
    pipeline_or_components: Any,
    prompts: Sequence[str],
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    num_images_per_prompt: int = 4,
    first_step_only: bool = False,
    generator: torch.Generator | None = None,
    *,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    show_progress: bool = True,
    return_per_step: bool = False,
) -> torch.Tensor:
    """Wen et al. (ICLR 2024) memorization detection score per prompt (higher = more memorized).

    Runs classifier-free-guided sampling with the pipeline's own scheduler (a fresh copy, so the
    pipeline is left untouched) from Gaussian noise and records, at every step, the L2 norm over the
    whole latent of ``eps(x_t, prompt) - eps(x_t, "")`` (the unguided difference; guidance only
    shapes the trajectory). The score of a prompt is that norm averaged over steps and over its
    ``num_images_per_prompt`` generations. Defaults are Wen et al.'s (DDIM, 50 steps, guidance 7.5,
    4 images). Cheap variants: ``first_step_only=True`` (only the first step's norm, one UNet call
    per chunk) and ``num_images_per_prompt=1``.

    Work is vectorized over prompts x generations (``batch_size`` prompts per chunk). Prompt
    encoding goes through ``pipe.encode_prompt``; a mapping/object with ``unet``, ``scheduler``,
    ``tokenizer`` and ``text_encoder`` also works. ``pipe.__call__`` is not used because the
    per-step predictions are needed.

    Returns a float32 CPU tensor ``[len(prompts)]``; with ``return_per_step=True`` the raw norms
    ``[len(prompts), num_images_per_prompt, steps]`` instead.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty sequence of strings")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not math.isfinite(float(guidance_scale)):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")

    unet = _get(pipeline_or_components, "unet")
    base_scheduler = _get(pipeline_or_components, "scheduler")
    if unet is None or base_scheduler is None:
        raise ValueError("pipeline_or_components must provide `unet` and `scheduler`")
    scheduler = type(base_scheduler).from_config(base_scheduler.config)
    device, dtype = _module_device_dtype(unet)
    latent_h, latent_w = _latent_hw(pipeline_or_components, unet, height, width)
    channels = unet.config.in_channels
    step_kwargs: dict[str, Any] = {}
    step_params = inspect.signature(scheduler.step).parameters
    if "generator" in step_params:
        step_kwargs["generator"] = generator

    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    n_steps = 1 if first_step_only else len(timesteps)
    chunks = [prompts[i: i + batch_size] for i in range(0, len(prompts), batch_size)]

    try:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(chunks) * n_steps, desc="wen detection", disable=not show_progress)
    except ImportError:  # pragma: no cover - tqdm is a declared dependency
        progress = None

    per_chunk = []
    with torch.no_grad():
        for chunk in chunks:
            cond, uncond = _encode_pair(pipeline_or_components, chunk, num_images_per_prompt, device)
            embeds = torch.cat([uncond, cond], dim=0).to(device=device, dtype=dtype)
            same = _same_rows(cond, uncond).to(device)
            batch = cond.shape[0]
            scheduler.set_timesteps(num_inference_steps, device=device)
            latents = _randn((batch, channels, latent_h, latent_w), generator, device).to(dtype)
            latents = latents * scheduler.init_noise_sigma
            norms = []
            for i, t in enumerate(scheduler.timesteps):
                model_in = scheduler.scale_model_input(torch.cat([latents, latents], dim=0), t)
                pred_uncond, pred_cond = _predict(unet, model_in, t, embeds).chunk(2, dim=0)
                delta = pred_cond.float() - pred_uncond.float()
                norms.append(delta.flatten(1).norm(p=2, dim=1).masked_fill(same, 0.0).cpu())
                if progress is not None:
                    progress.update(1)
                if first_step_only or i == n_steps - 1:
                    break
                guided = pred_uncond.float() + guidance_scale * delta
                latents = scheduler.step(guided.to(dtype), t, latents, **step_kwargs, return_dict=False)[0]
            per_chunk.append(torch.stack(norms, dim=1).reshape(len(chunk), num_images_per_prompt, -1))
    if progress is not None:
        progress.close()
    per_step = torch.cat(per_chunk, dim=0).float()
    if return_per_step:
        return per_step
    return per_step.mean(dim=(1, 2))


# ----------------------------------------------------------------------------------------------
# scoring a detector
# ----------------------------------------------------------------------------------------------


def _as_1d_array(scores: Any, name: str) -> np.ndarray:
    """Flatten scores (tensor, array or sequence) into a finite float64 numpy vector."""
    if torch.is_tensor(scores):
        scores = scores.detach().cpu().double().numpy()
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty; detection_auc needs at least one score per class")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def detection_auc(scores_pos: Any, scores_neg: Any) -> dict[str, float]:
    """ROC AUC and TPR at 1% FPR of a detector whose higher scores should mean 'memorized' (positive).

    ``auc`` is scikit-learn's rank-based ``roc_auc_score`` (ties count one half);
    ``tpr_at_1pct_fpr`` is the largest TPR on the ROC curve whose FPR is <= 0.01 (Wen et al.'s
    TPR@1%FPR). Also returns the counts ``n_pos`` and ``n_neg``.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    pos = _as_1d_array(scores_pos, "scores_pos")
    neg = _as_1d_array(scores_neg, "scores_neg")
    y_true = np.concatenate([np.ones_like(pos), np.zeros_like(neg)])
    y_score = np.concatenate([pos, neg])
    auc = float(roc_auc_score(y_true, y_score))
    fpr, tpr, _ = roc_curve(y_true, y_score, drop_intermediate=False)
    ok = fpr <= 0.01 + 1e-12
    tpr_at = float(tpr[ok].max()) if np.any(ok) else 0.0
    return {"auc": auc, "tpr_at_1pct_fpr": tpr_at, "n_pos": int(pos.size), "n_neg": int(neg.size)}
