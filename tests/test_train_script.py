"""End to end: the installed trainer's main(argv) (diffusers_memcontrol.train) on a tiny pipeline (CPU, a few steps)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from diffusers_memcontrol.data import tiny_base as tb
from diffusers_memcontrol.errors import InputError
from diffusers_memcontrol.search.arguments import build_parser

SECRET_PROMPT = "a secret validation prompt qqzx"
SECRET_TOKEN = "hf_secret_token_never_written"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script():
    from diffusers_memcontrol import train

    return train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny SD-shaped pipeline built from the tiny base's configs (random weights), saved like a Hub model."""
    folder = str(tmp_path_factory.mktemp("tiny_pipeline"))
    pipe = StableDiffusionPipeline(vae=tb.build_vae(), text_encoder=tb.build_text_encoder(),
                                   tokenizer=tb.build_tokenizer(), unet=tb.build_unet(), scheduler=tb.build_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def _args(model_dir, cache_dir, output_dir, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", model_dir, "--output_dir", str(output_dir), "--latent_cache_dir", cache_dir,
            "--max_train_samples", "48", "--train_batch_size", "8", "--max_train_steps", "2", "--report_to", "none",
            "--no_progress", "--validation_prompts", *extra]


def _all_text(folder) -> bytes:
    blobs = []
    for root, _, files in os.walk(folder):
        for name in files:
            if not name.endswith((".safetensors", ".png", ".bin", ".pkl")):
                with open(os.path.join(root, name), "rb") as f:
                    blobs.append(f.read())
    return b"\n".join(blobs)


def test_main_writes_adapter_config_summary_grid_and_checkpoints(script, model_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    argv = _args(model_dir, cache_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                 "--report_to", "tensorboard", "--mitigation", "threshold", "--peft_method", "difffit",
                 "--num_validation_images", "1", "--hub_token", SECRET_TOKEN, "--validation_prompts", SECRET_PROMPT)
    summary = script.main(argv)
    for name in ("adapter_config.json", "adapter_model.safetensors", "mask.json", "training_config.json",
                 "summary.json", "validation.png", "checkpoint-2", "checkpoint-4", "logs"):
        assert os.path.exists(out / name), name
    saved = json.loads((out / "summary.json").read_text())
    assert saved["trainable_params"] == summary["trainable_params"] > 0
    assert saved["losses"]["steps"] + saved["skipped_steps"] == 4 and saved["threshold"]["seen_samples"] == 32
    assert saved["validation"] == "validation.png" and saved["train_samples"] == 48
    config = json.loads((out / "training_config.json").read_text())
    assert config["fine_tune"]["peft_method"] == "difffit" and config["run"]["num_validation_prompts"] == 1
    assert "validation_prompts" not in config["run"] and "hub_token" not in config["run"]
    # privacy: no prompt, caption or token in any JSON, config or tracker log
    text = _all_text(out)
    for private in (SECRET_PROMPT, "handwritten digit", SECRET_TOKEN):
        assert private.encode() not in text, private
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())


def test_resume_latest_through_the_script_matches_an_uninterrupted_run(script, model_dir, cache_dir, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--random_flip", "--seed", "7")
    script.main(_args(model_dir, cache_dir, full, *common))
    os.makedirs(resumed)
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    summary = script.main(_args(model_dir, cache_dir, resumed, *common, "--resume_from_checkpoint", "latest"))
    assert summary["resumed_from"] == "checkpoint-2" and summary["global_step"] == 4
    a, b = load_file(str(full / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_resume_past_max_train_steps_trains_one_more_step_as_diffusers(script, model_dir, cache_dir, tmp_path, caplog):
    out = tmp_path / "run"
    script.main(_args(model_dir, cache_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "2"))
    summary = script.main(_args(model_dir, cache_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                                "--resume_from_checkpoint", "checkpoint-4"))
    assert summary["resumed_from"] == "checkpoint-4" and summary["global_step"] == 5  # never a silent no-op
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert any("past --max_train_steps 2: training one more step" in r.getMessage() for r in caplog.records)


def test_embedded_default_runs_offline(script, tmp_path):
    if not os.path.isfile(os.path.join(tb.tiny_base_path(), "model_index.json")):
        pytest.skip("the shipped tiny base (assets/tiny_base/model_index.json) is not built yet")
    out = tmp_path / "default"
    eval_config = tmp_path / "eval.json"  # the real evaluation, at a tiny size
    eval_config.write_text(json.dumps({"num_eval_prompts": 4, "extraction_generations": 3, "num_inference_steps": 3,
                                       "max_train_images": 32, "max_reference_images": 32,
                                       "cache_dir": str(tmp_path / "eval_cache")}))
    summary = script.main(["--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "8",
                           "--max_train_samples", "32", "--report_to", "none", "--latent_cache_dir", str(tmp_path / "c"),
                           "--num_validation_images", "1", "--no_progress", "--eval", "--dmem_size", "2",
                           "--eval_config", str(eval_config)])
    assert summary["trainable_params"] > 0 and summary["validation"] == "validation.png"
    assert os.path.isfile(out / "adapter_model.safetensors") and os.path.isfile(out / "summary.json")
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("fid", "amd", "agreement", "extracted_images", "dmem", "trainable_params"):
        assert key in metrics, key
    assert metrics["trainable_params"] == summary["trainable_params"]


def _no_training_happened(out) -> None:
    assert not os.path.exists(out / "adapter_model.safetensors") and not os.path.exists(out / "summary.json")


@pytest.mark.parametrize("extra, error, message", [
    (("--caption_column", "caption"), ValueError, r"\['caption'\] not found.*available columns: \['image', 'text'"),
    (("--mask", "101"), ValueError, r"3 bits.*5 positions.*down_blocks\.0\.attentions\.0"),
    (("--adapter_dir", "somewhere"), InputError, "pass --eval with it"),
    (("--threshold", "high"), InputError, "positive number or"),
    (("--subject_column", "patient"), ValueError, r"\['patient'\] not found.*available columns"),
])
def test_bad_arguments_fail_before_training(script, model_dir, cache_dir, tmp_path, extra, error, message):
    out = tmp_path / "bad"
    with pytest.raises(error, match=message):
        script.main(_args(model_dir, cache_dir, out, *extra))
    _no_training_happened(out)


def test_unreadable_image_in_a_csv_is_named(script, model_dir, cache_dir, tmp_path):
    import io

    from PIL import Image

    rows = ["path,report"]
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(buf, format="PNG")
        (tmp_path / f"img{i}.png").write_bytes(buf.getvalue())
        rows.append(f"img{i}.png,report number {i}")
    for i in range(1, 6):  # whatever the split, the training rows hold unreadable files
        (tmp_path / f"img{i}.png").write_bytes(b"%PDF-1.4 not an image")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=r"img[1-5]\.png.*not a readable image file"):
        script.main(_args(model_dir, cache_dir, out, "--train_data_dir", str(tmp_path / "data.csv"),
                          "--image_column", "path", "--caption_column", "report"))
    _no_training_happened(out)


def test_eval_only_on_an_adapter_for_another_base_fails_clearly(script, model_dir, cache_dir, tmp_path):
    from diffusers_memcontrol.hub.adapters import save_adapter
    from diffusers_memcontrol.trainer.config import FineTuneConfig
    from tests.conftest import make_small_unet

    other = make_small_unet()
    other.add_adapter(FineTuneConfig().adapter_config())
    save_adapter(other, str(tmp_path / "foreign"))
    with pytest.raises(ValueError, match="trained for another base model"):
        script.main(_args(model_dir, cache_dir, tmp_path / "out", "--eval", "--adapter_dir",
                          str(tmp_path / "foreign")))


def test_hpo_rwa_eval_and_push_to_hub(script, model_dir, cache_dir, tmp_path, monkeypatch):
    calls = {}

    def fake_evaluate(pipe, eval_dataset, dmem_dataset, reference_dataset, config, **kwargs):
        calls["evaluate"] = (len(eval_dataset), len(dmem_dataset), len(reference_dataset), config, kwargs)
        return {"fid": 1.5, "amd": 0.2, "agreement": 0.9, "extracted_images": 0, "dmem": 3.0,
                "trainable_params": kwargs["trainable_params"]}

    def fake_publish(output_dir, repo_id, **kwargs):
        calls["publish"] = (output_dir, repo_id, kwargs)
        return "https://hub.example/" + repo_id

    monkeypatch.setattr(script, "evaluate", fake_evaluate)  # the names the trainer calls
    monkeypatch.setattr(script, "publish", fake_publish)
    out = tmp_path / "hpo"
    summary = script.main(_args(model_dir, cache_dir, out, "--hpo", "--dmem_size", "4", "--dmem_repeats", "3",
                                "--proxy_fraction", "0.05", "--mitigation", "rwa", "--eval", "--push_to_hub",
                                "--hub_model_id", "me/tiny-memcontrol", "--hub_token", SECRET_TOKEN))
    assert summary["train_samples"] == 2 + 4 * 3 and summary["rwa_augmented_captions"] > 0
    n_eval, n_dmem, n_reference, config, kwargs = calls["evaluate"]
    assert n_dmem == 4 and n_reference == 48 and n_eval == 360  # digits' fixed test split
    assert config.feature_encoder == "tiny-domain" and kwargs["label_column"] == "label"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fid"] == 1.5 and metrics["trainable_params"] == summary["trainable_params"]
    assert calls["publish"][1] == "me/tiny-memcontrol" and calls["publish"][2]["token"] == SECRET_TOKEN
    assert SECRET_TOKEN.encode() not in _all_text(out)

    # evaluation alone on the trained adapter: no training, metrics.json written
    calls.clear()
    again = tmp_path / "eval_only"
    script.main(_args(model_dir, cache_dir, again, "--eval", "--adapter_dir", str(out), "--dmem_size", "4"))
    assert calls["evaluate"][1] == 4 and os.path.isfile(again / "metrics.json")
    assert not os.path.exists(again / "adapter_model.safetensors")


def test_every_flag_has_help_and_a_row_in_docs_flags(script):
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "flags.md")) as f:
        docs = f.read()
    for action in build_parser()._actions:
        flag = action.option_strings[0]
        if flag != "-h":
            assert action.help, flag
            assert f"`{flag}`" in docs or f"`{flag} " in docs, f"{flag} is missing from docs/flags.md"


def test_cache_dir_is_the_download_cache_and_dataset_flags_reach_load_dataset(script, monkeypatch, tmp_path):
    from diffusers_memcontrol.data import datasets as data

    seen = {}

    def fake_load(*args, **kwargs):
        seen.update(args=args, **kwargs)
        raise InputError("stop here")

    monkeypatch.setattr(data, "load_image_caption_dataset", fake_load)
    with pytest.raises(InputError, match="stop here"):
        script.main(["--dataset_name", "frgfm/imagenette", "--dataset_config_name", "160px", "--caption_template",
                     "a photo of a {label}", "--cache_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path)])
    assert seen["args"][0] == "frgfm/imagenette" and seen["dataset_config_name"] == "160px"
    assert seen["caption_template"] == "a photo of a {label}" and seen["cache_dir"] == str(tmp_path / "hf")
    args = script.parse_args([])
    assert args.caption_dropout == 0 and args.latent_cache_dir is None and args.mask_layout == "paper"


def test_diffusers_training_flags_and_prefetch_workers(script, model_dir, cache_dir, tmp_path):
    """--dataloader_num_workers decodes ahead without changing a single draw; DREAM, input perturbation, the
    interpolation mode and the validation grid every epoch run through the real loop."""
    common = ("--latent_cache", "off", "--max_train_samples", "16", "--max_train_steps", "4", "--random_flip",
              "--input_perturbation", "0.1", "--dream_training", "--image_interpolation_mode", "bilinear")
    script.main(_args(model_dir, cache_dir, tmp_path / "inline", *common))
    summary = script.main(_args(model_dir, cache_dir, tmp_path / "workers", *common, "--dataloader_num_workers", "2",
                                "--validation_epochs", "1", "--validation_prompts", SECRET_PROMPT,
                                "--num_validation_images", "1"))
    a = load_file(str(tmp_path / "inline" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "workers" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    epochs = summary["num_train_epochs"]
    assert epochs == 2 and all(os.path.isfile(tmp_path / "workers" / f"validation-epoch-{e}.png") for e in (1, 2))
    config = json.loads((tmp_path / "workers" / "training_config.json").read_text())["fine_tune"]
    assert config["dream_training"] and config["input_perturbation"] == 0.1
    assert config["image_interpolation_mode"] == "bilinear"


def test_imagenette_structured_dataset_trains_and_evaluates_by_config_and_caption_template(
        script, model_dir, cache_dir, imagenette_like_dir, tmp_path):
    from tests.conftest import IMAGENETTE_LIKE_CLASSES as CLASSES

    out = tmp_path / "imagenette"
    summary = script.main([
        "--pretrained_model_name_or_path", model_dir, "--output_dir", str(out), "--latent_cache_dir", cache_dir,
        "--dataset_name", imagenette_like_dir, "--dataset_config_name", "320px",
        "--caption_template", "a photo of a {label}", "--validation_fraction", "0.25", "--test_fraction", "0.25",
        "--train_batch_size", "4", "--max_train_steps", "2", "--report_to", "none", "--no_progress",
        "--num_validation_images", "0", "--eval", "--dmem_size", "2", "--feature_encoder", "tiny-domain",
        "--eval_num_prompts", "3", "--eval_inference_steps", "2", "--eval_extraction_generations", "3"])
    config = json.loads((out / "training_config.json").read_text())
    assert config["data"]["splits"] == {"train": 6, "validation": 3, "test": 3}  # the 320px config's 12 rows
    assert summary["global_step"] == 2 and summary["metrics"] == "metrics.json"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_eval_prompts"] == 3 and metrics["num_dmem"] == 2 and metrics["fid"] is not None
    text = _all_text(out)  # the template is a setting; the captions built from it stay private
    assert b"a photo of a {label}" in text and not any(f"a photo of a {c}".encode() in text for c in CLASSES)
