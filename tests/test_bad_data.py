"""A user's own data breaks nothing: every image is decoded before training, and a full disk is one error line.

Real files throughout: truncated PNGs, a metadata file with no rows, an 8 MB tmpfs as the output folder of a full
fine-tune (mounted here; skipped with the reason where mounting is not permitted).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from datasets import Dataset, Features, Image
from diffusers_memcontrol.data.images import check_images
from PIL import Image as PILImage

from diffusers_memcontrol.cache import FileHashMemo
from diffusers_memcontrol.errors import InputError, run_command
from diffusers_memcontrol.files import DiskFullError, atomic_open, reporting_full_disk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def _png(color, mode: str = "RGB", size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    PILImage.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _truncate(path) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def _image_folder(folder, n: int = 16, bad: tuple[int, ...] = (5,)) -> str:
    """An imagefolder of `n` distinct 32x32 PNGs with metadata.jsonl; the images `bad` truncated halfway."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        with open(os.path.join(folder, f"img{i}.png"), "wb") as f:
            f.write(_png((i * 15, 255 - i * 15, 60)))
        rows.append({"file_name": f"img{i}.png", "text": f"private caption number {i}"})
    for i in bad:
        _truncate(os.path.join(folder, f"img{i}.png"))
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def _run(args: list[str], cwd, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEMCONTROL_CACHE_DIR": str(cache),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "diffusers_memcontrol.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    # split on "\n" only: a line glued behind a progress bar's carriage return does not count as its own line
    return [line for line in result.stderr.split("\n") if line.startswith("error:")]


def _model(folder, unet_channels=None, corrupt_weights: bool = False) -> str:
    """A tiny SD pipeline saved like a Hub model (random weights): the tiny base's configs, optionally a narrower
    UNet; with `corrupt_weights`, every weights file is garbage, so loading any of them fails."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffusers_memcontrol.data import tiny_base as tb

    unet = tb.build_unet()
    if unet_channels is not None:
        unet = UNet2DConditionModel.from_config({**unet.config, "block_out_channels": unet_channels})
    pipe = StableDiffusionPipeline(vae=tb.build_vae(), text_encoder=tb.build_text_encoder(),
                                   tokenizer=tb.build_tokenizer(), unet=unet, scheduler=tb.build_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    if corrupt_weights:
        for root, _, names in os.walk(folder):
            for name in names:
                if name.endswith(".safetensors"):
                    with open(os.path.join(root, name), "wb") as f:
                        f.write(b"not weights")
    return str(folder)


# the pre-flight check


def test_check_images_decodes_in_parallel_and_a_rerun_decodes_nothing_twice(tmp_path):
    folder = _image_folder(tmp_path / "images", n=12, bad=(3, 7))
    paths = [os.path.join(folder, f"img{i}.png") for i in range(12)] + [os.path.join(folder, "img1.png")]
    dataset = Dataset.from_dict({"image": paths}, features=Features({"image": Image()}))
    memo = FileHashMemo(str(tmp_path / "cache" / "file_hashes.sqlite"))
    first = check_images(dataset, "image", memo=memo, workers=2, progress=False)
    assert [b.row for b in first.bad] == [3, 7]
    assert "img3.png" in first.bad[0].reason and "truncated" in first.bad[0].reason
    assert first.decoded == 12 and first.cached == 1  # row 12 repeats row 1's file: decoded once
    rerun = check_images(dataset, "image", memo=memo, workers=1, progress=False)
    assert [b.row for b in rerun.bad] == [3, 7]
    assert rerun.decoded == 2 and rerun.cached == 11  # only the bad files are read again
    memo.close()
    # another process of a search, through the same cache folder: nothing decoded but the bad files
    other = FileHashMemo(str(tmp_path / "cache" / "file_hashes.sqlite"))
    assert check_images(dataset, "image", memo=other, progress=False).decoded == 2
    other.close()


def test_images_in_memory_are_checked_by_content(tmp_path):
    good, bad = _png((1, 2, 3)), _png((4, 5, 6))[:40]
    dataset = Dataset.from_dict({"image": [{"bytes": good, "path": None}, {"bytes": bad, "path": "x.png"},
                                           {"bytes": good, "path": None}]}, features=Features({"image": Image()}))
    result = check_images(dataset, "image", progress=False)
    assert [b.row for b in result.bad] == [1] and "'x.png' (row 1)" in result.bad[0].reason
    assert result.decoded == 2 and result.cached == 1


@pytest.mark.parametrize("mode, color, fmt", [("RGBA", (10, 20, 30, 128), "PNG"), ("I;16", 40000, "PNG"),
                                               ("CMYK", (10, 20, 30, 40), "JPEG"), ("L", 200, "PNG"),
                                               ("P", 3, "PNG"), ("1", 1, "PNG")])
def test_modes_that_train_today_pass_the_check(tmp_path, mode, color, fmt):
    path = str(tmp_path / f"image.{fmt.lower()}")
    PILImage.new(mode, (32, 32), color).save(path, format=fmt)
    assert PILImage.open(path).mode == mode
    dataset = Dataset.from_dict({"image": [path]}, features=Features({"image": Image()}))
    result = check_images(dataset, "image", progress=False)
    assert result.bad == [] and result.decoded == 1


def test_modes_that_train_today_still_train(tmp_path):
    from diffusers_memcontrol import train

    folder = tmp_path / "modes"
    os.makedirs(folder)
    rows = []
    for i, (mode, color, ext) in enumerate([("RGBA", (10, 20, 30, 128), "png"), ("I;16", 40000, "png"),
                                            ("CMYK", (10, 20, 30, 40), "jpg"), ("L", 200, "png")] * 3):
        PILImage.new(mode, (32, 32), color if mode != "L" else color - i).save(folder / f"img{i}.{ext}")
        rows.append({"file_name": f"img{i}.{ext}", "text": f"caption {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = train.main(["--pretrained_model_name_or_path", _model(tmp_path / "model"), "--train_data_dir",
                          str(folder), "--output_dir", str(tmp_path / "out"), "--latent_cache_dir",
                          str(tmp_path / "cache"), "--max_train_steps", "2", "--train_batch_size", "4",
                          "--report_to", "none", "--no_progress", "--num_validation_images", "0"])
    assert summary["global_step"] == 2 and summary["train_samples"] >= 8
    assert os.path.isfile(tmp_path / "out" / "adapter_model.safetensors")


def test_a_truncated_png_a_12_step_run_draws_ends_it_before_any_weight_loads(tmp_path):
    data = _image_folder(tmp_path / "data", n=16, bad=(5,))
    # the weights are garbage: had the run loaded any, it would have failed on them, not on the image
    model = _model(tmp_path / "model", corrupt_weights=True)
    out = tmp_path / "out"
    # 12 steps of batch 2 on the 12 training rows: every row is drawn, img5's row included; progress bars on
    result = _run(["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", str(out),
                   "--max_train_steps", "12", "--train_batch_size", "2", "--report_to", "none",
                   "--num_validation_images", "0", "--dataloader_num_workers", "2"], tmp_path, tmp_path / "cache")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = _error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    assert "img5.png" in lines[0] and "of the train split" in lines[0] and "truncated" in lines[0], lines[0]
    assert "--skip_bad_images" in lines[0]
    assert "check train images" in result.stderr  # the bar was on screen, and the error still starts a line
    assert not os.path.exists(out / "training_config.json") and not os.path.exists(out / "adapter_model.safetensors")


def test_skip_bad_images_drops_and_lists_the_rows_and_keeps_dmem(tmp_path):
    from diffusers_memcontrol import train

    data = _image_folder(tmp_path / "data", n=16, bad=(5, 9))
    model = _model(tmp_path / "model")
    out = tmp_path / "out"
    common = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--latent_cache_dir",
              str(tmp_path / "cache"), "--max_train_steps", "2", "--train_batch_size", "4", "--report_to", "none",
              "--no_progress", "--num_validation_images", "0", "--validation_fraction", "0", "--test_fraction", "0"]
    with pytest.raises(InputError, match=r"img5\.png' \(row 5 of the train split\).*1 more image"):
        train.main([*common, "--output_dir", str(out)])
    # a bad image chosen for D_mem: refused, even with --skip_bad_images
    dmem_file = tmp_path / "dmem.json"
    dmem_file.write_text(json.dumps([{"file_name": "img9.png"}, {"file_name": "img2.png"}]))
    with pytest.raises(InputError, match=r"img9\.png.*D_mem pairs are never dropped"):
        train.main([*common, "--output_dir", str(out), "--skip_bad_images", "--duplicate_dmem", "--dmem_repeats",
                    "3", "--dmem_file", str(dmem_file)])
    # D_mem without bad images: the bad rows are dropped, listed, and D_mem is the same pair, still duplicated
    dmem_file.write_text(json.dumps([{"file_name": "img2.png"}]))
    summary = train.main([*common, "--output_dir", str(out), "--skip_bad_images", "--duplicate_dmem",
                          "--dmem_repeats", "3", "--dmem_file", str(dmem_file)])
    skipped = json.loads((out / "skipped_images.json").read_text())
    assert [(s["split"], s["row"], os.path.basename(s["image"].split("'")[1])) for s in skipped] == [
        ("train", 5, "img5.png"), ("train", 9, "img9.png")]
    assert "caption" not in json.dumps(skipped)  # names and rows only
    assert summary["train_samples"] == 16 - 2 + 2  # the bad rows out, D_mem's 2 extra copies in


# empty datasets


def test_a_metadata_file_with_no_rows_is_one_error_line(tmp_path):
    data = tmp_path / "data"
    os.makedirs(data)
    (data / "img0.png").write_bytes(_png((1, 2, 3)))
    (data / "metadata.jsonl").write_text("\n")
    result = _run(["--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1",
                   "--report_to", "none"], tmp_path, tmp_path / "cache")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = _error_lines(result)
    assert len(lines) == 1 and "metadata.jsonl" in lines[0] and "has no rows" in lines[0], result.stderr[-3000:]


def test_no_rows_left_after_skipping_bad_images(tmp_path):
    from diffusers_memcontrol import train

    data = _image_folder(tmp_path / "data", n=3, bad=(0, 1, 2))
    with pytest.raises(InputError, match=r"No rows of the train split are left: every one of its 3 image"):
        train.main(["--train_data_dir", data, "--output_dir", str(tmp_path / "out"), "--report_to", "none",
                    "--no_progress", "--skip_bad_images"])


# error lines and progress bars


def test_an_error_starts_its_own_line_behind_a_progress_bar(monkeypatch):
    from tqdm.auto import tqdm

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)

    def main(argv):
        bar = tqdm(total=10, desc="check images", file=sys.stderr, mininterval=0)
        bar.update(3)
        raise InputError("Cannot read image 'x.png' (row 3 of the train split)")

    with pytest.raises(SystemExit) as exit_info:
        run_command(main, [])
    assert exit_info.value.code == 2
    text = stream.getvalue()
    assert "check images" in text
    assert [line for line in text.split("\n") if line.startswith("error:")] == [
        "error: Cannot read image 'x.png' (row 3 of the train split)"]


# out of disk


def test_a_write_out_of_space_names_the_folder_the_bytes_needed_and_free(tmp_path, monkeypatch):
    import errno

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as info:
        with reporting_full_disk(tmp_path, needed=12345):
            full()
    assert info.value.folder == str(tmp_path) and info.value.needed == 12345 and info.value.free > 0
    assert "about 12,345 bytes" in info.value.strerror and str(tmp_path) in info.value.strerror
    # the atomic write: no temporary file is left, and the error is the disk's
    with pytest.raises(DiskFullError, match="more than 5 bytes"):
        with atomic_open(tmp_path / "metrics.json") as f:
            f.write("12345")
            f.flush()
            full()
    assert os.listdir(tmp_path) == []
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)

    def main(argv):  # safetensors' own error type, as a full disk gives it
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space "
                           "left on device\" })")

    with pytest.raises(SystemExit) as exit_info:
        run_command(main, [])
    assert exit_info.value.code == 1
    lines = [line for line in stream.getvalue().split("\n") if line]
    assert len(lines) == 1 and lines[0].startswith("error: No space left on device"), stream.getvalue()


@pytest.fixture
def tmpfs_8mb(tmp_path):
    """An 8 MB tmpfs at tmp_path/out, unmounted after the test (a full fine-tune writes a pipeline, VAE 2.7 MB)."""
    target = tmp_path / "out"
    os.makedirs(target)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(target)],
                                 capture_output=True, text=True, check=False)
    except FileNotFoundError:
        pytest.skip("no `mount` command here: a tmpfs cannot be mounted")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({mounted.stderr.strip()}); CI runs this as root")
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_a_full_disk_mid_run_is_one_error_line_and_a_rerun_with_space_resumes(tmp_path, tmpfs_8mb):
    from diffusers_memcontrol.trainer.checkpoints import verify_checkpoint

    out = tmpfs_8mb
    # a full fine-tune of a 70k-parameter UNet: a checkpoint (weights + Adam's two moments + unet/ in diffusers'
    # format) is about 1.1 MB
    model = _model(tmp_path / "model", unet_channels=(8, 8, 16))
    params = 70_276
    checkpoint = 4 * 4 * params
    ballast = out / "ballast.bin"  # leaves room for 1.5 checkpoints: checkpoint-2 fits, checkpoint-4 does not
    st = os.statvfs(out)
    ballast.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - int(1.5 * checkpoint)))
    args = ["--pretrained_model_name_or_path", model, "--peft_method", "full", "--output_dir", str(out),
            "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
            "--max_train_samples", "16", "--train_batch_size", "4", "--report_to", "none",
            "--num_validation_images", "0"]
    result = _run(args, tmp_path, tmp_path / "cache")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "bytes free" in result.stderr and "the final adapter" in result.stderr  # the warning at the start
    lines = _error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    assert f"No space left on device in {str(out)!r}" in lines[0] and "bytes are free" in lines[0], lines[0]
    needed = int(lines[0].split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert checkpoint <= needed < 2 * checkpoint, lines[0]
    # no partial file: the earlier checkpoint whole and verified, nothing half written beside it
    assert sorted(os.listdir(out)) == ["ballast.bin", "checkpoint-2", "training_config.json"], os.listdir(out)
    verify_checkpoint(str(out / "checkpoint-2"))
    # space freed: the rerun resumes from checkpoint-2 and finishes
    ballast.unlink()
    result = _run([*args, "--resume_from_checkpoint", "latest"], tmp_path, tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-2" and summary["global_step"] == 6
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-6"]
    verify_checkpoint(str(out / "checkpoint-6"))
