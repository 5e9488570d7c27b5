"""Adapters in files: the --mask value, saving and loading a MemControl adapter (peft format), merged sampling."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile

import torch
from peft import PeftConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from ..constants import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MASK_FILE, UNET_FOLDER
from ..files import file_digest, move, replace_folder, reporting_full_disk, usual_mode
from ..tuners import Mask, MaskSpace, MemControlConfig
from ..tuners.memcontrol.builtin_masks import BUILTIN_PREFIX, builtin_mask
from .pipelines import is_pipeline_folder
from .publish import MemControlRepoError, download_memcontrol


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


ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MASK_FILE)
# safetensors metadata of adapter_model.safetensors: the SHA-256 of the adapter_config.json saved with it
CONFIG_DIGEST_KEY = "memcontrol_config_sha256"


def check_adapter_tensors(state: dict[str, torch.Tensor], expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
                          source: str, error: type[Exception] | None = None, strict_dtype: bool = False) -> None:
    """Refuse (MemControlRepoError, or `error`) adapter tensors with missing or unknown keys, another shape, another
    dtype (`strict_dtype`; else any float dtype for a float tensor: fp16/bf16 adapters load), or NaN/inf values,
    before any of them reaches a model."""
    error = error or MemControlRepoError
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise error(f"The adapter {source} does not fit this UNet: missing tensors {missing[:2]}, unexpected "
                    f"tensors {unexpected[:2]}.")
    for key, (shape, dtype) in expected.items():
        value = state[key]
        if tuple(value.shape) != tuple(shape):
            raise error(f"The adapter {source}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(shape)}.")
        if value.dtype != dtype and (strict_dtype or not (value.is_floating_point() and dtype.is_floating_point)):
            raise error(f"The adapter {source}: tensor {key} is {value.dtype}, expected {dtype}.")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise error(f"The adapter {source}: tensor {key} holds NaN or infinite values; refusing to load it.")


def _only_adapter_files(folder: str, names: set[str]) -> bool:
    """Whether `folder` is missing or holds an adapter and nothing else (a folder save_adapter replaces as a whole;
    an existing empty folder, e.g. a checkpoint being written, is filled in place)."""
    if not os.path.isdir(folder):
        return not os.path.lexists(folder)
    found = os.listdir(folder)
    return bool(found) and all(n in names and os.path.isfile(os.path.join(folder, n)) for n in found)


def save_adapter(unet: torch.nn.Module, output_dir: str, adapter_name: str = "default", extra_files: dict | None = None
                 ) -> None:
    """Write the adapter in peft format (adapter_config.json + adapter_model.safetensors + mask.json) atomically.

    The files are written into a temporary folder first. A folder that holds nothing but an adapter is replaced as a
    whole (renames only); in a folder that holds other files too (a trainer's output folder), the old weights are
    removed first and the new ones moved in last, and the weights' metadata records the digest of their config, so a
    crash never leaves new weights beside an old config. Non-finite adapter tensors are refused.
    """
    config: MemControlConfig = unet.peft_config[adapter_name]
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(
        unet, adapter_name=adapter_name).items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"Refusing to write an adapter with NaN/inf tensors ({bad[:3]}).")
    output_dir = os.path.abspath(output_dir)
    whole = _only_adapter_files(output_dir, set(ADAPTER_FILES) | set(extra_files or {}))
    parent = os.path.dirname(output_dir) if whole else output_dir
    os.makedirs(parent, exist_ok=True)
    needed = sum(v.numel() * v.element_size() for v in state.values()) + 2**16  # + configs, mask, header
    with reporting_full_disk(output_dir, needed):
        tmp = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
        try:
            config.save_pretrained(tmp)
            config_digest = file_digest(os.path.join(tmp, ADAPTER_CONFIG_FILE))
            save_file(state, os.path.join(tmp, ADAPTER_WEIGHTS_FILE),
                      metadata={"format": "pt", CONFIG_DIGEST_KEY: config_digest})
            mask = config.get_mask()
            if mask is not None:
                mask.save(os.path.join(tmp, MASK_FILE))
            for name, text in (extra_files or {}).items():
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(text)
            for name in os.listdir(tmp):
                usual_mode(os.path.join(tmp, name))
                with open(os.path.join(tmp, name), "rb") as f:
                    os.fsync(f.fileno())
            usual_mode(tmp)
            if whole:
                replace_folder(tmp, output_dir)
                return
            weights = os.path.join(output_dir, ADAPTER_WEIGHTS_FILE)
            if os.path.exists(weights):
                os.remove(weights)
            for name in sorted(os.listdir(tmp), key=lambda n: n == ADAPTER_WEIGHTS_FILE):  # the weights last
                move(os.path.join(tmp, name), os.path.join(output_dir, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def read_adapter_config(adapter_dir: str) -> MemControlConfig:
    """The MemControlConfig saved in `adapter_dir` (clear errors for a missing or non-MemControl adapter)."""
    if not os.path.isfile(os.path.join(adapter_dir, ADAPTER_CONFIG_FILE)):
        raise FileNotFoundError(f"{adapter_dir!r} has no adapter_config.json: not an adapter folder.")
    try:
        config = PeftConfig.from_pretrained(adapter_dir)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MemControlRepoError(f"{os.path.join(adapter_dir, 'adapter_config.json')!r} is not valid JSON: "
                                  f"{error}") from None
    if not isinstance(config, MemControlConfig):
        raise ValueError(  # noqa: TRY004 - kept a ValueError (bad input folder), as before
            f"{adapter_dir!r} holds a {type(config).__name__}, not a MemControl adapter.")
    return config


def check_adapter_fits(unet: torch.nn.Module, adapter_dir: str) -> MemControlConfig | None:
    """Check, without touching `unet`, that the adapter in `adapter_dir` (or the UNet of a full fine-tune's pipeline
    folder: then None is returned) was made for this UNet's architecture."""
    if is_pipeline_folder(adapter_dir):
        from diffusers import UNet2DConditionModel

        saved = UNet2DConditionModel.load_config(adapter_dir, subfolder=UNET_FOLDER)
        differ = sorted(k for k, v in unet.config.items() if not k.startswith("_") and k in saved
                        and json.dumps(saved[k]) != json.dumps(v))
        if differ:
            raise ValueError(f"The full fine-tune in {adapter_dir!r} was trained for another base model: its UNet "
                             f"differs in {differ[:3]}.")
        return None
    config = read_adapter_config(adapter_dir)
    mask = config.get_mask()
    if mask is not None:
        try:
            MaskSpace.from_unet(unet, method=config.method, layout=mask.layout).validate(mask)
        except ValueError as err:
            raise ValueError(f"The adapter in {adapter_dir!r} was trained for another base model: {err}") from None
    return config


@contextlib.contextmanager
def merged_adapters(unet: torch.nn.Module):
    """Fold the adapters into the UNet's weights while sampling (no adapter overhead per step), then restore them."""
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer) and not m.merged]
    for layer in layers:
        layer.merge()
    try:
        yield unet
    finally:
        for layer in layers:
            layer.unmerge()
