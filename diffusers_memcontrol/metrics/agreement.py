"""Text-image agreement: does a generated image show what its prompt asks for?

* :func:`clip_score` -- CLIPScore with a transformers ``CLIPModel`` (natural images).
* :func:`classifier_agreement` -- fraction of images a domain classifier assigns the prompt's label
  (used with the project's tiny-domain encoder, whose ``forward`` returns logits).
* :func:`biovil_score` -- BioViL-T image-report similarity (the paper's chest X-ray metric), via
  ``hi-ml-multimodal``, imported lazily.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffusers_memcontrol.metrics.encoders import (
    ClipEncoder,
    check_images,
    resize,
    to_rgb,
)

__all__ = ["biovil_score", "classifier_agreement", "clip_score"]


def _check_prompts(prompts: Sequence[str], n: int) -> list[str]:
    """Validate one string prompt per image."""
    if isinstance(prompts, str):
        prompts = [prompts] * n if n == 1 else None
        if prompts is None:
            raise ValueError(f"got a single prompt for {n} images; pass one prompt per image")
    prompts = list(prompts)
    if len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be {n} strings (one per image), got {len(prompts)} items")
    return prompts


def clip_score(
    images: torch.Tensor,
    prompts: Sequence[str],
    model: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-image CLIPScore ``100 * max(cos(image, text), 0)`` (torchmetrics' convention), float32 [N].

    ``model`` is a transformers ``CLIPModel`` (then ``tokenizer`` is required) or the encoder
    returned by ``load_encoder("clip")`` (which carries its tokenizer when one was saved with it).
    Images are ``[N, 3, H, W]`` in ``[-1, 1]``; take ``.mean()`` for the usual aggregate.
    """
    images = check_images(images)
    prompts = _check_prompts(prompts, images.shape[0])
    encoder = model if isinstance(model, ClipEncoder) else ClipEncoder(model.eval(), tokenizer=tokenizer)
    if tokenizer is None and encoder.tokenizer is None:
        raise ValueError("clip_score needs a CLIP tokenizer: pass tokenizer=")
    img = F.normalize(encoder.features(images, batch_size=batch_size), dim=-1)
    txt = []
    for start in range(0, len(prompts), batch_size):
        txt.append(encoder.text_features(prompts[start: start + batch_size], tokenizer=tokenizer))
    txt = F.normalize(torch.cat(txt, dim=0), dim=-1)
    return 100.0 * (img * txt).sum(dim=-1).clamp(min=0.0)


@torch.no_grad()
def classifier_agreement(
    images: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    classifier: Any,
    *,
    image_size: int | None = None,
    batch_size: int = 64,
) -> float:
    """Fraction of images whose predicted class (argmax of ``classifier(images)``) equals the prompt's label.

    ``classifier`` takes ``[N, 3, H, W]`` images in ``[-1, 1]`` (resized to ``image_size`` when given,
    e.g. 32 for the tiny-domain encoder) and returns logits ``[N, num_classes]``.
    """
    images = to_rgb(check_images(images))
    labels_t = torch.as_tensor(labels).reshape(-1)
    if labels_t.numel() != images.shape[0]:
        raise ValueError(f"labels must hold one class per image ({images.shape[0]}), got {labels_t.numel()}")
    if labels_t.is_floating_point() or labels_t.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got dtype {labels_t.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    if image_size is not None:
        images = resize(images, int(image_size))
    if hasattr(classifier, "eval"):
        classifier.eval()
    device = next((p.device for p in classifier.parameters()), torch.device("cpu")) \
        if hasattr(classifier, "parameters") else torch.device("cpu")
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = classifier(images[start: start + batch_size].to(device))
        logits = logits if torch.is_tensor(logits) else getattr(logits, "logits", logits[0])
        if logits.dim() != 2:
            raise ValueError(f"classifier must return logits [N, num_classes], got shape {tuple(logits.shape)}")
        pred = logits.argmax(dim=-1).cpu()
        correct += int((pred == labels_t[start: start + batch_size].long()).sum())
    return correct / images.shape[0]


def _default_biovil_engine() -> Any:
    """BioViL-T image-text inference engine from hi-ml-multimodal (downloads weights from the Hub)."""
    try:
        from health_multimodal.image import get_image_inference
        from health_multimodal.image.utils import ImageModelType
        from health_multimodal.text import get_bert_inference
        from health_multimodal.text.utils import BertEncoderType
        from health_multimodal.vlp import ImageTextInferenceEngine
    except ImportError as exc:
        raise ImportError(
            "biovil_score needs hi-ml-multimodal: pip install hi-ml-multimodal (it requires torchvision and "
            f"downloads microsoft/BiomedVLP-BioViL-T from the Hugging Face Hub). Import error: {exc}"
        ) from exc
    return ImageTextInferenceEngine(
        image_inference_engine=get_image_inference(ImageModelType.BIOVIL_T),
        text_inference_engine=get_bert_inference(BertEncoderType.BIOVIL_T_BERT),
    )


def biovil_score(
    images: torch.Tensor,
    prompts: Sequence[str],
    engine: Any = None,
) -> torch.Tensor:
    """Per-image BioViL-T cosine similarity between a chest X-ray and its report text, float32 [N].

    ``engine`` is a hi-ml-multimodal ``ImageTextInferenceEngine`` (default: BioViL-T image and text
    models, which hi-ml-multimodal fetches from the Hugging Face Hub). The engine reads images from
    files, so each image is written as an 8-bit grayscale PNG to a temporary folder first.
    """
    images = check_images(images)
    prompts = _check_prompts(prompts, images.shape[0])
    if engine is None:
        engine = _default_biovil_engine()
    from PIL import Image

    gray = ((images.float().mean(dim=1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    scores = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (pixels, prompt) in enumerate(zip(gray, prompts)):
            path = Path(tmp) / f"image_{i:06d}.png"
            Image.fromarray(np.ascontiguousarray(pixels)).save(path)  # 2-D uint8 -> mode "L"
            scores.append(float(engine.get_similarity_score_from_raw_data(path, prompt)))
    return torch.tensor(scores, dtype=torch.float32)
