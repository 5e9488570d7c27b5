"""diffusers-memcontrol: memorization-aware parameter-efficient fine-tuning for diffusers text-to-image models.

Importing the package registers the `MEMCONTROL` peft method with peft.
"""

from .masks import LAYOUTS, METHODS, SCOPES, Mask, MaskSpace
from .tuners import MemControlConfig, MemControlModel

__version__ = "0.1.0"

__all__ = ["LAYOUTS", "METHODS", "SCOPES", "Mask", "MaskSpace", "MemControlConfig", "MemControlModel"]
