"""A full fine-tune (`--peft_method full`) in diffusers' layout, and every reader of it: diffusers' loaders, the
verified checkpoint, the audit, publishing, evaluation of a trained folder and the adapter loader's refusal."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel

from diffusers_memcontrol.audit import command as audit
from diffusers_memcontrol.data import tiny_base as tb
from diffusers_memcontrol.hub.loaders import load_unet_adapter
from diffusers_memcontrol.hub.publish import MemControlRepoError, publish
from diffusers_memcontrol.trainer.checkpoints import CheckpointError, verify_checkpoint
from tests.conftest import unet_output

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> str:
    """Two steps of a full fine-tune of the tiny base on digits, checkpointed at step 2."""
    from diffusers_memcontrol import train

    folder = str(tmp_path_factory.mktemp("full"))
    train.main(["--peft_method", "full", "--max_train_steps", "2", "--checkpointing_steps", "2", "--learning_rate",
                "1e-3", "--max_train_samples", "16", "--train_batch_size", "4", "--output_dir", folder,
                "--report_to", "none", "--num_validation_images", "0", "--no_progress",
                "--latent_cache_dir", str(tmp_path_factory.mktemp("cache"))])
    return folder


def test_the_output_is_a_diffusers_pipeline_with_the_run_files_beside_it(full_run):
    names = set(os.listdir(full_run))
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "mask.json",
            "training_config.json", "summary.json", "trial_result.json", "checkpoint-2"} <= names
    assert "adapter_model.safetensors" not in names and "adapter_config.json" not in names
    assert not [n for n in names if n.startswith(".")]  # no temporary folder left behind
    assert json.loads(Path(full_run, "mask.json").read_text())["method"] == "full"

    pipe = DiffusionPipeline.from_pretrained(full_run, safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(tb.tiny_base_path(), safety_checker=None)
    assert not torch.allclose(unet_output(pipe.unet), unet_output(base.unet), atol=1e-5)  # it trained
    image = pipe("a prompt", num_inference_steps=1, output_type="np").images[0]
    assert image.shape[:2] == (tb.IMAGE_SIZE, tb.IMAGE_SIZE)


def test_the_checkpoint_unet_loads_with_diffusers_and_is_covered_by_the_manifest(full_run, tmp_path):
    folder = os.path.join(full_run, "checkpoint-2")
    manifest = verify_checkpoint(folder)
    assert {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"} <= set(manifest["files"])
    assert not any(name.endswith((".bin", ".pkl", ".pt")) for name in manifest["files"])
    unet = UNet2DConditionModel.from_pretrained(full_run, subfolder="checkpoint-2/unet")
    final = UNet2DConditionModel.from_pretrained(full_run, subfolder="unet")  # step 2 is the last step
    for key, value in final.state_dict().items():
        torch.testing.assert_close(unet.state_dict()[key], value, rtol=0, atol=0)

    copy = tmp_path / "checkpoint-2"
    shutil.copytree(folder, copy)
    (copy / "unet" / "extra.pkl").write_bytes(b"not listed")  # a planted pickle in the subfolder
    with pytest.raises(CheckpointError, match="not listed"):
        verify_checkpoint(str(copy))
    os.remove(copy / "unet" / "extra.pkl")
    with open(copy / "unet" / "config.json", "a", encoding="utf-8") as f:
        f.write(" ")
    with pytest.raises(CheckpointError, match="unet/config.json does not match its digest"):
        verify_checkpoint(str(copy))


def test_the_adapter_loader_names_the_pipeline_loader(full_run):
    pipe = StableDiffusionPipeline.from_pretrained(tb.tiny_base_path(), safety_checker=None)
    with pytest.raises(MemControlRepoError, match=r"diffusers pipeline.*DiffusionPipeline\.from_pretrained"):
        load_unet_adapter(pipe.unet, full_run, local_files_only=True)


def test_the_audit_reads_the_run_folder_as_the_fine_tuned_pipeline(full_run, tmp_path):
    assert audit.detect_model_kind(full_run) == "run"
    pipe = audit.load_audited_pipeline(full_run, "run", tb.tiny_base_path(), audit.build_parser().parse_args(
        [full_run]))
    saved = DiffusionPipeline.from_pretrained(full_run, safety_checker=None)
    assert torch.equal(unet_output(pipe.unet), unet_output(saved.unet))

    out = tmp_path / "audit"
    assert audit.main([full_run, "--dmem_size", "2", "--generations", "3", "--num_inference_steps", "2",
                       "--no_progress", "--no_base", "--output_dir", str(out)]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["model"]["kind"] == "run" and report["prompts"] == "run" and report["attacked_prompts"] == 2


def test_publish_writes_a_pipeline_repository_with_its_card(full_run, tmp_path):
    local = tmp_path / "repo"
    publish(full_run, "someone/full-ft", dry_run=True, local_dir=str(local))
    names = {os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/config.json",
            "scheduler/scheduler_config.json", "mask.json", "README.md"} <= names
    assert not names & {"training_config.json", "summary.json", "trial_result.json"}
    assert not any(n.startswith("checkpoint") or n.endswith((".bin", ".pkl")) for n in names)
    card = (local / "README.md").read_text()
    assert 'DiffusionPipeline.from_pretrained("someone/full-ft")' in card and "has_pipeline: true" in card
    assert "load_memcontrol_adapter" not in card
    DiffusionPipeline.from_pretrained(str(local), safety_checker=None)("a prompt", num_inference_steps=1)


def test_eval_with_adapter_dir_evaluates_the_full_fine_tune(full_run, tmp_path):
    from diffusers_memcontrol import train

    eval_config = tmp_path / "eval.json"
    eval_config.write_text(json.dumps({"num_eval_prompts": 4, "extraction_generations": 3, "num_inference_steps": 2,
                                       "max_train_images": 16, "max_reference_images": 16,
                                       "cache_dir": str(tmp_path / "eval_cache")}))
    out = tmp_path / "eval"
    train.main(["--eval", "--adapter_dir", full_run, "--output_dir", str(out), "--max_train_samples", "16",
                "--dmem_size", "2", "--eval_config", str(eval_config), "--report_to", "none", "--no_progress"])
    metrics = json.loads((out / "metrics.json").read_text())
    summary = json.loads(Path(full_run, "summary.json").read_text())
    assert metrics["trainable_params"] == summary["trainable_params"] > 0 and "fid" in metrics
