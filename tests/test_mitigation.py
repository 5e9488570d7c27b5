"""Tests of random word augmentation and Wen et al.'s threshold mitigation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTokenizer

from diffusers_memcontrol.data.tiny_base import build_tokenizer
from diffusers_memcontrol.trainer.mitigation import (
    RandomWordAugmentation,
    ThresholdMitigation,
    threshold_mask,
)


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return build_tokenizer()


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    ).eval()


# ---------------------------------------------------------------------------- RWA

CAPTION = "a chest x ray with a small effusion"


def test_rwa_defaults_follow_reference_code(tokenizer):
    rwa = RandomWordAugmentation(tokenizer)
    assert rwa.num_words == 4 and rwa.p == 1.0


@pytest.mark.parametrize("k", [1, 2, 4])
def test_rwa_p1_inserts_exactly_k_words(tokenizer, k):
    rwa = RandomWordAugmentation(tokenizer, num_words=k, p=1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = rwa(CAPTION, rng)
        assert len(out.split()) == len(CAPTION.split()) + k
        # the original words keep their order
        it = iter(out.split())
        assert all(any(w == o for o in it) for w in CAPTION.split())


def test_rwa_p0_leaves_caption_unchanged(tokenizer):
    rwa = RandomWordAugmentation(tokenizer, num_words=2, p=0.0)
    assert rwa(CAPTION, np.random.default_rng(0)) == CAPTION
    assert rwa.apply_batch([CAPTION, "x"], 3) == [CAPTION, "x"]


def test_rwa_seeded_reproducible_with_both_rng_kinds(tokenizer):
    rwa = RandomWordAugmentation(tokenizer, num_words=3, p=0.5)
    caps = [CAPTION] * 30
    a = rwa.apply_batch(caps, np.random.default_rng(7))
    b = rwa.apply_batch(caps, np.random.default_rng(7))
    assert a == b
    assert rwa.apply_batch(caps, random.Random(7)) == rwa.apply_batch(caps, random.Random(7))
    changed = sum(out != CAPTION for out in a)
    assert 0 < changed < 30  # p = 0.5


def test_rwa_excludes_special_tokens_and_respects_max_id(tokenizer):
    rwa = RandomWordAugmentation(tokenizer, num_words=1, max_token_id=256)
    assert set(rwa._candidates.tolist()) <= set(range(256))
    full = RandomWordAugmentation(tokenizer)
    assert not set(full._candidates.tolist()) & set(tokenizer.all_special_ids)
    for seed in range(30):
        assert "<|" not in full("x", seed)


def test_rwa_rejects_bad_config(tokenizer):
    with pytest.raises(ValueError, match="p must"):
        RandomWordAugmentation(tokenizer, p=1.5)
    with pytest.raises(ValueError, match="num_words"):
        RandomWordAugmentation(tokenizer, num_words=-1)
    with pytest.raises(ValueError, match="max_token_id"):
        RandomWordAugmentation(tokenizer, max_token_id=10**6)
    with pytest.raises(ValueError, match="rng"):
        RandomWordAugmentation(tokenizer)("x", rng="seed")


# ---------------------------------------------------------------------------- threshold mitigation


def _batch(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=gen)
    timesteps = torch.randint(0, 1000, (n,), generator=gen)
    cond = torch.randn(n, 7, 32, generator=gen)
    uncond = torch.zeros(1, 7, 32)
    return latents, timesteps, cond, uncond


def test_hard_threshold_keeps_strictly_below(unet):
    latents, t, cond, uncond = _batch(10)
    _, norms = threshold_mask(unet, latents, t, cond, uncond, threshold=1e9)
    assert norms.shape == (10,) and bool((norms > 0).all())
    cut = float(norms.median())
    keep, norms2 = threshold_mask(unet, latents, t, cond, uncond, threshold=cut)
    assert torch.allclose(norms, norms2)
    assert torch.equal(keep, norms < cut)
    assert keep.dtype == torch.bool


def test_auto_drops_top_ten_percent(unet):
    latents, t, cond, uncond = _batch(10, seed=1)
    keep, norms = threshold_mask(unet, latents, t, cond, uncond, threshold="auto")
    assert int(keep.sum()) == 9
    assert not bool(keep[norms.argmax()])
    keep_all, _ = threshold_mask(unet, latents, t, cond, uncond, threshold="auto", quantile=1.0)
    assert bool(keep_all.all())


def test_identical_embeddings_give_zero_norm(unet):
    latents, t, _, uncond = _batch(3)
    keep, norms = threshold_mask(unet, latents, t, uncond.expand(3, -1, -1), uncond, threshold=2.0)
    assert torch.equal(norms, torch.zeros(3)) and bool(keep.all())


def test_threshold_mitigation_counts_skips(unet):
    latents, t, cond, uncond = _batch(4)
    mit = ThresholdMitigation(threshold=1e-6)
    kept = mit.filter(unet, latents, t, cond, uncond)
    assert kept.numel() == 0
    assert mit.skipped_steps == 1 and mit.dropped_samples == 4 and mit.steps == 1
    loose = ThresholdMitigation(threshold=1e9)
    kept = loose.filter(unet, latents, t, cond, uncond)
    assert torch.equal(kept, torch.arange(4)) and loose.skipped_steps == 0 and loose.dropped_samples == 0
    assert mit.stats()["dropped_fraction"] == 1.0
    assert mit.last_norms.shape == (4,)
    mit.reset()
    assert mit.stats()["steps"] == 0


@pytest.mark.parametrize("bad", [0, -1.0, "median", None, True])
def test_threshold_rejects_bad_threshold(unet, bad):
    latents, t, cond, uncond = _batch(2)
    with pytest.raises(ValueError, match="threshold"):
        threshold_mask(unet, latents, t, cond, uncond, threshold=bad)
    with pytest.raises(ValueError, match="threshold"):
        ThresholdMitigation(threshold=bad)


@pytest.mark.parametrize("q", [0.0, 1.5, -0.1])
def test_threshold_rejects_bad_quantile(q):
    with pytest.raises(ValueError, match="quantile"):
        ThresholdMitigation(threshold="auto", quantile=q)
