"""The MemControl peft method: config, layers and tuner model."""

from .config import PEFT_TYPE, MemControlConfig
from .layer import Conv2d, Linear, MemControlLayer, Norm
from .mask import LAYOUTS, METHODS, SCOPES, Mask, MaskSpace
from .model import MemControlModel, trainable_parameters

__all__ = ["LAYOUTS", "METHODS", "PEFT_TYPE", "SCOPES", "Conv2d", "Linear", "Mask", "MaskSpace", "MemControlConfig",
           "MemControlLayer", "MemControlModel", "Norm", "trainable_parameters"]
