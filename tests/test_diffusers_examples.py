"""diffusers' own example tests, run against `training/train_memcontrol.py`.

A port of diffusers' `examples/text_to_image/test_text_to_image.py` and `test_text_to_image_lora.py` (with
`examples/test_examples_utils.py`): the same flags and assertions, with two substitutions, since nothing here may
download: the shipped tiny base stands for `hf-internal-testing/tiny-stable-diffusion-torch`, and a local image folder
with a `metadata.jsonl` stands for `hf-internal-testing/dummy_image_text_data`. diffusers' `train_text_to_image.py`
fine-tunes the whole UNet, so its tests pass `--peft_method full` here (this trainer's default is an adapter);
`train_text_to_image_lora.py`'s tests pass `--peft_method lora`. Each run goes through `accelerate launch` (its CLI as
`python -m accelerate.commands.launch`, with the config `write_basic_config` writes, as diffusers' tests do), on the
CPU. The SDXL tests are not ported: there is no SDXL base here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from diffusers_memcontrol.data.tiny_base import IMAGE_SIZE, tiny_base_path

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "train_memcontrol.py")
PRETRAINED = tiny_base_path()  # stands for hf-internal-testing/tiny-stable-diffusion-torch
PROMPT = "a prompt"


def run_command(command: list[str]) -> None:
    """Run `command`; a failure raises with the command's whole output (test_examples_utils.run_command)."""
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"Command `{' '.join(command)}` failed ({result.returncode}):\n\n{result.stdout}")


@pytest.fixture(scope="module")
def launch_args(tmp_path_factory) -> list[str]:
    """`accelerate launch --config_file <basic config>` (ExamplesTestsAccelerate.setup_class)."""
    from accelerate.utils import write_basic_config

    config = str(tmp_path_factory.mktemp("accelerate") / "default_config.yml")
    write_basic_config(save_location=config)
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> str:
    """An imagefolder with metadata.jsonl (file_name, text), standing for hf-internal-testing/dummy_image_text_data."""
    folder = tmp_path_factory.mktemp("dummy_image_text_data")
    rows = []
    for i in range(8):
        Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (30 * i, 255 - 30 * i, 90)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a dummy picture number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return str(folder)


def _train_args(method: str, dataset_dir: str, output_dir: str, max_train_steps: int, *extra: str) -> list[str]:
    """The flags diffusers' tests pass, for this trainer (`--peft_method`, the local folder as the dataset)."""
    return [SCRIPT, "--pretrained_model_name_or_path", PRETRAINED, "--peft_method", method,
            "--train_data_dir", dataset_dir, "--resolution", "64", "--center_crop", "--random_flip",
            "--train_batch_size", "1", "--gradient_accumulation_steps", "1", "--max_train_steps", str(max_train_steps),
            "--learning_rate", "5.0e-04", "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--output_dir", output_dir, "--no_progress", *extra]


