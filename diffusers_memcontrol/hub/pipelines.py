"""A full fine-tune in diffusers' layout: the adapter folded into a plain UNet, and the pipeline saved with
`save_pretrained` as diffusers' `train_text_to_image.py` saves it, so `DiffusionPipeline.from_pretrained` loads it.

`--peft_method full` writes its output folder with `save_pipeline` (the run's MemControl files stay beside the
pipeline) and the `unet/` of its checkpoints with `merged_unet(...).save_pretrained`; the audit, `--eval --adapter_dir`
and `publish` (`publishable_files`) read such a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ..constants import MASK_FILE, PIPELINE_INDEX_FILE
from ..files import move, replace_folder, usual_mode
from ..tuners import MaskSpace, MemControlConfig

__all__ = ["is_pipeline_folder", "merged_unet", "publishable_files", "save_pipeline"]

# the files of a pipeline's components that are published: configs, tokenizer texts, safetensors weights
PUBLISHED_SUFFIXES = (".json", ".txt", ".safetensors")


def is_pipeline_folder(folder: str) -> bool:
    """Whether `folder` holds a diffusers pipeline (`save_pretrained` layout: a full fine-tune's output)."""
    return os.path.isfile(os.path.join(folder, PIPELINE_INDEX_FILE))


def merged_unet(unet: torch.nn.Module, adapter_name: str = "default") -> torch.nn.Module:
    """A plain diffusers UNet (no tuner layers) computing what `unet` with its adapter computes; `unet` is untouched.

    Weights the adapter does not change are shared with `unet` (no copy); non-finite merged weights are refused.
    """
    state: dict[str, torch.Tensor] = {}
    tuner_prefixes = []
    for name, module in unet.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        tuner_prefixes.append(f"{name}.")
        base = module.get_base_layer()
        weight, bias = base.weight, base.bias
        if not module.merged and adapter_name in getattr(module, "memcontrol_roles", {}):
            with torch.no_grad():  # the layer's own merge arithmetic, into new tensors
                weight, new_bias = module._merged_parameters(adapter_name, base.weight, base.bias, 1.0)
            bias = new_bias if new_bias is not None else bias
        state[f"{name}.weight"] = weight.detach()
        if bias is not None:
            state[f"{name}.bias"] = bias.detach()
    for key, value in unet.state_dict().items():
        if not any(key.startswith(prefix) for prefix in tuner_prefixes):
            state[key] = value
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"Refusing to write a UNet with NaN/inf weights ({bad[:3]}).")
    with torch.device("meta"):
        plain = type(unet).from_config(unet.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval()


def save_pipeline(pipe: Any, output_dir: str, adapter_name: str = "default") -> None:
    """Write a full fine-tune as diffusers' `save_pretrained` pipeline (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/) into `output_dir`, beside the run's other files, and its mask as mask.json.

    `pipe` is the StableDiffusionPipeline that trained; its adapter is folded into the UNet (`merged_unet`). Written
    in a temporary folder first; model_index.json is removed first and moved in last, so a crash never leaves a
    loadable pipeline mixing old and new components.
    """
    config: MemControlConfig = pipe.unet.peft_config[adapter_name]
    unet = merged_unet(pipe.unet, adapter_name)
    pipeline = type(pipe)(**{**pipe.components, "unet": unet}, requires_safety_checker=False)
    mask = config.get_mask()
    if mask is None:  # all ones: written out, so the run folder names its mask as every other run's does
        space = MaskSpace.from_unet(unet, method=config.method, layout=config.mask_layout)
        mask = space.mask("1" * len(space))
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".pipeline-", dir=output_dir)
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        mask.save(os.path.join(tmp, MASK_FILE))
        for dirpath, dirnames, filenames in os.walk(tmp):
            for name in dirnames + filenames:
                usual_mode(os.path.join(dirpath, name))
            for name in filenames:
                with open(os.path.join(dirpath, name), "rb") as f:
                    os.fsync(f.fileno())
        index = os.path.join(output_dir, PIPELINE_INDEX_FILE)
        if os.path.exists(index):
            os.remove(index)
        for name in sorted(os.listdir(tmp), key=lambda n: n == PIPELINE_INDEX_FILE):  # the index last
            source, target = os.path.join(tmp, name), os.path.join(output_dir, name)
            if os.path.isdir(source):
                replace_folder(source, target)
            else:
                move(source, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publishable_files(folder: str, pickle_suffixes: tuple[str, ...]) -> list[str]:
    """The files of the pipeline in `folder` that a publication copies ("/"-joined, model_index.json last): its
    components' configs, tokenizer texts and safetensors weights, nothing hidden or linked out of the folder.

    A component holding a file with one of `pickle_suffixes` is a ValueError: only safetensors are published."""
    with open(os.path.join(folder, PIPELINE_INDEX_FILE), encoding="utf-8") as f:
        index = json.load(f)
    root = os.path.realpath(folder)
    found = []
    for component in sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]):
        path = os.path.join(folder, component)
        names = sorted(os.listdir(path)) if os.path.isdir(path) else []
        pickles = [n for n in names if n.lower().endswith(pickle_suffixes)]
        if pickles:
            raise ValueError(f"{folder!r}: {component}/ holds pickle weights {pickles}; only safetensors are "
                             "published. Save the pipeline with safe_serialization=True.")
        found += [f"{component}/{n}" for n in names if not n.startswith(".") and n.endswith(PUBLISHED_SUFFIXES)
                  and os.path.isfile(os.path.join(path, n)) and not os.path.islink(os.path.join(path, n))
                  and os.path.commonpath([os.path.realpath(os.path.join(path, n)), root]) == root]
    return [*found, PIPELINE_INDEX_FILE]
