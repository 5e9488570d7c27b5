"""The frozen encoders of a Stable Diffusion pipeline: caption embeddings and VAE latents, batched, on the CPU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: Any, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Text embeddings (last hidden state, as Stable Diffusion uses) of `captions`, float32 on the CPU."""
    out = [_encode_prompts_on_device(tokenizer, text_encoder, captions[i:i + batch_size]).float().cpu()
           for i in range(0, len(captions), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def _encode_prompts_on_device(tokenizer, text_encoder, captions: Sequence[str]) -> torch.Tensor:
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


@torch.no_grad()
def encode_images(vae: Any, images: torch.Tensor, batch_size: int = 64, generator: Any = None) -> torch.Tensor:
    """Scaled VAE latents of images in [-1, 1] (a sample of the posterior, as diffusers' training script does)."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="encode latents", leave=False,
                  disable=len(images) <= 4 * batch_size):
        batch = images[i:i + batch_size].to(vae.device, vae.dtype)
        out.append(vae.encode(batch).latent_dist.sample(generator).float().cpu() * vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def encode_latent_distribution(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled mean and std of the VAE posterior of images in [-1, 1]: latents = mean + std * N(0, 1)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((dist.mean.float() - shift) * scale).cpu(), (dist.std.float() * scale).cpu()


def default_resolution(unet: Any, vae: Any) -> int:
    """Pixel resolution the UNet was built for: its sample size x the VAE's downsampling factor."""
    return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
