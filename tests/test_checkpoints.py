"""Checkpoints hold no pickle, are checked against their manifest before anything loads, and rotate only after the
new one is complete (issue 19, items 3 and 4)."""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import pytest

from diffusers_memcontrol.trainer import loop as training
from diffusers_memcontrol.trainer.checkpoints import list_checkpoints, resolve_checkpoint
from diffusers_memcontrol.trainer.config import FineTuneConfig
from diffusers_memcontrol.trainer.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = {"peft_method": "svdiff", "max_train_steps": 2, "train_batch_size": 4, "learning_rate": 1e-2,
          "use_ema": True}


@pytest.fixture(scope="module")
def saved(pipe, data8, tmp_path_factory):
    """A run with checkpoint-1 and checkpoint-2 (the folder is copied by tests that change it)."""
    out = str(tmp_path_factory.mktemp("run"))
    train(copy.deepcopy(pipe.unet), pipe.scheduler, data8, FineTuneConfig(**CONFIG), output_dir=out,
          checkpointing_steps=1, progress=False)
    return out


def _copy(saved, tmp_path) -> str:
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(saved, out)
    return out


def _resume(pipe, data8, out, spec="latest", steps=3):
    return train(copy.deepcopy(pipe.unet), pipe.scheduler, data8, FineTuneConfig(**{**CONFIG, "max_train_steps": steps}),
                 output_dir=out, resume_from_checkpoint=spec, progress=False)


def test_checkpoint_holds_safetensors_json_and_a_manifest_only(saved):
    folder = os.path.join(saved, "checkpoint-2")
    names = sorted(os.listdir(folder))
    assert all(n.endswith((".json", ".safetensors")) for n in names), names
    manifest = json.loads(Path(folder, "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    assert {"optimizer.safetensors", "lr_scheduler.json", "ema.safetensors", "rng.json", "train_state.json",
            "adapter_model.safetensors"} <= set(names)


def test_planted_pickle_never_runs_and_the_checkpoint_is_refused(pipe, data8, saved, tmp_path):
    out = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        with open(os.path.join(out, "checkpoint-2", name), "wb") as f:
            pickle.dump(Payload(), f)
    log = _resume(pipe, data8, out)  # latest skips the changed checkpoint-2 for checkpoint-1
    assert not marker.exists()
    assert log["resumed_from"] == "checkpoint-1" and log["global_step"] == 3
    from diffusers_memcontrol.errors import InputError

    with pytest.raises(InputError, match="does not match its manifest"):
        resolve_checkpoint(out, "checkpoint-2")
    assert not marker.exists()


@pytest.mark.parametrize("change", ["no_manifest", "changed_tensor", "truncated"])
def test_named_checkpoint_that_does_not_match_is_refused(saved, tmp_path, change):
    from diffusers_memcontrol.errors import InputError

    out = _copy(saved, tmp_path)
    folder = os.path.join(out, "checkpoint-2")
    if change == "no_manifest":
        os.remove(os.path.join(folder, "manifest.json"))
    else:
        path = os.path.join(folder, "optimizer.safetensors")
        data = Path(path).read_bytes()
        data = data[:len(data) // 2] if change == "truncated" else data[:-4] + b"\x00\x00\x80\x7f"
        Path(path).write_bytes(data)
    with pytest.raises(InputError, match="manifest"):
        resolve_checkpoint(out, folder)
    assert resolve_checkpoint(out, "latest").endswith("checkpoint-1")


def test_kill_during_save_with_limit_1_keeps_the_previous_checkpoint(pipe, data8, tmp_path, monkeypatch):
    """A save that dies half-way (here: the optimizer state fails to write) leaves the previous checkpoint in place,
    and `latest` resumes from it, not from step 0."""
    out = str(tmp_path)
    real = training.write_state_part

    def dying(folder, name, state):
        if name == "optimizer" and os.path.basename(folder).startswith(".checkpoint-2"):
            raise KeyboardInterrupt  # stands for a kill: nothing after this line runs
        real(folder, name, state)

    monkeypatch.setattr(training, "write_state_part", dying)
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(pipe.unet), pipe.scheduler, data8, FineTuneConfig(**CONFIG), output_dir=out,
              checkpointing_steps=1, checkpoints_total_limit=1, progress=False)
    monkeypatch.undo()
    assert [os.path.basename(c) for c in list_checkpoints(out)] == ["checkpoint-1"]
    assert _resume(pipe, data8, out)["resumed_from"] == "checkpoint-1"


def test_latest_skips_an_incomplete_newest_checkpoint_with_a_log_line(saved, tmp_path, caplog):
    out = _copy(saved, tmp_path)
    os.makedirs(os.path.join(out, "checkpoint-7"))
    Path(out, "checkpoint-7", "adapter_model.safetensors").write_bytes(b"partial")
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(out, "latest").endswith("checkpoint-2")
    assert "checkpoint-7" in caplog.text


def test_resumed_state_matches_the_saved_one(pipe, data8, saved, tmp_path):
    """Optimizer, LR schedule, EMA and the position come back exactly (no pickle involved)."""
    out = _copy(saved, tmp_path)
    full = str(tmp_path / "full")
    unet = copy.deepcopy(pipe.unet)
    log_full = train(unet, pipe.scheduler, data8, FineTuneConfig(**{**CONFIG, "max_train_steps": 3}), output_dir=full,
                     checkpointing_steps=1, progress=False)
    log = _resume(pipe, data8, out, spec=os.path.join(out, "checkpoint-2"))
    assert log["resumed_from"] == "checkpoint-2" and log["losses"] == pytest.approx(log_full["losses"], abs=1e-6)
