import json
import os

import pytest
from diffusers import UNet2DConditionModel

from diffusers_memcontrol import MaskSpace, MemControlConfig
from diffusers_memcontrol.cli import main
from diffusers_memcontrol.data.tiny_base import tiny_base_path
from diffusers_memcontrol.hub.adapters import save_adapter


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

    from diffusers_memcontrol.search.launching import trainer_command

    assert trainer_command() == [sys.executable, "-m", "diffusers_memcontrol.train"]


def test_masks_lists_the_builtin_masks_through_the_real_command():
    import subprocess
    import sys

    from diffusers_memcontrol.tuners.memcontrol.builtin_masks import builtin_masks

    done = subprocess.run([sys.executable, "-m", "diffusers_memcontrol.cli", "masks"], capture_output=True, text=True,
                          check=True)
    for builtin in builtin_masks().values():
        entry = done.stdout.split(builtin.spec + "\n", 1)[1].split("\n\n", 1)[0]
        assert builtin.source in entry and "Sec. 4.5" in entry
        assert f"method: {builtin.mask.method}, layout: {builtin.mask.layout}, scope: {builtin.scope}" in entry
        assert f"trainable: {builtin.trainable_params:,} of {builtin.unet_params:,}" in entry
        assert builtin.description in entry and builtin.mask.bitstring in entry


def test_masks_json(capsys):
    from diffusers_memcontrol.tuners.memcontrol.builtin_masks import builtin_mask, builtin_masks

    assert main(["masks", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == [b.spec for b in builtin_masks().values()]
    for entry in listed:
        assert builtin_mask(entry["name"]).mask.bitstring == entry["bitstring"]
        assert {"source", "description", "method", "layout", "scope", "base_model", "trainable_params"} <= set(entry)
