"""A masked LoRA in diffusers' LoRA language: a standard peft `LoraConfig` and `pytorch_lora_weights.safetensors`.

The `lora` method trains LoRA factors inside the MemControl tuner (``memcontrol_lora_A/B``), which diffusers'
``load_lora_weights``, peft's LoRA tools and the Hub's LoRA widgets do not see. :func:`masked_lora_config` is the
standard peft ``LoraConfig`` of a mask (its target modules: the attention projections the mask switches on) and
:func:`save_lora_weights_diffusers` writes a trained MemControl LoRA the way diffusers' ``train_text_to_image_lora.py``
does (``save_lora_weights`` of the peft state dict converted to diffusers' keys), so that ``pipe.load_lora_weights``
loads it. The mask travels with it: in the safetensors metadata (``memcontrol_mask``) and in ``mask.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from torch import nn

from ...constants import LORA_WEIGHTS_FILE, MASK_FILE
from ...files import move, reporting_full_disk, usual_mode
from .. import Mask, MaskSpace
from .mask import ROLE_LORA

__all__ = ["MASK_METADATA_KEY", "masked_lora_config", "memcontrol_lora_state_dict", "read_lora_mask",
           "save_lora_weights_diffusers"]

MASK_METADATA_KEY = "memcontrol_mask"


def masked_lora_config(mask: Mask | None, unet: nn.Module, rank: int = 4, alpha: float = 4.0,
                       scope: str = "reference", layout: str = "blocks"):
    """The peft ``LoraConfig`` of a `lora` mask: one LoRA per attention projection the mask trains."""
    from peft import LoraConfig

    space = MaskSpace.from_unet(unet, method="lora", layout=mask.layout if mask is not None else layout)
    plan = space.module_roles(mask, unet, scope=scope, lora_rank=rank)
    targets = sorted(name for name, roles in plan.items() if ROLE_LORA in roles)
    if not targets:
        raise ValueError("The mask switches no LoRA layer on (an all-zero mask): there is no LoRA to write.")
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)


def _unwrapped(unet: nn.Module) -> nn.Module:
    """The UNet inside a `peft.PeftModel` (`get_peft_model`), or `unet` itself (`unet.add_adapter`)."""
    from peft import PeftModel

    return unet.get_base_model() if isinstance(unet, PeftModel) else unet


def memcontrol_lora_state_dict(unet: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The MemControl tuner's LoRA factors under peft LoRA's keys (``<module>.lora_A.weight`` / ``lora_B.weight``),
    named as in the UNet itself (a `peft.get_peft_model` wrapper's ``base_model.model.`` prefix left out)."""
    state = {}
    for name, module in _unwrapped(unet).named_modules():
        factors_a = getattr(module, "memcontrol_lora_A", None)
        if factors_a is None or adapter_name not in factors_a:
            continue
        state[f"{name}.lora_A.weight"] = factors_a[adapter_name].detach().float().cpu().contiguous()
        state[f"{name}.lora_B.weight"] = module.memcontrol_lora_B[adapter_name].detach().float().cpu().contiguous()
    return state


def save_lora_weights_diffusers(unet: nn.Module, output_dir: str, adapter_name: str = "default") -> str:
    """Write a trained MemControl `lora` adapter as diffusers' ``pytorch_lora_weights.safetensors`` (+ ``mask.json``).

    ``StableDiffusionPipeline.load_lora_weights(output_dir)`` loads it as a standard peft LoRA that computes what the
    MemControl adapter computes. Returns the weights file's path.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    config = (getattr(unet, "peft_config", None) or {}).get(adapter_name)
    if config is None or getattr(config, "method", None) != "lora":
        raise ValueError(f"The UNet holds no MemControl 'lora' adapter named {adapter_name!r}.")
    state = memcontrol_lora_state_dict(unet, adapter_name)
    if not state:
        raise ValueError("The adapter holds no LoRA factor (an all-zero mask): there is no LoRA to write.")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"Refusing to write a LoRA with NaN/inf tensors ({bad[:3]}).")
    targets = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    from peft import LoraConfig

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=targets)
    metadata = {k: v for k, v in lora.to_dict().items() if v is not None}
    mask = config.get_mask()
    os.makedirs(output_dir, exist_ok=True)
    needed = 2 * sum(v.numel() * v.element_size() for v in state.values()) + 2**16  # written twice (metadata)
    with reporting_full_disk(output_dir, needed):
        tmp = tempfile.mkdtemp(prefix=".lora-", dir=output_dir)
        try:
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(state),
                                                      unet_lora_adapter_metadata=metadata)
            path = os.path.join(tmp, LORA_WEIGHTS_FILE)
            with safe_open(path, framework="pt") as f:
                extra = dict(f.metadata() or {})
            extra[MASK_METADATA_KEY] = json.dumps(mask.to_dict() if mask is not None else None, sort_keys=True)
            save_file(load_file(path), path, metadata=extra)
            if mask is not None:
                mask.save(os.path.join(tmp, MASK_FILE))
            for name in os.listdir(tmp):
                usual_mode(os.path.join(tmp, name))
                move(os.path.join(tmp, name), os.path.join(output_dir, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(output_dir, LORA_WEIGHTS_FILE)


def read_lora_mask(output_dir: str) -> Mask | None:
    """The mask stored in a LoRA written by :func:`save_lora_weights_diffusers` (None: all ones)."""
    from safetensors import safe_open

    with safe_open(os.path.join(output_dir, LORA_WEIGHTS_FILE), framework="pt") as f:
        stored = (f.metadata() or {}).get(MASK_METADATA_KEY)
    if stored is None:
        raise ValueError(f"{output_dir!r} holds a LoRA without a MemControl mask in its metadata.")
    value = json.loads(stored)
    return Mask.from_dict(value) if value is not None else None
