import json
import os

import pytest
from diffusers import UNet2DConditionModel

from diffusers_memcontrol import MaskSpace, MemControlConfig
from diffusers_memcontrol.cli import main
from diffusers_memcontrol.tiny_base import tiny_base_path
from diffusers_memcontrol.training import save_adapter


def test_mask_space_lists_positions(capsys):
    assert main(["mask-space", "--peft_method", "svdiff", "--mask_layout", "blocks", "--mask", "1000000"]) == 0
    report = json.loads(capsys.readouterr().out)
    unet = UNet2DConditionModel.from_pretrained(tiny_base_path(), subfolder="unet")
    space = MaskSpace.from_unet(unet, "svdiff", "blocks")
    assert report["positions"] == space.positions and report["bits"] == [1, 0, 0, 0, 0, 0, 0]
    assert report["trainable_params"] == space.count_trainable(space.mask("1000000"), unet)


def test_publish_dry_run(tmp_path, capsys):
    unet = UNet2DConditionModel.from_pretrained(tiny_base_path(), subfolder="unet")
    unet.add_adapter(MemControlConfig(method="difffit"))
    save_adapter(unet, str(tmp_path / "run"))
    (tmp_path / "run" / "captions.txt").write_text("a private report")
    assert main(["publish", str(tmp_path / "run"), "--repo_id", "org/name", "--dry_run",
                 "--local_dir", str(tmp_path / "repo")]) == 0
    files = set(os.listdir(tmp_path / "repo"))
    assert {"mask.json", "adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert "captions.txt" not in files


def _fails_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_unknown_command_fails(capsys):
    _fails_with_one_line(capsys, ["bogus"], "invalid choice: 'bogus'")


def test_transfer_and_search_reach_the_runner(capsys):
    _fails_with_one_line(capsys, ["transfer", "--max_train_steps", "1"], "--final --mask MASK")  # no --mask
    _fails_with_one_line(capsys, ["search", "--mask", "best_mask.json"], "pass one of them")


def test_train_runs_the_installed_trainer(capsys):
    _fails_with_one_line(capsys, ["train", "--mask_layout", "rows"], "invalid choice: 'rows'")
    _fails_with_one_line(capsys, ["train", "--n_trials", "3"], "--n_trials is a search flag")


def test_search_help_lists_the_trainer_and_search_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in ("--n_trials", "--storage", "--search_space", "--learning_rate", "--dataset_config_name"):
        assert flag in out, flag


def test_the_search_runs_the_installed_module_not_a_checkout_path():
    import sys

    from diffusers_memcontrol.search import trainer_command

    assert trainer_command() == [sys.executable, "-m", "diffusers_memcontrol.train"]
