"""`pipe.load_memcontrol_adapter(repo)`: MemControl adapters on diffusers pipelines, fetched, checked, then injected.

`register_pipeline_methods()` (called when `diffusers_memcontrol` is imported) attaches `load_memcontrol_adapter` and
`unload_memcontrol_adapter` to `diffusers.DiffusionPipeline`, so every pipeline with a `unet` (StableDiffusionPipeline
first) gains them; the pipeline classes and their saved folders stay plain diffusers. The same functions work on a
bare UNet through `load_unet_adapter` / `unload_unet_adapter`.

Loading checks, before any weight of the UNet is touched, that the mask positions exist in this UNet and that every
tensor of `adapter_model.safetensors` has the key and shape that injecting the adapter would create (computed on a
meta-device twin of the UNet, so no memory and no SVD is spent on a mismatch).
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import torch
from torch import nn

from ..constants import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MASK_FILE, UNET_FOLDER
from ..tuners import Mask, MaskSpace, MemControlConfig
from .adapters import CONFIG_DIGEST_KEY, check_adapter_tensors
from .pipelines import is_pipeline_folder
from .publish import MemControlRepoError, download_memcontrol

DEFAULT_ADAPTER_NAME = "memcontrol"
_MARK = "__memcontrol_loader__"


# ----------------------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------------------
def _read_config(folder: str, source: str) -> MemControlConfig:
    path = os.path.join(folder, ADAPTER_CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MemControlRepoError(f"{source}: {ADAPTER_CONFIG_FILE} ({path}) is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise MemControlRepoError(f"{source}: {ADAPTER_CONFIG_FILE} ({path}) is not a JSON object.")
    if data.get("peft_type") != "MEMCONTROL":
        raise MemControlRepoError(
            f"{source} holds a {data.get('peft_type')!r} adapter, not a MemControl one (peft_type MEMCONTROL); use "
            "diffusers' own loaders (e.g. load_lora_weights) for it."
        )
    known = set(MemControlConfig.__dataclass_fields__) - {"peft_type", "target_modules"}
    fields = {k: v for k, v in data.items() if k in known}
    mask = Mask.load(os.path.join(folder, MASK_FILE))
    if fields.get("mask") is None:
        fields["mask"] = mask.to_dict()
    try:
        config = MemControlConfig(**fields)
    except (TypeError, ValueError) as error:
        raise MemControlRepoError(f"{source}: invalid {ADAPTER_CONFIG_FILE}: {error}") from error
    if config.get_mask() != mask:
        raise MemControlRepoError(f"{source}: {MASK_FILE} and the mask in {ADAPTER_CONFIG_FILE} disagree.")
    config.inference_mode = True  # loaded for generation: adapter tensors do not require grad
    return config


def _check_positions(unet: nn.Module, config: MemControlConfig, source: str) -> None:
    mask = config.get_mask()
    try:
        MaskSpace.from_unet(unet, method=config.method, layout=mask.layout).validate(mask)
    except ValueError as error:
        raise MemControlRepoError(f"The adapter {source} does not fit this UNet (mask for another architecture): "
                                  f"{error}") from error


def _meta_twin(unet: nn.Module) -> nn.Module | None:
    """The same architecture on the meta device (no memory), built from the diffusers config; None if impossible."""
    config = getattr(unet, "config", None)
    from_config = getattr(type(unet), "from_config", None)
    if config is None or from_config is None:
        return None
    try:
        with torch.device("meta"):
            return from_config(config)
    except (TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError):  # exotic UNet: check later
        return None


def _expected_shapes(unet: nn.Module, config: MemControlConfig) -> dict[str, tuple[int, ...]] | None:
    """Keys and shapes of the adapter state dict that injecting `config` into `unet` creates."""
    expected = _expected_tensors(unet, config)
    return None if expected is None else {k: shape for k, (shape, _) in expected.items()}


def _expected_tensors(unet: nn.Module, config: MemControlConfig) -> dict[str, tuple[tuple, torch.dtype]] | None:
    """Keys, shapes and dtypes of the adapter state dict that injecting `config` into `unet` creates."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    twin = _meta_twin(unet)
    if twin is None:
        return None
    probe = "memcontrol_probe"
    inject_adapter_in_model(copy.deepcopy(config), twin, probe)
    return {k: (tuple(v.shape), v.dtype) for k, v in get_peft_model_state_dict(twin, adapter_name=probe).items()}


