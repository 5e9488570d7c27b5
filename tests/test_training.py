"""The training loop (diffusers_memcontrol.trainer.loop) on a tiny SD-shaped pipeline built from configs (CPU, seconds)."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffusers_memcontrol.data import tiny_base as tb
from diffusers_memcontrol.hub.adapters import check_adapter_fits, resolve_mask, save_adapter
from diffusers_memcontrol.hub.loaders import load_adapter
from diffusers_memcontrol.trainer.batches import prepare_training_data, training_data_from_tensors
from diffusers_memcontrol.trainer.checkpoints import list_checkpoints, resolve_checkpoint
from diffusers_memcontrol.trainer.config import FineTuneConfig, parse_threshold
from diffusers_memcontrol.trainer.loop import train

LEARNING_RATES = {"svdiff": 1e-2, "difffit": 1e-2, "attention": 1e-3, "lora": 3e-3, "full": 1e-3}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return tb.load_domain("digits", "train").select(range(16))


@pytest.fixture(scope="module")
def data8(pipe, digits):
    return prepare_training_data(pipe, digits.select(range(8)), cache="memory", progress=False)


@pytest.fixture(scope="module")
def data_flip(pipe, digits):
    return prepare_training_data(pipe, digits, cache="memory", random_flip=True, progress=False)


@torch.no_grad()
def fixed_batch_loss(unet, noise_scheduler, data, num_samples: int = 8, seed: int = 0) -> float:
    """Denoising loss on a fixed batch (first samples' cached latent means, fixed noise and timesteps)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    idx = torch.arange(min(num_samples, data.num_samples))
    gen = torch.Generator().manual_seed(seed)
    x0 = data.latent_mean[data.latent_rows[idx, 0]].float()
    cond = data.prompt_embeds[data.caption_rows[idx]].float()
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
    was_training = unet.training
    unet.eval()
    pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond, return_dict=False)[0]
    unet.train(was_training)
    return float(torch.nn.functional.mse_loss(pred.float(), noise).item())


def _adapter_state(unet) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet, adapter_name="default").items()}


# ------------------------------------------------------------------------------------------------ every method trains
@pytest.mark.parametrize("method", sorted(LEARNING_RATES))
def test_each_method_lowers_the_loss_on_a_fixed_batch(pipe, data8, method):
    unet = copy.deepcopy(pipe.unet)
    before = fixed_batch_loss(unet, pipe.scheduler, data8)
    config = FineTuneConfig(peft_method=method, max_train_steps=20, train_batch_size=8, caption_dropout=0.0,
                            learning_rate=LEARNING_RATES[method])
    log = train(unet, pipe.scheduler, data8, config, progress=False)
    after = fixed_batch_loss(unet, pipe.scheduler, data8)
    assert log["trainable_params"] > 0 and log["global_step"] == 20 and len(log["losses"]) == 20
    assert after < before - 0.05, f"{method}: fixed-batch loss {before:.4f} -> {after:.4f}"
    # only adapter tensors trained: every base weight is untouched
    base = dict(pipe.unet.named_parameters())
    for name, p in unet.named_parameters():
        if not p.requires_grad and name.replace(".base_layer", "") in base:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name


def test_freeze_trains_nothing_and_keeps_the_loss(pipe, data8):
    unet = copy.deepcopy(pipe.unet)
    before = fixed_batch_loss(unet, pipe.scheduler, data8)
    log = train(unet, pipe.scheduler, data8, FineTuneConfig(peft_method="freeze", max_train_steps=3,
                                                            train_batch_size=8), progress=False)
    assert log["trainable_params"] == 0 and log["global_step"] == 3
    assert fixed_batch_loss(unet, pipe.scheduler, data8) == pytest.approx(before, abs=1e-7)


