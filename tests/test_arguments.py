"""The command line: presets, the dispatch between one fine-tune and the whole method, and README's commands."""

import os
import re
import runpy

import pytest

from diffusers_memcontrol.errors import InputError
from diffusers_memcontrol.search.arguments import (
    PRESETS,
    expand_preset,
    parse_search_args,
    runs_whole_method,
    stage2_args,
)
from diffusers_memcontrol.trainer.arguments import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_preset_expands_in_place_and_later_flags_override_it(capsys):
    argv = expand_preset(["--preset", "quickstart", "--output_dir", "elsewhere", "--n_trials", "2"])
    assert argv[:len(PRESETS["quickstart"])] == PRESETS["quickstart"]
    assert "--preset" not in argv and argv[-4:] == ["--output_dir", "elsewhere", "--n_trials", "2"]
    assert " ".join(PRESETS["quickstart"]) in capsys.readouterr().out  # printed, to copy and change
    args, train_args = parse_search_args(argv)
    assert args.output_dir == "elsewhere" and args.n_trials == 2 and args.search  # the last value wins, as argparse
    assert train_args[train_args.index("--max_train_steps") + 1] == "250"
    assert expand_preset(["--search"]) == ["--search"]  # no preset: unchanged


def test_an_unknown_preset_is_a_user_error():
    with pytest.raises(InputError, match=r"--preset 'nope': unknown preset; expected one of quickstart, transfer"):
        expand_preset(["--preset", "nope"])
    with pytest.raises(InputError, match=r"--preset None"):
        expand_preset(["--preset"])


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_is_a_whole_method_run_and_its_fine_tunes_parse(name):
    argv = expand_preset(["--preset", name])
    assert runs_whole_method(argv) and not runs_whole_method(["--peft_method", "svdiff"])
    _, train_args = parse_search_args(argv)
    assert parse_args(train_args).dmem_unique_captions


def test_the_transfer_preset_runs_the_quickstarts_stage_2_on_as_many_animal_rows():
    _, train_args = parse_search_args(expand_preset(["--preset", "transfer"]))
    quickstart = parse_args(parse_search_args(expand_preset(["--preset", "quickstart"]))[1])
    transfer = parse_args(train_args)
    assert transfer.dataset_name == "animal-mnist" and quickstart.dataset_name is None  # digits
    for name in ("max_train_steps", "train_batch_size", "learning_rates", "dmem_size", "dmem_repeats"):
        assert getattr(transfer, name) == getattr(quickstart, name), name
    from diffusers_memcontrol.trainer.arguments import load_splits

    quickstart.eval = True  # every run of the search evaluates, so its rows are split
    digits_rows = len(load_splits(quickstart)[0]["train"])
    assert transfer.max_train_samples == digits_rows  # so D_mem's duplicates stay a quarter of the rows


def test_the_trainer_refuses_the_whole_method_flags_with_a_pointer():
    for flag in ("--search", "--final", "--preset"):
        with pytest.raises(InputError, match=r"run the whole method: use `python training/train_memcontrol.py"):
            parse_args([flag] + (["quickstart"] if flag == "--preset" else []))


def test_the_example_script_dispatches(monkeypatch):
    script = runpy.run_path(os.path.join(ROOT, "training", "train_memcontrol.py"), run_name="example")
    calls = []
    monkeypatch.setitem(script["main"].__globals__, "main_search", lambda argv: calls.append(("search", argv)))
    monkeypatch.setitem(script["main"].__globals__, "train_one", lambda argv: calls.append(("train", argv)))
    script["main"](["--peft_method", "difffit"])
    script["main"](["--final", "--mask", "m.json"])
    script["main"](["--preset", "quickstart"])
    assert [c[0] for c in calls] == ["train", "search", "search"]
    assert calls[0][1] == ["--peft_method", "difffit"] and calls[2][1] == PRESETS["quickstart"]


def test_readme_quickstart_is_one_short_command():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    first = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1)
    run = first.split(" && ")[-1]
    assert run == "python training/train_memcontrol.py --preset quickstart" and len(run) <= 160
    assert len(readme.splitlines()) <= 250
    assert readme.index(run) < len("\n".join(readme.splitlines()[:40]))  # the quickstart is on the first screen


def test_rows_are_held_out_only_when_something_is_evaluated(tmp_path, caplog):
    """diffusers' script trains on every row; the validation and test splits are carved out for --eval only."""
    import json
    import logging

    from PIL import Image

    from diffusers_memcontrol.trainer.arguments import load_splits

    rows = []
    for i in range(20):
        Image.new("RGB", (8, 8), (i * 12, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"row {i}"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    argv = ["--train_data_dir", str(tmp_path), "--validation_fraction", "0.1", "--test_fraction", "0.2"]
    with caplog.at_level(logging.INFO, logger="diffusers_memcontrol.trainer.arguments"):
        plain, _ = load_splits(parse_args(argv))
        assert len(plain["train"]) == 20 and not [r for r in caplog.records if "Splits" in r.getMessage()]
        evaluated, _ = load_splits(parse_args([*argv, "--eval"]))
    assert {k: len(v) for k, v in evaluated.items()} == {"train": 14, "validation": 2, "test": 4}
    logged = [r.getMessage() for r in caplog.records if "Splits" in r.getMessage()]
    assert logged == ["Splits: train 14, validation 2, test 4 rows."]


def test_a_held_out_stage_2_keeps_the_splits_and_draws_other_dmem_pairs_and_seeds():
    from diffusers_memcontrol.trainer.arguments import build_sets, load_splits

    args, train_args = parse_search_args(["--search", "--stage2_holdout", "--seed", "3", "--dmem_size", "5"])
    assert stage2_args(args, train_args)[-6:] == ["--split_seed", "3", "--seed", "4", "--dmem_block", "1"]
    search = parse_args([*train_args, "--eval"])
    final = parse_args([*stage2_args(args, train_args), "--eval"])
    assert final.seed == 4 and final.split_seed == 3
    (search_splits, _), (final_splits, _) = load_splits(search), load_splits(final)
    for name in ("train", "validation", "test"):  # the search's splits: nothing the choice saw moves into test
        assert search_splits[name]["text"] == final_splits[name]["text"]
    search_dmem, final_dmem = build_sets(search, search_splits)[1], build_sets(final, final_splits)[1]
    assert len(final_dmem) == 5 and not set(search_dmem["dmem_index"]) & set(final_dmem["dmem_index"])
    no_holdout, train_args = parse_search_args(["--search", "--seed", "3"])
    assert stage2_args(no_holdout, train_args) == train_args
    with pytest.raises(InputError, match="--dmem_block is set by --stage2_holdout"):
        parse_search_args(["--search", "--stage2_holdout", "--dmem_block", "2"])