def _file_shapes(weights: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(weights, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError: a truncated or corrupt file
        raise MemControlRepoError(f"{weights!r} is not a readable safetensors file: {error}") from None


def _read_weights(weights: str, config_path: str, source: str) -> dict[str, torch.Tensor]:
    """The tensors of `weights` (MemControlRepoError naming the file when it is truncated or corrupt), checked to
    belong to the adapter_config.json saved with them when their metadata records its digest."""
    from safetensors import safe_open

    from ..files import file_digest

    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError: a truncated or corrupt file
        raise MemControlRepoError(f"{weights!r} is not a readable safetensors file: {error}") from None
    recorded = metadata.get(CONFIG_DIGEST_KEY)
    if recorded is not None and recorded != file_digest(config_path):
        raise MemControlRepoError(f"The adapter {source}: {ADAPTER_WEIGHTS_FILE} was saved with another "
                                  f"{ADAPTER_CONFIG_FILE} (an interrupted save?); refusing to load them together.")
    return state


def _fuse(unet: nn.Module, name: str, source: str) -> None:
    """Merge adapter `name` into the weights, checking every merged weight is finite; on failure restore them."""
    layers = [layer for _, layer in _tuner_layers(unet) if name in getattr(layer, "memcontrol_roles", {name: 0})]
    saved = []
    try:
        for layer in layers:
            base = layer.get_base_layer()
            saved.append((layer, base.weight.detach().clone(),
                          None if getattr(base, "bias", None) is None else base.bias.detach().clone()))
            layer.merge(safe_merge=True, adapter_names=[name])
    except ValueError as error:
        with torch.no_grad():
            for layer, weight, bias in saved:
                base = layer.get_base_layer()
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)
                if name in layer.merged_adapters:
                    layer.merged_adapters.remove(name)
        raise MemControlRepoError(f"The adapter {source} cannot be fused: {error}; the UNet was left as it was.") \
            from None


def _compare_shapes(expected: dict, found: dict, source: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or wrong:
        details = []
        if wrong:
            details.append("shape mismatches " + ", ".join(f"{k}: file {found[k]} vs UNet {expected[k]}"
                                                           for k in wrong[:3]))
        if missing:
            details.append(f"{len(missing)} tensors missing from the file (e.g. {missing[:2]})")
        if unexpected:
            details.append(f"{len(unexpected)} tensors this UNet has no place for (e.g. {unexpected[:2]})")
        raise MemControlRepoError(f"The adapter {source} does not fit this UNet: {'; '.join(details)}.")


# ----------------------------------------------------------------------------------------------------------------
# load / unload on a UNet
# ----------------------------------------------------------------------------------------------------------------
def memcontrol_adapter_names(unet: nn.Module) -> list[str]:
    """Names of the MemControl adapters currently loaded into `unet`."""
    return [name for name, cfg in (getattr(unet, "peft_config", None) or {}).items()
            if isinstance(cfg, MemControlConfig)]


def _tuner_layers(unet: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]


def _active_adapters(unet: nn.Module) -> list[str]:
    for _, layer in _tuner_layers(unet):
        return list(layer.active_adapters)
    return []


def _remove(unet: nn.Module, adapter_name: str) -> None:
    """Unmerge and delete one adapter (through diffusers' `delete_adapters`); unwrap layers left without any adapter."""
    for _, layer in _tuner_layers(unet):
        if adapter_name in layer.merged_adapters:
            others = [a for a in layer.merged_adapters if a != adapter_name]
            layer.unmerge()
            if others:
                layer.merge(adapter_names=others)
        layer.delete_adapter(adapter_name)
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters(adapter_name)
    _unwrap_empty_layers(unet)


def _holds_nothing(layer) -> bool:
    for attr in tuple(layer.adapter_layer_names) + tuple(layer.other_param_names):
        store = getattr(layer, attr, None)
        if hasattr(store, "__len__") and hasattr(store, "keys") and len(store):
            return False
    return True


def _unwrap_empty_layers(unet: nn.Module) -> None:
    for name, layer in reversed(_tuner_layers(unet)):  # innermost first
        if not _holds_nothing(layer):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, layer.base_layer)


def _free_name(unet: nn.Module) -> str:
    taken = set(getattr(unet, "peft_config", None) or {})
    if DEFAULT_ADAPTER_NAME not in taken:
        return DEFAULT_ADAPTER_NAME
    i = 1
    while f"{DEFAULT_ADAPTER_NAME}_{i}" in taken:
        i += 1
    return f"{DEFAULT_ADAPTER_NAME}_{i}"


def load_unet_adapter(
    unet: nn.Module,
    repo_id_or_path: str | os.PathLike,
    adapter_name: str | None = None,
    fuse: bool = False,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    endpoint: str | None = None,
) -> str:
    """Fetch, check and inject a MemControl adapter into `unet`; return the adapter name.

    Every check (mask positions, tensor keys and shapes, safetensors only) runs before the UNet is modified, so a
    mismatched adapter leaves the UNet exactly as it was.
    """
    from peft import set_peft_model_state_dict

    source = os.fspath(repo_id_or_path)
    if os.path.isdir(source) and is_pipeline_folder(source):
        raise MemControlRepoError(f"{source!r} holds a full fine-tune saved as a diffusers pipeline, not an adapter: "
                                  "load it with DiffusionPipeline.from_pretrained (its UNet: UNet2DConditionModel."
                                  f"from_pretrained(..., subfolder={UNET_FOLDER!r})).")
    folder = download_memcontrol(source, revision=revision, token=token, cache_dir=cache_dir,
                                 local_files_only=local_files_only, require_adapter=True, endpoint=endpoint)
    label = repr(source)
    config = _read_config(folder, label)
    name = adapter_name or _free_name(unet)
    if name in (getattr(unet, "peft_config", None) or {}):
        raise ValueError(f"An adapter named {name!r} is already loaded; pass another adapter_name or unload it first.")
    _check_positions(unet, config, label)
    weights = os.path.join(folder, ADAPTER_WEIGHTS_FILE)
    expected = _expected_tensors(unet, config)
    if expected is not None:
        _compare_shapes({k: shape for k, (shape, _) in expected.items()}, _file_shapes(weights), label)
    state = _read_weights(weights, os.path.join(folder, ADAPTER_CONFIG_FILE), label)
    model_dtype = next((p.dtype for p in unet.parameters() if p.is_floating_point()), torch.float32)
    if expected is not None:
        check_adapter_tensors(state, expected, label)
        _check_in_dtype(state, model_dtype, label)

    previously_active = _active_adapters(unet)
    grads_before = {id(p): p.requires_grad for p in unet.parameters()}
    try:
        with warnings.catch_warnings():  # peft warns whenever a model already holds a peft_config: expected here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            unet.add_adapter(config, adapter_name=name)
        if expected is None:  # no meta twin: check shapes against the injected layers, before copying values
            from peft import get_peft_model_state_dict

            injected = get_peft_model_state_dict(unet, adapter_name=name)
            _compare_shapes({k: tuple(v.shape) for k, v in injected.items()},
                            {k: tuple(v.shape) for k, v in state.items()}, label)
            check_adapter_tensors(state, {k: (tuple(v.shape), v.dtype) for k, v in injected.items()}, label)
            _check_in_dtype(state, model_dtype, label)
        result = set_peft_model_state_dict(unet, state, adapter_name=name)
        if result.unexpected_keys:
            raise MemControlRepoError(f"The adapter {label} does not fit this UNet: unexpected keys "
                                      f"{result.unexpected_keys[:3]}.")
    except Exception:
        _remove(unet, name)
        for p in unet.parameters():
            p.requires_grad_(grads_before.get(id(p), p.requires_grad))
        raise
    # keep adapters that were active before (e.g. another MemControl adapter) active next to the new one; peft's
    # set_adapter switches gradients on, so restore the previous flags and keep this inference adapter frozen
    active = [a for a in previously_active if a != name] + [name]
    for _, layer in _tuner_layers(unet):
        layer.set_adapter(active)
    for p in unet.parameters():
        p.requires_grad_(grads_before.get(id(p), False))
    if fuse:
        try:
            _fuse(unet, name, label)
        except MemControlRepoError:
            _remove(unet, name)
            raise
    return name


def _check_in_dtype(state: dict[str, torch.Tensor], dtype: torch.dtype, source: str) -> None:
    """Refuse adapter values that become infinite in the UNet's dtype (e.g. 1e30 in a half-precision UNet)."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value.to(dtype)).all():
            raise MemControlRepoError(f"The adapter {source}: tensor {key} overflows the UNet's {dtype}; refusing "
                                      "to load it.")


def unload_unet_adapter(unet: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Remove one MemControl adapter (or all of them) from `unet`, unfusing first; return the removed names."""
    loaded = memcontrol_adapter_names(unet)
    if adapter_name is not None and adapter_name not in loaded:
        raise ValueError(f"No MemControl adapter named {adapter_name!r} is loaded; loaded: {loaded}.")
    names = [adapter_name] if adapter_name is not None else loaded
    for name in names:
        _remove(unet, name)
    return names


# ----------------------------------------------------------------------------------------------------------------
# pipeline mixin
# ----------------------------------------------------------------------------------------------------------------
def load_adapter(unet: torch.nn.Module, adapter_dir: str, adapter_name: str = "default") -> MemControlConfig:
    """Load a saved MemControl adapter folder into `unet` (checked before any weight moves); return its config.

    The same checks and loading as `pipe.load_memcontrol_adapter` (`load_unet_adapter`), local folder only.
    """
    name = load_unet_adapter(unet, adapter_dir, adapter_name=adapter_name, local_files_only=True)
    return unet.peft_config[name]


def _require_unet(pipe) -> nn.Module:
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has no `unet` component: MemControl adapters target UNet-based "
                         "diffusers pipelines such as StableDiffusionPipeline.")
    return unet


