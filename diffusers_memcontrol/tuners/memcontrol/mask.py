"""Mask spaces: which PEFT parameters of a UNet train, one bit per position.

A *position* is a part of the UNet's transformer blocks that MemControl can switch on or off. Positions are
found by walking the given `UNet2DConditionModel` (never from a hard-coded SD1.5 list) and are ordered in data-flow
order: down blocks, mid block, up blocks; inside a block by attention index, then transformer layer, then attn1
before attn2.

Layouts:

- `blocks`: one bit per `Transformer2DModel`, covering its transformer layers (16 bits on SD1.5).
- `attention`: one bit per self-attention (`attn1`) and per cross-attention (`attn2`) module (32 bits on SD1.5).
- `paper`: the reference code's layout. SV-DIFF / DiffFit / full: every down-block and mid-block transformer, and the
  up-block transformers except the last one of each up block (13 bits on SD1.5: `up_blocks[1..3].attentions[2]` are
  never masked). Other methods: all transformers (16 on SD1.5).

A bit covers the *transformer layers* of its block (`<block>.transformer_blocks`); the block's `proj_in`, `proj_out`
and group norm are outside every position. With this definition the SD1.5 counts match the reference code
(3,203 / 6,403 / 11,779 SV-DIFF shifts per block at width 320 / 640 / 1280).

What a method trains (its *masked* parameters follow the bits; *unmasked* parameters do not):

| method      | masked parameters (a 0 bit freezes them)                        | unmasked parameters        |
|-------------|-----------------------------------------------------------------|----------------------------|
| `svdiff`    | spectral shifts of every Linear/Conv2d, one shift per norm      | none                       |
| `difffit`   | gammas: q/k/v/out outputs of attn1/attn2, attn1/attn2/ff branch | biases of all layers, norms|
| `attention` | attn1/attn2 weights and biases                                  | none                       |
| `lora`      | peft LoRA on attn1/attn2 to_q/to_k/to_v/to_out.0                | none                       |
| `full`      | every UNet weight                                               | none                       |
| `freeze`    | nothing                                                         | none                       |

Scopes:

- `reference` (default, the reference code's behaviour, so the paper's runs are reproduced): masked parameters outside
  every position (e.g. SV-DIFF shifts of resnets, conv_in/out, time embedding; the up blocks' last transformers in the
  `paper` layout) always train, and unmasked parameters (DiffFit's biases and norms) train everywhere.
- `strict`: only parameters inside positions whose bit is 1 train; everything else is frozen.

Built-in masks (published masks shipped with the package) live in `diffusers_memcontrol.tuners.memcontrol.builtin_masks`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from ...constants import ADAPTER_CONFIG_FILE, BEST_MASK_FILE, MASK_FILE
from ...files import write_text_atomic

MASK_FILES = (MASK_FILE, BEST_MASK_FILE, ADAPTER_CONFIG_FILE)

METHODS = ("svdiff", "difffit", "attention", "lora", "full", "freeze")
LAYOUTS = ("blocks", "attention", "paper")
SCOPES = ("reference", "strict")
_PAPER_SUBSET_METHODS = ("svdiff", "difffit", "full")
_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")

# Kinds of trainable tensors a method attaches to one module (see `module_roles`).
ROLE_SPECTRAL = "spectral"  # SV-DIFF shifts of the singular values of a Linear/Conv2d weight
ROLE_NORM_SHIFT = "norm_shift"  # SV-DIFF: one scalar shift of a norm's weight
ROLE_GAMMA = "gamma"  # DiffFit: per-channel scale of an attention projection's output
ROLE_RESIDUAL_GAMMA = "residual_gamma"  # DiffFit: per-channel scale of an attn1/attn2/ff residual branch
ROLE_BIAS = "bias"  # DiffFit: bias of a Linear/Conv2d
ROLE_NORM_AFFINE = "norm_affine"  # DiffFit: weight and bias of a norm
ROLE_DENSE = "dense"  # attention / full: every weight and bias of the module
ROLE_LORA = "lora"  # peft LoRA


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(choices)}.")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and getattr(module, "weight", None) is not None


def _transformer_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """Transformer2DModel-like blocks (anything with `transformer_blocks`) in data-flow order."""
    found = [(name, m) for name, m in unet.named_modules() if hasattr(m, "transformer_blocks") and name]
    if not found:
        raise ValueError(
            f"{type(unet).__name__} has no transformer blocks (modules with `transformer_blocks`); MemControl needs a "
            "UNet2DConditionModel with cross-attention blocks."
        )

    def order(item: tuple[str, nn.Module]) -> tuple:
        parts = item[0].split(".")
        stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(parts[0], 3)
        return (stage, [int(p) if p.isdigit() else p for p in parts[1:]])

    return sorted(found, key=order)


@dataclass(frozen=True)
class Mask:
    """A binary mask over the positions of a `MaskSpace`; serializes to JSON and travels with adapters."""

    method: str
    layout: str
    positions: tuple[str, ...]
    bits: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", tuple(self.positions))
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        _check_choice("method", self.method, METHODS)
        _check_choice("layout", self.layout, LAYOUTS)
        if len(self.bits) != len(self.positions):
            raise ValueError(f"Mask has {len(self.bits)} bits for {len(self.positions)} positions; they must match.")
        bad = [b for b in self.bits if b not in (0, 1)]
        if bad:
            raise ValueError(f"Mask bits must be 0 or 1, got {bad[:5]}.")

    def __len__(self) -> int:
        return len(self.bits)

    @property
    def bitstring(self) -> str:
        """The bits as a compact string such as '1011'."""
        return "".join(str(b) for b in self.bits)

    @property
    def active_positions(self) -> list[str]:
        """Positions whose bit is 1."""
        return [p for p, b in zip(self.positions, self.bits) if b]

    def to_dict(self) -> dict:
        """Plain-JSON form (lists, not tuples)."""
        return {"method": self.method, "layout": self.layout, "positions": list(self.positions), "bits": list(self.bits)}

    def to_json(self, **kwargs) -> str:
        """JSON text holding method, layout, positions and bits."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> Mask:
        """Inverse of `to_dict`, with a clear error on missing keys."""
        missing = [k for k in ("method", "layout", "positions", "bits") if k not in data]
        if missing:
            raise ValueError(f"Mask JSON is missing {missing}; expected keys method, layout, positions, bits.")
        return cls(data["method"], data["layout"], tuple(data["positions"]), tuple(data["bits"]))

    @classmethod
    def from_json(cls, text: str) -> Mask:
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        """Write the mask JSON atomically, so a crash never leaves a half-written file."""
        write_text_atomic(path, self.to_json(indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Mask:
        """Read a mask from a JSON file (a mask, or an `adapter_config.json` holding one), from a folder holding
        one of MASK_FILES (the first found): what training, search and publishing write (built-in masks
        `memcontrol:<name>` are resolved by `adapters.resolve_mask`)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            mask = cls._read_file(path)
            if mask is None:
                raise ValueError(f"{path!r} holds no mask (an adapter of a method without one, such as full).")
            return mask
        for name in MASK_FILES:
            file = os.path.join(path, name)
            mask = cls._read_file(file) if os.path.isfile(file) else None
            if mask is not None:
                return mask
        raise FileNotFoundError(f"No {', '.join(MASK_FILES)} holding a mask in folder {path!r}: no mask to read.")

    @classmethod
    def _read_file(cls, path: str) -> Mask | None:
        """The mask of a mask JSON or of an `adapter_config.json` (None when that adapter has no mask)."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and "bits" not in data and "mask" in data:
            data = data["mask"]
        return None if data is None else cls.from_dict(data)


@dataclass
class MaskSpace:
    """The mask positions of one method and layout on one UNet architecture."""

    method: str
    layout: str
    positions: list[str]
    covers: dict[str, str] = field(default_factory=dict, repr=False)  # position -> module-name prefix it covers
    transformer_prefixes: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def from_unet(cls, unet: nn.Module, method: str = "svdiff", layout: str = "blocks") -> MaskSpace:
        """Walk `unet` and list the positions of `layout` for `method`."""
        _check_choice("method", method, METHODS)
        _check_choice("layout", layout, LAYOUTS)
        blocks = _transformer_blocks(unet)
        positions: list[str] = []
        covers: dict[str, str] = {}
        if layout == "attention":
            for name, block in blocks:
                for i, layer in enumerate(block.transformer_blocks):
                    for attn in ("attn1", "attn2"):
                        if getattr(layer, attn, None) is not None:
                            pos = f"{name}.transformer_blocks.{i}.{attn}"
                            positions.append(pos)
                            covers[pos] = pos + "."
        else:
            up_last = {}
            for name, _ in blocks:
                parts = name.split(".")
                if parts[0] == "up_blocks" and len(parts) >= 4:
                    key = ".".join(parts[:3])
                    up_last[key] = max(up_last.get(key, -1), int(parts[3]))
            for name, _ in blocks:
                parts = name.split(".")
                if layout == "paper" and method in _PAPER_SUBSET_METHODS and parts[0] == "up_blocks":
                    if len(parts) >= 4 and int(parts[3]) == up_last[".".join(parts[:3])]:
                        continue
                positions.append(name)
                covers[name] = name + ".transformer_blocks."
        return cls(method, layout, positions, covers, [name + ".transformer_blocks." for name, _ in blocks])

    def __len__(self) -> int:
        return len(self.positions)

    def full(self) -> Mask:
        """All ones: the method's default configuration."""
        return Mask(self.method, self.layout, tuple(self.positions), (1,) * len(self))

    def empty(self) -> Mask:
        """All zeros: nothing inside the positions trains."""
        return Mask(self.method, self.layout, tuple(self.positions), (0,) * len(self))

    def mask(self, bits: Iterable[int] | str) -> Mask:
        """A mask of this space from a bit sequence or a bit string such as '1011'."""
        bits = [int(c) for c in bits if c not in " ,_"] if isinstance(bits, str) else [int(b) for b in bits]
        if len(bits) != len(self):
            raise ValueError(
                f"Got {len(bits)} bits but this {self.method}/{self.layout} space has len(space) = {len(self)} "
                f"positions: {self.positions}."
            )
        return Mask(self.method, self.layout, tuple(self.positions), tuple(bits))

    def validate(self, mask: Mask) -> Mask:
        """Check that `mask` belongs to this space; raise naming the expected positions otherwise."""
        if mask.layout != self.layout or list(mask.positions) != list(self.positions):
            raise ValueError(
                f"Mask (layout {mask.layout!r}, {len(mask)} positions: {list(mask.positions)[:4]}...) does not fit "
                f"this UNet; expected layout {self.layout!r} with {len(self)} positions: {self.positions}."
            )
        return mask

    def position_of(self, module_name: str) -> str | None:
        """The position covering `module_name`, or None when it lies outside every position."""
        for pos, prefix in self.covers.items():
            if module_name.startswith(prefix):
                return pos
        return None

    def module_roles(
        self, mask: Mask | None, unet: nn.Module, scope: str = "reference", lora_rank: int = 4
    ) -> dict[str, tuple[str, ...]]:
        """Which trainable tensors the method attaches to each module under `mask` (the single source of truth).

        Used both to count trainable parameters (on a meta-device UNet) and to inject the adapter.
        """
        _check_choice("scope", scope, SCOPES)
        mask = self.validate(mask) if mask is not None else self.full()
        on = {p for p, b in zip(mask.positions, mask.bits) if b}
        plan: dict[str, tuple[str, ...]] = {}
        wrapped: list[str] = []
        for name, module in unet.named_modules():
            if any(name.startswith(w) for w in wrapped):
                continue  # internals of an adapter layer already injected (base_layer, lora_A, ...)
            if hasattr(module, "get_base_layer"):
                wrapped.append(name + ".")
                module = module.get_base_layer()
            masked, unmasked = _method_roles(self.method, name, module, self.transformer_prefixes)
            if not masked and not unmasked:
                continue
            pos = self.position_of(name)
            if pos is None:
                masked_on = scope == "reference"
            else:
                masked_on = pos in on
            unmasked_on = scope == "reference" or (pos is not None and pos in on)
            roles = (masked if masked_on else ()) + (unmasked if unmasked_on else ())
            if roles:
                plan[name] = roles
        return plan

    def count_trainable(
        self, mask: Mask | None, unet: nn.Module, scope: str = "reference", lora_rank: int = 4
    ) -> int:
        """Number of parameters that train under `mask` (works on a meta-device UNet: shapes only)."""
        modules = {n: (m.get_base_layer() if hasattr(m, "get_base_layer") else m) for n, m in unet.named_modules()}
        plan = self.module_roles(mask, unet, scope=scope, lora_rank=lora_rank)
        return sum(role_numel(role, modules[name], lora_rank) for name, roles in plan.items() for role in roles)

    def to_dict(self) -> dict:
        """JSON-friendly description (method, layout, positions)."""
        return {k: v for k, v in asdict(self).items() if k in ("method", "layout", "positions")}


def _method_roles(
    method: str, name: str, module: nn.Module, transformer_prefixes: list[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(masked roles, unmasked roles) that `method` gives to one module."""
    is_linear = isinstance(module, nn.Linear)
    is_conv = isinstance(module, nn.Conv2d)
    is_norm = _is_norm(module)
    in_transformer = any(name.startswith(p) for p in transformer_prefixes)
    attn_proj = in_transformer and is_linear and _ends_with_projection(name)
    if method == "svdiff":
        if is_linear or is_conv:
            return (ROLE_SPECTRAL,), ()
        if is_norm:
            return (ROLE_NORM_SHIFT,), ()
    elif method == "difffit":
        masked: tuple[str, ...] = ()
        if attn_proj:
            masked = (ROLE_GAMMA, ROLE_RESIDUAL_GAMMA) if name.endswith("to_out.0") else (ROLE_GAMMA,)
        elif in_transformer and is_linear and name.endswith(".ff.net.2"):
            masked = (ROLE_RESIDUAL_GAMMA,)
        unmasked: tuple[str, ...] = ()
        if (is_linear or is_conv) and module.bias is not None:
            unmasked = (ROLE_BIAS,)
        elif is_norm:
            unmasked = (ROLE_NORM_AFFINE,)
        return masked, unmasked
    elif method == "attention":
        if in_transformer and (is_linear and _in_attention(name)):
            return (ROLE_DENSE,), ()
    elif method == "lora":
        if attn_proj:
            return (ROLE_LORA,), ()
    elif method == "full":
        if is_linear or is_conv or is_norm:
            return (ROLE_DENSE,), ()
    return (), ()


def _in_attention(name: str) -> bool:
    return ".attn1." in f".{name}." or ".attn2." in f".{name}."


def _ends_with_projection(name: str) -> bool:
    return any(name.endswith(f".{a}.{p}") for a in ("attn1", "attn2") for p in _ATTENTION_PROJECTIONS)


def role_numel(role: str, module: nn.Module, lora_rank: int = 4) -> int:
    """Number of trainable scalars that `role` adds to `module`."""
    if role == ROLE_SPECTRAL:
        weight = module.weight
        return min(weight.shape[0], weight[0].numel())
    if role == ROLE_NORM_SHIFT:
        return 1
    if role in (ROLE_GAMMA, ROLE_RESIDUAL_GAMMA, ROLE_BIAS):
        return module.weight.shape[0]
    if role == ROLE_NORM_AFFINE:
        return module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    if role == ROLE_DENSE:
        return sum(p.numel() for p in module.parameters(recurse=False))
    if role == ROLE_LORA:
        return lora_rank * (module.in_features + module.out_features)
    raise ValueError(f"Unknown role {role!r}.")
