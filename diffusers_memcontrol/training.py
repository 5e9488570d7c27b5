"""The fine-tuning loop as a library function, shared by `training/train_memcontrol.py` and search trials.

The VAE and text encoder are frozen, so images are encoded to latents and captions to embeddings once
(`encode_dataset`) and the loop only runs the UNet.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .masks import Mask, MaskSpace
from .tuners import MemControlConfig


@dataclass
class FineTuneConfig:
    """Hyper-parameters of one MemControl fine-tune; round-trips to JSON (`to_json` / `from_json`)."""

    peft_method: str = field(default="svdiff", metadata={"help": "svdiff, difffit, attention, lora, full or freeze."})
    mask: Optional[dict] = field(default=None, metadata={"help": "Mask JSON dict; None = all ones."})
    mask_layout: str = field(default="blocks", metadata={"help": "blocks, attention or paper."})
    mask_scope: str = field(default="reference", metadata={"help": "reference or strict."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    max_train_steps: int = field(default=500, metadata={"help": "Optimizer steps."})
    train_batch_size: int = field(default=32, metadata={"help": "Samples per step."})
    caption_dropout: float = field(default=0.1, metadata={"help": "Probability of an empty caption (for CFG)."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    adam_weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank (peft_method lora)."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling, noise and dropout."})

    def __post_init__(self) -> None:
        if self.max_train_steps < 0:
            raise ValueError(f"max_train_steps must be >= 0, got {self.max_train_steps}.")
        if self.train_batch_size < 1:
            raise ValueError(f"train_batch_size must be >= 1, got {self.train_batch_size}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")

    def to_json(self) -> str:
        """JSON text of every field."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "FineTuneConfig":
        """Inverse of `to_json`."""
        return cls(**json.loads(text))

    def adapter_config(self, mask: Optional[Mask] = None) -> MemControlConfig:
        """The peft config of this fine-tune."""
        mask = mask or (Mask.from_dict(self.mask) if self.mask else None)
        return MemControlConfig(method=self.peft_method, mask=mask, mask_layout=self.mask_layout,
                                mask_scope=self.mask_scope, lora_rank=self.lora_rank, lora_alpha=self.lora_rank)


def resolve_mask(spec: Optional[str], unet: torch.nn.Module, method: str, layout: str) -> Optional[Mask]:
    """Turn a `--mask` value (None, a bit string, a mask JSON file, or a folder holding one) into a Mask."""
    if spec is None or spec == "":
        return None
    space = MaskSpace.from_unet(unet, method=method, layout=layout)
    if os.path.exists(spec):
        if os.path.isdir(spec):
            candidates = [os.path.join(spec, n) for n in ("mask.json", "best_mask.json", "adapter_config.json")]
            path = next((c for c in candidates if os.path.isfile(c)), None)
            if path is None:
                raise FileNotFoundError(f"No mask.json, best_mask.json or adapter_config.json in folder {spec!r}.")
        else:
            path = spec
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if "mask" in data and "bits" not in data:  # an adapter_config.json
            data = data["mask"]
        mask = Mask.from_dict(data)
        if mask.method != method:
            # a mask transfers across methods only when positions agree (same layout on the same architecture)
            mask = Mask(method, mask.layout, mask.positions, mask.bits)
        return MaskSpace.from_unet(unet, method=method, layout=mask.layout).validate(mask)
    if set(spec) <= set("01, _"):
        return space.mask(spec)
    raise ValueError(f"--mask {spec!r} is neither a file, a folder, nor a bit string of length {len(space)}.")


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Text embeddings (last hidden state, as Stable Diffusion uses) of `captions`."""
    device = text_encoder.device
    out = []
    for i in range(0, len(captions), batch_size):
        ids = tokenizer(captions[i:i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out.append(text_encoder(ids)[0].float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 64, generator=None) -> torch.Tensor:
    """Scaled VAE latents of images in [-1, 1] (a sample of the posterior, as diffusers' training script does)."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="encode latents", leave=False,
                  disable=len(images) <= 4 * batch_size):
        batch = images[i:i + batch_size].to(vae.device, vae.dtype)
        out.append(vae.encode(batch).latent_dist.sample(generator).float().cpu() * vae.config.scaling_factor)
    return torch.cat(out)