class MemControlLoaderMixin:
    """Adds `load_memcontrol_adapter` / `unload_memcontrol_adapter` to a diffusers pipeline that has a `unet`."""

    def load_memcontrol_adapter(
        self,
        repo_id_or_path: str | os.PathLike,
        adapter_name: str | None = None,
        fuse: bool = False,
        *,
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> str:
        """Load a MemControl adapter (Hub repo id or folder) into `self.unet`; `fuse=True` merges it into the weights.

        Fetches with huggingface_hub (cache, revision, token, local_files_only), loads safetensors only and checks
        that the adapter fits this UNet before touching it. Returns the adapter name.
        """
        return load_unet_adapter(_require_unet(self), repo_id_or_path, adapter_name, fuse, revision=revision,
                                 token=token, cache_dir=cache_dir, local_files_only=local_files_only)

    def unload_memcontrol_adapter(self, adapter_name: str | None = None) -> list[str]:
        """Remove a MemControl adapter (all of them when `adapter_name` is None) from `self.unet`, restoring the base."""
        return unload_unet_adapter(_require_unet(self), adapter_name)


setattr(MemControlLoaderMixin.load_memcontrol_adapter, _MARK, True)
setattr(MemControlLoaderMixin.unload_memcontrol_adapter, _MARK, True)


def register_pipeline_methods() -> None:
    """Attach the MemControl loader methods to `diffusers.DiffusionPipeline` (idempotent; never overrides diffusers)."""
    from diffusers import DiffusionPipeline

    for method in ("load_memcontrol_adapter", "unload_memcontrol_adapter"):
        current = DiffusionPipeline.__dict__.get(method)
        if current is None or getattr(current, _MARK, False):
            setattr(DiffusionPipeline, method, getattr(MemControlLoaderMixin, method))
