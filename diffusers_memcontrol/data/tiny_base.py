"""The tiny Stable-Diffusion-shaped base pipeline shipped with the package, and its data domains.

MemControl is about fine-tuning Stable Diffusion 1.5 on chest X-rays. Neither fits on a CPU, and
nothing pretrained can be downloaded here, so the package ships its own stand-in:

* a tiny pipeline with SD1.5's *shape* (same UNet block types, 1x1-conv ``proj_in``/``proj_out``,
  a KL autoencoder, a CLIP text encoder, SD1.5's noise schedule), pretrained by
  ``training/pretrain_tiny_base.py`` on Fashion-MNIST at 32x32 pixels / 8x8 latents, saved in
  diffusers' ``save_pretrained`` layout under ``assets/tiny_base/`` (:func:`tiny_base_path`);
* a small domain CNN (:class:`DomainEncoder`) trained on handwritten digits, whose penultimate
  features play the role of the paper's chest X-ray DenseNet for FID / AMD
  (:func:`domain_encoder_path`);
* loaders for three small offline image domains (:data:`DOMAINS`, :func:`load_domain`):
  ``"fashion-mnist"`` (pretraining), ``"digits"`` (the sensitive fine-tuning domain of the
  quickstart) and ``"animal-mnist"`` (a transfer demo).

Usage::

    from diffusers import StableDiffusionPipeline
    from diffusers_memcontrol.data.tiny_base import tiny_base_path, load_domain

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base_path(), safety_checker=None)
    image = pipe("a photo of a sneaker", num_inference_steps=50, guidance_scale=4.0).images[0]
    digits = load_domain("digits", "train")   # columns: image (PIL RGB 32x32), text, label

Importing this module has no side effects (no downloads, no global torch state).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..constants import ASSETS_DIR

__all__ = [
    "DOMAINS",
    "IMAGE_SIZE",
    "LATENT_SIZE",
    "DomainEncoder",
    "DomainSpec",
    "build_scheduler",
    "build_text_encoder",
    "build_tokenizer",
    "build_unet",
    "build_vae",
    "domain_encoder_path",
    "images_to_tensor",
    "load_domain",
    "load_domain_arrays",
    "load_domain_encoder",
    "printed_digits",
    "read_pretraining_report",
    "tiny_base_path",
]

IMAGE_SIZE = 32
"""Pixel resolution of the tiny base (and of every domain image)."""
LATENT_SIZE = 8
"""Latent resolution: the VAE downsamples by 4."""




def tiny_base_path() -> str:
    """Folder of the shipped tiny pipeline (``StableDiffusionPipeline.from_pretrained`` layout)."""
    return os.path.join(ASSETS_DIR, "tiny_base")


def domain_encoder_path() -> str:
    """Folder of the shipped :class:`DomainEncoder` (``DomainEncoder.from_pretrained`` layout)."""
    return os.path.join(tiny_base_path(), "domain_encoder")


# --------------------------------------------------------------------------------------------------
# Model builders (random initialisation; used by training/pretrain_tiny_base.py)
# --------------------------------------------------------------------------------------------------

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 514
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def byte_level_vocab() -> dict[str, int]:
    """The 514-token byte-level CLIP vocabulary: 256 bytes, 256 bytes + ``</w>``, BOS, EOS."""
    symbols = [_bytes_to_unicode()[b] for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab[BOS_TOKEN] = 512
    vocab[EOS_TOKEN] = 513
    return vocab


def build_tokenizer():
    """A CLIP tokenizer over raw bytes (no merges): every character of a caption is one token.

    Built from in-memory ``vocab``/``merges`` (transformers 5 ignores ``vocab_file=`` here), with
    ``model_max_length=77`` as the SD pipelines expect.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=MAX_LENGTH)


