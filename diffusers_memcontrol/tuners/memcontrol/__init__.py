"""The MemControl peft method: config, layers and tuner model."""

from .config import PEFT_TYPE, MemControlConfig
from .layer import Conv2d, Linear, MemControlLayer, Norm
from .model import MemControlModel

__all__ = ["PEFT_TYPE", "Conv2d", "Linear", "MemControlConfig", "MemControlLayer", "MemControlModel", "Norm"]
