"""MemControl end to end on the shipped tiny base: search (real trainer trials), choice, stage 2, table, plot.

Budgets are minimal (a few steps, a handful of images): this checks the wiring and the artifacts, not the figures.
"""

import json
import os

import pytest

from diffusers_memcontrol import Mask
from diffusers_memcontrol.runner import main_search, parse_search_args

TINY_RUN = ["--max_train_steps", "3", "--train_batch_size", "8", "--dmem_size", "4", "--dmem_repeats", "2",
            "--proxy_fraction", "0.05", "--dmem_unique_captions", "--eval_num_prompts", "4",
            "--eval_extraction_generations", "4", "--eval_inference_steps", "2"]


def test_search_final_and_table(tmp_path):
    out = str(tmp_path / "run")
    result = main_search(["--search", "--search_space", "difffit", "--mask_layout", "paper", "--n_trials", "2",
                          "--population_size", "2", "--baselines", "freeze", "--mitigations", "none",
                          "--output_dir", out, *TINY_RUN])
    chosen = result["search"]["chosen"]
    best = Mask.load(os.path.join(out, "best_mask.json"))
    assert best.to_dict() == chosen["mask"] and best.method == "difffit"
    assert chosen["row"] in result["search"]["front"]  # the chosen mask is on the front
    assert open(os.path.join(out, "pareto.png"), "rb").read(4) == b"\x89PNG"
    assert "Full FT" in result["pareto_baselines"]
    rows = json.load(open(os.path.join(out, "results.json")))
    assert [(r["method"], r["mitigation"]) for r in rows] == [("freeze", "none"), ("memcontrol", "none")]
    for row in rows:
        for key in ("fid", "amd", "dmem", "trainable_params", "extracted_images"):
            assert key in row
    assert rows[0]["trainable_params"] == 0 and rows[1]["trainable_params"] > 0
    table = open(os.path.join(out, "results.md")).read()
    assert "| Freeze |" in table and "| MemControl |" in table
    for name in ("trials.csv", "pareto.json"):
        assert os.path.exists(os.path.join(out, "search", "difffit", name))


def test_search_arguments_are_checked():
    with pytest.raises(SystemExit):
        parse_search_args(["--search", "--mask", "101"])
    with pytest.raises(ValueError, match="Unknown or unsearchable"):
        main_search(["--search", "--search_space", "full", "--output_dir", "/tmp/unused-memcontrol"])
