"""Shared fixtures: real diffusers UNets at tiny size, and the SD1.5 layout on the meta device."""

import pytest
import torch
from diffusers import UNet2DConditionModel

# One thread: the tests' small matmuls and SVDs gain nothing from more, and oversubscribed cores slow LAPACK ~20x.
torch.set_num_threads(1)

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def make_small_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """An SD1.5-shaped UNet (same block types and layers) at a width that runs in milliseconds on a CPU."""
    config = dict(SD15_UNET_CONFIG, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, sample_size=8,
                  norm_num_groups=8, attention_head_dim=4)
    config.update(overrides)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config)


@pytest.fixture
def small_unet() -> UNet2DConditionModel:
    return make_small_unet()


@pytest.fixture
def sd15_meta_unet() -> UNet2DConditionModel:
    """The SD1.5 UNet architecture (859.5M parameters) without allocating its weights."""
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


@pytest.fixture
def unet_inputs():
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.tensor([10, 700]),
        torch.randn(2, 5, 32, generator=generator),
    )