def test_trainable_params_is_the_count_the_mask_space_predicts(pipe, data8):
    from diffusers_memcontrol import MaskSpace

    space = MaskSpace.from_unet(pipe.unet, "difffit", "blocks")
    mask = space.mask("1" + "0" * (len(space.positions) - 1))
    unet = copy.deepcopy(pipe.unet)
    log = train(unet, pipe.scheduler, data8, FineTuneConfig(peft_method="difffit", mask=mask.to_dict(),
                                                            max_train_steps=1, train_batch_size=8), progress=False)
    assert log["trainable_params"] == space.count_trainable(mask, pipe.unet) > 0


@pytest.mark.parametrize("method", ["svdiff", "difffit", "attention", "lora", "full"])
def test_gradient_checkpointing_gives_the_same_adapter(pipe, data8, method):
    states = []
    for checkpointing in (False, True):
        unet = copy.deepcopy(pipe.unet)
        config = FineTuneConfig(peft_method=method, max_train_steps=2, train_batch_size=4,
                                learning_rate=LEARNING_RATES[method], gradient_checkpointing=checkpointing)
        train(unet, pipe.scheduler, data8, config, progress=False)
        states.append(_adapter_state(unet))
        assert not unet.is_gradient_checkpointing
    changed = [k for k in states[0] if not torch.equal(states[0][k], _adapter_state_init(pipe, method)[k])]
    assert changed, "the adapter did not train"
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=1e-6)


_INIT_CACHE: dict = {}


def _adapter_state_init(pipe, method):
    if method not in _INIT_CACHE:
        unet = copy.deepcopy(pipe.unet)
        unet.add_adapter(FineTuneConfig(peft_method=method).adapter_config())
        _INIT_CACHE[method] = _adapter_state(unet)
    return _INIT_CACHE[method]


def test_snr_gamma_noise_offset_v_prediction_ema_and_schedulers_run(pipe, data8):
    unet = copy.deepcopy(pipe.unet)
    config = FineTuneConfig(peft_method="difffit", max_train_steps=4, train_batch_size=4, snr_gamma=5.0,
                            noise_offset=0.05, prediction_type="v_prediction", use_ema=True, lr_scheduler="cosine",
                            lr_warmup_steps=2, gradient_accumulation_steps=2, scale_lr=True)
    log = train(unet, pipe.scheduler, data8, config, progress=False)
    assert log["global_step"] == 4 and all(torch.isfinite(torch.tensor(log["losses"])))
    assert log["learning_rate"] == pytest.approx(config.learning_rate * 2 * 4)
    assert pipe.scheduler.config.prediction_type == "epsilon"  # the pipeline's scheduler is not modified


def test_epochs_set_the_number_of_steps(pipe, data8):
    unet = copy.deepcopy(pipe.unet)
    config = FineTuneConfig(peft_method="lora", max_train_steps=None, num_train_epochs=2, train_batch_size=3)
    log = train(unet, pipe.scheduler, data8, config, progress=False)
    assert log["steps_per_epoch"] == 3 and log["global_step"] == 6 and log["num_train_epochs"] == 2


def test_training_on_fixed_tensors(pipe, data8):
    unet = copy.deepcopy(pipe.unet)
    latents = data8.latent_mean[data8.latent_rows[:, 0]]
    embeds = data8.prompt_embeds[data8.caption_rows]
    data = training_data_from_tensors(latents, embeds, data8.uncond_embeds)
    log = train(unet, pipe.scheduler, data, FineTuneConfig(max_train_steps=2, train_batch_size=4), progress=False)
    assert log["trainable_params"] > 0 and len(log["losses"]) == 2 and "final_loss" in log


def test_bf16_mixed_precision_keeps_fp32_masters(pipe, data8):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(mixed_precision="bf16")
        for method in ("svdiff", "freeze"):
            unet = copy.deepcopy(pipe.unet)
            config = FineTuneConfig(peft_method=method, max_train_steps=2, train_batch_size=4,
                                    gradient_checkpointing=True)
            log = train(unet, pipe.scheduler, data8, config, accelerator=accelerator, progress=False)
            assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
            assert all(p.dtype == torch.bfloat16 for p in unet.parameters() if not p.requires_grad)
            assert len(log["losses"]) == 2
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


