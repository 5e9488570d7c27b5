"""Built-in masks: published masks shipped with the package (`assets/masks/<name>.json`).

They are named `memcontrol:<name>` wherever a mask is accepted (the trainer's `--mask`, `adapters.resolve_mask`);
`memcontrol masks` lists them with their source. The mask vocabulary itself (`Mask`, `MaskSpace`, layouts, scopes,
roles) belongs to the peft method: `diffusers_memcontrol.tuners.memcontrol.mask`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from torch import nn

from ...constants import ASSETS_DIR
from .. import Mask, MaskSpace

BUILTIN_PREFIX = "memcontrol:"
BUILTIN_MASKS_DIR = os.path.join(ASSETS_DIR, "masks")


@dataclass(frozen=True)
class BuiltinMask:
    """A published mask shipped with the package: the mask, where it comes from and what it trains."""

    name: str
    source: str
    description: str
    base_model: str  # the architecture the positions belong to (a Hub id)
    scope: str  # the scope under which `trainable_params` holds
    trainable_params: int  # on `base_model`'s UNet, counted by MaskSpace.count_trainable
    unet_params: int
    mask: Mask
    path: str

    @classmethod
    def from_file(cls, path: str) -> BuiltinMask:
        """Read `assets/masks/<name>.json`."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        fields = {k: data[k] for k in ("source", "description", "base_model", "scope", "trainable_params",
                                       "unet_params")}
        name = os.path.splitext(os.path.basename(path))[0]
        return cls(name=name, mask=Mask.from_dict(data["mask"]), path=path, **fields)

    @property
    def spec(self) -> str:
        """The name to pass as `--mask`, e.g. 'memcontrol:paper-mimic-svdiff'."""
        return BUILTIN_PREFIX + self.name

    def to_dict(self) -> dict:
        """Plain-JSON listing entry (what `memcontrol masks --json` prints)."""
        return {"name": self.spec, "source": self.source, "description": self.description,
                "method": self.mask.method, "layout": self.mask.layout, "scope": self.scope,
                "base_model": self.base_model, "trainable_params": self.trainable_params,
                "unet_params": self.unet_params, "bitstring": self.mask.bitstring}

    def fit(self, unet: nn.Module, method: str | None = None) -> Mask:
        """The mask, after checking that it belongs to `unet`'s architecture and to the PEFT `method` (if given)."""
        mask = self.mask
        if method is not None and method != mask.method:
            raise ValueError(f"Built-in mask {self.spec!r} is for PEFT method {mask.method!r} ({mask.layout} layout); "
                             f"PEFT method {method!r} does not accept it: use --peft_method {mask.method}.")
        space = MaskSpace.from_unet(unet, method=mask.method, layout=mask.layout)
        if list(space.positions) != list(mask.positions):
            raise ValueError(
                f"Built-in mask {self.spec!r} ({mask.method}, {mask.layout} layout, {len(mask)} positions) is for the "
                f"UNet of {self.base_model}; this UNet's {mask.layout} layout has {len(space)} positions "
                f"({space.positions[:2]}...). Use a mask of this UNet's space (`memcontrol mask-space`).")
        return mask


def builtin_masks() -> dict[str, BuiltinMask]:
    """The built-in masks by name (without the `memcontrol:` prefix)."""
    files = sorted(f for f in os.listdir(BUILTIN_MASKS_DIR) if f.endswith(".json"))
    return {os.path.splitext(f)[0]: BuiltinMask.from_file(os.path.join(BUILTIN_MASKS_DIR, f)) for f in files}


def builtin_mask(spec: str) -> BuiltinMask:
    """The built-in mask named `memcontrol:<name>` (or `<name>`); ValueError listing the built-in masks otherwise."""
    name = spec.removeprefix(BUILTIN_PREFIX)
    masks = builtin_masks()
    if name not in masks:
        raise ValueError(f"Unknown built-in mask {spec!r}; built-in masks: "
                         f"{', '.join(m.spec for m in masks.values())} (`memcontrol masks` lists them).")
    return masks[name]
