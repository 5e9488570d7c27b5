"""Image-caption data: built-in domains, Hub datasets, local imagefolders and CSV/JSONL tables of image paths.

Also the MemControl data protocol (paper Sec. 4.1):

* :func:`split_dataset` -- train / validation / test without subject leakage (MIMIC-CXR has several studies
  per patient: with ``subject_column`` a subject lands in exactly one split);
* :func:`build_memorization_set` -- ``D_mem``, the image-caption pairs the search expects to be memorized
  (random, or the longest captions as the MemControl authors' code does; or fixed by a JSON file);
* :func:`build_hpo_set` -- the search's training set: a proxy subset of the training split plus ``D_mem``
  duplicated ``dmem_repeats`` times ("100 pairs duplicated 50 times, added to 1% of the training set").
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..files import write_text_atomic
from .columns import check_captions, check_columns
from .images import undecoded_column

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict


def load_image_caption_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    max_samples: int | None = None,
    dataset_config_name: str | None = None,
    caption_template: str | None = None,
    cache_dir: str | None = None,
) -> Dataset:
    """A `datasets.Dataset` of images and captions from a built-in domain, a Hub id, a folder or a CSV/JSONL file.

    Defaults to the built-in `digits` domain (the quickstart's sensitive data). A folder is read as an `imagefolder`
    with `metadata.jsonl`/`metadata.csv` (file_name + caption), or with one sub-folder per class; a `.csv`/`.jsonl`
    file lists image paths (absolute or relative to the file) and captions, the way MIMIC-CXR users usually hold
    their data. `dataset_config_name` and `cache_dir` mean what they mean for `datasets.load_dataset`;
    `caption_template` (e.g. "a photo of a {label}") writes the captions of a classification dataset into
    `caption_column` (see :func:`captions_from_template`).
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
        dataset = _load_local(train_data_dir, builder, data_files=train_data_dir, cache_dir=cache_dir)
        check_columns(dataset, {"image_column": image_column,
                                "caption_column": caption_column if caption_template is None else None}, train_data_dir)
        root = os.path.dirname(os.path.abspath(train_data_dir))
        paths = _resolve_image_paths(dataset[image_column], root, train_data_dir, image_column)
        dataset = dataset.remove_columns(image_column).add_column(image_column, paths)
        dataset = dataset.cast_column(image_column, ImageFeature())
    elif train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {train_data_dir!r} does not exist.")
        dataset = _load_local(train_data_dir, "imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    else:
        try:
            dataset = load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
        except ValueError as error:
            _raise_for_config(dataset_name, dataset_config_name, error)
            raise
    if caption_template is not None:
        dataset = captions_from_template(dataset, caption_template, caption_column)
    check_columns(dataset, {"image_column": image_column, "caption_column": caption_column},
                  dataset_name or train_data_dir)
    if max_samples is not None:
        dataset = dataset.shuffle(seed=0).select(range(min(max_samples, len(dataset))))
    check_captions(dataset[caption_column], caption_column, dataset_name or train_data_dir)
    return dataset


def _load_local(source: str, builder: str, **kwargs: Any) -> Dataset:
    """`load_dataset(builder, split="train", **kwargs)` for a local folder or table, refusing one with no rows."""
    from datasets import load_dataset

    if builder == "imagefolder":
        empty = _metadata_without_rows(source)
        if empty is not None:
            raise ValueError(f"--train_data_dir {source!r} is empty: its metadata file {empty!r} has no rows; expected "
                             "one row per training image (its file_name and caption).")
    try:
        dataset = load_dataset(builder, split="train", **kwargs)
    except ValueError as error:
        if "corresponds to no data" not in str(error):
            raise
        dataset = None
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"--train_data_dir {source!r} is empty: expected one row per training image (an image and "
                         "its caption).")
    return dataset


def _metadata_without_rows(folder: str) -> str | None:
    """The first imagefolder metadata file (metadata.jsonl/.csv) under `folder` that holds no row, else None."""
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name not in ("metadata.jsonl", "metadata.csv"):
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = sum(1 for line in f if line.strip())
            if lines <= (1 if name.endswith(".csv") else 0):  # a CSV's first line is its header
                return path
    return None


def _raise_for_config(dataset_name: str, config_name: str | None, error: ValueError) -> None:
    """Turn datasets' multi-line error about a missing or unknown config into one line naming the accepted configs."""
    from datasets import get_dataset_config_names

    try:
        configs = get_dataset_config_names(dataset_name)
    except (OSError, ValueError):  # the configs cannot be listed either: keep datasets' own error
        return
    if config_name is None and len(configs) > 1:
        raise ValueError(f"--dataset_name {dataset_name!r} has several configs: pass --dataset_config_name, one of "
                         f"{configs}.") from error
    if config_name is not None and config_name not in configs:
        raise ValueError(f"--dataset_config_name {config_name!r} is not a config of {dataset_name!r}; available: "
                         f"{configs}.") from error


def captions_from_template(dataset: Dataset, template: str, caption_column: str = "text") -> Dataset:
    """Write `template` filled from each row into `caption_column`: a `ClassLabel` column gives its class name.

    Any column may be named in the template ("a photo of a {label}", "{finding} in the {view} view"); this makes a
    caption-less image-classification dataset (Imagenette, an imagefolder of class folders) trainable.
    """
    import string

    from datasets import ClassLabel

    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if not fields or any(not f.isidentifier() for f in fields):
        raise ValueError(f"--caption_template {template!r}: expected column names in braces, e.g. "
                         "'a photo of a {label}'.")
    missing = [f for f in fields if f not in dataset.column_names]
    if missing:
        raise ValueError(f"--caption_template {template!r} names column(s) {missing} not in the dataset; available "
                         f"columns: {dataset.column_names}.")
    names = {f: dataset.features[f].names for f in fields if isinstance(dataset.features[f], ClassLabel)}
    columns = dataset.select_columns(fields).to_dict()  # the named columns only: no image is decoded
    captions = [template.format(**{f: names[f][columns[f][i]] if f in names else columns[f][i] for f in fields})
                for i in range(len(dataset))]
    if caption_column in dataset.column_names:
        dataset = dataset.remove_columns(caption_column)
    return dataset.add_column(caption_column, captions)


def _resolve_image_paths(values: Sequence, root: str, source: str, image_column: str) -> list[str]:
    """Absolute image paths of a CSV/JSONL table; a clear error naming the row/file when one is empty or missing.

    Only existence is checked here (cheap); whether a file really is an image is checked when it is decoded
    (PIL names the file) or up front with :func:`images.scan_images`.
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


# --------------------------------------------------------------------------------------------------
# splits without subject leakage
# --------------------------------------------------------------------------------------------------


def _check_fraction(value: float, name: str) -> float:
    """A float in [0, 1)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")
    return float(value)


def _target_rows(fraction: float, n: int) -> int:
    """Rows a split of `fraction` should get: rounded, but at least one when the fraction is positive."""
    if fraction <= 0.0 or n == 0:
        return 0
    return max(1, round(fraction * n))


def _group_take(order: list, sizes: dict, target: float) -> list:
    """Subjects taken greedily in `order` so that their row count comes closest to `target` (at least one)."""
    taken, total = [], 0
    if target <= 0:
        return taken
    for subject in order:
        size = sizes[subject]
        if not taken or abs(total + size - target) < abs(total - target):
            taken.append(subject)
            total += size
        if total >= target:
            break
    return taken


def _split_indices(
    n: int, subjects: list | None, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Row indices of each of `fractions` (carved in order) and of the remainder, sorted; grouped by subject."""
    rng = np.random.default_rng(seed)
    if subjects is None:
        order = rng.permutation(n)
        out, start = [], 0
        for fraction in fractions:
            k = min(_target_rows(fraction, n), max(0, n - start - 1))
            out.append(np.sort(order[start:start + k]))
            start += k
        out.append(np.sort(order[start:]))
        return out
    unique, inverse, counts = np.unique(np.asarray([str(s) for s in subjects]), return_inverse=True,
                                        return_counts=True)
    sizes = dict(zip(range(len(unique)), counts.tolist()))
    remaining = [int(i) for i in rng.permutation(len(unique))]
    assignment = np.full(len(unique), len(fractions), dtype=np.int64)
    for split_id, fraction in enumerate(fractions):
        if len(remaining) <= 1:
            break
        taken = _group_take(remaining, sizes, fraction * n if fraction > 0 else 0)
        taken = taken[: len(remaining) - 1]  # always leave at least one subject for the remainder (train)
        assignment[taken] = split_id
        chosen = set(taken)
        remaining = [s for s in remaining if s not in chosen]
    row_split = assignment[inverse]
    return [np.flatnonzero(row_split == k) for k in range(len(fractions) + 1)]


def _subjects_of(dataset, subject_column: str, what: str) -> list:
    """The subject ids of every row; ValueError when the column is missing or a value is empty."""
    check_columns(dataset, {"subject_column": subject_column}, what)
    values = dataset[subject_column]
    empty = [i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())
             or (isinstance(v, float) and np.isnan(v))]
    if empty:
        raise ValueError(f"{len(empty)} rows of {what} have no subject in column {subject_column!r} (first rows: "
                         f"{empty[:5]}); every row needs a subject id to split without leakage.")
    return values


def split_dataset(
    dataset: Dataset | DatasetDict | str,
    subject_column: str | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> DatasetDict:
    """Deterministic train/validation/test `DatasetDict`, grouped by subject so that no subject leaks across splits.

    ``dataset`` is a `Dataset`, a `DatasetDict`, or the name of a built-in domain (:data:`tiny_base.DOMAINS`).

    * One `Dataset` (or a `DatasetDict` holding only ``train``): ``test_fraction`` and ``validation_fraction`` of
      its rows are carved out (test first). Without ``subject_column`` rows are drawn by a seeded permutation.
      With it, subjects are shuffled (seeded, after sorting their ids, so the split does not depend on row order)
      and taken greedily until each split holds the closest possible number of rows to its fraction; every row of
      a subject goes to the same split. Every split with a positive fraction gets at least one row/subject.
    * A `DatasetDict` with ``train`` and ``test`` (the built-in domains ship a fixed, stratified 80/20 split):
      ``test`` is kept as it is and the validation split is carved from ``train`` with ``validation_fraction`` of
      the *train* rows (grouped by subject when given); ``test_fraction`` is not used.
    * A `DatasetDict` that already has ``train``, ``validation`` and ``test`` is returned unchanged.

    With ``subject_column``, given splits are checked for shared subjects (ValueError naming a few of them). Rows
    keep their original order inside each split.
    """
    from datasets import Dataset, DatasetDict

    validation_fraction = _check_fraction(validation_fraction, "validation_fraction")
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(f"validation_fraction + test_fraction must be < 1 (some rows must stay in train), got "
                         f"{validation_fraction} + {test_fraction}.")
    if isinstance(dataset, str):
        from .tiny_base import DOMAINS, load_domain

        if dataset not in DOMAINS:
            raise ValueError(f"Unknown built-in domain {dataset!r}; choose one of {sorted(DOMAINS)} or pass a Dataset.")
        dataset = DatasetDict({"train": load_domain(dataset, "train"), "test": load_domain(dataset, "test")})
    if isinstance(dataset, DatasetDict):
        unknown = sorted(set(dataset) - {"train", "validation", "test"})
        if "train" not in dataset or unknown:
            raise ValueError(f"A DatasetDict passed to split_dataset must have a 'train' split (and optionally "
                             f"'validation', 'test'); got splits {sorted(dataset)}.")
        given = dict(dataset)
    elif isinstance(dataset, Dataset):
        given = {"train": dataset}
    else:
        raise TypeError(f"dataset must be a datasets.Dataset, a DatasetDict or a built-in domain name, got "
                        f"{type(dataset).__name__}.")
    train = given["train"]
    if len(train) == 0:
        raise ValueError("The train split is empty; nothing to split.")
    if "validation" in given and "test" in given:
        out = DatasetDict(given)
    else:
        if "test" in given:  # e.g. a built-in domain: keep its test split, carve validation from train
            names, fractions = ["validation"], [validation_fraction]
        elif "validation" in given:
            names, fractions = ["test"], [test_fraction]
        else:
            names, fractions = ["test", "validation"], [test_fraction, validation_fraction]
        subjects = _subjects_of(train, subject_column, "the train split") if subject_column else None
        parts = _split_indices(len(train), subjects, fractions, seed)
        carved = {name: train.select(rows) for name, rows in zip(names, parts[:-1])}
        out = DatasetDict({
            "train": train.select(parts[-1]),
            "validation": given.get("validation", carved.get("validation")),
            "test": given.get("test", carved.get("test")),
        })
    if subject_column:
        _check_no_leakage(out, subject_column)
    return out


def _check_no_leakage(splits, subject_column: str) -> None:
    """ValueError when a subject appears in more than one split."""
    seen: dict[str, str] = {}
    for name in ("train", "validation", "test"):
        split = splits[name]
        if len(split) == 0:
            continue
        for subject in set(map(str, _subjects_of(split, subject_column, f"the {name} split"))):
            other = seen.setdefault(subject, name)
            if other != name:
                raise ValueError(f"Subject {subject!r} (column {subject_column!r}) appears in both the {other} and "
                                 f"the {name} split; the given splits leak subjects.")


# --------------------------------------------------------------------------------------------------
# D_mem and the HPO training set
# --------------------------------------------------------------------------------------------------

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def nonsense_words(count: int, seed: int = 0, avoid: Sequence[str] = ()) -> list[str]:
    """`count` distinct, seeded, pronounceable nonsense words (e.g. ``"vokezar"``), none of them in `avoid`."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}.")
    rng = np.random.default_rng([int(seed), 7919])
    avoid_set = {w.lower() for w in avoid}
    words: list[str] = []
    seen = set()
    while len(words) < count:
        syllables = rng.integers(3, 5)
        word = "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                       for _ in range(syllables)) + _CONSONANTS[rng.integers(len(_CONSONANTS))]
        if word not in seen and word not in avoid_set:
            seen.add(word)
            words.append(word)
    return words


def _load_dmem_file(path: str) -> list:
    """Entries of a D_mem JSON file: a list (or ``{"indices": [...]}`` / ``{"rows": [...]}``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dmem_file {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"dmem_file {path!r} is not valid JSON: {err}") from err
    if isinstance(data, dict):
        data = data.get("indices", data.get("rows"))
    if not isinstance(data, list) or not data:
        raise ValueError(f"dmem_file {path!r} must hold a non-empty JSON list of row indices or of objects with "
                         "'file_name' and/or 'caption' (or {'indices': [...]}).")
    return data


def _match_dmem_entries(dataset, entries: list, caption_column: str, image_column: str, path: str) -> list[int]:
    """Row indices of the D_mem entries of a file (indices, or {file_name/caption} objects)."""
    n = len(dataset)
    if all(isinstance(e, int) and not isinstance(e, bool) for e in entries):
        bad = [e for e in entries if not 0 <= e < n]
        if bad:
            raise ValueError(f"dmem_file {path!r}: row indices {bad[:5]} are outside the training split's 0..{n - 1}.")
        if len(set(entries)) != len(entries):
            raise ValueError(f"dmem_file {path!r} lists a row index more than once.")
        return list(entries)
    if not all(isinstance(e, dict) and ({"file_name", "caption", "text"} & set(e)) for e in entries):
        raise ValueError(f"dmem_file {path!r}: entries must all be ints (row indices) or all objects with "
                         "'file_name' and/or 'caption'.")
    captions = dataset[caption_column] if any({"caption", "text"} & set(e) for e in entries) else None
    names: list | None = None
    if any("file_name" in e for e in entries):
        check_columns(dataset, {"image_column": image_column}, "the training split")
        names = []
        raw = undecoded_column(dataset, image_column)[image_column]
        for value in raw:
            p = value if isinstance(value, str) else (value.get("path") if isinstance(value, dict) else None)
            names.append(p or "")
    used: set[int] = set()
    rows = []
    for k, entry in enumerate(entries):
        caption = entry.get("caption", entry.get("text"))
        file_name = entry.get("file_name")
        match = None
        for i in range(n):
            if i in used:
                continue
            if caption is not None and captions[i] != caption:
                continue
            if file_name is not None:
                name = names[i]
                if not (name == file_name or os.path.basename(name) == os.path.basename(file_name)
                        or name.endswith("/" + file_name.lstrip("/"))):
                    continue
            match = i
            break
        if match is None:
            what = {key: entry[key] for key in ("file_name",) if key in entry}
            if caption is not None:
                what["caption"] = f"<{len(caption)} characters>"
            raise ValueError(f"dmem_file {path!r}: entry {k} ({what}) matches no (unused) row of the training split.")
        used.add(match)
        rows.append(match)
    return rows


def build_memorization_set(
    dataset: Dataset | DatasetDict,
    caption_column: str = "text",
    dmem_size: int = 100,
    selection: str = "random",
    unique_captions: bool = False,
    seed: int = 0,
    dmem_file: str | None = None,
    *,
    image_column: str = "image",
    block: int = 0,
) -> Dataset:
    """D_mem: the training pairs the search duplicates and expects memorized (MemControl Sec. 4.1), as a `Dataset`.

    ``dataset`` is the training split (or a `DatasetDict`, whose ``train`` split is used). ``selection``:
    ``"random"`` (seeded, without replacement) or ``"longest"`` (the ``dmem_size`` longest captions in characters,
    ties broken by row order: the heuristic of the MemControl authors' code, where long reports are rare and
    specific). ``dmem_file`` fixes the rows instead (``dmem_size`` and ``selection`` are then ignored): a JSON
    list of row indices, or of objects with ``file_name`` (matched against the image path or its basename)
    and/or ``caption``; :func:`write_dmem_file` writes one.

    ``unique_captions=True`` appends one distinct, seeded nonsense word to each caption. It models a report that
    mentions a unique detail: on class-captioned data (every "a handwritten digit seven" looks alike to the text
    encoder) a model cannot tie one caption to one image, so per-prompt memorization cannot occur otherwise.

    ``block`` K > 0 draws the K-th set of ``dmem_size`` pairs by the same rule, disjoint from the sets before it
    (block 0 is the default D_mem): held-out pairs for stage 2, which the search never saw.

    The result keeps every column (captions possibly extended) and adds ``dmem_index``: the row in ``dataset``.
    """
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"The DatasetDict has no 'train' split (splits: {sorted(dataset)}).")
        dataset = dataset["train"]
    check_columns(dataset, {"caption_column": caption_column}, "the training split")
    n = len(dataset)
    if dmem_file is not None:
        rows = _match_dmem_entries(dataset, _load_dmem_file(dmem_file), caption_column, image_column, dmem_file)
    else:
        if not isinstance(dmem_size, int) or isinstance(dmem_size, bool) or dmem_size < 1:
            raise ValueError(f"dmem_size must be a positive int, got {dmem_size!r}.")
        if not isinstance(block, int) or block < 0:
            raise ValueError(f"block must be an int >= 0, got {block!r}.")
        if (block + 1) * dmem_size > n:
            sets = f" x {block + 1} disjoint sets (block {block})" if block else ""
            raise ValueError(f"dmem_size={dmem_size}{sets} exceeds the {n} rows of the training split; pass a smaller "
                             "--dmem_size or more data.")
        if selection == "random":
            rest = np.arange(n)
            for b in range(block + 1):  # block b: a seeded draw from the rows no earlier block took
                rng = np.random.default_rng(seed if b == 0 else [seed, b])
                picked = rest[rng.choice(len(rest), size=dmem_size, replace=False)]
                rest = np.setdiff1d(rest, picked)
            rows = sorted(picked.tolist())
        elif selection == "longest":
            lengths = np.asarray([len(c) if isinstance(c, str) else -1 for c in dataset[caption_column]])
            rows = np.argsort(-lengths, kind="stable")[block * dmem_size:(block + 1) * dmem_size].tolist()
        else:
            raise ValueError(f"selection must be 'random' or 'longest', got {selection!r}.")
    dmem = dataset.select(rows)
    empty = [r for r, c in zip(rows, dmem[caption_column]) if not isinstance(c, str) or not c.strip()]
    if empty:
        raise ValueError(f"D_mem rows {empty[:5]} have an empty caption in column {caption_column!r}; every D_mem "
                         "pair needs a caption.")
    if unique_captions:
        captions = dmem[caption_column]
        vocabulary = {w.lower() for c in dataset[caption_column] if isinstance(c, str) for w in c.split()}
        # block K's words follow the K earlier blocks' in one seeded stream: distinct from theirs, block 0's as before
        words = nonsense_words((block + 1) * len(captions), seed=seed, avoid=sorted(vocabulary))[block * len(captions):]
        feature = dataset.features[caption_column]
        dmem = dmem.remove_columns(caption_column).add_column(
            caption_column, [f"{c} {w}" for c, w in zip(captions, words)], feature=feature)
        dmem = dmem.select_columns(dataset.column_names)
    from datasets import Value

    return dmem.add_column("dmem_index", [int(r) for r in rows], feature=Value("int64"))


def with_dmem_captions(train: Dataset, dmem: Dataset, caption_column: str = "text") -> Dataset:
    """`train` with each D_mem row's caption replaced by D_mem's (extended) caption.

    With ``unique_captions`` the D_mem pairs carry new words; the final fine-tune must see the same pairs that the
    search and the evaluation use, or the memorization measured on D_mem would be of captions never trained on.
    """
    check_columns(dmem, ["dmem_index", caption_column], "the D_mem set")
    check_columns(train, {"caption_column": caption_column}, "the training split")
    captions = list(train[caption_column])
    for index, caption in zip(dmem["dmem_index"], dmem[caption_column]):
        if not 0 <= index < len(captions):
            raise ValueError(f"D_mem row {index} is outside the {len(captions)} rows of the training split: D_mem "
                             "must come from build_memorization_set on this split.")
        captions[index] = caption
    feature = train.features[caption_column]
    return train.remove_columns(caption_column).add_column(caption_column, captions, feature=feature).select_columns(
        train.column_names)


MAX_DUPLICATED_SHARE = 0.25
"""Most of the stage-2 training rows that D_mem's duplicates should be (:func:`with_duplicated_dmem` warns above)."""


def with_duplicated_dmem(train: Dataset, dmem: Dataset, dmem_repeats: int, seed: int = 0) -> Dataset:
    """`train` with each D_mem pair appearing `dmem_repeats` times in all (its own row + copies), shuffled.

    The stage-2 emulation of near-duplicates (MIMIC-CXR holds many): without duplicated pairs a fine-tune on a
    split of distinct images never memorizes, so nothing separates the methods. For measurement only, never for a
    model meant for use. ``dmem`` must come from :func:`build_memorization_set` on `train`.
    """
    from datasets import concatenate_datasets

    _check_repeats(dmem_repeats)
    check_columns(dmem, ["dmem_index"], "the D_mem set (build it with build_memorization_set)")
    if dmem_repeats == 1:
        return train
    share = len(dmem) * dmem_repeats / (len(train) + len(dmem) * (dmem_repeats - 1))
    if share > MAX_DUPLICATED_SHARE:
        logger.warning("The %d D_mem pairs x %d copies are %.0f%% of the training rows: duplicates dominate the "
                       "fine-tune, which then learns the domain poorly (the paper's stage 2 trains on a split where "
                       "they are a minority). Keep them at most %.0f%%: lower --dmem_repeats or --dmem_size, or raise "
                       "--max_train_samples.", len(dmem), dmem_repeats, 100 * share, 100 * MAX_DUPLICATED_SHARE)
    copies = train.select(np.tile(np.asarray(dmem["dmem_index"], dtype=np.int64), dmem_repeats - 1))
    return concatenate_datasets([train, copies]).shuffle(seed=seed)


def _check_repeats(dmem_repeats: int) -> None:
    if not isinstance(dmem_repeats, int) or isinstance(dmem_repeats, bool) or dmem_repeats < 1:
        raise ValueError(f"dmem_repeats must be a positive int, got {dmem_repeats!r}.")


def without_rows(train: Dataset, rows: Sequence[int], dmem: Dataset | None = None) -> tuple[Dataset, Dataset | None]:
    """(`train` without `rows`, `dmem` with its ``dmem_index`` moved to the same pairs' rows in the smaller split).

    ``dmem`` must come from :func:`build_memorization_set` on `train`, and none of its rows may be dropped."""
    from datasets import Value

    dropped = {int(r) for r in rows}
    keep = [i for i in range(len(train)) if i not in dropped]
    if dmem is not None:
        lost = sorted(dropped & {int(i) for i in dmem["dmem_index"]})
        if lost:
            raise ValueError(f"D_mem rows {lost[:5]} cannot be dropped: D_mem pairs are never left out.")
        new_row = {old: new for new, old in enumerate(keep)}
        dmem = dmem.remove_columns("dmem_index").add_column(
            "dmem_index", [new_row[int(i)] for i in dmem["dmem_index"]], feature=Value("int64"))
    return train.select(keep), dmem


def write_dmem_file(dmem: Dataset, path: str) -> str:
    """Write the row indices of a D_mem set (its ``dmem_index`` column) as the JSON list `dmem_file` accepts."""
    check_columns(dmem, ["dmem_index"], "the D_mem set")
    return write_text_atomic(path, json.dumps([int(i) for i in dmem["dmem_index"]]))


def build_hpo_set(
    train: Dataset, dmem: Dataset, dmem_repeats: int = 50, proxy_fraction: float = 0.01, seed: int = 0
) -> Dataset:
    """The search's training set: a seeded proxy subset of `train` (D_mem rows excluded) + D_mem x `dmem_repeats`.

    As in the paper: "D_mem = 100 pairs duplicated 50 times, added to 1% of the training set". The proxy has
    ``round(proxy_fraction * len(train))`` rows drawn without replacement from the rows that are not in D_mem
    (capped by their number). ``dmem`` must come from :func:`build_memorization_set` on the same `train` (its
    ``dmem_index`` column); its (possibly extended) captions are kept. The result has ``dmem_index`` = -1 on proxy
    rows and is shuffled with `seed`; its length is ``n_proxy + len(dmem) * dmem_repeats``.
    """
    from datasets import concatenate_datasets

    _check_repeats(dmem_repeats)
    if not isinstance(proxy_fraction, (int, float)) or not 0.0 <= float(proxy_fraction) <= 1.0:
        raise ValueError(f"proxy_fraction must be a number in [0, 1], got {proxy_fraction!r}.")
    check_columns(dmem, ["dmem_index"], "the D_mem set (build it with build_memorization_set)")
    extra = sorted(set(train.column_names) ^ (set(dmem.column_names) - {"dmem_index"}))
    if extra:
        raise ValueError(f"train and dmem have different columns ({extra}); dmem must come from "
                         "build_memorization_set(train, ...).")
    dmem_rows = {int(i) for i in dmem["dmem_index"]}
    if dmem_rows and max(dmem_rows) >= len(train):
        raise ValueError(f"dmem refers to row {max(dmem_rows)} but train has {len(train)} rows; build D_mem from "
                         "this training split.")
    candidates = np.asarray([i for i in range(len(train)) if i not in dmem_rows], dtype=np.int64)
    n_proxy = min(round(float(proxy_fraction) * len(train)), len(candidates))
    rng = np.random.default_rng(seed)
    proxy_rows = np.sort(rng.choice(candidates, size=n_proxy, replace=False)) if n_proxy else np.zeros(0, np.int64)
    proxy = train.select(proxy_rows)
    proxy = proxy.add_column("dmem_index", [-1] * len(proxy), feature=dmem.features["dmem_index"])
    proxy = proxy.select_columns(dmem.column_names).cast(dmem.features)
    repeated = dmem.select(np.tile(np.arange(len(dmem)), dmem_repeats))
    return concatenate_datasets([proxy, repeated]).shuffle(seed=seed)
