"""Splits without subject leakage, D_mem construction, the HPO training set and bad data inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from PIL import Image

from diffusers_memcontrol.data.datasets import (
    build_hpo_set,
    build_memorization_set,
    captions_from_template,
    load_image_caption_dataset,
    nonsense_words,
    split_dataset,
    with_dmem_captions,
    with_duplicated_dmem,
    write_dmem_file,
)
from diffusers_memcontrol.data.images import scan_images


def make_table(n: int = 1000, seed: int = 0) -> Dataset:
    """Rows of subjects with 1-6 studies each, captions of varying length."""
    rng = np.random.default_rng(seed)
    subjects, captions = [], []
    subject = 0
    while len(subjects) < n:
        for _ in range(int(rng.integers(1, 7))):
            subjects.append(f"p{subject:05d}")
        subject += 1
    subjects = subjects[:n]
    rng.shuffle(subjects)  # a subject's studies are scattered over the table
    for i in range(n):
        captions.append("finding " + "x" * int(rng.integers(0, 50)) + f" {i}")
    return Dataset.from_dict({"text": captions, "subject_id": subjects, "image": [None] * n})


# ---------------------------------------------------------------------------- splits


def test_subject_split_has_no_leakage_and_right_fractions():
    table = make_table()
    splits = split_dataset(table, subject_column="subject_id", validation_fraction=0.1, test_fraction=0.2, seed=3)
    assert set(splits) == {"train", "validation", "test"}
    assert sum(len(s) for s in splits.values()) == len(table)
    subjects = {name: set(split["subject_id"]) for name, split in splits.items()}
    assert not subjects["train"] & subjects["validation"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["validation"] & subjects["test"]
    # fractions of rows, up to one subject's size (<= 6 rows)
    assert abs(len(splits["test"]) - 200) <= 6
    assert abs(len(splits["validation"]) - 100) <= 6
    # deterministic; another seed gives another split
    again = split_dataset(table, subject_column="subject_id", validation_fraction=0.1, test_fraction=0.2, seed=3)
    assert again["test"]["text"] == splits["test"]["text"]
    other = split_dataset(table, subject_column="subject_id", validation_fraction=0.1, test_fraction=0.2, seed=4)
    assert other["test"]["text"] != splits["test"]["text"]
    # rows keep their original order
    order = {t: i for i, t in enumerate(table["text"])}
    positions = [order[t] for t in splits["train"]["text"]]
    assert positions == sorted(positions)


def test_subject_split_does_not_depend_on_row_order():
    table = make_table(300)
    shuffled = table.shuffle(seed=1).flatten_indices()
    a = split_dataset(table, subject_column="subject_id", seed=0)
    b = split_dataset(shuffled, subject_column="subject_id", seed=0)
    assert set(a["test"]["subject_id"]) == set(b["test"]["subject_id"])


def test_row_split_fractions_and_disjointness():
    table = make_table(200)
    splits = split_dataset(table, validation_fraction=0.15, test_fraction=0.05, seed=0)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (160, 30, 10)
    texts = [set(s["text"]) for s in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


def test_existing_test_split_is_kept_and_validation_carved_from_train():
    table = make_table(300)
    given = DatasetDict({"train": table.select(range(250)), "test": table.select(range(250, 300))})
    splits = split_dataset(given, subject_column=None, validation_fraction=0.2)
    assert splits["test"]["text"] == given["test"]["text"]
    assert len(splits["validation"]) == 50 and len(splits["train"]) == 200
    full = DatasetDict({"train": splits["train"], "validation": splits["validation"], "test": splits["test"]})
    assert split_dataset(full)["validation"]["text"] == splits["validation"]["text"]


def test_builtin_domain_split():
    splits = split_dataset("digits", validation_fraction=0.1)
    assert len(splits["test"]) == 360
    assert len(splits["validation"]) == round(0.1 * 1437) and len(splits["train"]) == 1437 - 144


def test_given_splits_that_leak_subjects_are_refused():
    table = make_table(100)
    leaky = DatasetDict({"train": table.select(range(80)), "test": table.select(range(60, 100))})
    with pytest.raises(ValueError, match="appears in both"):
        split_dataset(leaky, subject_column="subject_id")


def test_split_bad_inputs():
    table = make_table(50)
    with pytest.raises(ValueError, match=r"available columns: \['text', 'subject_id', 'image'\]"):
        split_dataset(table, subject_column="patient")
    with pytest.raises(ValueError, match="validation_fraction must be a number in"):
        split_dataset(table, validation_fraction=1.5)
    with pytest.raises(ValueError, match="must be < 1"):
        split_dataset(table, validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="Unknown built-in domain"):
        split_dataset("mnist-xyz")
    with pytest.raises(TypeError, match="datasets.Dataset"):
        split_dataset([1, 2, 3])
    missing = Dataset.from_dict({"text": ["a", "b"], "subject_id": ["s", None], "image": [None, None]})
    with pytest.raises(ValueError, match="have no subject"):
        split_dataset(missing, subject_column="subject_id")


# ---------------------------------------------------------------------------- D_mem


def test_longest_selection_picks_the_longest_captions():
    table = make_table(300)
    dmem = build_memorization_set(table, dmem_size=20, selection="longest")
    lengths = sorted((len(c) for c in table["text"]), reverse=True)
    assert sorted((len(c) for c in dmem["text"]), reverse=True) == lengths[:20]
    assert min(len(c) for c in dmem["text"]) >= lengths[20]
    assert [table[i]["text"] for i in dmem["dmem_index"]] == dmem["text"]


def test_random_selection_is_seeded_and_without_replacement():
    table = make_table(300)
    a = build_memorization_set(table, dmem_size=30, seed=5)
    b = build_memorization_set(table, dmem_size=30, seed=5)
    c = build_memorization_set(table, dmem_size=30, seed=6)
    assert a["dmem_index"] == b["dmem_index"] != c["dmem_index"]
    assert len(set(a["dmem_index"])) == 30


def test_held_out_blocks_are_disjoint_and_block_0_is_the_default_draw():
    import numpy as np

    table = make_table(300)
    first = build_memorization_set(table, dmem_size=30, seed=5)
    # block 0 is the draw every earlier run made
    assert first["dmem_index"] == sorted(np.random.default_rng(5).choice(300, size=30, replace=False).tolist())
    assert build_memorization_set(table, dmem_size=30, seed=5, block=0)["dmem_index"] == first["dmem_index"]
    blocks = [build_memorization_set(table, dmem_size=30, seed=5, block=b)["dmem_index"] for b in range(3)]
    assert all(len(set(b)) == 30 for b in blocks)
    assert not set(blocks[0]) & set(blocks[1]) and not set(blocks[2]) & (set(blocks[0]) | set(blocks[1]))
    longest = [build_memorization_set(table, dmem_size=20, selection="longest", block=b) for b in (0, 1)]
    assert min(len(c) for c in longest[0]["text"]) >= max(len(c) for c in longest[1]["text"])
    assert not set(longest[0]["dmem_index"]) & set(longest[1]["dmem_index"])
    with pytest.raises(ValueError, match=r"dmem_size=200 x 2 disjoint sets \(block 1\) exceeds the 300 rows"):
        build_memorization_set(table, dmem_size=200, block=1)


def test_held_out_blocks_get_their_own_unique_words():
    captions = ["a handwritten digit seven"] * 40 + ["a handwritten digit one"] * 40
    table = Dataset.from_dict({"text": captions, "image": [None] * 80})
    words = [{c.split()[-1] for c in build_memorization_set(table, dmem_size=10, unique_captions=True, seed=1,
                                                           block=b)["text"]} for b in (0, 1)]
    assert len(words[0]) == len(words[1]) == 10 and not words[0] & words[1]


def test_unique_captions_are_unique_and_extend_the_originals():
    captions = ["a handwritten digit seven"] * 40 + ["a handwritten digit one"] * 40
    table = Dataset.from_dict({"text": captions, "image": [None] * 80})
    dmem = build_memorization_set(table, dmem_size=25, unique_captions=True, seed=1)
    assert len(set(dmem["text"])) == 25
    for caption, index in zip(dmem["text"], dmem["dmem_index"]):
        original = captions[index]
        assert caption.startswith(original + " ") and len(caption.split()) == len(original.split()) + 1
    again = build_memorization_set(table, dmem_size=25, unique_captions=True, seed=1)
    assert again["text"] == dmem["text"]
    words = nonsense_words(500, seed=0, avoid=["digit"])
    assert len(set(words)) == 500 and "digit" not in words
    final = with_dmem_captions(table, dmem)  # stage 2 trains on the captions the search used
    assert final.column_names == table.column_names and len(final) == 80
    changed = [i for i in range(80) if final["text"][i] != captions[i]]
    assert changed == sorted(dmem["dmem_index"])
    assert [final["text"][i] for i in dmem["dmem_index"]] == dmem["text"]
    with pytest.raises(ValueError, match="outside the 10 rows"):
        with_dmem_captions(table.select(range(10)), dmem)


def test_dmem_file_fixes_the_rows(tmp_path):
    table = make_table(100)
    path = str(tmp_path / "dmem.json")
    first = build_memorization_set(table, dmem_size=7, seed=2)
    write_dmem_file(first, path)
    fixed = build_memorization_set(table, dmem_size=100, dmem_file=path)  # dmem_size ignored
    assert fixed["dmem_index"] == first["dmem_index"]
    by_caption = tmp_path / "captions.json"
    by_caption.write_text(json.dumps([{"caption": table[9]["text"]}, {"caption": table[3]["text"]}]))
    assert build_memorization_set(table, dmem_file=str(by_caption))["dmem_index"] == [9, 3]


def test_dmem_file_matches_file_names(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "data.csv").write_text("image,text\na.png,one\nb.png,two\nc.png,three\n")
    dataset = load_image_caption_dataset(train_data_dir=str(tmp_path / "data.csv"))
    spec = tmp_path / "dmem.json"
    spec.write_text(json.dumps([{"file_name": "c.png"}, {"file_name": "a.png", "caption": "one"}]))
    assert build_memorization_set(dataset, dmem_file=str(spec))["dmem_index"] == [2, 0]
    spec.write_text(json.dumps([{"file_name": "zzz.png"}]))
    with pytest.raises(ValueError, match="entry 0 .*zzz.png.* matches no"):
        build_memorization_set(dataset, dmem_file=str(spec))


def test_dmem_bad_inputs(tmp_path):
    table = make_table(30)
    with pytest.raises(ValueError, match="dmem_size=31 exceeds the 30 rows"):
        build_memorization_set(table, dmem_size=31)
    with pytest.raises(ValueError, match="selection must be 'random' or 'longest'"):
        build_memorization_set(table, dmem_size=3, selection="shortest")
    with pytest.raises(ValueError, match=r"\['caption'\] not found.*available columns"):
        build_memorization_set(table, caption_column="caption", dmem_size=3)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2, 99]")
    with pytest.raises(ValueError, match=r"row indices \[99\] are outside"):
        build_memorization_set(table, dmem_file=str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_memorization_set(table, dmem_file=str(tmp_path / "missing.json"))


# ---------------------------------------------------------------------------- HPO set


def test_hpo_set_size_and_composition():
    table = make_table(1000)
    dmem = build_memorization_set(table, dmem_size=10, unique_captions=True, seed=0)
    hpo = build_hpo_set(table, dmem, dmem_repeats=50, proxy_fraction=0.05, seed=0)
    assert len(hpo) == 50 + 10 * 50
    indices = np.asarray(hpo["dmem_index"])
    assert (indices == -1).sum() == 50
    counts = np.bincount(indices[indices >= 0])
    assert sorted(set(counts[counts > 0])) == [50] and set(np.flatnonzero(counts)) == set(dmem["dmem_index"])
    proxy_texts = set(np.asarray(hpo["text"], dtype=object)[indices == -1])
    dmem_originals = {table[i]["text"] for i in dmem["dmem_index"]}
    assert not proxy_texts & dmem_originals  # D_mem rows are not in the proxy subset
    assert set(np.asarray(hpo["text"], dtype=object)[indices >= 0]) == set(dmem["text"])
    assert build_hpo_set(table, dmem, dmem_repeats=2, proxy_fraction=0.0).num_rows == 20


def test_hpo_set_bad_inputs():
    table = make_table(50)
    dmem = build_memorization_set(table, dmem_size=5)
    with pytest.raises(ValueError, match="dmem_repeats must be a positive int"):
        build_hpo_set(table, dmem, dmem_repeats=0)
    with pytest.raises(ValueError, match="proxy_fraction must be a number in"):
        build_hpo_set(table, dmem, proxy_fraction=2.0)
    with pytest.raises(ValueError, match="dmem_index"):
        build_hpo_set(table, table.select(range(5)))


def test_stage_two_split_with_duplicated_dmem():
    table = make_table(100)
    dmem = build_memorization_set(table, dmem_size=5, unique_captions=True, seed=0)
    train = with_dmem_captions(table, dmem)
    duplicated = with_duplicated_dmem(train, dmem, dmem_repeats=4, seed=0)
    assert len(duplicated) == 100 + 5 * 3 and duplicated.column_names == table.column_names
    counts = {}
    for text in duplicated["text"]:
        counts[text] = counts.get(text, 0) + 1
    assert {text: counts[text] for text in dmem["text"]} == {text: 4 for text in dmem["text"]}  # own row + 3 copies
    assert sum(counts.values()) - 4 * 5 == 95  # every other row once
    assert with_duplicated_dmem(train, dmem, dmem_repeats=1) is train
    with pytest.raises(ValueError, match="dmem_repeats must be a positive int"):
        with_duplicated_dmem(train, dmem, dmem_repeats=0)


def test_duplicated_dmem_warns_when_duplicates_exceed_a_quarter_of_the_rows(caplog):
    table = make_table(100)
    dmem = build_memorization_set(table, dmem_size=5, seed=0)
    with caplog.at_level("WARNING", logger="diffusers_memcontrol.data.datasets"):
        with_duplicated_dmem(table, dmem, dmem_repeats=6)  # 30 of 125 rows: 24%
    assert not caplog.records
    with caplog.at_level("WARNING", logger="diffusers_memcontrol.data.datasets"):
        with_duplicated_dmem(table, dmem, dmem_repeats=7)  # 35 of 130 rows: 27%
    assert "27% of the training rows" in caplog.text


# ---------------------------------------------------------------------------- CSV / JSONL loading


@pytest.fixture
def image_table(tmp_path):
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "ok.png")
    (tmp_path / "notes.png").write_text("this is a radiology report, not an image")
    os.makedirs(tmp_path / "imgs")
    Image.new("L", (8, 8)).save(tmp_path / "imgs" / "gray.png")
    return tmp_path


def test_csv_and_jsonl_load_relative_paths(image_table):
    (image_table / "data.csv").write_text("path,report\nok.png,clear lungs\nimgs/gray.png,small effusion\n")
    dataset = load_image_caption_dataset(train_data_dir=str(image_table / "data.csv"), image_column="path",
                                         caption_column="report")
    assert dataset[1]["path"].size == (8, 8) and dataset[0]["report"] == "clear lungs"
    assert len(scan_images(dataset, "path", decode=True, progress=False)) == 2
    rows = [{"file_name": str(image_table / "ok.png"), "text": "absolute path"}]
    (image_table / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = load_image_caption_dataset(train_data_dir=str(image_table / "data.jsonl"), image_column="file_name")
    assert dataset[0]["file_name"].size == (8, 8)


def test_missing_column_lists_available_ones(image_table):
    (image_table / "data.csv").write_text("path,report\nok.png,clear lungs\n")
    with pytest.raises(ValueError, match=r"\['image', 'text'\] not found.*available columns: \['path', 'report'\]\. "
                                         r"Pass --image_column / --caption_column"):
        load_image_caption_dataset(train_data_dir=str(image_table / "data.csv"))


def test_missing_and_unreadable_files_are_named(image_table):
    (image_table / "missing.csv").write_text("image,text\nok.png,a\nnope.png,b\n")
    with pytest.raises(FileNotFoundError, match=r"row 1: .*nope\.png"):
        load_image_caption_dataset(train_data_dir=str(image_table / "missing.csv"))
    (image_table / "bad.csv").write_text("image,text\nok.png,a\nnotes.png,b\n")
    dataset = load_image_caption_dataset(train_data_dir=str(image_table / "bad.csv"))
    with pytest.raises(ValueError, match=r"Cannot read image .*notes\.png.* \(row 1\)"):
        scan_images(dataset, "image", progress=False)
    with pytest.raises(Exception, match=r"notes\.png"):  # decoding names the file too
        dataset[1]["image"]
    (image_table / "empty.csv").write_text("image,text\nok.png,a\n,b\n")
    with pytest.raises(ValueError, match="row 1: column 'image' is empty"):
        load_image_caption_dataset(train_data_dir=str(image_table / "empty.csv"))


# ---------------------------------------------------------------------------- classification data: configs, templates


def test_imagenette_structured_repo_loads_by_config_with_template_captions(imagenette_like_dir, tmp_path):
    from tests.conftest import IMAGENETTE_LIKE_CLASSES, IMAGENETTE_LIKE_CONFIGS

    for config, side in IMAGENETTE_LIKE_CONFIGS.items():
        dataset = load_image_caption_dataset(dataset_name=imagenette_like_dir, dataset_config_name=config,
                                             caption_template="a photo of a {label}", cache_dir=str(tmp_path))
        assert len(dataset) == 12
        assert dataset["text"] == [f"a photo of a {IMAGENETTE_LIKE_CLASSES[i % 3]}" for i in range(12)]
        assert {image.size for image in dataset["image"]} == {(side, side)}  # this config's images
        assert [int(np.asarray(image)[0, 0, 0]) for image in dataset["image"]] == [10 * i for i in range(12)]
    validation = load_image_caption_dataset(dataset_name=imagenette_like_dir, dataset_config_name="160px",
                                            split="validation", caption_template="{label}", cache_dir=str(tmp_path))
    assert validation["text"] == [IMAGENETTE_LIKE_CLASSES[i % 3] for i in range(6)]
    assert any(os.scandir(tmp_path))  # datasets' download/preparation cache went where cache_dir said


def test_template_fills_any_column_and_keeps_other_columns():
    from datasets import ClassLabel, Features, Value

    features = Features({"label": ClassLabel(names=["cat", "dog"]), "view": Value("string"), "text": Value("string")})
    table = Dataset.from_dict({"label": [1, 0], "view": ["side", "front"], "text": ["old", "old"]}, features=features)
    captioned = captions_from_template(table, "a {view} view of a {label}", "text")
    assert captioned["text"] == ["a side view of a dog", "a front view of a cat"]
    assert captioned["label"] == [1, 0]  # the class ids stay usable (e.g. for splits)


def test_imagefolder_of_class_folders_gets_captions_from_folder_names(tmp_path):
    for klass, shade in (("cassette_player", 40), ("golf_ball", 200)):
        (tmp_path / klass).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (shade, shade, shade)).save(tmp_path / klass / f"{i}.png")
    dataset = load_image_caption_dataset(train_data_dir=str(tmp_path), caption_template="a photo of a {label}",
                                         cache_dir=str(tmp_path / ".cache"))
    assert len(dataset) == 6
    for row in dataset:
        klass = "golf_ball" if np.asarray(row["image"])[0, 0, 0] == 200 else "cassette_player"
        assert row["text"] == f"a photo of a {klass}"


def test_unknown_config_and_absent_template_column_name_what_is_accepted(imagenette_like_dir, tmp_path):
    with pytest.raises(ValueError, match=r"config_name '999px' is not a config .*available: \['160px', '320px'\]"):
        load_image_caption_dataset(dataset_name=imagenette_like_dir, dataset_config_name="999px",
                                   caption_template="a photo of a {label}", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"dataset_config_name.*\['160px', '320px'\]"):
        load_image_caption_dataset(dataset_name=imagenette_like_dir, caption_template="{label}",
                                   cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"\{breed\}.*\['breed'\].*available columns: \['image', 'label'\]"):
        load_image_caption_dataset(dataset_name=imagenette_like_dir, dataset_config_name="160px",
                                   caption_template="a photo of a {breed}", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"'a photo'.*expected column names in braces"):
        load_image_caption_dataset(dataset_name=imagenette_like_dir, dataset_config_name="160px",
                                   caption_template="a photo", cache_dir=str(tmp_path))
