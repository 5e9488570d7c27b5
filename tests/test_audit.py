"""`memcontrol audit MODEL` on the shipped tiny base: LoRAs (diffusers and peft format), a planted memorization, the
base's cliques subtracted, exit statuses and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffusers_memcontrol import cli
from diffusers_memcontrol.audit import command as audit
from diffusers_memcontrol.data import tiny_base as tb
from tests.conftest import unet_output

pytestmark = pytest.mark.usefixtures("one_thread")

# a cheap attack: 2 D_mem pairs of 40 digits, 3 generations of 2 steps each
CHEAP = ["--dataset_name", "digits", "--max_train_samples", "40", "--dmem_size", "2", "--dmem_unique_captions",
         "--generations", "3", "--num_inference_steps", "2", "--no_progress"]


def _lora_unet(rank: int = 2):
    """The tiny base with a peft LoRA of random (non-zero) weights on its attention projections."""
    from peft import LoraConfig

    pipe = StableDiffusionPipeline.from_pretrained(tb.tiny_base_path(), safety_checker=None)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return pipe


def _namespace(model: str):
    return audit.build_parser().parse_args([model])


@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory) -> tuple[str, torch.Tensor]:
    """A LoRA written by diffusers' save_lora_weights, and the UNet output it gives."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    pipe = _lora_unet()
    folder = str(tmp_path_factory.mktemp("diffusers_lora"))
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    return folder, unet_output(pipe.unet)


def test_a_lora_saved_by_diffusers_loads_and_audits_with_the_data_flags(diffusers_lora, tmp_path):
    folder, expected = diffusers_lora
    assert audit.detect_model_kind(folder) == "diffusers_lora"
    pipe = audit.load_audited_pipeline(folder, "diffusers_lora", tb.tiny_base_path(), _namespace(folder))
    base = StableDiffusionPipeline.from_pretrained(tb.tiny_base_path(), safety_checker=None)
    assert torch.allclose(unet_output(pipe.unet), expected, atol=1e-4)
    assert not torch.allclose(unet_output(base.unet), expected, atol=1e-3)  # the LoRA changes the model

    out = tmp_path / "out"
    assert audit.main([folder, *CHEAP, "--output_dir", str(out), "--no_base"]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["model"]["kind"] == "diffusers_lora" and report["dmem_size"] == 2
    assert report["attacked_prompts"] == 2 and report["base"] is None
    assert report["settings"]["data"]["dataset_name"] == "digits"
    assert (out / "audit.md").is_file() and (out / "memorization.png").is_file()


def test_a_peft_lora_folder_loads(tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe = _lora_unet()
    pipe.unet.peft_config["default"].save_pretrained(str(tmp_path))
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(pipe.unet).items()},
              str(tmp_path / "adapter_model.safetensors"))
    assert audit.detect_model_kind(str(tmp_path)) == "peft_lora"
    loaded = audit.load_audited_pipeline(str(tmp_path), "peft_lora", tb.tiny_base_path(), _namespace(str(tmp_path)))
    assert torch.allclose(unet_output(loaded.unet), unet_output(pipe.unet), atol=1e-4)


def test_cliques_the_base_already_forms_are_subtracted(tmp_path):
    """The base audited as MODEL, with a clique threshold so loose that every prompt forms one: each clique of the
    model is the base's own, so none is the fine-tune's memorization."""
    out = tmp_path / "out"
    status = audit.main([tb.tiny_base_path(), *CHEAP, "--extraction_threshold", "10",
                         "--extraction_match_threshold", "1e-6", "--output_dir", str(out), "--fail_on_extraction"])
    report = json.loads((out / "audit.json").read_text())
    assert report["model"]["kind"] == "pipeline"
    assert report["memorized_prompts_before_base_subtraction"] == 2 == report["base"]["memorized_prompts"]
    assert report["base_only_cliques_subtracted"] == 2 and report["memorized_prompts"] == 0
    assert report["extracted_images"] == 0 and status == 0  # nothing extracted: --fail_on_extraction passes


