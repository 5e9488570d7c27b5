"""Tests of the memorization metrics on tiny, randomly initialised diffusers models."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from diffusers_memcontrol.data.tiny_base import build_tokenizer
from diffusers_memcontrol.metrics.memorization import (
    DmemResult,
    detection_auc,
    dmem_search,
    wen_detection_scores,
)


@pytest.fixture(scope="module")
def tiny() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514, hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
            pad_token_id=513,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=None, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _embeds(pipe, prompts):
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    return cond, uncond[:1]


# ---------------------------------------------------------------------------- d_mem (search variant)


def test_dmem_zero_when_embeddings_equal(tiny):
    _, uncond = _embeds(tiny, ["x"])
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    res = dmem_search(tiny.unet, DDPMScheduler(), latents, uncond.expand(5, -1, -1), uncond,
                      generator=torch.Generator().manual_seed(0), batch_size=2)
    assert isinstance(res, DmemResult)
    assert torch.equal(res.values, torch.zeros(5))
    assert res.max == 0.0 and res.mean == 0.0


def test_dmem_positive_shapes_and_aggregates(tiny):
    cond, uncond = _embeds(tiny, ["a red circle", "blue", "zz top", "a", "dog"])
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    res = dmem_search(tiny.unet, DDPMScheduler(), latents, cond, uncond, num_repeats=2,
                      generator=torch.Generator().manual_seed(0), batch_size=2)
    assert res.values.shape == (10,) and res.timesteps.shape == (10,)
    assert bool((res.values > 0).all())
    # batches of 2 within each of the 2 passes over 5 samples: [2, 2, 1] x 2
    assert res.batch_max.shape == (6,)
    chunks = [res.values[0:2], res.values[2:4], res.values[4:5], res.values[5:7], res.values[7:9], res.values[9:10]]
    expected = torch.stack([c.max() for c in chunks])
    assert torch.allclose(res.batch_max, expected)
    assert res.max == pytest.approx(float(expected.mean()))
    assert res.mean == pytest.approx(float(res.values.mean()))
    assert int(res.timesteps.min()) >= 0 and int(res.timesteps.max()) < 1000
    assert set(res.to_dict()) >= {"max", "mean", "values"}


def test_dmem_deterministic_and_fixed_timesteps(tiny):
    cond, uncond = _embeds(tiny, ["one", "two", "three"])
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    a = dmem_search(tiny.unet, DDPMScheduler(), latents, cond, uncond, generator=torch.Generator().manual_seed(5))
    b = dmem_search(tiny.unet, DDPMScheduler(), latents, cond, uncond, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.values, b.values) and torch.equal(a.timesteps, b.timesteps)
    fixed = dmem_search(tiny.unet, DDPMScheduler(), latents, cond, uncond, timesteps=500,
                        generator=torch.Generator().manual_seed(5))
    assert torch.equal(fixed.timesteps, torch.full((3,), 500))


def test_dmem_rejects_bad_inputs(tiny):
    cond, uncond = _embeds(tiny, ["one", "two"])
    latents = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="prompt_embeds"):
        dmem_search(tiny.unet, DDPMScheduler(), latents, cond[:1], uncond)
    with pytest.raises(ValueError, match="timesteps"):
        dmem_search(tiny.unet, DDPMScheduler(), latents, cond, uncond, timesteps=5000)
    with pytest.raises(ValueError, match="num_repeats"):
        dmem_search(tiny.unet, DDPMScheduler(), latents, cond, uncond, num_repeats=0)
    with pytest.raises(ValueError, match="latents"):
        dmem_search(tiny.unet, DDPMScheduler(), latents[0], cond, uncond)


# ---------------------------------------------------------------------------- Wen et al. detection


def test_wen_zero_for_empty_prompt_and_positive_otherwise(tiny):
    scores = wen_detection_scores(tiny, ["", "a red circle"], num_inference_steps=4, num_images_per_prompt=2,
                                  generator=torch.Generator().manual_seed(0), show_progress=False)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert scores[0].item() == 0.0
    assert scores[1].item() > 0.0


def test_wen_first_step_only_consistent(tiny):
    prompts = ["a", "bb", "ccc"]
    per_step = wen_detection_scores(tiny, prompts, num_inference_steps=4, num_images_per_prompt=2,
                                    generator=torch.Generator().manual_seed(3), show_progress=False,
                                    return_per_step=True, batch_size=2)
    assert per_step.shape == (3, 2, 4)
    full = wen_detection_scores(tiny, prompts, num_inference_steps=4, num_images_per_prompt=2,
                                generator=torch.Generator().manual_seed(3), show_progress=False, batch_size=2)
    assert torch.allclose(full, per_step.mean(dim=(1, 2)))
    cheap = wen_detection_scores(tiny, prompts, num_inference_steps=4, num_images_per_prompt=2, first_step_only=True,
                                 generator=torch.Generator().manual_seed(3), show_progress=False, batch_size=2)
    assert cheap.shape == (3,)
    assert torch.allclose(cheap, per_step[:, :, 0].mean(dim=1), atol=1e-5)


def test_wen_components_mapping_matches_pipeline(tiny):
    components = {"unet": tiny.unet, "scheduler": tiny.scheduler, "tokenizer": tiny.tokenizer,
                  "text_encoder": tiny.text_encoder}
    a = wen_detection_scores(components, ["hello"], num_inference_steps=3, num_images_per_prompt=1,
                             generator=torch.Generator().manual_seed(0), show_progress=False)
    b = wen_detection_scores(tiny, ["hello"], num_inference_steps=3, num_images_per_prompt=1,
                             generator=torch.Generator().manual_seed(0), show_progress=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_wen_rejects_bad_inputs(tiny):
    with pytest.raises(ValueError, match="prompts"):
        wen_detection_scores(tiny, [], show_progress=False)
    with pytest.raises(ValueError, match="num_inference_steps"):
        wen_detection_scores(tiny, ["a"], num_inference_steps=0, show_progress=False)
    with pytest.raises(ValueError, match="unet"):
        wen_detection_scores({"scheduler": tiny.scheduler}, ["a"], show_progress=False)


# ---------------------------------------------------------------------------- AUC


def test_detection_auc_separated_and_equal():
    sep = detection_auc(torch.tensor([5.0, 6.0, 7.0]), [1.0, 2.0, 3.0])
    assert sep["auc"] == 1.0 and sep["tpr_at_1pct_fpr"] == 1.0
    assert sep["n_pos"] == 3 and sep["n_neg"] == 3
    tied = detection_auc([1.0] * 10, [1.0] * 10)
    assert tied["auc"] == pytest.approx(0.5)
    assert tied["tpr_at_1pct_fpr"] == 0.0
    gen = torch.Generator().manual_seed(0)
    same = detection_auc(torch.randn(2000, generator=gen), torch.randn(2000, generator=gen))
    assert abs(same["auc"] - 0.5) < 0.05
    inverted = detection_auc([0.0, 0.1], [1.0, 2.0])
    assert inverted["auc"] == 0.0


def test_detection_auc_rejects_bad_inputs():
    with pytest.raises(ValueError, match="scores_pos"):
        detection_auc([], [1.0])
    with pytest.raises(ValueError, match="scores_neg"):
        detection_auc([1.0], [float("nan")])
