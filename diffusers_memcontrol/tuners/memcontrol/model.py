"""`MemControlModel`: the peft tuner that injects mask-aware adapters into a diffusers UNet."""

from __future__ import annotations

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ...masks import ROLE_LORA, MaskSpace
from .config import MemControlConfig
from .layer import MemControlLayer, create_layer


class MemControlModel(BaseTuner):
    """Injects SV-DIFF / DiffFit / attention / LoRA / full deltas into the modules that a mask switches on.

    Which module gets which trainable tensors is decided once by `MaskSpace.module_roles`, the same function that
    counts trainable parameters, so counts and injected adapters always agree. An all-zero mask (or the `freeze`
    method) injects nothing and leaves every UNet parameter frozen.
    """

    prefix: str = "memcontrol_"
    tuner_layer_cls = (MemControlLayer, LoraLayer)
    target_module_mapping: dict = {}  # noqa: RUF012 - peft reads this class attribute

    def _pre_injection_hook(self, model: nn.Module, config: MemControlConfig, adapter_name: str) -> None:
        space = MaskSpace.from_unet(model, method=config.method, layout=config.mask_layout)
        mask = config.get_mask()
        if mask is not None:
            space.validate(mask)
        else:
            config.mask = space.full().to_dict()
        plan = space.module_roles(config.get_mask(), model, scope=config.mask_scope, lora_rank=config.lora_rank)
        if not hasattr(self, "_memcontrol_plans"):
            self._memcontrol_plans: dict[str, dict[str, tuple[str, ...]]] = {}
        if not plan:
            # Nothing trains (freeze, or an all-zero mask in strict scope). peft and diffusers expect at least one
            # tuner layer per adapter, so wrap one layer with no trainable tensors: outputs stay identical.
            anchor = next(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
            plan = {anchor: ()}
        self._memcontrol_plans[adapter_name] = plan
        config.target_modules = sorted(plan)

    def _prepare_adapter_config(self, peft_config: MemControlConfig, model_config: dict) -> MemControlConfig:
        return peft_config

    def _check_target_module_exists(self, peft_config: MemControlConfig, key: str) -> bool:
        return key in self._memcontrol_plans.get(self._injecting, {})

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        self._injecting = adapter_name
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._injecting = None

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
        roles = self._memcontrol_plans[adapter_name][current_key]
        if ROLE_LORA in roles:
            lora_config = LoraConfig(r=peft_config.lora_rank, lora_alpha=peft_config.lora_alpha,
                                     target_modules=[current_key])
            if isinstance(target, LoraLayer):
                target.update_layer(adapter_name, peft_config.lora_rank, lora_alpha=peft_config.lora_alpha,
                                    config=lora_config)
                return
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            new_module = LoraLinear(base, adapter_name, config=lora_config, r=peft_config.lora_rank,
                                    lora_alpha=peft_config.lora_alpha)
        elif isinstance(target, MemControlLayer):
            target.update_layer(adapter_name, roles)
            return
        else:
            new_module = create_layer(target, adapter_name, roles)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
