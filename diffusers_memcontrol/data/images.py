"""The one image pipeline of training, evaluation and the caches: open, digest, transform.

A dataset image value is a path, raw bytes, a PIL image or a `datasets` Image dict (``{"bytes", "path"}``).
`open_image` turns any of them into an RGB PIL image with an error that names the row and file; `image_digest` is its
content key (SHA-256 of the file bytes); `transform_image` is diffusers' train_text_to_image.py transform without
torchvision: resize the shorter side (``--image_interpolation_mode``, lanczos by default), crop, flip, scale to
[-1, 1].
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..files import file_digest

# The names of torchvision's InterpolationMode (diffusers' --image_interpolation_mode choices) -> PIL resampling, as
# torchvision maps them for PIL images.
INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def check_interpolation(mode: str) -> str:
    """`mode` when it is a known interpolation name, else a ValueError listing them."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"Unknown image_interpolation_mode {mode!r}; expected one of {', '.join(INTERPOLATIONS)}.")
    return mode


@dataclass
class ImageInfo:
    """Content key (SHA-256 of the file bytes), size and a printable name of one dataset image."""

    key: str
    size: tuple[int, int]
    name: str


def undecoded_column(dataset: Any, column: str) -> Any:
    """The dataset with `column` not decoded (``{"bytes", "path"}`` dicts) when it is a datasets Image feature."""
    from datasets import Image as ImageFeature

    feature = dataset.features.get(column) if hasattr(dataset, "features") else None
    if isinstance(feature, ImageFeature) and feature.decode:
        return dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def image_source(value: Any, row: int | None = None, column: str = "image") -> tuple[Any, str, bytes | None]:
    """(openable source, printable name, raw bytes or None) of one stored image value."""
    where = f"in row {row} of column {column!r}" if row is not None else "given in memory"
    at = f" (row {row})" if row is not None else ""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return data, f"{path!r}{at}" if path else where, data
        if path:
            return path, f"{path!r}{at}", None
        raise ValueError(f"The image {where} holds neither bytes nor a path.")
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value), f"{os.fspath(value)!r}{at}", None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), where, bytes(value)
    if isinstance(value, Image.Image):
        return value, where, None
    raise ValueError(f"The value {where} is a {type(value).__name__}, not an image (path, bytes or PIL image).")


def _open(source: Any, name: str, decode: bool) -> Image.Image:
    """PIL image of a source from `image_source`; pixels are read only when `decode`."""
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, bytes):
            image = Image.open(io.BytesIO(source))
        else:
            image = Image.open(source)
        if decode:
            image.load()
        return image
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file {name} does not exist.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"Cannot read image {name}: not a readable image file ({err}).") from None


def open_image(value: Any, row: int | None = None, column: str = "image") -> Image.Image:
    """An image value (path, bytes, PIL image, datasets Image dict) as an RGB PIL image; errors name the row/file."""
    source, name, _ = image_source(value, row, column)
    return _open(source, name, decode=True).convert("RGB")


def image_digest(value: Any, memo: Any = None) -> str:
    """Content key of an image value: SHA-256 of its file bytes (of mode, size and pixels for a PIL image).

    Files given by path are hashed through `memo` (a `cache.FileHashMemo`) when given, so large folders are read once.
    """
    source, _, data = image_source(value)
    if data is not None:
        return hashlib.sha256(data).hexdigest()
    if isinstance(source, str):
        return memo.digest(source) if memo is not None else file_digest(source)
    return hashlib.sha256(f"{source.mode}|{source.size}|".encode() + source.tobytes()).hexdigest()


def scan_images(dataset: Any, image_column: str, memo: Any = None, decode: bool = False, progress: bool = True
                ) -> list[ImageInfo]:
    """Content key and size of every image, checking each can be opened (all of it when `decode`); names bad files.

    Files given by path are hashed through `memo` (a `cache.FileHashMemo`) when given, so large folders are read once.
    """
    raw = undecoded_column(dataset, image_column)
    infos: list[ImageInfo] = []
    bar = tqdm(total=len(raw), desc="check images", disable=not progress, unit="img", leave=False)
    row = 0
    for batch in raw.iter(batch_size=256):
        for value in batch[image_column]:
            source, name, _ = image_source(value, row, image_column)
            if isinstance(source, str) and not os.path.isfile(source):
                raise FileNotFoundError(f"Image file {name} does not exist.")
            image = _open(source, name, decode)
            infos.append(ImageInfo(image_digest(value, memo), tuple(image.size), name))
            row += 1
        bar.update(len(batch[image_column]))
    bar.close()
    if memo is not None:
        memo.flush()
    return infos


@dataclass
class BadImage:
    """A dataset row whose image cannot be decoded: the row, the printable name of the file and why."""

    row: int
    name: str
    reason: str


@dataclass
class ImageCheck:
    """What `check_images` found: the bad rows, and how many images it decoded or knew to be good (cache)."""

    bad: list[BadImage]
    decoded: int
    cached: int


def _decode_fully(source: Any, name: str) -> tuple[str | None, str | None]:
    """(content key, None) of an image that decodes in full as training reads it (pixels + RGB), else (None, why).

    A file is read once: its bytes are hashed (the latent cache's key) and decoded from memory."""
    path = source
    try:
        if isinstance(source, str):
            try:
                with open(source, "rb") as f:
                    source = f.read()
            except FileNotFoundError:
                raise FileNotFoundError(f"Image file {name} does not exist.") from None
            except OSError as err:
                raise ValueError(f"Cannot read image {name}: {err.strerror or err}.") from None
        digest = hashlib.sha256(source).hexdigest() if isinstance(source, bytes) else None
        _open(source, name, decode=True).convert("RGB")
        return digest, None
    except (ValueError, FileNotFoundError) as err:
        reason = str(err)
        if isinstance(path, str) and os.path.isfile(path):  # PIL's message then names the file, not a buffer
            try:
                _open(path, name, decode=True).convert("RGB")
            except (ValueError, FileNotFoundError) as by_path:
                reason = str(by_path)
        return None, reason


