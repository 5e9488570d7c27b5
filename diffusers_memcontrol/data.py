"""Image-caption data: built-in domains, Hub datasets, local imagefolders and CSV/JSONL tables of image paths.

Also the MemControl data protocol (paper Sec. 4.1):

* :func:`split_dataset` -- train / validation / test without subject leakage (MIMIC-CXR has several studies
  per patient: with ``subject_column`` a subject lands in exactly one split);
* :func:`build_memorization_set` -- ``D_mem``, the image-caption pairs the search expects to be memorized
  (random, or the longest captions as the MemControl authors' code does; or fixed by a JSON file);
* :func:`build_hpo_set` -- the search's training set: a proxy subset of the training split plus ``D_mem``
  duplicated ``dmem_repeats`` times ("100 pairs duplicated 50 times, added to 1% of the training set");
* :func:`validate_images` -- open every image once and name the first unreadable file.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image


def load_image_caption_dataset(
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    max_samples: Optional[int] = None,
):
    """A `datasets.Dataset` of images and captions from a built-in domain, a Hub id, a folder or a CSV/JSONL file.

    Defaults to the built-in `digits` domain (the quickstart's sensitive data). A folder is read as an `imagefolder`
    with `metadata.jsonl`/`metadata.csv` (file_name + caption); a `.csv`/`.jsonl` file lists image paths (absolute
    or relative to the file) and captions, the way MIMIC-CXR users usually hold their data.
    """
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    from .tiny_base import DOMAINS, load_domain

    if dataset_name is None and train_data_dir is None:
        dataset_name = "digits"
    if dataset_name in DOMAINS:
        dataset = load_domain(dataset_name, split)
    elif train_data_dir is not None and os.path.isfile(train_data_dir):
        ext = os.path.splitext(train_data_dir)[1].lower()
        builder = {".csv": "csv", ".jsonl": "json", ".json": "json"}.get(ext)
        if builder is None:
            raise ValueError(f"--train_data_dir {train_data_dir!r}: expected a folder or a .csv/.jsonl file.")
        dataset = load_dataset(builder, data_files=train_data_dir, split="train")
        _check_columns(dataset, image_column, caption_column, train_data_dir)
        root = os.path.dirname(os.path.abspath(train_data_dir))
        paths = _resolve_image_paths(dataset[image_column], root, train_data_dir, image_column)
        dataset = dataset.remove_columns(image_column).add_column(image_column, paths)
        dataset = dataset.cast_column(image_column, ImageFeature())
    elif train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {train_data_dir!r} does not exist.")
        dataset = load_dataset("imagefolder", data_dir=train_data_dir, split="train")
    else:
        dataset = load_dataset(dataset_name, split=split)
    _check_columns(dataset, image_column, caption_column, dataset_name or train_data_dir)
    if max_samples is not None:
        dataset = dataset.shuffle(seed=0).select(range(min(max_samples, len(dataset))))
    empty = [i for i, c in enumerate(dataset[caption_column]) if not isinstance(c, str) or not c.strip()]
    if empty:
        raise ValueError(f"{len(empty)} rows have an empty caption in column {caption_column!r} (first rows: "
                         f"{empty[:5]}); every training image needs a caption.")
    return dataset


def _resolve_image_paths(values: Sequence, root: str, source: str, image_column: str) -> list[str]:
    """Absolute image paths of a CSV/JSONL table; a clear error naming the row/file when one is empty or missing.

    Only existence is checked here (cheap); whether a file really is an image is checked when it is decoded
    (PIL names the file) or up front with :func:`validate_images`.
    """
    paths = []
    missing = []
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{source!r} row {row}: column {image_column!r} is empty ({value!r}); expected the path "
                             "of an image file (absolute or relative to the table).")
        path = value if os.path.isabs(value) else os.path.join(root, value)
        if not os.path.isfile(path):
            missing.append((row, path))
        paths.append(path)
    if missing:
        shown = ", ".join(f"row {r}: {p!r}" for r, p in missing[:5])
        raise FileNotFoundError(f"{len(missing)} image file(s) listed in {source!r} do not exist ({shown}"
                                f"{', ...' if len(missing) > 5 else ''}); paths are read relative to the table's "
                                "folder unless absolute.")
    return paths


def _check_columns(dataset, image_column: str, caption_column: str, source) -> None:
    missing = [c for c in (image_column, caption_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"Column(s) {missing} not found in {source!r}; available columns: {dataset.column_names}. "
                         "Pass --image_column / --caption_column.")


def preprocess_images(images: Sequence, resolution: int, center_crop: bool = False) -> torch.Tensor:
    """PIL images (or paths) -> float tensor [N, 3, resolution, resolution] in [-1, 1], as SD training expects."""
    out = np.empty((len(images), resolution, resolution, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        if isinstance(image, str):
            try:
                image = Image.open(image)
            except OSError as err:
                raise ValueError(f"Cannot read image file {image!r}: {err}") from err
        image = image.convert("RGB")
        if center_crop:
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.BILINEAR)
        out[i] = np.asarray(image)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
