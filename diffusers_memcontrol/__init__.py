"""diffusers-memcontrol: memorization-aware parameter-efficient fine-tuning for diffusers text-to-image models.

Importing the package registers the `MEMCONTROL` peft method with peft and adds `load_memcontrol_adapter` /
`unload_memcontrol_adapter` to diffusers pipelines (a saved pipeline stays loadable by plain diffusers).
"""

from .hub.loaders import MemControlLoaderMixin, register_pipeline_methods
from .hub.publish import MemControlRepoError, download_memcontrol, publish
from .tuners import LAYOUTS, METHODS, SCOPES, Mask, MaskSpace, MemControlConfig, MemControlModel

register_pipeline_methods()

__version__ = "0.1.0"

__all__ = [
    "LAYOUTS",
    "METHODS",
    "SCOPES",
    "Mask",
    "MaskSpace",
    "MemControlConfig",
    "MemControlLoaderMixin",
    "MemControlModel",
    "MemControlRepoError",
    "download_memcontrol",
    "publish",
    "register_pipeline_methods",
]