# ------------------------------------------------------------------------------------------------ mitigations
def test_rwa_changes_captions_seeded_and_encodes_them(pipe, data8):
    from diffusers_memcontrol.trainer.batches import conditioning
    from diffusers_memcontrol.trainer.mitigation import RandomWordAugmentation

    rwa = RandomWordAugmentation(data8.tokenizer, num_words=4, p=1.0)
    idx = torch.arange(4)
    no_drop = torch.zeros(4, dtype=torch.bool)
    cached, n0 = conditioning(data8, idx, no_drop, None, None)
    augmented, n1 = conditioning(data8, idx, no_drop, rwa, 123)
    again, _ = conditioning(data8, idx, no_drop, rwa, 123)
    assert n0 == 0 and n1 == 4
    assert torch.equal(augmented, again)  # seeded
    assert all(not torch.allclose(augmented[i], cached[i]) for i in range(4))
    dropped, n2 = conditioning(data8, idx, torch.tensor([True, False, False, False]), rwa, 123)
    assert torch.equal(dropped[0], data8.uncond_embeds) and n2 == 3

    unet = copy.deepcopy(pipe.unet)
    log = train(unet, pipe.scheduler, data8, FineTuneConfig(max_train_steps=2, train_batch_size=4, mitigation="rwa",
                                                            caption_dropout=0.0), progress=False)
    assert log["rwa_augmented_captions"] == 8


def test_threshold_drops_samples(pipe, data8):
    unet = copy.deepcopy(pipe.unet)
    config = FineTuneConfig(max_train_steps=3, train_batch_size=8, mitigation="threshold", threshold="auto",
                            threshold_quantile=0.5, caption_dropout=0.0)
    log = train(unet, pipe.scheduler, data8, config, progress=False)
    stats = log["threshold"]
    assert stats["seen_samples"] == 24 and stats["dropped_samples"] >= 9 and log["skipped_steps"] == 0


def test_threshold_skips_and_counts_steps_where_everything_is_dropped(pipe, data8):
    unet = copy.deepcopy(pipe.unet)
    config = FineTuneConfig(max_train_steps=3, train_batch_size=4, mitigation="threshold", threshold=1e-9,
                            caption_dropout=0.0)
    log = train(unet, pipe.scheduler, data8, config, progress=False)
    assert log["skipped_steps"] == 3 and log["threshold"]["skipped_steps"] == 3 and log["losses"] == []
    init = _adapter_state_init(pipe, "svdiff")
    for key, value in _adapter_state(unet).items():  # nothing was updated
        assert torch.equal(value, init[key]), key


# ------------------------------------------------------------------------------------------------ checkpoints
def test_resume_from_checkpoint_gives_the_same_adapter(pipe, data_flip, tmp_path):
    config = FineTuneConfig(peft_method="svdiff", max_train_steps=6, train_batch_size=4, learning_rate=1e-2,
                            gradient_accumulation_steps=2, use_ema=True, lr_scheduler="cosine", lr_warmup_steps=1,
                            random_flip=True, caption_dropout=0.3, mitigation="threshold", seed=3)
    full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
    unet = copy.deepcopy(pipe.unet)
    log_full = train(unet, pipe.scheduler, data_flip, config, output_dir=full_dir, checkpointing_steps=3,
                     progress=False)
    assert [os.path.basename(c) for c in list_checkpoints(full_dir)] == ["checkpoint-3", "checkpoint-6"]
    uninterrupted = _adapter_state(unet)

    # a run "killed" after step 3: only checkpoint-3 exists; resuming with "latest" finishes the run
    os.makedirs(resumed_dir)
    shutil.copytree(os.path.join(full_dir, "checkpoint-3"), os.path.join(resumed_dir, "checkpoint-3"))
    unet2 = copy.deepcopy(pipe.unet)
    log_resumed = train(unet2, pipe.scheduler, data_flip, config, output_dir=resumed_dir,
                        resume_from_checkpoint="latest", progress=False)
    assert log_resumed["resumed_from"] == "checkpoint-3" and log_resumed["global_step"] == 6
    resumed = _adapter_state(unet2)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6)
    assert log_resumed["losses"] == pytest.approx(log_full["losses"], abs=1e-6)
    assert log_resumed["threshold"] == log_full["threshold"]


