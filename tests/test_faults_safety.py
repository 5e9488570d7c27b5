"""Adapters, caches and publications under hostile or broken input (issue 19, items 5, 6, 7, 10 and 11)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_memcontrol.hub.adapters import save_adapter
from diffusers_memcontrol.hub.loaders import load_unet_adapter
from diffusers_memcontrol.hub.publish import DOWNLOAD_PATTERNS, MemControlRepoError, publish
from diffusers_memcontrol.trainer.config import FineTuneConfig
from tests.test_hub import output_dir  # noqa: F401 - the fixture
from tests.test_loaders import make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_unet():
    return make_tiny_pipeline().unet


@pytest.fixture(scope="module")
def adapter_dir(base_unet, tmp_path_factory):
    unet = copy.deepcopy(base_unet)
    unet.add_adapter(FineTuneConfig(peft_method="svdiff").adapter_config())
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "memcontrol_" in name:
                p.fill_(0.01)
    folder = str(tmp_path_factory.mktemp("adapter"))
    save_adapter(unet, folder)
    return folder


def _copy(adapter_dir, tmp_path) -> str:
    import shutil

    shutil.copytree(adapter_dir, tmp_path / "a")
    return str(tmp_path / "a")


def _poison(folder: str, value: float) -> None:
    path = os.path.join(folder, "adapter_model.safetensors")
    state = load_file(path)
    key = min(state)
    state[key] = torch.full_like(state[key], value)
    save_file(state, path, metadata={"format": "pt"})


def _base_state(unet) -> dict:
    return {k: v.clone() for k, v in unet.state_dict().items()}


# ------------------------------------------------------------------------------------------------ item 5
@pytest.mark.parametrize(("value", "dtype"), [(float("nan"), torch.float32), (float("inf"), torch.float32),
                                              (1e30, torch.float16)])
def test_non_finite_adapter_is_refused_before_the_unet_is_touched(base_unet, adapter_dir, tmp_path, value, dtype):
    folder = _copy(adapter_dir, tmp_path)
    _poison(folder, value)
    unet = copy.deepcopy(base_unet).to(dtype)
    before = _base_state(unet)
    with pytest.raises(MemControlRepoError, match="NaN or infinite|overflows"):
        load_unet_adapter(unet, folder, local_files_only=True)
    assert not getattr(unet, "peft_config", None)
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fuse_that_overflows_is_rolled_back(base_unet, adapter_dir, tmp_path):
    trained = copy.deepcopy(base_unet)
    trained.add_adapter(FineTuneConfig(peft_method="difffit").adapter_config())
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "memcontrol_" in name:
                p.fill_(3e38)  # finite, but (bias + 3e38) * gamma 3e38 is not
    folder = str(tmp_path / "huge")
    save_adapter(trained, folder)
    unet = copy.deepcopy(base_unet)
    before = _base_state(unet)
    with pytest.raises(MemControlRepoError, match="cannot be fused"):
        load_unet_adapter(unet, folder, fuse=True, local_files_only=True)
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    load_unet_adapter(unet, adapter_dir, fuse=True, local_files_only=True)  # the next load works (no NaN left)


@pytest.mark.parametrize("broken", ["adapter_model.safetensors", "adapter_config.json"])
def test_truncated_files_raise_a_repo_error_naming_the_file(base_unet, adapter_dir, tmp_path, broken):
    folder = _copy(adapter_dir, tmp_path)
    path = os.path.join(folder, broken)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])
    with pytest.raises(MemControlRepoError, match=broken.replace(".", r"\.")):
        load_unet_adapter(copy.deepcopy(base_unet), folder, local_files_only=True)


# ------------------------------------------------------------------------------------------------ item 10
def test_hub_download_patterns_match_top_level_files_only():
    from huggingface_hub.utils import filter_repo_objects

    names = ["mask.json", "adapter_config.json", "adapter_model.safetensors", "README.md", "metrics.json",
             "big/1.safetensors", "deep/er/x.json", "sub/mask.json", "other.json", "pytorch_model.bin"]
    kept = set(filter_repo_objects(names, allow_patterns=DOWNLOAD_PATTERNS))
    assert kept == {"mask.json", "adapter_config.json", "adapter_model.safetensors", "README.md", "metrics.json"}


def test_poisoned_svd_cache_file_is_not_used(monkeypatch, tmp_path):
    from diffusers_memcontrol.tuners.memcontrol import svd_cache

    monkeypatch.setenv("MEMCONTROL_CACHE_DIR", str(tmp_path))
    weight = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    svd_cache.layer_svd(weight)  # computed and cached
    path = svd_cache.svd_cache_path(svd_cache.weight_key(weight))
    other = torch.linalg.svd(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), full_matrices=False)
    save_file({"u": other[0].contiguous(), "s": other[1].contiguous(), "vh": other[2].contiguous()}, path)
    with pytest.warns(UserWarning, match="do not reproduce the weight"):
        u2, s2, vh2 = svd_cache.layer_svd(weight)
    torch.testing.assert_close((u2 * s2) @ vh2, weight, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_interrupted_save_adapter_never_mixes_versions(base_unet, adapter_dir, tmp_path, monkeypatch, fail_at):
    """A save that dies at its n-th rename leaves the old adapter whole (or no folder), never new weights beside an
    old config."""
    from diffusers_memcontrol.hub import adapters as adapters

    folder = _copy(adapter_dir, tmp_path)
    old = {n: Path(folder, n).read_bytes() for n in os.listdir(folder)}
    unet = copy.deepcopy(base_unet)
    unet.add_adapter(FineTuneConfig(peft_method="svdiff").adapter_config())
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "memcontrol_" in name:
                p.fill_(-0.02)  # another version of the same adapter
    calls = {"n": 0}

    def dying(real):
        def rename(src, dst):  # every rename counts, whichever call (os.replace or os.rename) makes it
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise KeyboardInterrupt
            real(src, dst)
        return rename

    monkeypatch.setattr(adapters.os, "replace", dying(os.replace))
    monkeypatch.setattr(adapters.os, "rename", dying(os.rename))
    with pytest.raises(KeyboardInterrupt):
        save_adapter(unet, folder)
    monkeypatch.undo()
    if os.path.exists(folder):
        now = {n: Path(folder, n).read_bytes() for n in os.listdir(folder)}
        assert now == old


# ------------------------------------------------------------------------------------------------ item 11
@pytest.mark.parametrize("method", ["svdiff", "difffit", "attention", "lora", "full"])
def test_loading_a_trained_adapter_never_changes_the_base(method, tmp_path):
    """peft's generic test_parameters_after_loading_model, on the small UNet (3 SGD steps, save, load)."""
    from peft import PeftModel, get_peft_model

    from diffusers_memcontrol import MemControlConfig
    from tests.conftest import make_small_unet

    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([10]),
              torch.randn(1, 5, 32, generator=generator))
    model = get_peft_model(make_small_unet(layers_per_block=1), MemControlConfig(method=method))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model(*inputs).sample.sum().backward()
        optimizer.step()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in trained.values())
    model.save_pretrained(tmp_path)
    pristine = make_small_unet(layers_per_block=1).state_dict()
    loaded = PeftModel.from_pretrained(make_small_unet(layers_per_block=1), tmp_path).state_dict()
    assert loaded.keys() == trained.keys()
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value, atol=1e-4, rtol=1e-4)
        base_key = key.removeprefix("base_model.model.").replace(".base_layer", "")
        if "memcontrol_" not in key:
            assert torch.equal(loaded[key], pristine[base_key]), key


