import os

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from diffusers_memcontrol import MaskSpace, MemControlConfig
from diffusers_memcontrol.tuners.memcontrol.layer import MemControlLayer
from tests.conftest import make_small_unet

METHODS = ["svdiff", "difffit", "attention", "lora", "full", "freeze"]


def _train(model, inputs, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = model(*inputs).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init_and_counts(method, unet_inputs):
    unet = make_small_unet()
    reference = unet(*unet_inputs).sample
    space = MaskSpace.from_unet(unet, method, "paper")
    mask = space.mask([0, 1] * (len(space) // 2) + [1] * (len(space) % 2))
    unet.add_adapter(MemControlConfig(method=method, mask=mask))
    assert torch.equal(unet(*unet_inputs).sample, reference)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert trainable == space.count_trainable(mask, make_small_unet())
    assert (trainable == 0) == (method == "freeze")


@pytest.mark.parametrize("method", METHODS)
def test_save_load_reproduces_outputs(method, unet_inputs, tmp_path):
    space = MaskSpace.from_unet(make_small_unet(), method, "blocks")
    mask = space.mask([1, 0] * (len(space) // 2))
    model = get_peft_model(make_small_unet(), MemControlConfig(method=method, mask=mask))
    _train(model, unet_inputs)
    trained = model(*unet_inputs).sample
    model.save_pretrained(tmp_path)

    files = set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    state = load_file(tmp_path / "adapter_model.safetensors")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(v.numel() for v in state.values()) == n_trainable  # only what trained: no U/V, no base weights
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, MemControlConfig) and config.get_mask() == mask

    loaded = PeftModel.from_pretrained(make_small_unet(), tmp_path)
    torch.testing.assert_close(loaded(*unet_inputs).sample, trained, atol=1e-5, rtol=0)

    unet = make_small_unet()  # the diffusers path: inject into the bare UNet, then load the weights
    inject_adapter_in_model(config, unet, "default")
    result = set_peft_model_state_dict(unet, state)
    assert not result.unexpected_keys
    torch.testing.assert_close(unet(*unet_inputs).sample, trained, atol=1e-5, rtol=0)

    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, MemControlLayer) for m in merged.modules())
    torch.testing.assert_close(merged(*unet_inputs).sample, trained, atol=1e-5, rtol=0)


def test_training_changes_outputs(unet_inputs):
    model = get_peft_model(make_small_unet(), MemControlConfig(method="svdiff"))
    before = model(*unet_inputs).sample
    _train(model, unet_inputs)
    assert not torch.allclose(model(*unet_inputs).sample, before)


def test_masked_off_blocks_are_not_wrapped():
    unet = make_small_unet()
    space = MaskSpace.from_unet(unet, "svdiff", "blocks")
    mask = space.mask([0] + [1] * (len(space) - 1))
    unet.add_adapter(MemControlConfig(method="svdiff", mask=mask))
    off = dict(unet.named_modules())[space.positions[0]]
    assert not any(isinstance(m, MemControlLayer) for m in off.transformer_blocks.modules())
    on = dict(unet.named_modules())[space.positions[1]]
    assert any(isinstance(m, MemControlLayer) for m in on.transformer_blocks.modules())


def test_all_zero_mask_equals_freeze(unet_inputs):
    unet = make_small_unet()
    space = MaskSpace.from_unet(unet, "svdiff", "blocks")
    reference = unet(*unet_inputs).sample
    unet.add_adapter(MemControlConfig(method="svdiff", mask=space.empty(), mask_scope="strict"))
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == 0
    assert torch.equal(unet(*unet_inputs).sample, reference)


def test_svdiff_factored_and_rebuilt_forms_agree():
    torch.manual_seed(0)
    for base in (nn.Linear(24, 40), nn.Conv2d(8, 16, 3, padding=1)):
        from diffusers_memcontrol.tuners.memcontrol.layer import create_layer

        layer = create_layer(base, "default", ("spectral",))
        with torch.no_grad():
            layer.memcontrol_spectral_shift["default"].normal_()
        x = torch.randn(3, 5, 24) if isinstance(base, nn.Linear) else torch.randn(2, 8, 6, 6)
        layer._use_factored = lambda tokens: True
        factored = layer(x)
        layer._use_factored = lambda tokens: False
        rebuilt = layer(x)
        torch.testing.assert_close(factored, rebuilt, atol=1e-5, rtol=1e-5)
        # and both equal U diag(relu(S + delta)) V^T applied directly
        u, s, vh = torch.linalg.svd(base.weight.reshape(base.weight.shape[0], -1), full_matrices=False)
        weight = (u * torch.relu(s + layer.memcontrol_spectral_shift["default"])) @ vh
        expected = (nn.functional.linear(x, weight, base.bias) if isinstance(base, nn.Linear)
                    else nn.functional.conv2d(x, weight.reshape(base.weight.shape), base.bias, padding=1))
        torch.testing.assert_close(rebuilt, expected, atol=1e-5, rtol=1e-5)


def test_sd15_layout_injection_on_meta(sd15_meta_unet):
    space = MaskSpace.from_unet(sd15_meta_unet, "svdiff", "paper")
    mask = space.mask([1, 0] * 6 + [1])
    config = MemControlConfig(method="svdiff", mask=mask)
    inject_adapter_in_model(config, sd15_meta_unet, "default")
    trainable = sum(p.numel() for p in sd15_meta_unet.parameters() if p.requires_grad)
    assert trainable == space.count_trainable(mask, sd15_meta_unet)
    assert MemControlConfig.from_dict(config.to_dict()).get_mask() == mask if hasattr(
        MemControlConfig, "from_dict") else True


def test_config_round_trip_and_errors(tmp_path, small_unet):
    space = MaskSpace.from_unet(small_unet, "difffit", "attention")
    config = MemControlConfig(method="difffit", mask=space.full(), mask_scope="strict")
    config.save_pretrained(tmp_path)
    again = PeftConfig.from_pretrained(tmp_path)
    assert again.method == "difffit" and again.mask_scope == "strict" and again.get_mask() == space.full()
    with pytest.raises(ValueError, match="Unknown method"):
        MemControlConfig(method="bitfit")
    with pytest.raises(ValueError, match="built for method 'difffit'"):
        MemControlConfig(method="svdiff", mask=space.full())
    with pytest.raises(ValueError, match="Unknown mask_scope"):
        MemControlConfig(mask_scope="loose")
    other = MaskSpace.from_unet(make_small_unet(layers_per_block=1), "difffit", "attention")
    with pytest.raises(ValueError, match="does not fit"):
        small_unet.add_adapter(MemControlConfig(method="difffit", mask=other.full()))


def test_diffusers_scale_hooks(unet_inputs):
    unet = make_small_unet()
    reference = unet(*unet_inputs).sample
    unet.add_adapter(MemControlConfig(method="difffit"))
    _train(unet, unet_inputs)
    trained = unet(*unet_inputs).sample
    unet.set_adapters(["default"], weights=[0.0])
    torch.testing.assert_close(unet(*unet_inputs).sample, reference, atol=1e-5, rtol=0)
    unet.set_adapters(["default"], weights=[1.0])
    torch.testing.assert_close(unet(*unet_inputs).sample, trained, atol=1e-5, rtol=0)
