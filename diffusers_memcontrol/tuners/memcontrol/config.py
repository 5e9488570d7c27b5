"""`MemControlConfig`: a peft config for mask-aware SV-DIFF, DiffFit, attention, LoRA, full and frozen tuning."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

from .mask import LAYOUTS, METHODS, SCOPES, Mask

PEFT_TYPE = "MEMCONTROL"


@dataclass
class MemControlConfig(PeftConfig):
    """Configuration of a MemControl adapter: a PEFT method restricted to the positions switched on by a mask.

    The mask's positions are resolved against the UNet when the adapter is injected, so the same config works on SD1.x,
    SD2.x and custom UNets. `adapter_config.json` stores the mask, so a saved adapter carries its own mask.
    """

    method: str = field(
        default="svdiff",
        metadata={"help": f"PEFT method, one of {', '.join(METHODS)}."},
    )
    mask: dict | Mask | None = field(
        default=None,
        metadata={"help": "The mask (Mask or its JSON dict: method, layout, positions, bits). None: all ones."},
    )
    mask_layout: str = field(
        default="blocks",
        metadata={"help": f"Mask layout used when `mask` is None, one of {', '.join(LAYOUTS)}."},
    )
    mask_scope: str = field(
        default="reference",
        metadata={
            "help": "'reference': method parameters outside every position also train (the reference code); "
            "'strict': only the positions switched on train."
        },
    )
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank (method 'lora' only)."})
    lora_alpha: float = field(default=4.0, metadata={"help": "LoRA alpha (method 'lora' only)."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Filled in at injection with the modules the mask selects; informative only."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; expected one of {', '.join(METHODS)}.")
        if self.mask_scope not in SCOPES:
            raise ValueError(f"Unknown mask_scope {self.mask_scope!r}; expected one of {', '.join(SCOPES)}.")
        if self.mask_layout not in LAYOUTS:
            raise ValueError(f"Unknown mask_layout {self.mask_layout!r}; expected one of {', '.join(LAYOUTS)}.")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}.")
        if isinstance(self.mask, Mask):
            self.mask = self.mask.to_dict()
        if self.mask is not None:
            mask = Mask.from_dict(self.mask)  # validates
            if mask.method != self.method:
                raise ValueError(f"The mask was built for method {mask.method!r} but the config's method is "
                                 f"{self.method!r}.")
            self.mask_layout = mask.layout
            self.mask = mask.to_dict()

    def get_mask(self) -> Mask | None:
        """The mask as a `Mask` object (None means all ones)."""
        return Mask.from_dict(self.mask) if self.mask is not None else None
