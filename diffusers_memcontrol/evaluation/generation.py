"""Generated and real image batches for evaluation: seeded generation with any diffusers pipeline, real images of a
dataset column, and seeded row subsets (used by `evaluation` and `audit`)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.images import pixel_batch
from .config import EvaluationConfig, _positive_int


def subset_rows(n: int, cap: int | None, seed: int, keep: Sequence[int] = ()) -> np.ndarray:
    """Sorted seeded subset of range(n) of size cap (all when None), always containing `keep`."""
    if cap is None or cap >= n:
        return np.arange(n)
    keep_arr = np.unique(np.asarray(list(keep), dtype=np.int64))
    rest = np.setdiff1d(np.arange(n), keep_arr)
    extra = max(0, cap - len(keep_arr))
    chosen = np.random.default_rng(seed).choice(rest, size=min(extra, len(rest)), replace=False)
    return np.sort(np.concatenate([keep_arr, chosen]).astype(np.int64))


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar (disabled when not `enabled`)."""
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def pipe_default_resolution(pipe: Any) -> int:
    """Pixel size a pipeline generates by default: unet sample_size x VAE scale factor."""
    size = pipe.unet.config.sample_size
    size = size if isinstance(size, int) else int(size[0])
    factor = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(size * factor)


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    num_images_per_prompt: int = 1,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 4.0,
    resolution: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    show_progress: bool = True,
    desc: str = "generate",
) -> torch.Tensor:
    """Images ``[len(prompts) * k, 3, H, W]`` in [-1, 1] (prompt-major), reproducible whatever the batch size.

    Each image has its own CPU generator seeded from ``(seed, prompt index, image index)``, so the same image comes
    out whether it is generated alone or in a batch of any size; the pipeline is called on batches of
    ``batch_size`` (prompt, image) pairs with ``output_type="pt"``. The pipeline's own progress bar is silenced
    for the call and restored afterwards.
    """
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty sequence of strings.")
    _positive_int(num_images_per_prompt, "num_images_per_prompt")
    _positive_int(batch_size, "batch_size")
    _positive_int(num_inference_steps, "num_inference_steps")
    resolution = resolution or pipe_default_resolution(pipe)
    pairs = [(i, j) for i in range(len(prompts)) for j in range(num_images_per_prompt)]
    previous = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    had_config = hasattr(pipe, "_progress_bar_config")
    pipe.set_progress_bar_config(disable=True)
    out = []
    bar = progress_bar(len(pairs), desc, show_progress)
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(image_seed(seed, i, j)) for i, j in chunk]
            result = pipe(
                prompt=[prompts[i] for i, _ in chunk],
                num_images_per_prompt=1,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=generators,
                output_type="pt",
            )
            images = result.images if hasattr(result, "images") else result[0]
            images = torch.as_tensor(images).float().cpu()
            out.append(images.mul(2.0).sub(1.0).clamp(-1.0, 1.0))
            bar.update(len(chunk))
    finally:
        bar.close()
        if had_config:
            pipe._progress_bar_config = previous
        else:
            del pipe._progress_bar_config
    return torch.cat(out)


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """A 63-bit seed for one (prompt, image) pair, stable across runs and batch sizes."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{image_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def real_images(dataset: Any, column: str, rows: Sequence[int], resolution: int, config: EvaluationConfig) -> Any:
    """Yield ``[B, 3, R, R]`` tensors in [-1, 1] of `rows` of an image column, decoding a batch at a time."""
    rows = [int(r) for r in rows]
    generator = torch.Generator().manual_seed(config.seed)  # random crops (center_crop False) are seeded
    for start in range(0, len(rows), config.encoder_batch_size):
        images = dataset.select(rows[start:start + config.encoder_batch_size])[column]
        yield pixel_batch(images, resolution, config.center_crop, config.image_interpolation_mode, generator)