def build_text_encoder(seed: int = 0, initializer_factor: float = 8.0):
    """A 2-layer, 64-wide CLIP text encoder, randomly initialised from ``seed`` (kept frozen).

    The encoder is never trained (SD keeps its CLIP frozen during fine-tuning too); it only has to
    map distinct captions to distinct embeddings. CLIP's default init scale makes a random
    encoder nearly ignore the words that differ (the relative distance between the embeddings of
    "a handwritten digit seven" and "... eight" is ~0.1 of their norm); ``initializer_factor=8``
    sharpens the random attention so the differing words reach the later positions too (~0.4), which
    per-caption conditioning, and hence per-caption memorization, needs.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=64,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        initializer_factor=float(initializer_factor),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return model.eval()


def build_vae(seed: int = 0) -> AutoencoderKL:
    """A small KL autoencoder: 3 levels (downsampling x4), 32x32 RGB -> 4x8x8 latents."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=IMAGE_SIZE,
            scaling_factor=1.0,
            force_upcast=False,
        )
    return vae


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    """An SD1.5-shaped conditional UNet at 8x8 latents (~1.5M parameters, 7 transformer blocks)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=8,
            use_linear_projection=False,
        )
    return unet


def build_scheduler() -> DDPMScheduler:
    """DDPM noise scheduler with Stable Diffusion 1.5's training configuration."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
        variance_type="fixed_small",
    )


# --------------------------------------------------------------------------------------------------
# Domain encoder (the stand-in for the paper's chest X-ray DenseNet)
# --------------------------------------------------------------------------------------------------


