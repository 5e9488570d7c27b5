"""Adapters in files: the --mask value, saving and loading a MemControl adapter (peft format), merged sampling."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile

import torch

from .files import usual_mode
from .masks import BUILTIN_PREFIX, builtin_mask
from .tuners import Mask, MaskSpace, MemControlConfig


def resolve_mask(spec: str | None, unet: torch.nn.Module, method: str | None, layout: str) -> Mask | None:
    """Turn a `--mask` value (None, a bit string, a mask JSON file, a folder or a Hub repo holding one, a built-in
    mask `memcontrol:<name>`) into a Mask.

    A stored mask is re-targeted to `method` when its positions fit; `method=None` keeps the stored method.
    """
    if spec is None or spec == "":
        return None
    if spec.startswith(BUILTIN_PREFIX):  # a mask shipped with the package (`memcontrol masks` lists them)
        return builtin_mask(spec).fit(unet, method)
    if not os.path.exists(spec) and re.fullmatch(r"[\w.-]+/[\w.-]+", spec):  # a Hub repo holding a published mask
        from .hub import download_memcontrol

        spec = download_memcontrol(spec, require_adapter=False)
    if os.path.exists(spec):
        mask = Mask.load(spec)
        if method is not None and mask.method != method:
            # a mask transfers across methods only when positions agree (same layout on the same architecture)
            mask = Mask(method, mask.layout, mask.positions, mask.bits)
        return MaskSpace.from_unet(unet, method=mask.method, layout=mask.layout).validate(mask)
    if method is None:
        raise ValueError(f"--mask {spec!r} is not a mask file, folder or Hub repo; a bit string needs a PEFT method.")
    space = MaskSpace.from_unet(unet, method=method, layout=layout)
    if set(spec) <= set("01, _"):
        return space.mask(spec)
    raise ValueError(f"--mask {spec!r} is neither a file, a folder, nor a bit string of length {len(space)}.")


def save_adapter(unet: torch.nn.Module, output_dir: str, adapter_name: str = "default", extra_files: dict | None = None
                 ) -> None:
    """Write the adapter in peft format (adapter_config.json + adapter_model.safetensors + mask.json) atomically.

    Files are written into a temporary folder next to `output_dir` and moved in place one by one with `os.replace`,
    so a crash never leaves a half-written adapter file. Non-finite adapter tensors are refused.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config: MemControlConfig = unet.peft_config[adapter_name]
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(
        unet, adapter_name=adapter_name).items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"Refusing to write an adapter with NaN/inf tensors ({bad[:3]}).")
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=output_dir)
    try:
        save_file(state, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        mask = config.get_mask()
        if mask is not None:
            mask.save(os.path.join(tmp, "mask.json"))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        for name in os.listdir(tmp):
            usual_mode(os.path.join(tmp, name))
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_adapter_config(adapter_dir: str) -> MemControlConfig:
    """The MemControlConfig saved in `adapter_dir` (clear errors for a missing or non-MemControl adapter)."""
    from peft import PeftConfig

    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise FileNotFoundError(f"{adapter_dir!r} has no adapter_config.json: not an adapter folder.")
    config = PeftConfig.from_pretrained(adapter_dir)
    if not isinstance(config, MemControlConfig):
        raise ValueError(  # noqa: TRY004 - kept a ValueError (bad input folder), as before
            f"{adapter_dir!r} holds a {type(config).__name__}, not a MemControl adapter.")
    return config


def check_adapter_fits(unet: torch.nn.Module, adapter_dir: str) -> MemControlConfig:
    """Check, without touching `unet`, that the adapter in `adapter_dir` was made for this UNet's architecture."""
    config = read_adapter_config(adapter_dir)
    mask = config.get_mask()
    if mask is not None:
        try:
            MaskSpace.from_unet(unet, method=config.method, layout=mask.layout).validate(mask)
        except ValueError as err:
            raise ValueError(f"The adapter in {adapter_dir!r} was trained for another base model: {err}") from None
    return config


def load_adapter(unet: torch.nn.Module, adapter_dir: str, adapter_name: str = "default") -> MemControlConfig:
    """Load a saved MemControl adapter folder into `unet` (checked before any weight moves); return its config.

    The same checks and loading as `pipe.load_memcontrol_adapter` (`loaders.load_unet_adapter`), local folder only.
    """
    from .loaders import load_unet_adapter

    name = load_unet_adapter(unet, adapter_dir, adapter_name=adapter_name, local_files_only=True)
    return unet.peft_config[name]




@contextlib.contextmanager
def merged_adapters(unet: torch.nn.Module):
    """Fold the adapters into the UNet's weights while sampling (no adapter overhead per step), then restore them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer) and not m.merged]
    for layer in layers:
        layer.merge()
    try:
        yield unet
    finally:
        for layer in layers:
            layer.unmerge()
