"""Shared fixtures: real diffusers UNets at tiny size, and the SD1.5 layout on the meta device."""

import os

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

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


@pytest.fixture(autouse=True, scope="session")
def _cache_in_tmp(tmp_path_factory):
    """Keep the tests' caches (latents, text embeddings, SVDs, FID statistics) out of the user's cache folder."""
    previous = os.environ.get("MEMCONTROL_CACHE_DIR")
    os.environ["MEMCONTROL_CACHE_DIR"] = str(tmp_path_factory.mktemp("memcontrol_cache"))
    yield
    if previous is None:
        os.environ.pop("MEMCONTROL_CACHE_DIR", None)
    else:
        os.environ["MEMCONTROL_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on 2 shared cores it is ~10x faster than two fighting (SVDs stop spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


IMAGENETTE_LIKE_CLASSES = ("tench", "church", "parachute")
IMAGENETTE_LIKE_CONFIGS = {"160px": 16, "320px": 32}  # config name -> side of its images


def _imagenette_readme() -> str:
    configs, infos = [], []
    names = "".join(f"          '{i}': {name}\n" for i, name in enumerate(IMAGENETTE_LIKE_CLASSES))
    for config in IMAGENETTE_LIKE_CONFIGS:
        configs.append(f"- config_name: {config}\n  data_files:\n"
                       f"  - split: train\n    path: {config}/train-*.parquet\n"
                       f"  - split: validation\n    path: {config}/validation-*.parquet\n")
        infos.append(f"- config_name: {config}\n  features:\n  - name: image\n    dtype: image\n"
                     f"  - name: label\n    dtype:\n      class_label:\n        names:\n{names}")
    return "---\nconfigs:\n" + "".join(configs) + "dataset_info:\n" + "".join(infos) + "---\n# imagenette-like\n"


@pytest.fixture(scope="session")
def imagenette_like_dir(tmp_path_factory) -> str:
    """A local dataset repo shaped like frgfm/imagenette's parquet conversion, for `load_dataset(folder, config)`.

    Configs "160px" (16x16 images) and "320px" (32x32): parquet files with an `image` column (PNG bytes) and an int
    `label` column, 12 train and 6 validation rows each; the README's YAML declares the configs' data files and the
    `ClassLabel` names (IMAGENETTE_LIKE_CLASSES), the way a Hub dataset repo does. Row i has class i % 3 and its
    pixels are all equal to 10 * i, so a test can tell rows and configs apart.
    """
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenette_like")
    for config, side in IMAGENETTE_LIKE_CONFIGS.items():
        (root / config).mkdir()
        for split, rows in (("train", 12), ("validation", 6)):
            images = []
            for i in range(rows):
                buffer = io.BytesIO()
                Image.fromarray(np.full((side, side, 3), 10 * i, dtype=np.uint8)).save(buffer, format="PNG")
                images.append({"bytes": buffer.getvalue(), "path": f"{split}_{i}.png"})
            table = pa.table({"image": images, "label": [i % len(IMAGENETTE_LIKE_CLASSES) for i in range(rows)]})
            pq.write_table(table, root / config / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text(_imagenette_readme())
    return str(root)


def unet_output(unet: UNet2DConditionModel, batch: int = 1) -> torch.Tensor:
    """The UNet's prediction on a fixed random input (8x8 latents, 4 text tokens): to compare two loaded models."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, unet.config.in_channels, 8, 8, generator=generator)
    hidden = torch.randn(batch, 4, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=hidden).sample


def random_tiny_pipeline() -> StableDiffusionPipeline:
    """A tiny SD-shaped pipeline built from the tiny base's configs (random weights, no file read)."""
    from diffusers_memcontrol.data import tiny_base as tb

    return StableDiffusionPipeline(vae=tb.build_vae(), text_encoder=tb.build_text_encoder(),
                                   tokenizer=tb.build_tokenizer(), unet=tb.build_unet(), scheduler=tb.build_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    """`random_tiny_pipeline()`, once per test module."""
    return random_tiny_pipeline()


@pytest.fixture(scope="module")
def data8(pipe):
    """The first 8 digits training images, encoded in memory for `pipe`."""
    from diffusers_memcontrol.data import tiny_base as tb
    from diffusers_memcontrol.trainer.batches import prepare_training_data

    return prepare_training_data(pipe, tb.load_domain("digits", "train").select(range(8)), cache="memory",
                                 progress=False)
