import os

import pytest
import torch

from diffusers_memcontrol import MemControlConfig
from diffusers_memcontrol.tuners.memcontrol import svd_cache
from diffusers_memcontrol.tuners.memcontrol.layer import MemControlLayer
from tests.conftest import make_small_unet


def _inject_counting(monkeypatch, seed=0):
    calls = []
    real = svd_cache.compute_svd

    def counting(weight):
        calls.append(tuple(weight.shape))
        return real(weight)

    monkeypatch.setattr(svd_cache, "compute_svd", counting)
    unet = make_small_unet(seed=seed)
    unet.add_adapter(MemControlConfig(method="svdiff"))
    return unet, calls


def test_second_injection_reads_the_svd_cache(monkeypatch, tmp_path, unet_inputs):
    monkeypatch.setenv("MEMCONTROL_CACHE_DIR", str(tmp_path))
    first, first_calls = _inject_counting(monkeypatch)
    n_layers = sum(1 for m in first.modules() if isinstance(m, MemControlLayer) and m._svd is not None)
    assert len(first_calls) == n_layers > 0
    files = [f for _, _, fs in os.walk(tmp_path / "svd") for f in fs]
    assert len(files) == len({svd_cache.weight_key(m.get_base_layer().weight) for m in first.modules()
                              if isinstance(m, MemControlLayer) and m._svd is not None})
    assert all(f.endswith(".safetensors") for f in files)

    second, second_calls = _inject_counting(monkeypatch)
    assert second_calls == []
    for a, b in zip(first.modules(), second.modules()):
        if isinstance(a, MemControlLayer) and a._svd is not None:
            assert all(torch.equal(x, y) for x, y in zip(a._svd, b._svd))
    with torch.no_grad():
        for unet in (first, second):
            for name, p in unet.named_parameters():
                if "memcontrol_spectral_shift" in name:
                    p.fill_(0.1)
        torch.testing.assert_close(second(*unet_inputs).sample, first(*unet_inputs).sample, atol=1e-6, rtol=0)

    _, other_calls = _inject_counting(monkeypatch, seed=1)  # other weights: other keys
    assert len(other_calls) == n_layers


def test_unreadable_cache_file_is_recomputed(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMCONTROL_CACHE_DIR", str(tmp_path))
    weight = torch.randn(6, 4)
    path = svd_cache.svd_cache_path(svd_cache.weight_key(weight))
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"not safetensors")
    with pytest.warns(UserWarning, match="unreadable SVD cache file"):
        u, s, vh = svd_cache.layer_svd(weight)
    torch.testing.assert_close((u * s) @ vh, weight, atol=1e-5, rtol=0)