def fine_tune(
    unet: torch.nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor,
    config: FineTuneConfig,
    accelerator=None,
    mask: Optional[Mask] = None,
    progress: bool = True,
) -> dict:
    """Inject the adapter of `config` into `unet` and train it on cached latents/embeddings; return a loss log.

    `prompt_embeds[i]` is the embedding of the caption of `latents[i]`; `uncond_embeds` is the embedding of "".
    """
    if len(latents) != len(prompt_embeds):
        raise ValueError(f"Got {len(latents)} latents but {len(prompt_embeds)} prompt embeddings; they must match.")
    if len(latents) == 0:
        raise ValueError("The training set is empty.")
    device = accelerator.device if accelerator is not None else next(unet.parameters()).device
    unet.add_adapter(config.adapter_config(mask))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay) \
        if params else None
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    unet.train()
    bar = tqdm(range(config.max_train_steps), desc=f"fine-tune {config.peft_method}", disable=not progress)
    n = len(latents)
    for step in bar:
        idx = torch.randint(0, n, (min(config.train_batch_size, n),), generator=generator)
        x0 = latents[idx].to(device)
        cond = prompt_embeds[idx].clone()
        drop = torch.rand(len(idx), generator=generator) < config.caption_dropout
        cond[drop] = uncond_embeds.to(cond.dtype)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator).to(device)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
            noise_scheduler.get_velocity(x0, noise, t)
        prediction = unet(noisy, t, cond.to(device)).sample
        loss = F.mse_loss(prediction.float(), target.float())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Loss is {loss.item()} at step {step}; stopping (no adapter saved).")
        if optimizer is not None:
            if config.lr_warmup_steps:
                for group in optimizer.param_groups:
                    group["lr"] = config.learning_rate * min(1.0, (step + 1) / config.lr_warmup_steps)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if accelerator is not None and accelerator.trackers:
            accelerator.log({"train_loss": losses[-1]}, step=step)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    unet.eval()
    trainable = sum(p.numel() for p in params)
    return {"losses": losses, "trainable_params": trainable,
            "final_loss": float(np.mean(losses[-50:])) if losses else math.nan}


def save_adapter(unet: torch.nn.Module, output_dir: str, adapter_name: str = "default", extra_files: dict | None = None
                 ) -> None:
    """Write the adapter in peft format (adapter_config.json + adapter_model.safetensors + mask.json) atomically.

    Files are written into a temporary folder next to `output_dir` and moved in place one by one with `os.replace`,
    so a crash never leaves a half-written adapter file.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config: MemControlConfig = unet.peft_config[adapter_name]
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=output_dir)
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(
            unet, adapter_name=adapter_name).items()}
        save_file(state, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        mask = config.get_mask()
        if mask is not None:
            mask.save(os.path.join(tmp, "mask.json"))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_adapter(unet: torch.nn.Module, adapter_dir: str, adapter_name: str = "default") -> MemControlConfig:
    """Inject and load a saved MemControl adapter into `unet` (safetensors only); return its config."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{adapter_dir!r} has no adapter_model.safetensors (only safetensors are loaded).")
    config = PeftConfig.from_pretrained(adapter_dir)
    if not isinstance(config, MemControlConfig):
        raise ValueError(f"{adapter_dir!r} holds a {type(config).__name__}, not a MemControl adapter.")
    inject_adapter_in_model(config, unet, adapter_name)  # validates the mask against this UNet first
    result = set_peft_model_state_dict(unet, load_file(weights), adapter_name=adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"Adapter {adapter_dir!r} does not fit this UNet: unexpected keys "
                         f"{result.unexpected_keys[:5]}.")
    return config