class DomainEncoder(ModelMixin, ConfigMixin):
    """A small CNN classifier for 32x32 RGB images in [-1, 1].

    ``forward(images)`` returns class logits; ``features(images)`` returns the ``feature_dim``-d
    penultimate (global-pooled) activations used as the FID / AMD feature space. Class names are
    in ``config.labels``. Saves and loads with ``save_pretrained`` / ``from_pretrained``
    (safetensors).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        channels: tuple[int, ...] = (32, 64, 128),
        feature_dim: int = 128,
        labels: tuple[str, ...] = tuple(str(i) for i in range(10)),
        dropout: float = 0.2,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(channels):
            layers += [
                nn.Conv2d(prev, ch, 3, padding=1),
                nn.GroupNorm(8, ch),
                nn.SiLU(),
                nn.Conv2d(ch, ch, 3, padding=1),
                nn.GroupNorm(8, ch),
                nn.SiLU(),
            ]
            if i < len(channels) - 1:
                layers.append(nn.AvgPool2d(2))
            prev = ch
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(prev, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, len(labels))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, feature_dim]`` of images ``[N, 3, H, W]`` in [-1, 1]."""
        h = self.body(images.to(self.dtype))
        h = h.mean(dim=(2, 3))
        return F.silu(self.proj(h))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, len(config.labels)]``."""
        return self.head(self.drop(self.features(images)))


def load_domain_encoder(path: str | None = None) -> DomainEncoder:
    """Load the shipped (or a given) :class:`DomainEncoder` in eval mode."""
    return DomainEncoder.from_pretrained(path or domain_encoder_path()).eval()


# --------------------------------------------------------------------------------------------------
# Domains
# --------------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SPLIT_SEED = 0
"""Seed of the deterministic 80/20 stratified train/test split of ``digits`` and ``animal-mnist``."""


@dataclass(frozen=True)
class DomainSpec:
    """Description of one image domain: class names, one caption per class, provenance."""

    name: str
    labels: tuple[str, ...]
    captions: tuple[str, ...]
    source: str
    license: str
    install_hint: str = ""
    extra: dict = field(default_factory=dict)

    def caption(self, label: int) -> str:
        return self.captions[int(label)]


_FASHION_LABELS = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FASHION_NOUNS = (
    "a t-shirt",
    "a pair of trousers",
    "a pullover",
    "a dress",
    "a coat",
    "a sandal",
    "a shirt",
    "a sneaker",
    "a bag",
    "an ankle boot",
)
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Class order as listed by the animal-mnist package (labels 0..9).
_ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")

DOMAINS: dict[str, DomainSpec] = {
    "fashion-mnist": DomainSpec(
        name="fashion-mnist",
        labels=_FASHION_LABELS,
        captions=tuple(f"a photo of {n}" for n in _FASHION_NOUNS),
        source="Zalando Fashion-MNIST (Debian package dataset-fashion-mnist), 60k train / 10k test, "
        "28x28 zero-padded to 32x32; the tiny base's pretraining domain",
        license="MIT",
        install_hint="apt-get install dataset-fashion-mnist",
    ),
    "digits": DomainSpec(
        name="digits",
        labels=_DIGIT_WORDS,
        captions=tuple(f"a handwritten digit {w}" for w in _DIGIT_WORDS),
        source="scikit-learn load_digits (UCI optical digits), 1,797 8x8 images bilinearly upsampled "
        "to 32x32, stratified 80/20 split (seed 0); the quickstart's sensitive fine-tuning domain",
        license="BSD-3-Clause",
    ),
    "animal-mnist": DomainSpec(
        name="animal-mnist",
        labels=_ANIMALS,
        captions=tuple(f"a silhouette of {'an' if a[0] in 'aeiou' else 'a'} {a}" for a in _ANIMALS),
        source="PyPI animal-mnist 0.4 (10k 28x28 animal silhouettes), zero-padded to 32x32, "
        "stratified 80/20 split (seed 0); a transfer demo domain",
        license="MIT",
        install_hint="pip install --no-deps animal-mnist",
    ),
}


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _pad_to_32(images: np.ndarray) -> np.ndarray:
    pad = (IMAGE_SIZE - images.shape[1]) // 2
    return np.pad(images, ((0, 0), (pad, pad), (pad, pad)))


def _stratified_split(labels: np.ndarray, split: str, test_fraction: float = 0.2) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=SPLIT_SEED, stratify=labels)
    return np.sort(train_idx if split == "train" else test_idx)


def _load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    img_path = os.path.join(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz")
    lbl_path = os.path.join(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz")
    if not (os.path.exists(img_path) and os.path.exists(lbl_path)):
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {FASHION_MNIST_DIR}. Install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu)."
        )
    return _pad_to_32(_read_idx(img_path)), _read_idx(lbl_path).astype(np.int64)


def _digits_to_32(levels: np.ndarray) -> np.ndarray:
    """8x8 images of 17 grey levels (0-16, as the UCI digits store them) -> uint8 [N, 32, 32], bilinear."""
    from PIL import Image

    small = np.clip(np.round(levels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for im in small])


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    labels = bunch.target.astype(np.int64)
    idx = _stratified_split(labels, split)
    return _digits_to_32(bunch.images)[idx], labels[idx]


def printed_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` typeset digits (Pillow's bundled font, jittered) made like the UCI digits: 8x8, 17 levels, 32x32.

    The tiny base's "vocabulary" of the digits domain (training/pretrain_tiny_base.py): like SD1.5, which saw some
    radiographs on the web before anyone fine-tuned it on MIMIC, the base sees digits that are not any image of the
    fine-tuning splits. Returns ``(images uint8 [n, 32, 32], labels int64 [n])``, the same for a seed.
    """
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int64)
    levels = np.zeros((n, 8, 8))
    fonts: dict[int, ImageFont.FreeTypeFont] = {}
    for i, digit in enumerate(labels):
        size = int(rng.integers(40, 60))
        font = fonts.setdefault(size, ImageFont.load_default(size=size))
        canvas = Image.new("L", (96, 96), 0)
        stroke = int(rng.integers(0, 4))
        ImageDraw.Draw(canvas).text((20, 10), str(digit), fill=255, font=font, stroke_width=stroke, stroke_fill=255)
        glyph = canvas.crop(canvas.getbbox())
        height = int(rng.integers(52, 64))  # the UCI digits fill their box, as these do
        width = max(6, min(60, int(glyph.width * height / glyph.height * rng.uniform(0.8, 1.25))))
        cell = Image.new("L", (64, 64), 0)
        cell.paste(glyph.resize((width, height), Image.BILINEAR),
                   ((64 - width) // 2 + int(rng.integers(-2, 3)), (64 - height) // 2 + int(rng.integers(-2, 3))))
        cell = cell.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        small = np.asarray(cell.resize((8, 8), Image.BOX), dtype=np.float64)
        levels[i] = np.round(small / max(small.max(), 1.0) * 16.0)
    return _digits_to_32(levels), labels


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays only (animal-mnist ships its arrays as pickles)."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"animal-mnist data: refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_animal_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    import importlib.util

    hint = DOMAINS["animal-mnist"].install_hint
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or spec.origin is None:
        raise ImportError(
            f"animal-mnist is not installed. Install it with `{hint}` (its tensorflow "
            "requirement is not needed: the data is read without it)."
        )
    folder = os.path.join(os.path.dirname(spec.origin), "data", "Animal_MNIST")
    paths = [os.path.join(folder, f"animal_{k}_version_3.gz") for k in ("data", "label")]
    if not all(os.path.exists(p) for p in paths):
        raise FileNotFoundError(f"animal-mnist data files not found in {folder}; reinstall with `{hint}`.")
    arrays = []
    for p in paths:
        with gzip.open(p, "rb") as f:
            arrays.append(np.asarray(_NumpyOnlyUnpickler(f).load()))
    images, labels = arrays[0].astype(np.uint8), arrays[1].astype(np.int64)
    idx = _stratified_split(labels, split)
    return _pad_to_32(images[idx]), labels[idx]


_LOADERS = {"fashion-mnist": _load_fashion_mnist, "digits": _load_digits, "animal-mnist": _load_animal_mnist}


def load_domain_arrays(name: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Raw arrays of a domain: ``(images uint8 [N, 32, 32] grayscale, labels int64 [N])``.

    The fast path for training code; :func:`load_domain` wraps the same arrays in a ``Dataset``.
    """
    if name not in DOMAINS:
        raise KeyError(f"unknown domain {name!r}; choose one of {sorted(DOMAINS)}")
    _check_split(split)
    return _LOADERS[name](split)


def _pgm_bytes(images: np.ndarray) -> list[bytes]:
    """Encode uint8 grayscale images as binary PGM files (no compression, no per-pixel work)."""
    n, h, w = images.shape
    header = f"P5\n{w} {h}\n255\n".encode()
    flat = np.ascontiguousarray(images).reshape(n, h * w)
    return [header + row.tobytes() for row in flat]


def load_domain(name: str, split: str = "train"):
    """Load a domain as a ``datasets.Dataset`` with columns ``image``, ``text``, ``label``.

    Args:
        name: one of :data:`DOMAINS` (``"fashion-mnist"``, ``"digits"``, ``"animal-mnist"``).
        split: ``"train"`` or ``"test"`` (fashion-mnist: the official split; the others: a fixed
            stratified 80/20 split, seed :data:`SPLIT_SEED`).

    ``image`` decodes to a 32x32 PIL image in RGB mode (grayscale replicated), ``text`` is the class
    caption (e.g. ``"a handwritten digit seven"``), ``label`` a ``ClassLabel`` int.
    """
    import pyarrow as pa
    from datasets import ClassLabel, Dataset, DatasetInfo, Features, Image, Value
    from datasets.table import InMemoryTable

    images, labels = load_domain_arrays(name, split)
    spec = DOMAINS[name]
    features = Features(
        {"image": Image(mode="RGB"), "text": Value("string"), "label": ClassLabel(names=list(spec.labels))}
    )
    # Build the Arrow table directly: images as tiny PGM files (the Image feature's storage),
    # captions by fancy indexing; no per-image PIL work until an image is accessed.
    image_storage = pa.StructArray.from_arrays(
        [pa.array(_pgm_bytes(images), type=pa.binary()), pa.nulls(len(images), type=pa.string())],
        names=["bytes", "path"],
    )
    captions = np.asarray(spec.captions, dtype=object)[labels].tolist()
    table = pa.table(
        {
            "image": image_storage,
            "text": pa.array(captions, type=pa.string()),
            "label": pa.array(labels, type=pa.int64()),
        }
    ).cast(features.arrow_schema)
    info = DatasetInfo(description=spec.source, license=spec.license, features=features)
    return Dataset(InMemoryTable(table), info=info, split=split)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 grayscale ``[N, H, W]`` -> float RGB ``[N, 3, H, W]`` in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def read_pretraining_report(path: str | None = None) -> dict:
    """The metrics written by ``training/pretrain_tiny_base.py`` (PSNR, encoder accuracy, times)."""
    with open(path or os.path.join(tiny_base_path(), "pretraining_report.json"), encoding="utf-8") as f:
        return json.load(f)
