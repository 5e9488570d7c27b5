"""The one image pipeline (diffusers_memcontrol.data.images): opening values, content digests, the training transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from diffusers_memcontrol.data.images import (
    INTERPOLATIONS,
    ImageLoader,
    image_digest,
    open_image,
    scan_images,
    transform_image,
)


def gradient_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A non-uniform image (so resampling filters and crops give different pixels)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    red = (x + 0 * y) % 256
    green = (7 * x + 3 * y) % 256  # high frequencies
    blue = (x * y / 255) % 256
    return Image.fromarray(np.stack([red, green, blue], -1).astype(np.uint8)).convert(mode)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_value_kind_opens_to_the_same_rgb_image(tmp_path):
    image = gradient_image(12, 9, "L")
    path = tmp_path / "gray.png"
    image.save(path)
    data = png_bytes(image)
    values = [str(path), path, data, image, {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}]
    opened = [open_image(v) for v in values]
    assert all(o.mode == "RGB" and o.size == (12, 9) for o in opened)
    assert all(np.array_equal(np.asarray(o), np.asarray(opened[0])) for o in opened[1:])


def test_unreadable_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "report.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match=r"Cannot read image .*report\.png.*\(row 3\)"):
        open_image(str(bad), row=3)
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        open_image(str(tmp_path / "nope.png"))
    with pytest.raises(ValueError, match=r"row 2 of column 'scan'.*neither bytes nor a path"):
        open_image({"bytes": None, "path": None}, row=2, column="scan")
    with pytest.raises(ValueError, match=r"int, not an image"):
        open_image(5)
    dataset = Dataset.from_dict({"image": [str(tmp_path / "nope.png")]}).cast_column("image", ImageFeature())
    with pytest.raises(FileNotFoundError, match=r"nope\.png.*row 0"):
        scan_images(dataset, "image", progress=False)


def test_one_digest_for_the_same_content(tmp_path):
    image = gradient_image(10, 10)
    data = png_bytes(image)
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "b.png").write_bytes(data)
    keys = {image_digest(v) for v in (str(tmp_path / "a.png"), str(tmp_path / "b.png"), data,
                                      {"bytes": data, "path": "elsewhere.png"})}
    assert len(keys) == 1
    assert image_digest(image) == image_digest(image.copy()) != image_digest(gradient_image(10, 11))
    dataset = Dataset.from_dict({"image": [str(tmp_path / "a.png"), str(tmp_path / "b.png")]})
    dataset = dataset.cast_column("image", ImageFeature())
    infos = scan_images(dataset, "image", progress=False)
    assert [i.key for i in infos] == [keys.pop()] * 2 and infos[0].size == (10, 10)
    assert np.array_equal(np.asarray(ImageLoader(dataset, "image")(1)), np.asarray(image))


def test_transform_resizes_the_shorter_side_then_crops():
    wide = gradient_image(60, 30)
    out = transform_image(wide, 16)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert -1.0 <= out.min() < out.max() <= 1.0
    # resize first (60x30 -> 32x16), then the centre 16 columns
    resized = np.asarray(wide.resize((32, 16), INTERPOLATIONS["lanczos"]))[:, 8:24]
    assert torch.equal(out, torch.from_numpy(resized.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0))
    assert torch.equal(transform_image(wide, 16, flip=True), out.flip(-1))
    crops = {tuple(transform_image(wide, 16, center_crop=False, generator=torch.Generator().manual_seed(s))
                   [0, 0, :4].tolist()) for s in range(8)}
    assert len(crops) > 1  # random crops move
    again = transform_image(wide, 16, center_crop=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, transform_image(wide, 16, center_crop=False, generator=torch.Generator().manual_seed(3)))


def test_interpolation_modes_differ_and_unknown_is_refused():
    image = gradient_image(40, 40)
    outs = {mode: transform_image(image, 16, interpolation=mode) for mode in ("lanczos", "bilinear", "bicubic",
                                                                             "nearest")}
    modes = list(outs)
    for i, a in enumerate(modes):
        assert not any(torch.equal(outs[a], outs[b]) for b in modes[i + 1:]), a
    assert torch.equal(transform_image(image, 40, interpolation="nearest"), transform_image(image, 40))  # no resize
    with pytest.raises(ValueError, match=r"Unknown image_interpolation_mode 'cubic'; expected one of lanczos"):
        transform_image(image, 16, interpolation="cubic")
