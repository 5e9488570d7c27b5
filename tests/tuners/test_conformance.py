"""Every generic behaviour peft promises for its own tuners, checked for each MemControl method on a small UNet."""

import copy
import os
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from diffusers_memcontrol import MemControlConfig
from diffusers_memcontrol.tuners import register_with_peft
from diffusers_memcontrol.tuners.memcontrol.layer import MemControlLayer, create_layer
from tests.conftest import make_small_unet

METHODS = ["svdiff", "difffit", "attention", "lora", "full"]
ATOL = 1e-4


def _unet():
    """The small SD1.5-shaped UNet with one layer per block: every module type, half the modules."""
    return make_small_unet(layers_per_block=1)


def _perturb(model, seed: int, scale: float = 0.05) -> None:
    """Give every adapter tensor a random non-zero value (a trained adapter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "memcontrol_" in name:
                p.add_(torch.randn(p.shape, generator=generator) * scale)


def _adapter(method, unet_inputs, seed=0, name="default"):
    model = get_peft_model(_unet(), MemControlConfig(method=method), adapter_name=name)
    _perturb(model, seed)
    return model


def _out(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


@pytest.fixture(scope="module")
def reference(unet_inputs_module):
    return _out(_unet(), unet_inputs_module)


@pytest.fixture(scope="module")
def unet_inputs_module():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 700]),
            torch.randn(2, 5, 32, generator=generator))


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init_and_layer_features(method, unet_inputs_module, reference):
    model = get_peft_model(_unet(), MemControlConfig(method=method))
    torch.testing.assert_close(_out(model, unet_inputs_module), reference, atol=1e-5, rtol=0)
    layers = [m for m in model.modules() if isinstance(m, MemControlLayer)]
    assert layers
    for layer in layers:
        base = layer.get_base_layer()
        expected = getattr(base, "out_features", None) or getattr(base, "out_channels", None) or base.weight.shape[0]
        assert layer.out_features == expected and layer.in_features > 0


@pytest.mark.parametrize("method", METHODS)
def test_adapter_tensors_use_the_peft_prefix(method):
    model = get_peft_model(_unet(), MemControlConfig(method=method))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".memcontrol_" in n for n in trainable)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_low_cpu_mem_usage(method, unet_inputs_module, tmp_path):
    model = _adapter(method, unet_inputs_module)
    expected = _out(model, unet_inputs_module)
    model.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(_unet(), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    torch.testing.assert_close(_out(loaded, unet_inputs_module), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_second_adapter_add_load_switch_delete_save_selected(method, unet_inputs_module, reference, tmp_path):
    model = _adapter(method, unet_inputs_module, seed=0)
    first = _out(model, unet_inputs_module)
    other = _adapter(method, unet_inputs_module, seed=1, name="other")
    second = _out(other, unet_inputs_module)
    other.save_pretrained(tmp_path / "saved")

    model.load_adapter(tmp_path / "saved" / "other", adapter_name="second")
    model.add_adapter("third", MemControlConfig(method=method))
    assert set(model.peft_config) == {"default", "second", "third"}
    torch.testing.assert_close(_out(model, unet_inputs_module), first, atol=1e-5, rtol=0)
    model.set_adapter("second")
    torch.testing.assert_close(_out(model, unet_inputs_module), second, atol=1e-5, rtol=0)
    model.set_adapter("third")
    torch.testing.assert_close(_out(model, unet_inputs_module), reference, atol=1e-5, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".third" in n for n in trainable)

    model.save_pretrained(tmp_path / "selected", selected_adapters=["second"])
    assert {"default", "third"}.isdisjoint(os.listdir(tmp_path / "selected"))
    saved = load_file(tmp_path / "selected" / "second" / "adapter_model.safetensors")
    assert saved and all("memcontrol_" in k for k in saved)

    model.delete_adapter("second")
    assert "second" not in model.peft_config
    assert not any(".second" in n for n, _ in model.named_parameters())
    model.set_adapter("default")
    torch.testing.assert_close(_out(model, unet_inputs_module), first, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_several_active_adapters_merge_like_forward(method, unet_inputs_module):
    model = _adapter(method, unet_inputs_module, seed=0)
    model.add_adapter("second", MemControlConfig(method=method))
    _perturb(model, seed=2)  # both adapters now differ from identity
    model.base_model.set_adapter(["default", "second"])
    both = _out(model, unet_inputs_module)
    model.base_model.set_adapter("default")
    assert not torch.allclose(_out(model, unet_inputs_module), both, atol=1e-4)
    model.base_model.set_adapter(["default", "second"])
    merged = model.merge_and_unload(adapter_names=["default", "second"])
    assert not any(isinstance(m, MemControlLayer) for m in merged.modules())
    torch.testing.assert_close(_out(merged, unet_inputs_module), both, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_disable(method, unet_inputs_module, reference):
    model = _adapter(method, unet_inputs_module)
    adapted = _out(model, unet_inputs_module)
    base_state = {k: v.clone() for k, v in _unet().state_dict().items()}

    model.merge_adapter()
    torch.testing.assert_close(_out(model, unet_inputs_module), adapted, atol=ATOL, rtol=0)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    torch.testing.assert_close(_out(model, unet_inputs_module), adapted, atol=ATOL, rtol=0)
    with model.disable_adapter():  # disabling a merged adapter unmerges it
        torch.testing.assert_close(_out(model, unet_inputs_module), reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(_out(model, unet_inputs_module), adapted, atol=ATOL, rtol=0)

    model.merge_adapter()
    model.unmerge_adapter()
    state = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
             for k, v in model.state_dict().items() if "memcontrol_" not in k}
    for key, value in base_state.items():
        torch.testing.assert_close(state[key], value, atol=ATOL, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, unet_inputs_module), reference, atol=1e-5, rtol=0)

    unloaded = model.merge_and_unload()
    torch.testing.assert_close(_out(unloaded, unet_inputs_module), adapted, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_diffusers_fuse_then_disable(method, unet_inputs_module, reference):
    unet = _unet()
    unet.add_adapter(MemControlConfig(method=method))
    _perturb(unet, seed=0)
    adapted = _out(unet, unet_inputs_module)
    unet.fuse_lora()
    torch.testing.assert_close(_out(unet, unet_inputs_module), adapted, atol=ATOL, rtol=0)
    unet.disable_adapters()
    torch.testing.assert_close(_out(unet, unet_inputs_module), reference, atol=ATOL, rtol=0)
    unet.enable_adapters()
    torch.testing.assert_close(_out(unet, unet_inputs_module), adapted, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("method", "tensor"), [(m, "weight") for m in METHODS]
                         + [(m, "bias") for m in ("difffit", "attention", "full")])  # SV-DIFF, LoRA: no bias delta
def test_safe_merge_rejects_non_finite(method, tensor, unet_inputs_module):
    model = _adapter(method, unet_inputs_module)
    names = [n for n, _ in model.named_parameters() if "memcontrol_" in n]
    names = [n for n in names if ("bias" in n) == (tensor == "bias")]
    bad = dict(model.named_parameters())[names[0]]
    with torch.no_grad():
        bad.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.isfinite(v).all() for k, v in model.state_dict().items() if "memcontrol_" not in k)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_casts_after_injection(method, dtype, unet_inputs_module):
    model = _adapter(method, unet_inputs_module)
    expected = _out(model, unet_inputs_module)
    svd_before = [tuple(t.clone() for t in m._svd) for m in model.modules()
                  if isinstance(m, MemControlLayer) and m._svd is not None]
    model.to(dtype)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in unet_inputs_module)
    low = _out(model, inputs).float()
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low, expected, atol=0.1, rtol=0.05)
    model.to(torch.float32)
    svd_after = [m._svd for m in model.modules() if isinstance(m, MemControlLayer) and m._svd is not None]
    assert len(svd_after) == len(svd_before) and (method != "svdiff" or svd_after)
    for before, after in zip(svd_before, svd_after):
        assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(after, before))


@pytest.fixture(scope="module")
def wide_inputs():
    """16x16 latents: the mid block keeps 4 tokens, so attention's queries and keys get gradients (1 token: none)."""
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([10]),
            torch.randn(1, 5, 32, generator=generator))