def _fails_with_one_line(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_bad_input_is_one_error_line(capsys, tmp_path, diffusers_lora):
    _fails_with_one_line(capsys, [str(tmp_path / "missing")], "neither a folder nor a Hub repository id")
    _fails_with_one_line(capsys, [str(tmp_path)], "holds no model the audit knows")
    _fails_with_one_line(capsys, [diffusers_lora[0], "--dataset_name", "digits"],
                         "--dmem_file, --dmem_size N or --scan")
    _fails_with_one_line(capsys, [diffusers_lora[0], "--scan", "--scan_top_k", "0"], "--scan_top_k must be")
    _fails_with_one_line(capsys, [diffusers_lora[0], "--dmem_file", str(tmp_path / "nope.json")], "dmem_file")
    _fails_with_one_line(capsys, [diffusers_lora[0], "--scan", "--mixed_precision", "fp16", "--device", "cpu"],
                         "fp16 needs a GPU")


def test_a_hub_repo_that_cannot_be_fetched_is_one_error_line(capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fails_with_one_line(capsys, ["no-such-org/no-such-adapter", *CHEAP], "MODEL 'no-such-org/no-such-adapter'")


# ---------------------------------------------------------------------------------------------------------------
# a planted memorization: a short real full fine-tune on the tiny base with 5 D_mem pairs duplicated 50 times
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def memorizing_run(tmp_path_factory) -> str:
    """The quickstart's stage-2 Full FT row (250 steps, 100 images, 5 D_mem pairs x 50): it memorizes D_mem."""
    from diffusers_memcontrol import train

    folder = str(tmp_path_factory.mktemp("full-none"))
    train.main(["--peft_method", "full", "--max_train_steps", "250", "--learning_rate", "1e-3", "--caption_dropout",
                "0.1", "--max_train_samples", "100", "--dmem_size", "5", "--dmem_unique_captions", "--duplicate_dmem",
                "--output_dir", folder, "--report_to", "none", "--num_validation_images", "0", "--no_progress",
                "--latent_cache", "memory"])
    return folder


@pytest.mark.slow  # about 3 minutes on 2 CPU cores (the fine-tune); deselect with -m "not slow"
def test_a_run_folder_audits_with_no_other_argument_and_the_scan_ranks_dmem_on_top(memorizing_run, tmp_path):
    out = tmp_path / "out"
    status = audit.main([memorizing_run, "--scan", "--scan_top_k", "5", "--scan_generations", "4", "--generations",
                         "10", "--num_inference_steps", "20", "--fail_on_extraction", "--output_dir", str(out),
                         "--no_progress"])
    report = json.loads((out / "audit.json").read_text())
    detection = report["detection"]
    assert report["dmem_size"] == 5 and detection["n_scanned"] > 5
    assert detection["auc"] >= 0.9 and detection["dmem_in_top_k"] >= 4, detection
    assert detection["dmem_ranks"][:4] == [1, 2, 3, 4], detection
    assert report["extracted_images"] >= 3 and status == audit.EXTRACTION_EXIT_STATUS
    assert report["base"]["extracted_images"] == 0 and report["memorized_prompts"] >= 3
    # the nearest-neighbour copies see the memorized pairs too (5 of 5 measured), and none for the base
    assert report["copied_images"] >= 3 and report["base"]["copied_images"] == 0
    assert report["copies"]["classes"] and "Copies (nearest-neighbour) |" in (out / "audit.md").read_text()
    # privacy: no caption in audit.json or audit.md without --include_prompts
    ns = audit._trainer_namespace(audit.build_parser().parse_args([memorizing_run]),
                                  json.loads(Path(memorizing_run, "training_config.json").read_text())["run"],
                                  set())
    _, dmem, _ = audit._data(ns, want_dmem=True)  # the run's own D_mem, from the rows it trained on
    text = (out / "audit.json").read_text() + (out / "audit.md").read_text()
    assert not any(caption in text for caption in dmem["text"])


@pytest.mark.slow
def test_the_run_folder_d_mem_attack_matches_and_publish_audit_puts_figures_in_the_card(memorizing_run, tmp_path,
                                                                                        capsys):
    local = tmp_path / "repo"
    status = cli.main(["publish", memorizing_run, "--repo_id", "me/full", "--dry_run", "--local_dir", str(local),
                       "--audit", "--audit_args", "--generations", "10", "--num_inference_steps", "20",
                       "--no_progress"])
    assert status == 0
    report = json.loads(Path(memorizing_run, "audit", "audit.json").read_text())
    assert report["prompts"] == "run" and report["attacked_prompts"] == 5 and report["extracted_images"] >= 3
    card = (local / "README.md").read_text()
    assert "Memorization audit" in card
    assert f"| Extracted images (calibrated) | {report['extracted_images']} | 0 |" in card
    # a full fine-tune is published as a diffusers pipeline (the publication record is local only, never uploaded)
    assert sorted(n for n in os.listdir(local) if not n.startswith(".")) == [
        "README.md", "mask.json", "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert 'DiffusionPipeline.from_pretrained("me/full")' in card
