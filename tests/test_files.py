import json
import math
import os

import numpy as np
import pytest
import torch

from diffusers_memcontrol.files import atomic_open, atomic_path, write_json_atomic, write_text_atomic


def test_write_json_atomic_is_strict_and_plain(tmp_path):
    path = tmp_path / "sub" / "m.json"
    write_json_atomic(path, {"a": np.float32(1.5), "b": torch.tensor([1, 2]), "c": math.nan, "d": np.int64(3)})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [1, 2], "c": None, "d": 3}
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_crash_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "t.txt"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("partial")
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["t.txt"]  # no temporary file left behind


def test_atomic_path_for_writers_by_name(tmp_path):
    path = tmp_path / "x.bin"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()


def test_atomic_open_passes_newline_for_csv(tmp_path):
    import csv

    path = tmp_path / "rows.csv"
    with atomic_open(path, newline="") as f:
        csv.writer(f).writerows([["a", "b"], [1, 2]])
    assert path.read_bytes() == b"a,b\r\n1,2\r\n"