def test_checkpoints_total_limit_and_resolve(pipe, data8, tmp_path):
    out = str(tmp_path)
    assert resolve_checkpoint(out, "latest") is None  # nothing yet: start fresh
    with pytest.raises(FileNotFoundError, match="checkpoint-9"):
        resolve_checkpoint(out, "checkpoint-9")
    unet = copy.deepcopy(pipe.unet)
    train(unet, pipe.scheduler, data8, FineTuneConfig(peft_method="lora", max_train_steps=4, train_batch_size=4),
          output_dir=out, checkpointing_steps=1, checkpoints_total_limit=2, progress=False)
    assert [os.path.basename(c) for c in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert resolve_checkpoint(out, "latest").endswith("checkpoint-4")
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary folder left


def test_resume_with_another_method_fails_clearly(pipe, data8, tmp_path):
    unet = copy.deepcopy(pipe.unet)
    train(unet, pipe.scheduler, data8, FineTuneConfig(max_train_steps=1, train_batch_size=4), output_dir=str(tmp_path),
          checkpointing_steps=1, progress=False)
    with pytest.raises(ValueError, match="same --peft_method"):
        train(copy.deepcopy(pipe.unet), pipe.scheduler, data8,
              FineTuneConfig(peft_method="difffit", max_train_steps=2, train_batch_size=4),
              output_dir=str(tmp_path), resume_from_checkpoint="latest", progress=False)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(pipe, data8, tmp_path, monkeypatch):
    from diffusers_memcontrol.trainer import loop as training

    calls = {"n": 0}
    real = training.F.mse_loss

    def poisoned(*args, **kwargs):  # the third micro-batch's loss is NaN
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(training.F, "mse_loss", poisoned)
    unet = copy.deepcopy(pipe.unet)
    with pytest.raises(FloatingPointError, match=r"at step 3 .*checkpoint-2"):
        train(unet, pipe.scheduler, data8, FineTuneConfig(max_train_steps=5, train_batch_size=4),
              output_dir=str(tmp_path), checkpointing_steps=2, progress=False)
    assert [os.path.basename(c) for c in list_checkpoints(str(tmp_path))] == ["checkpoint-2"]
    assert not os.path.exists(tmp_path / "adapter_model.safetensors")
    ckpt = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in ckpt.values())


def test_save_adapter_refuses_non_finite_tensors(pipe, tmp_path):
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(FineTuneConfig(peft_method="difffit").adapter_config())
    next(p for p in unet.parameters() if p.requires_grad).data.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        save_adapter(unet, str(tmp_path))
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_missing_columns_list_the_available_ones(pipe, digits):
    with pytest.raises(ValueError, match=r"\['caption'\].*available columns: \['image', 'text', 'label'\]"):
        prepare_training_data(pipe, digits, "image", "caption", cache="memory", progress=False)


