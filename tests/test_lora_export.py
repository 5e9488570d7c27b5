"""A masked MemControl LoRA written in diffusers' LoRA format loads with `pipe.load_lora_weights` and keeps its mask."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffusers_memcontrol import MaskSpace
from diffusers_memcontrol.data import tiny_base as tb
from diffusers_memcontrol.tuners import MemControlConfig
from diffusers_memcontrol.tuners.memcontrol.lora_export import (
    masked_lora_config,
    read_lora_mask,
    save_lora_weights_diffusers,
)
from tests.conftest import unet_output

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def trained(tmp_path):
    """The tiny base with a MemControl `lora` adapter under a mask with a position off, its factors randomized."""
    pipe = StableDiffusionPipeline.from_pretrained(tb.tiny_base_path(), safety_checker=None)
    space = MaskSpace.from_unet(pipe.unet, method="lora", layout="paper")
    mask = space.mask("1" * (len(space) - 1) + "0")
    pipe.unet.add_adapter(MemControlConfig(method="lora", mask=mask, mask_scope="strict", lora_rank=2,
                                           lora_alpha=3.0))
    torch.manual_seed(0)
    for name, param in pipe.unet.named_parameters():
        if "memcontrol_lora_B" in name:
            param.data.normal_(0, 0.05)
    return pipe, mask


def test_load_lora_weights_reproduces_the_memcontrol_lora(trained, tmp_path):
    pipe, mask = trained
    expected = unet_output(pipe.unet)
    path = save_lora_weights_diffusers(pipe.unet, str(tmp_path))
    assert path.endswith("pytorch_lora_weights.safetensors")

    fresh = StableDiffusionPipeline.from_pretrained(tb.tiny_base_path(), safety_checker=None)
    base_output = unet_output(fresh.unet)
    fresh.load_lora_weights(str(tmp_path))
    assert not torch.allclose(base_output, expected, atol=1e-4)  # the LoRA changes the model
    assert torch.allclose(unet_output(fresh.unet), expected, atol=1e-5)

    # a standard peft LoraConfig whose targets are the projections the mask switches on, and the mask kept
    from peft import LoraConfig

    loaded = next(iter(fresh.unet.peft_config.values()))
    assert isinstance(loaded, LoraConfig) and loaded.r == 2 and loaded.lora_alpha == 3.0
    config = masked_lora_config(mask, pipe.unet, rank=2, alpha=3.0, scope="strict")
    with_lora = {name for name, module in fresh.unet.named_modules() if hasattr(module, "lora_A")}
    assert with_lora == set(config.target_modules)
    off = next(p for p, b in zip(mask.positions, mask.bits) if not b)
    assert config.target_modules and not any(t.startswith(off) for t in config.target_modules)
    assert read_lora_mask(str(tmp_path)) == mask
    assert json.loads((tmp_path / "mask.json").read_text())["bits"] == list(mask.bits)


def test_an_adapter_of_another_method_is_refused(tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tb.tiny_base_path(), safety_checker=None)
    pipe.unet.add_adapter(MemControlConfig(method="svdiff"))
    with pytest.raises(ValueError, match="no MemControl 'lora' adapter"):
        save_lora_weights_diffusers(pipe.unet, str(tmp_path))


@pytest.mark.parametrize("path", ["add_adapter", "get_peft_model"])
def test_every_documented_adapter_path_exports_a_lora_that_load_lora_weights_reproduces(path, tmp_path):
    """README's two ways to add the adapter (`unet.add_adapter`, `peft.get_peft_model`) export the same LoRA keys."""
    import peft
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(tb.tiny_base_path(), safety_checker=None)
    config = MemControlConfig(method="lora", lora_rank=2)
    if path == "add_adapter":
        pipe.unet.add_adapter(config)
        model = pipe.unet
    else:
        model = peft.get_peft_model(pipe.unet, config)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "memcontrol_lora_B" in name:
            param.data.normal_(0, 0.05)
    expected = unet_output(pipe.unet)  # get_peft_model wraps the very UNet, so it computes the adapted output
    save_lora_weights_diffusers(model, str(tmp_path))
    keys = load_file(str(tmp_path / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(k.startswith("unet.") and "base_model" not in k for k in keys)

    fresh = StableDiffusionPipeline.from_pretrained(tb.tiny_base_path(), safety_checker=None)
    base_output = unet_output(fresh.unet)
    fresh.load_lora_weights(str(tmp_path))
    assert not torch.allclose(base_output, expected, atol=1e-4)
    assert torch.allclose(unet_output(fresh.unet), expected, atol=1e-5)
