"""In-domain rate: the fraction of generations that a classifier of the target domain, against the base model's
pretraining domain, calls target-domain images.

A fine-tune that has not learned its domain keeps drawing what the base was pretrained on (the tiny base: mostly
Fashion-MNIST garments, plus the look of digits but not each digit's shape). It asks "a digit at all?"; whether it
is the prompted digit is the agreement metric's question. :class:`InDomainClassifier` is a logistic regression on grayscale pixels,
trained (:func:`fit_in_domain_classifier`) on the VAE round trips of both domains, i.e. on images as the pipeline
renders them; the package ships one per built-in target domain (``digits``, ``animal-mnist``) for the tiny base's
VAE (``training/fit_quality_classifiers.py``), never trained on a test split.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["InDomainClassifier", "fit_in_domain_classifier", "in_domain_classifier_path", "in_domain_rate",
           "load_in_domain_classifier"]


def _pixels(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """``[N, C, H, W]`` images in [-1, 1] -> grayscale pixels ``[N, image_size ** 2]`` (float64)."""
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"images must be a [N, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    gray = images.detach().float().cpu().mean(dim=1, keepdim=True)
    if gray.shape[-1] != image_size or gray.shape[-2] != image_size:
        gray = F.interpolate(gray, size=(image_size, image_size), mode="area")
    return gray.flatten(1).double()


@dataclass
class InDomainClassifier:
    """Logistic regression ``sigmoid(((x - mean) / scale) . weight + bias)`` on grayscale pixels: P(target domain)."""

    weight: torch.Tensor
    bias: float
    mean: torch.Tensor
    scale: torch.Tensor
    image_size: int = 32
    info: dict = field(default_factory=dict)

    def probability(self, images: torch.Tensor) -> torch.Tensor:
        """P(target domain) of each image ``[N]``."""
        x = (_pixels(images, self.image_size) - self.mean.double()) / self.scale.double()
        return torch.sigmoid(x @ self.weight.double() + float(self.bias)).float()

    def save(self, path: str | os.PathLike) -> str:
        """Write as safetensors (tensors + JSON metadata) atomically."""
        from safetensors.torch import save_file

        from ..files import atomic_path

        tensors = {"weight": self.weight.float().contiguous(), "bias": torch.tensor([float(self.bias)]),
                   "mean": self.mean.float().contiguous(), "scale": self.scale.float().contiguous()}
        metadata = {"image_size": str(self.image_size), "info": json.dumps(self.info, sort_keys=True)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, tmp, metadata=metadata)
        return str(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> InDomainClassifier:
        """Inverse of :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
            metadata = f.metadata() or {}
        return cls(tensors["weight"], float(tensors["bias"][0]), tensors["mean"], tensors["scale"],
                   int(metadata.get("image_size", 32)), json.loads(metadata.get("info", "{}")))


def fit_in_domain_classifier(target: torch.Tensor, base: torch.Tensor, *, image_size: int = 32, seed: int = 0,
                             C: float = 1.0, info: dict | None = None) -> InDomainClassifier:
    """Fit on ``target`` (label 1) vs ``base`` (label 0) images in [-1, 1], classes weighted to balance (sklearn's
    deterministic lbfgs solver)."""
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([_pixels(target, image_size), _pixels(base, image_size)]).numpy()
    y = np.concatenate([np.ones(len(target), dtype=np.int64), np.zeros(len(base), dtype=np.int64)])
    mean, scale = x.mean(0), x.std(0) + 1e-3
    model = LogisticRegression(C=C, max_iter=5000, class_weight="balanced", random_state=seed)
    model.fit((x - mean) / scale, y)
    return InDomainClassifier(torch.from_numpy(model.coef_[0]).float(), float(model.intercept_[0]),
                              torch.from_numpy(mean).float(), torch.from_numpy(scale).float(), image_size,
                              dict(info or {}))


def in_domain_rate(images: torch.Tensor, classifier: InDomainClassifier, threshold: float = 0.5) -> float:
    """Fraction of ``images`` that ``classifier`` assigns the target domain (P > threshold)."""
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    return float((classifier.probability(images) > threshold).float().mean())


def in_domain_classifier_path(domain: str) -> str:
    """Where the tiny base ships the in-domain classifier of a built-in target domain."""
    from ..data.tiny_base import tiny_base_path

    return os.path.join(tiny_base_path(), "in_domain", f"{domain}.safetensors")


def load_in_domain_classifier(name_or_path: str) -> InDomainClassifier:
    """A shipped classifier by target-domain name (``digits``, ``animal-mnist``) or a ``.safetensors`` path."""
    path = name_or_path if os.path.isfile(name_or_path) else in_domain_classifier_path(name_or_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No in-domain classifier {name_or_path!r} ({path}); build the tiny base's with "
                                "training/fit_quality_classifiers.py or pass a .safetensors file.")
    return InDomainClassifier.load(path)