def _checkpoints(folder) -> set[str]:
    return {x for x in os.listdir(folder) if "checkpoint" in x}


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# examples/text_to_image/test_text_to_image.py (TestTextToImage)
# ----------------------------------------------------------------------------------------------------------------
def test_text_to_image(launch_args, dataset_dir, tmp_path):
    tmpdir = str(tmp_path)
    run_command(launch_args + _train_args("full", dataset_dir, tmpdir, 2))
    # save_pretrained smoke test
    assert os.path.isfile(os.path.join(tmpdir, "unet", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(tmpdir, "scheduler", "scheduler_config.json"))


@pytest.mark.parametrize("use_ema", [False, True], ids=["checkpointing", "checkpointing_use_ema"])
def test_text_to_image_checkpointing(launch_args, dataset_dir, tmp_path, use_ema):
    tmpdir = str(tmp_path)
    ema = ["--use_ema"] if use_ema else []
    # max_train_steps == 4, checkpointing_steps == 2: checkpoints at steps 2, 4
    run_command(launch_args + _train_args("full", dataset_dir, tmpdir, 4, "--checkpointing_steps=2", *ema,
                                          "--seed=0"))

    pipe = DiffusionPipeline.from_pretrained(tmpdir, safety_checker=None)
    pipe(PROMPT, num_inference_steps=2 if use_ema else 1)
    assert _checkpoints(tmpdir) == {"checkpoint-2", "checkpoint-4"}

    # an intermediate checkpoint runs
    unet = UNet2DConditionModel.from_pretrained(tmpdir, subfolder="checkpoint-2/unet")
    pipe = DiffusionPipeline.from_pretrained(PRETRAINED, unet=unet, safety_checker=None)
    pipe(PROMPT, num_inference_steps=1)

    # remove checkpoint 2 so that only later checkpoints exist after resuming
    shutil.rmtree(os.path.join(tmpdir, "checkpoint-2"))

    # 2 total steps, resuming from checkpoint 4: one more step, checkpoint-5
    run_command(launch_args + _train_args("full", dataset_dir, tmpdir, 2, "--checkpointing_steps=1",
                                          "--resume_from_checkpoint=checkpoint-4", *ema, "--seed=0"))

    pipe = DiffusionPipeline.from_pretrained(tmpdir, safety_checker=None)
    pipe(PROMPT, num_inference_steps=1)
    assert _checkpoints(tmpdir) == {"checkpoint-4", "checkpoint-5"}


def test_text_to_image_checkpointing_checkpoints_total_limit(launch_args, dataset_dir, tmp_path):
    tmpdir = str(tmp_path)
    # max_train_steps == 6, checkpointing_steps == 2, checkpoints_total_limit == 2: 2, 4, 6 with 2 deleted
    run_command(launch_args + _train_args("full", dataset_dir, tmpdir, 6, "--checkpointing_steps=2",
                                          "--checkpoints_total_limit=2", "--seed=0"))

    pipe = DiffusionPipeline.from_pretrained(tmpdir, safety_checker=None)
    pipe(PROMPT, num_inference_steps=1)
    assert _checkpoints(tmpdir) == {"checkpoint-4", "checkpoint-6"}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_text_to_image_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints(
        launch_args, dataset_dir, tmp_path, method):
    """test_text_to_image.py's test (full) and test_text_to_image_lora.py's (lora)."""
    tmpdir = str(tmp_path)
    lora = ["--num_validation_images=0"] if method == "lora" else []
    # max_train_steps == 4, checkpointing_steps == 2: checkpoints at steps 2, 4
    run_command(launch_args + _train_args(method, dataset_dir, tmpdir, 4, "--checkpointing_steps=2", "--seed=0",
                                          *lora))
    _load_output(method, tmpdir)(PROMPT, num_inference_steps=1)
    assert _checkpoints(tmpdir) == {"checkpoint-2", "checkpoint-4"}

    # resume: the checkpoint at 6 has to remove checkpoint-2 and checkpoint-4, not just one
    run_command(launch_args + _train_args(method, dataset_dir, tmpdir, 8, "--checkpointing_steps=2",
                                          "--resume_from_checkpoint=checkpoint-4", "--checkpoints_total_limit=2",
                                          "--seed=0", *lora))
    _load_output(method, tmpdir)(PROMPT, num_inference_steps=1)
    assert _checkpoints(tmpdir) == {"checkpoint-6", "checkpoint-8"}


def _load_output(method: str, tmpdir: str):
    """How diffusers' tests load each script's output: the saved pipeline, or the base with load_lora_weights."""
    if method == "full":
        return DiffusionPipeline.from_pretrained(tmpdir, safety_checker=None)
    pipe = DiffusionPipeline.from_pretrained(PRETRAINED, safety_checker=None)
    pipe.load_lora_weights(tmpdir)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# examples/text_to_image/test_text_to_image_lora.py (TestTextToImageLoRA; the SDXL key check on the SD1.x LoRA)
# ----------------------------------------------------------------------------------------------------------------
def test_text_to_image_lora_checkpointing_checkpoints_total_limit(launch_args, dataset_dir, tmp_path):
    tmpdir = str(tmp_path)
    # max_train_steps == 6, checkpointing_steps == 2, checkpoints_total_limit == 2: 2, 4, 6 with 2 deleted
    run_command(launch_args + _train_args("lora", dataset_dir, tmpdir, 6, "--checkpointing_steps=2",
                                          "--checkpoints_total_limit=2", "--seed=0", "--num_validation_images=0"))

    pipe = DiffusionPipeline.from_pretrained(PRETRAINED, safety_checker=None)
    pipe.load_lora_weights(tmpdir)
    pipe(PROMPT, num_inference_steps=1)
    assert _checkpoints(tmpdir) == {"checkpoint-4", "checkpoint-6"}

    # test_text_to_image_lora_sdxl's state-dict check: LoRA tensors only, every key under `unet`
    lora_state_dict = load_file(os.path.join(tmpdir, "pytorch_lora_weights.safetensors"))
    assert all("lora" in k for k in lora_state_dict)
    assert lora_state_dict and all(k.startswith("unet") for k in lora_state_dict)
    assert all(torch.isfinite(v).all() for v in lora_state_dict.values())
