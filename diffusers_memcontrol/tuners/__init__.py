"""peft tuners of diffusers-memcontrol, registered with peft on import."""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .memcontrol import PEFT_TYPE, MemControlConfig, MemControlLayer, MemControlModel


def register_with_peft() -> None:
    """Make the plain-string peft type "MEMCONTROL" known to peft (get_peft_model, PeftConfig.from_pretrained, ...)."""
    # peft's register_peft_method only accepts members of its closed PeftType enum; plain-string types are supported
    # by filling the three mappings directly.
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = MemControlConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = MemControlModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = MemControlModel.prefix


register_with_peft()

__all__ = ["MemControlConfig", "MemControlLayer", "MemControlModel", "register_with_peft"]
