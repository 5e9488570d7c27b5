"""peft tuners of diffusers-memcontrol, registered with peft on import."""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .memcontrol import (
    LAYOUTS,
    METHODS,
    PEFT_TYPE,
    SCOPES,
    Mask,
    MaskSpace,
    MemControlConfig,
    MemControlLayer,
    MemControlModel,
    trainable_parameters,
)


def register_with_peft() -> None:
    """Make the plain-string peft type "MEMCONTROL" known to peft (get_peft_model, PeftConfig.from_pretrained, ...).

    Idempotent; raises if another method already holds the name, instead of replacing it.
    """
    # peft's register_peft_method only accepts members of its closed PeftType enum; plain-string types are supported
    # by filling the three mappings directly.
    wanted = (
        (PEFT_TYPE_TO_CONFIG_MAPPING, MemControlConfig),
        (PEFT_TYPE_TO_TUNER_MAPPING, MemControlModel),
        (PEFT_TYPE_TO_PREFIX_MAPPING, MemControlModel.prefix),
    )
    for mapping, value in wanted:
        current = mapping.get(PEFT_TYPE)
        if current is not None and current != value:
            raise ValueError(f"peft already has a method registered as {PEFT_TYPE!r} ({current!r}); refusing to "
                             "replace it.")
    for mapping, value in wanted:
        mapping[PEFT_TYPE] = value


register_with_peft()

__all__ = ["LAYOUTS", "METHODS", "SCOPES", "Mask", "MaskSpace", "MemControlConfig", "MemControlLayer", "MemControlModel",
           "register_with_peft", "trainable_parameters"]
