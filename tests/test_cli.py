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


def test_unknown_command_fails():
    with pytest.raises(SystemExit):
        main(["bogus"])


def test_transfer_and_search_reach_the_runner(capsys):
    with pytest.raises(SystemExit):
        main(["transfer", "--max_train_steps", "1"])  # no --mask: nothing to transfer
    assert "--final --mask MASK" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "--mask", "best_mask.json"])
    assert "pass one of them" in capsys.readouterr().err


def test_masks_lists_the_builtin_masks_through_the_real_command():
    import subprocess
    import sys

    from diffusers_memcontrol.masks import builtin_masks

    done = subprocess.run([sys.executable, "-m", "diffusers_memcontrol.cli", "masks"], capture_output=True, text=True,
                          check=True)
    for builtin in builtin_masks().values():
        entry = done.stdout.split(builtin.spec + "\n", 1)[1].split("\n\n", 1)[0]
        assert builtin.source in entry and "Sec. 4.5" in entry
        assert f"method: {builtin.mask.method}, layout: {builtin.mask.layout}, scope: {builtin.scope}" in entry
        assert f"trainable: {builtin.trainable_params:,} of {builtin.unet_params:,}" in entry
        assert builtin.description in entry and builtin.mask.bitstring in entry


def test_masks_json(capsys):
    from diffusers_memcontrol.masks import Mask, builtin_masks

    assert main(["masks", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == [b.spec for b in builtin_masks().values()]
    for entry in listed:
        assert Mask.load(entry["name"]).bitstring == entry["bitstring"]
        assert {"source", "description", "method", "layout", "scope", "base_model", "trainable_params"} <= set(entry)