# ------------------------------------------------------------------------------------------------ item 7
def test_publish_refuses_to_replace_another_runs_folder(output_dir, tmp_path):  # noqa: F811
    folder, _ = output_dir
    other_run = tmp_path / "other-run"
    (other_run / "checkpoint-4").mkdir(parents=True)
    (other_run / "mask.json").write_text(Path(folder, "mask.json").read_text())
    (other_run / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"weights of days of training")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        publish(folder, "org/x", dry_run=True, local_dir=other_run)
    assert (other_run / "checkpoint-4" / "adapter_model.safetensors").exists()

    repo = tmp_path / "repo"
    publish(folder, "org/x", dry_run=True, local_dir=repo)
    publish(folder, "org/x", dry_run=True, local_dir=repo)  # an unchanged earlier publication is replaced
    (repo / "notes.md").write_text("added by hand")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        publish(folder, "org/x", dry_run=True, local_dir=repo)
    assert (repo / "notes.md").exists()


# ------------------------------------------------------------------------------------------------ item 6
def test_publish_never_uploads_run_arguments(output_dir, tmp_path):  # noqa: F811
    folder, _ = output_dir
    (folder / "run_args.json").write_text(json.dumps(["--hub_token", "hf_secret"]))
    (folder / "training_config.json").write_text(json.dumps({"run": {"seed": 1}}))
    (folder / "final" / "full-none" / "run_args.json").write_text(json.dumps(["--hub_token", "hf_secret"]))
    repo = tmp_path / "repo"
    publish(folder, "org/x", dry_run=True, local_dir=repo, include_samples=True)
    names = {os.path.basename(p) for p, _, _ in os.walk(repo)} | {n for _, _, fs in os.walk(repo) for n in fs}
    assert "run_args.json" not in names and "training_config.json" not in names
    assert b"hf_secret" not in b"".join(Path(d, n).read_bytes() for d, _, fs in os.walk(repo) for n in fs)


def test_run_args_keep_no_token_or_prompt_and_compare_by_digest(tmp_path, monkeypatch):
    from diffusers_memcontrol.search import claims as runs
    from diffusers_memcontrol.search.trial_result import TrialResult

    args = ["--seed", "1", "--hub_token", "hf_secret", "--validation_prompts", "patient 42 x-ray", "chest",
            "--max_train_steps", "2"]
    calls = []

    def fake_trainer(argv, run_dir, **kwargs):  # a finished run: trial_result.json written last
        calls.append(argv)
        result = TrialResult(dmem=None, fid=1.0, trainable_params=0, global_step=2, train_samples=8,
                             dmem_exposures=None, metrics={"fid": 1.0})
        result.save(run_dir)
        return result

    monkeypatch.setattr(runs, "run_trainer", fake_trainer)
    run_dir = str(tmp_path / "row")
    runs.run_or_reuse(args, run_dir)
    text = Path(run_dir, "run_args.json").read_text(encoding="utf-8")
    assert "hf_secret" not in text and "patient 42" not in text and "chest" not in text
    assert runs.run_or_reuse(args, run_dir).fid == 1.0 and len(calls) == 1  # same arguments: reused
    runs.run_or_reuse([*args[:3], "hf_other", *args[4:]], run_dir)  # another token: not the same run
    assert len(calls) == 2


def test_storage_password_is_redacted_in_error_lines(capsys):
    from diffusers_memcontrol.errors import InputError, run_command

    def main(argv):
        raise InputError("--storage 'postgresql://alice:s3cret@db.example:5432/optuna': could not connect")

    with pytest.raises(SystemExit):
        run_command(main, [])
    err = capsys.readouterr().err
    assert "s3cret" not in err and "postgresql://***@db.example:5432/optuna" in err