@pytest.mark.parametrize("method", METHODS)
def test_training_step_changes_only_adapter_tensors(method, wide_inputs):
    unet = _unet()
    unet.add_adapter(MemControlConfig(method=method))
    unet.train()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("memcontrol_" in n for n in trainable)
    optimizer = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # the second step moves tensors whose gradient is zero at init (e.g. LoRA's A)
        unet(*wide_inputs).sample.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(method, unet_inputs_module):
    grads = []
    for checkpointing in (False, True):
        unet = _unet()
        unet.add_adapter(MemControlConfig(method=method))
        _perturb(unet, seed=0)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        unet(*unet_inputs_module).sample.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in unet.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_gets_a_gradient(method, wide_inputs):
    unet = _unet()
    unet.add_adapter(MemControlConfig(method=method))
    _perturb(unet, seed=0)  # away from init, where some gradients are structurally zero (LoRA's A)
    unet(*wide_inputs).sample.pow(2).mean().backward()
    missing = [n for n, p in unet.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing[:5]


def test_register_with_peft_refuses_to_replace_another_method():
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    register_with_peft()  # idempotent
    saved = PEFT_TYPE_TO_TUNER_MAPPING["MEMCONTROL"]
    PEFT_TYPE_TO_TUNER_MAPPING["MEMCONTROL"] = object
    try:
        with pytest.raises(ValueError, match="refusing to replace"):
            register_with_peft()
    finally:
        PEFT_TYPE_TO_TUNER_MAPPING["MEMCONTROL"] = saved


def test_svdiff_half_precision_matches_the_reference_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40)
    layer = create_layer(copy.deepcopy(base), "default", ("spectral",))
    with torch.no_grad():
        layer.memcontrol_spectral_shift["default"].normal_()
    x = torch.randn(3, 5, 24)
    u, s, vh = torch.linalg.svd(base.weight, full_matrices=False)
    expected = torch.nn.functional.linear(x, (u * torch.relu(s + layer.memcontrol_spectral_shift["default"])) @ vh,
                                          base.bias)
    layer.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = layer(x.to(torch.bfloat16)).float()
    torch.testing.assert_close(out, expected.detach(), atol=0.05, rtol=0.05)