def test_empty_captions_are_refused_without_printing_captions(pipe, digits):
    bad = digits.select(range(4)).map(lambda row, i: {"text": "  " if i == 2 else row["text"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"first rows: \[2\]") as err:
        prepare_training_data(pipe, bad, cache="memory", progress=False)
    assert "handwritten" not in str(err.value)


def _file_dataset(tmp_path, contents: dict[str, bytes]):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    paths = []
    for name, payload in contents.items():
        path = tmp_path / name
        path.write_bytes(payload)
        paths.append(str(path))
    return Dataset.from_dict({"image": paths, "text": ["a caption"] * len(paths)}).cast_column("image", ImageFeature())


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_unreadable_and_missing_image_files_are_named(pipe, tmp_path):
    dataset = _file_dataset(tmp_path, {"ok.png": _png_bytes(), "notes.png": b"this is not an image"})
    with pytest.raises(ValueError, match=r"notes\.png.*row 1"):
        prepare_training_data(pipe, dataset, cache="memory", progress=False)
    dataset = _file_dataset(tmp_path, {"ok.png": _png_bytes(), "gone.png": _png_bytes()})
    os.remove(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        prepare_training_data(pipe, dataset, cache="memory", progress=False)


def test_a_mask_that_does_not_fit_names_the_expected_positions(pipe, tmp_path):
    with pytest.raises(ValueError, match=r"7 positions.*down_blocks\.0\.attentions\.0"):
        resolve_mask("101", pipe.unet, "svdiff", "blocks")
    foreign = {"method": "svdiff", "layout": "blocks", "positions": ["down_blocks.0.attentions.0", "other"],
               "bits": [1, 0]}
    path = tmp_path / "mask.json"
    path.write_text(json.dumps(foreign))
    with pytest.raises(ValueError, match="does not fit this UNet; expected layout 'blocks' with 7 positions"):
        resolve_mask(str(path), pipe.unet, "svdiff", "blocks")
    assert resolve_mask("1010101", pipe.unet, "svdiff", "blocks").bitstring == "1010101"


def test_an_adapter_for_another_base_is_refused_before_loading(pipe, tmp_path):
    from tests.conftest import make_small_unet

    other = make_small_unet()  # SD1.5-shaped (more transformer blocks)
    other.add_adapter(FineTuneConfig(peft_method="svdiff", mask_layout="blocks").adapter_config())
    save_adapter(other, str(tmp_path))
    unet = copy.deepcopy(pipe.unet)
    with pytest.raises(ValueError, match="trained for another base model.*expected layout 'blocks' with 7"):
        check_adapter_fits(unet, str(tmp_path))
    with pytest.raises(ValueError, match="does not fit this UNet.*another architecture"):
        load_adapter(unet, str(tmp_path))
    assert not getattr(unet, "peft_config", None)  # untouched


def test_adapter_round_trip(pipe, data8, tmp_path):
    unet = copy.deepcopy(pipe.unet)
    train(unet, pipe.scheduler, data8, FineTuneConfig(peft_method="lora", max_train_steps=2, train_batch_size=4,
                                                      learning_rate=1e-2), progress=False)
    save_adapter(unet, str(tmp_path))
    fresh = copy.deepcopy(pipe.unet)
    load_adapter(fresh, str(tmp_path))
    before, after = _adapter_state(unet), _adapter_state(fresh)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_config_json_round_trip_and_validation():
    config = FineTuneConfig(peft_method="difffit", threshold="2.5", mitigation="threshold", snr_gamma=5.0)
    assert config.threshold == 2.5
    assert FineTuneConfig.from_json(config.to_json()) == config
    assert parse_threshold("auto") == "auto" and parse_threshold(2) == 2.0
    for bad in ({"threshold": "high"}, {"mitigation": "blur"}, {"peft_method": "ia3"}, {"lr_scheduler": "step"},
                {"gradient_accumulation_steps": 0}, {"prediction_type": "sample"}, {"max_train_steps": None}):
        with pytest.raises(ValueError):
            FineTuneConfig(**bad)


def test_mask_from_a_hub_repo_in_the_cache(tmp_path, monkeypatch):
    """`--mask ORG/NAME` resolves a published mask through huggingface_hub (here: its offline cache)."""
    from diffusers import UNet2DConditionModel

    from diffusers_memcontrol import MaskSpace
    from diffusers_memcontrol.data.tiny_base import tiny_base_path
    from diffusers_memcontrol.hub.adapters import resolve_mask
    from tests.test_loaders import write_hf_cache

    unet = UNet2DConditionModel.from_pretrained(tiny_base_path(), subfolder="unet")
    mask = MaskSpace.from_unet(unet, "difffit", "paper").mask("10110")
    write_hf_cache(str(tmp_path / "hub"), "hospital/cxr-mask", {"mask.json": mask.to_json().encode()})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert resolve_mask("hospital/cxr-mask", unet, "difffit", "paper") == mask
