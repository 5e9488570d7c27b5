"""`MemControlModel`: the peft tuner that injects mask-aware adapters into a diffusers UNet."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import MemControlConfig
from .layer import MemControlLayer, create_layer
from .mask import MaskSpace


class MemControlModel(BaseTuner):
    """Injects SV-DIFF / DiffFit / attention / LoRA / full deltas into the modules that a mask switches on.

    Which module gets which trainable tensors is decided by `MaskSpace.module_roles`, the same function that counts
    trainable parameters, so counts and injected adapters always agree. The plan is made for every injected adapter
    (the first one, and those added later by `PeftModel.add_adapter` / `load_adapter` or diffusers' `add_adapter`).
    An all-zero mask (or the `freeze` method) leaves every UNet parameter frozen.
    """

    prefix: str = "memcontrol_"
    tuner_layer_cls = MemControlLayer
    target_module_mapping: dict = {}  # noqa: RUF012 - peft reads this class attribute

    def _plan(self, model: nn.Module, config: MemControlConfig) -> dict[str, tuple[str, ...]]:
        """Module name -> roles of the adapter described by `config` (fills in the config's mask and targets)."""
        space = MaskSpace.from_unet(model, method=config.method, layout=config.mask_layout)
        mask = config.get_mask()
        if mask is not None:
            space.validate(mask)
        else:
            config.mask = space.full().to_dict()
        plan = space.module_roles(config.get_mask(), model, scope=config.mask_scope, lora_rank=config.lora_rank)
        if not plan:
            # Nothing trains (freeze, or an all-zero mask in strict scope). peft and diffusers expect at least one
            # tuner layer per adapter, so wrap one layer with no trainable tensors: outputs stay identical.
            plan = {_anchor(model): ()}
        config.target_modules = sorted(plan)
        return plan

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        if "_memcontrol_plans" not in self.__dict__:
            self._memcontrol_plans: dict[str, dict[str, tuple[str, ...]]] = {}
        self._memcontrol_plans[adapter_name] = self._plan(model, self.peft_config[adapter_name])
        self._injecting = adapter_name
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._injecting = None

    def _prepare_adapter_config(self, peft_config: MemControlConfig, model_config: dict) -> MemControlConfig:
        return peft_config

    def _check_target_module_exists(self, peft_config: MemControlConfig, key: str) -> bool:
        return key in self._memcontrol_plans.get(self._injecting, {})

    def _create_and_replace(
        self,
        peft_config: MemControlConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        roles = self._memcontrol_plans[adapter_name].get(current_key)
        if roles is None:
            raise ValueError(f"{current_key!r} is not adapted by this MemControl adapter's mask.")
        kwargs = dict(lora_rank=peft_config.lora_rank, lora_alpha=peft_config.lora_alpha,
                      inference_mode=peft_config.inference_mode)
        if isinstance(target, MemControlLayer):
            target.update_layer(adapter_name, roles, **kwargs)
            return
        new_module = create_layer(target, adapter_name, roles, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


def _anchor(model: nn.Module) -> str:
    """The first Linear/Conv2d of `model` that may carry an adapter (itself or its MemControl wrapper)."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, MemControlLayer):
            inside.append(name + ".")
            if isinstance(module.get_base_layer(), (nn.Linear, nn.Conv2d)):
                return name
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            return name
    raise ValueError("MemControl needs a model with at least one Linear or Conv2d layer.")


def trainable_parameters(model: nn.Module, by_prefix: bool = False) -> int:
    """Number of parameters of `model` that train (`requires_grad`): the adapter's after injection.

    `by_prefix=True` counts the adapter's parameters by their peft prefix instead: an adapter loaded (frozen) to be
    evaluated.
    """
    if by_prefix:
        return int(sum(p.numel() for name, p in model.named_parameters() if MemControlModel.prefix in name))
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))
