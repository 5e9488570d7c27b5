"""Tests of the shipped tiny base pipeline, its domain encoder and the domain loaders."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_memcontrol.data import tiny_base as tb

ASSETS = tb.tiny_base_path()
needs_assets = pytest.mark.skipif(
    not os.path.exists(os.path.join(ASSETS, "model_index.json")),
    reason="tiny base not built (run training/pretrain_tiny_base.py)",
)


def test_paths():
    assert tb.domain_encoder_path() == os.path.join(tb.tiny_base_path(), "domain_encoder")
    assert tb.tiny_base_path().endswith(os.path.join("diffusers_memcontrol", "assets", "tiny_base"))


def test_tokenizer_round_trip():
    tok = tb.build_tokenizer()
    assert len(tok) == 514
    assert tok.model_max_length == 77
    text = "a handwritten digit seven"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id == 512 and ids[-1] == tok.eos_token_id == 513
    assert len(ids) == len(text.replace(" ", "")) + 2  # one token per byte (spaces become </w>)
    assert tok.decode(ids, skip_special_tokens=True) == text
    padded = tok([text, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert padded.shape == (2, 77)


def test_builders_shapes():
    unet = tb.build_unet()
    n = sum(p.numel() for p in unet.parameters())
    assert 1.2e6 < n < 1.8e6
    assert unet.config.cross_attention_dim == 64
    # SD1.5-shaped: 1x1 conv projections in the transformer blocks
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    vae = tb.build_vae()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert z.shape == (1, 4, 8, 8)
    sched = tb.build_scheduler()
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.num_train_timesteps == 1000
    te1, te2 = tb.build_text_encoder(0), tb.build_text_encoder(0)
    assert all(torch.equal(a, b) for a, b in zip(te1.parameters(), te2.parameters()))


@needs_assets
def test_pipeline_loads_offline_and_generates():
    code = (
        "import torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        "from diffusers_memcontrol.data.tiny_base import tiny_base_path\n"
        "pipe = StableDiffusionPipeline.from_pretrained(tiny_base_path(), safety_checker=None)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "out = pipe('a photo of a sneaker', num_inference_steps=2, output_type='np',\n"
        "           generator=torch.Generator().manual_seed(0)).images\n"
        "assert out.shape == (1, 32, 32, 3), out.shape\n"
        "assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) == 514\n"
        "print('OK')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    res = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout


@needs_assets
def test_model_index_has_no_safety_checker():
    with open(os.path.join(ASSETS, "model_index.json")) as f:
        index = json.load(f)
    assert index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None]


@needs_assets
def test_weights_are_safetensors_only():
    files = [os.path.join(r, f) for r, _, fs in os.walk(ASSETS) for f in fs]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    for sub in ("unet", "vae", "text_encoder", "domain_encoder"):
        assert any(f.endswith(".safetensors") for f in os.listdir(os.path.join(ASSETS, sub))), sub
    total = sum(os.path.getsize(f) for f in files)
    assert total <= 25 * 2**20


@needs_assets
def test_domain_encoder_loads():
    enc = tb.load_domain_encoder()
    assert isinstance(enc, tb.DomainEncoder)
    assert list(enc.config.labels) == list(tb.DOMAINS["digits"].labels)
    x = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = enc.features(x), enc(x)
    assert feats.shape == (2, enc.config.feature_dim) and enc.config.feature_dim in (64, 128)
    assert logits.shape == (2, 10)


def test_domain_encoder_save_load_roundtrip(tmp_path):
    enc = tb.DomainEncoder(labels=["a", "b", "c"], feature_dim=64).eval()
    enc.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    enc2 = tb.DomainEncoder.from_pretrained(tmp_path).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc(x), enc2(x))
    assert list(enc2.config.labels) == ["a", "b", "c"]


@needs_assets
def test_pretraining_report():
    report = tb.read_pretraining_report()
    for key in ("psnr_fashion_mnist_test", "psnr_digits_test", "domain_encoder_test_accuracy"):
        assert isinstance(report[key], float), key
    assert report["domain_encoder_test_accuracy"] > 0.5
    assert report["psnr_fashion_mnist_test"] > 15


def test_load_domain_digits():
    train, test = tb.load_domain("digits", "train"), tb.load_domain("digits", "test")
    assert len(train) + len(test) == 1797
    assert set(train.column_names) == {"image", "text", "label"}
    assert train.features["label"].num_classes == 10
    assert sorted(set(train["label"])) == list(range(10))
    row = train[0]
    assert row["image"].size == (32, 32) and row["image"].mode == "RGB"
    assert row["text"] == "a handwritten digit " + tb.DOMAINS["digits"].labels[row["label"]]
    # the split is deterministic
    again = tb.load_domain_arrays("digits", "test")[1]
    assert np.array_equal(np.asarray(test["label"]), again)


def test_load_domain_errors():
    with pytest.raises(KeyError):
        tb.load_domain("mnist")
    with pytest.raises(ValueError):
        tb.load_domain_arrays("digits", "validation")


@pytest.mark.skipif(not os.path.isdir(tb.FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_arrays():
    images, labels = tb.load_domain_arrays("fashion-mnist", "test")
    assert images.shape == (10000, 32, 32) and images.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9
    assert tb.DOMAINS["fashion-mnist"].caption(7) == "a photo of a sneaker"


def test_animal_mnist_arrays():
    pytest.importorskip("animal_mnist")
    images, labels = tb.load_domain_arrays("animal-mnist", "test")
    assert images.shape == (2000, 32, 32)
    assert np.bincount(labels).tolist() == [200] * 10
    assert tb.DOMAINS["animal-mnist"].caption(5) == "a silhouette of an elephant"


@needs_assets
def test_shipped_text_encoder_is_the_seeded_random_init():
    from transformers import CLIPTextModel

    shipped = CLIPTextModel.from_pretrained(os.path.join(ASSETS, "text_encoder"))
    built = tb.build_text_encoder(tb.read_pretraining_report()["text_encoder"]["frozen_random_init_seed"])
    for (name, a), b in zip(shipped.state_dict().items(), built.state_dict().values()):
        assert torch.equal(a, b), name


@needs_assets
def test_vocabulary_stage_saw_digits_but_no_image_of_the_fine_tuning_splits():
    vocabulary = tb.read_pretraining_report()["vocabulary"]
    shipped, labels = tb.printed_digits(vocabulary["args"]["digit_vocabulary"], seed=vocabulary["args"]["seed"])
    assert sorted(set(labels.tolist())) == list(range(10))
    real = np.concatenate([tb.load_domain_arrays("digits", split)[0] for split in ("train", "test")])
    assert not {im.tobytes() for im in shipped} & {im.tobytes() for im in real}
    a = torch.from_numpy(shipped.reshape(len(shipped), -1)).double() / 255
    b = torch.from_numpy(real.reshape(len(real), -1)).double() / 255
    nearest = torch.cdist(a, b).min(dim=1).values / 32  # RMS pixel distance to the closest real digit
    assert nearest.min() > 0.05, float(nearest.min())


def test_printed_digits_are_seeded_and_shaped_like_the_digits_domain():
    images, labels = tb.printed_digits(20, seed=3)
    again, _ = tb.printed_digits(20, seed=3)
    other, _ = tb.printed_digits(20, seed=4)
    assert images.shape == (20, 32, 32) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    real = tb.load_domain_arrays("digits", "test")[0]
    assert abs(images.mean() - real.mean()) < 0.5 * real.mean()  # white digits on black, filling the box
