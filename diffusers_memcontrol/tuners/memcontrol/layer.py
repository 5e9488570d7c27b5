"""Tuner layers of the MemControl peft method: SV-DIFF shifts, DiffFit gammas/biases/norms, LoRA and dense deltas.

Every trainable tensor is a *delta* on a frozen base layer, so the base weights are never modified until `merge`,
the model is unchanged at init, and a saved adapter holds only what trained. Several active adapters add their weight
and bias deltas and multiply their output scales; merging them, in any order, gives the same layer.

SV-DIFF (Han et al. 2023): W' = U diag(relu(S + delta)) V^T with the SVD of the frozen weight (conv weights flattened to
out x in*k*k). The SVD is computed once when the layer is created and kept in fp32 whatever dtype the model is cast to
(a half-precision copy is used for the compute when the base weight is half precision). Since
W' = W + U diag(relu(S + delta) - S) V^T, the layer adds a correction to the base output and picks, per call, the
cheaper of two exact forms: rebuilding the weight correction (cost ~ out*in*r, independent of the number of tokens), or
applying it factored as ((x V) * shift) U^T (cost ~ tokens*r*(in+out)). The reference implementation always rebuilds
the whole weight from its SVD, which dominates the step time when there are few tokens per layer.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .mask import (
    ROLE_BIAS,
    ROLE_DENSE,
    ROLE_GAMMA,
    ROLE_LORA,
    ROLE_NORM_AFFINE,
    ROLE_NORM_SHIFT,
    ROLE_RESIDUAL_GAMMA,
    ROLE_SPECTRAL,
)

# role -> name of the ParameterDict holding it (all start with the peft prefix "memcontrol_")
ROLE_PARAMETERS = {
    ROLE_SPECTRAL: "memcontrol_spectral_shift",
    ROLE_NORM_SHIFT: "memcontrol_norm_shift",
    ROLE_GAMMA: "memcontrol_gamma",
    ROLE_RESIDUAL_GAMMA: "memcontrol_residual_gamma",
    ROLE_BIAS: "memcontrol_bias",
    ROLE_NORM_AFFINE: "memcontrol_norm_weight",  # plus memcontrol_norm_bias when the norm has a bias
    ROLE_DENSE: "memcontrol_weight",  # plus memcontrol_bias when the layer has a bias
    ROLE_LORA: "memcontrol_lora_A",  # plus memcontrol_lora_B
}
_HALF = (torch.float16, torch.bfloat16)


def _features(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Conv2d):
        return base.in_channels, base.out_channels
    if isinstance(base, nn.GroupNorm):
        return base.num_channels, base.num_channels
    if isinstance(base, nn.LayerNorm):
        return base.normalized_shape[-1], base.normalized_shape[-1]
    raise TypeError(f"Unsupported layer type {type(base).__name__}.")


class MemControlLayer(BaseTunerLayer):
    """Base of the MemControl tuner layers: per-adapter deltas stored in ParameterDicts keyed by adapter name."""

    adapter_layer_names = (
        "memcontrol_spectral_shift",
        "memcontrol_norm_shift",
        "memcontrol_gamma",
        "memcontrol_residual_gamma",
        "memcontrol_bias",
        "memcontrol_norm_weight",
        "memcontrol_norm_bias",
        "memcontrol_weight",
        "memcontrol_lora_A",
        "memcontrol_lora_B",
    )
    other_param_names = ("memcontrol_roles", "memcontrol_scale", "memcontrol_lora_scaling")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self.memcontrol_roles: dict[str, tuple[str, ...]] = {}
        self.memcontrol_scale: dict[str, float] = {}
        self.memcontrol_lora_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.in_features, self.out_features = _features(self.get_base_layer())
        self._svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # fp32 master of U, S, Vh
        self._svd_compute: tuple[torch.Tensor, torch.Tensor] | None = None  # U, Vh in a half compute dtype

    # --- creation ---------------------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        roles: tuple[str, ...],
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        inference_mode: bool = False,
    ) -> None:
        """Create the zero-effect deltas of `adapter_name` for the given roles."""
        base = self.get_base_layer()
        weight = base.weight
        device, dtype = weight.device, torch.float32
        out = self.out_features
        self.memcontrol_roles[adapter_name] = tuple(roles)
        self.memcontrol_scale[adapter_name] = 1.0
        for role in roles:
            if role == ROLE_SPECTRAL:
                _, s, _ = self._spectral_basis()
                self.memcontrol_spectral_shift[adapter_name] = nn.Parameter(torch.zeros_like(s))
            elif role == ROLE_NORM_SHIFT:
                self.memcontrol_norm_shift[adapter_name] = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))
            elif role == ROLE_GAMMA:
                self.memcontrol_gamma[adapter_name] = nn.Parameter(torch.ones(out, device=device, dtype=dtype))
            elif role == ROLE_RESIDUAL_GAMMA:
                self.memcontrol_residual_gamma[adapter_name] = nn.Parameter(
                    torch.ones(out, device=device, dtype=dtype)
                )
            elif role == ROLE_BIAS:
                self.memcontrol_bias[adapter_name] = nn.Parameter(torch.zeros(out, device=device, dtype=dtype))
            elif role == ROLE_NORM_AFFINE:
                self.memcontrol_norm_weight[adapter_name] = nn.Parameter(torch.zeros_like(weight, dtype=dtype))
                if base.bias is not None:
                    self.memcontrol_norm_bias[adapter_name] = nn.Parameter(torch.zeros_like(base.bias, dtype=dtype))
            elif role == ROLE_DENSE:
                self.memcontrol_weight[adapter_name] = nn.Parameter(torch.zeros_like(weight, dtype=dtype))
                if base.bias is not None:
                    self.memcontrol_bias[adapter_name] = nn.Parameter(torch.zeros_like(base.bias, dtype=dtype))
            elif role == ROLE_LORA and isinstance(base, nn.Linear):
                # peft's LoRA defaults: A kaiming-uniform, B zero, scaling alpha / r
                lora_a = torch.empty(lora_rank, self.in_features, device=device, dtype=dtype)
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
                self.memcontrol_lora_A[adapter_name] = nn.Parameter(lora_a)
                self.memcontrol_lora_B[adapter_name] = nn.Parameter(
                    torch.zeros(out, lora_rank, device=device, dtype=dtype)
                )
                self.memcontrol_lora_scaling[adapter_name] = lora_alpha / lora_rank
            else:
                raise ValueError(f"Role {role!r} is not handled by {type(self).__name__}.")
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _spectral_basis(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U, S, Vh of the frozen base weight (flattened to 2-D) in fp32, computed once."""
        if self._svd is None:
            from .svd_cache import layer_svd

            self._svd = layer_svd(self.get_base_layer().weight)
        return self._svd

    def _compute_basis(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U and Vh on the base weight's device, in its dtype when that is half precision, else the fp32 master.

        With a half-precision base, the fp32 master of U and Vh waits on the CPU (casting back to fp32 restores it
        unrounded) and only the half copy occupies the accelerator.
        """
        weight = self.get_base_layer().weight
        u, s, vh = self._spectral_basis()
        if weight.dtype in _HALF:
            compute = self._svd_compute
            if compute is None or compute[0].dtype != weight.dtype or compute[0].device != weight.device:
                compute = self._svd_compute = (u.to(weight.device, weight.dtype), vh.to(weight.device, weight.dtype))
                self._svd = (u.cpu(), s, vh.cpu())
            return compute
        if u.device != weight.device:
            u, vh = u.to(weight.device), vh.to(weight.device)
            self._svd = (u, s, vh)
        self._svd_compute = None
        return u, vh

    def _apply(self, fn, recurse=True):
        # the fp32 SVD follows the layer's device but never its dtype: casting to half and back must not round it
        result = super()._apply(fn, recurse)
        if self._svd is not None:
            u, s, vh = self._svd
            self._svd = (u, s.to(fn(torch.empty(0, device=s.device)).device), vh)  # U, Vh: placed at the next use
            self._svd_compute = None
        return result

    # --- helpers ----------------------------------------------------------------------------------------------
    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.memcontrol_roles]

    def _spectral_delta(self, adapter: str) -> torch.Tensor:
        """relu(S + delta) - S: the change of the singular values (exactly 0 at init)."""
        _, s, _ = self._spectral_basis()
        shift = self.memcontrol_spectral_shift[adapter]
        return (F.relu(s + shift) - s) * self.memcontrol_scale[adapter]

    def _lora_delta(self, adapter: str) -> torch.Tensor:
        scaling = self.memcontrol_lora_scaling[adapter] * self.memcontrol_scale[adapter]
        return (self.memcontrol_lora_B[adapter] @ self.memcontrol_lora_A[adapter]) * scaling

    def _weight_delta(self, adapter: str, spectral: bool = True, lora: bool = True) -> torch.Tensor | None:
        """Additive change of the base weight by this adapter (rebuilt form), or None."""
        weight = self.get_base_layer().weight
        delta = None
        if adapter in self.memcontrol_weight:
            delta = self.memcontrol_weight[adapter] * self.memcontrol_scale[adapter]
        if spectral and adapter in self.memcontrol_spectral_shift:
            u, vh = self._compute_basis()
            change = ((u * self._spectral_delta(adapter).to(u.dtype)) @ vh).reshape(weight.shape)
            delta = change if delta is None else delta + change
        if lora and adapter in self.memcontrol_lora_A:
            change = self._lora_delta(adapter)
            delta = change if delta is None else delta + change
        return delta

    def _bias_delta(self, adapter: str) -> torch.Tensor | None:
        if adapter in self.memcontrol_bias:
            return self.memcontrol_bias[adapter] * self.memcontrol_scale[adapter]
        return None

    def _output_scale(self, adapter: str) -> torch.Tensor | None:
        scale = None
        for store in (self.memcontrol_gamma, self.memcontrol_residual_gamma):
            if adapter in store:
                gamma = 1 + (store[adapter] - 1) * self.memcontrol_scale[adapter]
                scale = gamma if scale is None else scale * gamma
        return scale

    def _use_factored(self, tokens: int) -> bool:
        u, _, vh = self._spectral_basis()
        out, fan_in, rank = u.shape[0], vh.shape[1], u.shape[1]
        return tokens * rank * (fan_in + out) < out * fan_in * rank

    # --- peft hooks -------------------------------------------------------------------------------------------
    def set_scale(self, adapter: str, scale: float) -> None:
        """Scale the effect of `adapter` (1.0 = as trained); used by diffusers' set_adapters."""
        if adapter in self.memcontrol_scale:
            self.memcontrol_scale[adapter] = float(scale)

    def scale_layer(self, scale: float) -> None:
        """Multiply the scale of the active adapters (diffusers' scale hooks)."""
        for adapter in self._active():
            self.memcontrol_scale[adapter] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Undo `scale_layer` (or reset to 1.0 when `scale` is None)."""
        for adapter in self._active():
            self.memcontrol_scale[adapter] = 1.0 if scale is None else self.memcontrol_scale[adapter] / scale

    def _merged_scale(self) -> torch.Tensor | float:
        """Product of the output scales of the adapters merged so far (what a further merged delta is scaled by)."""
        total: torch.Tensor | float = 1.0
        for adapter in self.merged_adapters:
            scale = self._output_scale(adapter)
            if scale is not None:
                total = total * scale
        return total

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the base weights: zero overhead at inference."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.memcontrol_roles:
                continue
            with torch.no_grad():
                weight, bias = self._merged_parameters(adapter, base.weight, base.bias, self._merged_scale())
                if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                if bias is not None and base.bias is None:
                    raise ValueError(f"Adapter {adapter!r} adds a bias to a layer that has none.")
                base.weight.data.copy_(weight)
                if bias is not None:
                    base.bias.data.copy_(bias)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the base weights as they were before `merge`."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            with torch.no_grad():
                weight, bias = self._unmerged_parameters(adapter, base.weight, base.bias, self._merged_scale())
                base.weight.data.copy_(weight)
                if bias is not None:
                    base.bias.data.copy_(bias)

    def _merged_parameters(self, adapter, weight, bias, prior):
        raise NotImplementedError

    def _unmerged_parameters(self, adapter, weight, bias, prior):
        raise NotImplementedError

    def _base_output(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """The base layer's output when no adapter applies (disabled, merged or none active), else None."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not self._active():
            return self.base_layer(x, *args, **kwargs)
        return None


class _ProjectionLayer(nn.Module, MemControlLayer):
    """Shared logic of Linear and Conv2d: y = scale * (base(x; W + dW, b + db) + factored corrections)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, roles: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__()
        MemControlLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, roles, **kwargs)

    def _channel_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def _base_forward(self, x, weight, bias):
        raise NotImplementedError

    def _factored_correction(self, x, adapter):
        raise NotImplementedError

    def _tokens(self, x: torch.Tensor) -> int:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._base_output(x, *args, **kwargs)
        if result is not None:
            return result
        active = self._active()
        base = self.get_base_layer()
        weight, bias = base.weight, base.bias
        factored = []
        for adapter in active:
            spectral = adapter in self.memcontrol_spectral_shift and self._use_factored(self._tokens(x))
            if spectral or adapter in self.memcontrol_lora_A:
                factored.append(adapter)
            dense = self._weight_delta(adapter, spectral=not spectral, lora=False)
            if dense is not None:
                weight = weight + dense.to(weight.dtype)
            db = self._bias_delta(adapter)
            if db is not None:
                bias = db.to(weight.dtype) if bias is None else bias + db.to(bias.dtype)
        y = self._base_forward(x, weight, bias)
        for adapter in factored:
            if adapter in self.memcontrol_spectral_shift and self._use_factored(self._tokens(x)):
                y = y + self._factored_correction(x, adapter).to(y.dtype)
            if adapter in self.memcontrol_lora_A:
                a, b = self.memcontrol_lora_A[adapter], self.memcontrol_lora_B[adapter]
                lora = F.linear(F.linear(x.to(a.dtype), a), b) * (
                    self.memcontrol_lora_scaling[adapter] * self.memcontrol_scale[adapter])
                y = y + lora.to(y.dtype)
        for adapter in active:
            scale = self._output_scale(adapter)
            if scale is not None:
                y = y * scale.to(y.dtype).view(self._channel_shape(y))
        return y

    def _merged_parameters(self, adapter, weight, bias, prior):
        per_row = (-1, *([1] * (weight.dim() - 1)))
        prior_w = prior.view(per_row) if torch.is_tensor(prior) else prior
        new_weight = weight.float()
        delta = self._weight_delta(adapter)
        if delta is not None:
            new_weight = new_weight + prior_w * delta
        new_bias = bias.float() if bias is not None else None
        db = self._bias_delta(adapter)
        if db is not None:
            new_bias = prior * db if new_bias is None else new_bias + prior * db
        scale = self._output_scale(adapter)
        if scale is not None:
            new_weight = new_weight * scale.view(per_row)
            new_bias = new_bias * scale if new_bias is not None else None
        return new_weight.to(weight.dtype), (new_bias.to(bias.dtype) if new_bias is not None and bias is not None
                                             else new_bias)

    def _unmerged_parameters(self, adapter, weight, bias, prior):
        per_row = (-1, *([1] * (weight.dim() - 1)))
        prior_w = prior.view(per_row) if torch.is_tensor(prior) else prior
        new_weight = weight.float()
        new_bias = bias.float() if bias is not None else None
        scale = self._output_scale(adapter)
        if scale is not None:
            new_weight = new_weight / (scale.view(per_row) + 1e-8)
            new_bias = new_bias / (scale + 1e-8) if new_bias is not None else None
        delta = self._weight_delta(adapter)
        if delta is not None:
            new_weight = new_weight - prior_w * delta
        db = self._bias_delta(adapter)
        if db is not None and new_bias is not None:
            new_bias = new_bias - prior * db
        return new_weight.to(weight.dtype), (new_bias.to(bias.dtype) if new_bias is not None else None)

    def __repr__(self) -> str:
        return "memcontrol." + super().__repr__()


class Linear(_ProjectionLayer):
    """MemControl deltas around an `nn.Linear`."""

    def _channel_shape(self, y: torch.Tensor) -> tuple[int, ...]:
        return (-1,)

    def _tokens(self, x: torch.Tensor) -> int:
        return x.numel() // x.shape[-1]

    def _base_forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _factored_correction(self, x, adapter):
        u, vh = self._compute_basis()
        z = F.linear(x.to(vh.dtype), vh) * self._spectral_delta(adapter).to(vh.dtype)
        return F.linear(z, u)


class Conv2d(_ProjectionLayer):
    """MemControl deltas around an `nn.Conv2d`."""

    def _channel_shape(self, y: torch.Tensor) -> tuple[int, ...]:
        return (1, -1, 1, 1)

    def _tokens(self, x: torch.Tensor) -> int:
        base = self.get_base_layer()
        stride = base.stride[0] * base.stride[1]
        return max(1, x.shape[0] * x.shape[-1] * x.shape[-2] // stride)

    def _base_forward(self, x, weight, bias):
        base = self.get_base_layer()
        return base._conv_forward(x, weight, bias)

    def _factored_correction(self, x, adapter):
        base = self.get_base_layer()
        u, vh = self._compute_basis()
        kernel = vh.reshape(vh.shape[0], *base.weight.shape[1:])
        z = F.conv2d(x.to(vh.dtype), kernel, None, base.stride, base.padding, base.dilation, base.groups)
        z = z * self._spectral_delta(adapter).to(vh.dtype).view(1, -1, 1, 1)
        return F.conv2d(z, u[:, :, None, None])


class Norm(nn.Module, MemControlLayer):
    """MemControl deltas around a `nn.GroupNorm` / `nn.LayerNorm`: SV-DIFF's shift, DiffFit's or full tuning's affine."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, roles: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__()
        MemControlLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, roles, **kwargs)

    def _deltas(self, adapter: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        scale = self.memcontrol_scale[adapter]
        dw = db = None
        for store in (self.memcontrol_norm_shift, self.memcontrol_norm_weight, self.memcontrol_weight):
            if adapter in store:
                dw = store[adapter] * scale if dw is None else dw + store[adapter] * scale
        for store in (self.memcontrol_norm_bias, self.memcontrol_bias):
            if adapter in store:
                db = store[adapter] * scale if db is None else db + store[adapter] * scale
        return dw, db

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._base_output(x, *args, **kwargs)
        if result is not None:
            return result
        base = self.get_base_layer()
        weight, bias = base.weight, base.bias
        for adapter in self._active():
            dw, db = self._deltas(adapter)
            if dw is not None:
                weight = weight + dw.to(weight.dtype)
            if db is not None:
                bias = bias + db.to(bias.dtype)
        if isinstance(base, nn.GroupNorm):
            return F.group_norm(x, base.num_groups, weight, bias, base.eps)
        return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)

    def _merged_parameters(self, adapter, weight, bias, prior):
        dw, db = self._deltas(adapter)
        new_weight = weight + dw.to(weight.dtype) if dw is not None else weight
        new_bias = bias + db.to(bias.dtype) if db is not None else None
        return new_weight, new_bias

    def _unmerged_parameters(self, adapter, weight, bias, prior):
        dw, db = self._deltas(adapter)
        new_weight = weight - dw.to(weight.dtype) if dw is not None else weight
        new_bias = bias - db.to(bias.dtype) if db is not None else None
        return new_weight, new_bias

    def __repr__(self) -> str:
        return "memcontrol." + super().__repr__()


def create_layer(target: nn.Module, adapter_name: str, roles: tuple[str, ...], **kwargs: Any) -> nn.Module:
    """Wrap `target` in the MemControl layer matching its type."""
    if isinstance(target, nn.Linear):
        return Linear(target, adapter_name, roles, **kwargs)
    if isinstance(target, nn.Conv2d):
        if target.groups != 1 and ROLE_SPECTRAL in roles:
            raise ValueError(f"SV-DIFF does not support grouped convolutions (groups={target.groups}).")
        return Conv2d(target, adapter_name, roles, **kwargs)
    if isinstance(target, (nn.GroupNorm, nn.LayerNorm)):
        return Norm(target, adapter_name, roles, **kwargs)
    raise ValueError(f"MemControl cannot adapt a {type(target).__name__}; expected Linear, Conv2d or a norm layer.")