def _rows_to_check(values: list, first_row: int, column: str, split: str | None, memo: Any,
                   bad: list[BadImage]) -> list[tuple[int, Any, str, str]]:
    """(row, source, name, key) of each image value to decode; `key` is its content key when known without reading
    the file (bytes in the dataset, or a file the memo knows), else its path. Unusable values go to `bad`."""
    rows = []
    for row, value in enumerate(values, start=first_row):
        try:
            source, name, data = image_source(value, row, column)
        except ValueError as err:
            bad.append(BadImage(row, f"row {row}", str(err)))
            continue
        if isinstance(source, Image.Image):  # an in-memory PIL image is decoded already
            continue
        if split is not None and f"row {row}" in name:  # "(row 3 of the train split)"; a path may hold "row 3" too
            head, at, tail = name.rpartition(f"row {row}")
            name = f"{head}{at} of the {split} split{tail}"
        key = None
        if data is not None:
            key = hashlib.sha256(data).hexdigest()
        elif memo is not None and os.path.isfile(source):
            key = memo.lookup(source)
        rows.append((row, source, name, key or source))
    return rows


def check_images(dataset: Any, image_column: str, memo: Any = None, workers: int = 1, progress: bool = True,
                 split: str | None = None) -> ImageCheck:
    """Decode every image of `dataset` in full (pixels and RGB conversion, as training does); return the bad rows.

    `workers` threads decode at a time (PIL and hashlib release the GIL). With `memo` (a `cache.FileHashMemo`) the
    content key of each image that decoded is remembered, so a rerun, or another process of a search, decodes
    nothing twice; an image that appears in several rows is decoded once. `split` names the rows' split in the
    messages ("row 3 of the train split").
    """
    raw = undecoded_column(dataset, image_column)
    result = ImageCheck(bad=[], decoded=0, cached=0)
    good: set[str] = set()  # content keys of the images that decoded
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        with tqdm(total=len(raw), desc=f"check {split + ' ' if split else ''}images", disable=not progress,
                  unit="img", leave=False) as bar:
            first_row = 0
            for batch in raw.iter(batch_size=1024):
                values = batch[image_column]
                rows = _rows_to_check(values, first_row, image_column, split, memo, result.bad)
                first_row += len(values)
                known = good | (memo.decoded([k for *_, k in rows]) if memo is not None else set())
                todo = {}  # one decode per content key (or per file whose key is not known yet)
                for row, source, name, key in rows:
                    if key not in known:
                        todo.setdefault(key, (source, name))
                result.cached += len(rows) - len(todo)
                result.decoded += len(todo)
                stats = {key: os.stat(source) for key, (source, _) in todo.items() if isinstance(source, str)
                         and os.path.isfile(source)}
                decode = pool.map if pool is not None else map
                errors = {}
                for key, (digest, error) in zip(todo, decode(lambda item: _decode_fully(*item), todo.values())):
                    if error is not None:
                        errors[key] = error
                        continue
                    good.add(digest)
                    if memo is not None and key in stats:
                        memo.record(todo[key][0], digest, stats[key])
                result.bad += [BadImage(row, name, errors[key]) for row, _, name, key in rows if key in errors]
                if memo is not None:
                    memo.mark_decoded(sorted(good - known))
                bar.update(len(values))
    finally:
        if pool is not None:
            pool.shutdown()
        if memo is not None:
            memo.flush()
    result.bad.sort(key=lambda b: b.row)
    return result


class ImageLoader:
    """Decoded RGB PIL image of a dataset row, with errors that name the file."""

    def __init__(self, dataset: Any, image_column: str):
        self.raw = undecoded_column(dataset, image_column)
        self.column = image_column

    def __call__(self, row: int) -> Image.Image:
        return open_image(self.raw[int(row)][self.column], int(row), self.column)

    def __len__(self) -> int:
        return len(self.raw)


def transform_image(image: Any, resolution: int, center_crop: bool = True, flip: bool = False,
                    generator: torch.Generator | None = None, interpolation: str = "lanczos") -> torch.Tensor:
    """diffusers' training transform without torchvision: resize the shorter side, crop, flip, scale to [-1, 1].

    `image` is any value `open_image` takes. The crop is centred when `center_crop`, else random (drawn from
    `generator`); square images are not cropped. Returns a float tensor [3, resolution, resolution].
    """
    image = image.convert("RGB") if isinstance(image, Image.Image) else open_image(image)
    w, h = image.size
    if min(w, h) != resolution:
        scale = resolution / min(w, h)
        size = (resolution, int(h * scale)) if w <= h else (int(w * scale), resolution)
        image = image.resize(size, INTERPOLATIONS[check_interpolation(interpolation)])
        w, h = image.size
    if (w, h) != (resolution, resolution):
        if center_crop:
            left, top = round((w - resolution) / 2.0), round((h - resolution) / 2.0)
        else:
            left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
            top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
        image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def pixel_batch(images: Sequence[Any], resolution: int, center_crop: bool = True, interpolation: str = "lanczos",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """`transform_image` of each image value, stacked: float tensor [N, 3, resolution, resolution] in [-1, 1]."""
    return torch.stack([transform_image(image, resolution, center_crop, generator=generator,
                                        interpolation=interpolation) for image in images])
