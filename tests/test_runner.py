"""MemControl end to end on the shipped tiny base: search (real trainer trials), choice, stage 2, table, plot.

Budgets are minimal (a few steps, a handful of images): this checks the wiring and the artifacts, not the figures.
"""

import json
import math
import os

import pytest

from diffusers_memcontrol import Mask
from diffusers_memcontrol.errors import InputError
from diffusers_memcontrol.search.stages import main_search, parse_search_args


def _read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def _json(path):
    return json.loads(_read(path))


TINY_RUN = ["--max_train_steps", "3", "--train_batch_size", "8", "--dmem_size", "4", "--dmem_repeats", "2",
            "--proxy_fraction", "0.05", "--dmem_unique_captions", "--eval_num_prompts", "4",
            "--eval_extraction_generations", "4", "--eval_inference_steps", "2"]


def test_search_final_and_table(tmp_path):
    out = str(tmp_path / "run")
    result = main_search(["--search", "--search_space", "difffit", "--mask_layout", "paper", "--n_trials", "2",
                          "--population_size", "2", "--baselines", "freeze", "--mitigations", "none",
                          "--search_memorization_objective", "cliques", "--search_quality_objective", "agreement",
                          "--n_workers", "2", "--output_dir", out, *TINY_RUN])
    chosen = result["search"]["chosen"]
    best = Mask.load(os.path.join(out, "best_mask.json"))
    assert best.to_dict() == chosen["mask"] and best.method == "difffit"
    assert chosen["row"] in result["search"]["front"]  # the chosen mask is on the front
    assert _read(os.path.join(out, "pareto.png"), "rb")[:4] == b"\x89PNG"
    summary = _json(os.path.join(out, "search_summary.json"))
    assert (summary["memorization_metric"], summary["quality_metric"]) == ("cliques", "agreement")
    full_ft = _json(os.path.join(out, "trials", "full-ft", "trial_result.json"))["metrics"]
    # the plot's Full FT point is in the trials' units: clique share and 1 - agreement, not d_mem and FID
    assert tuple(result["pareto_baselines"]["Full FT"]) == (full_ft["memorization_objective"],
                                                           full_ft["quality_objective"])
    for t in summary["trials"]:  # the objectives, then the trial's own d_mem and FID beside them
        assert 0 <= t["memorization_objective"] <= 1 and 0 <= t["quality_objective"] <= 1
        assert t["dmem"] is not None and t["fid"] is not None
        # the binomial standard error of 1 - agreement over the 4 validation prompts
        q = t["quality_objective"]
        assert t["quality_objective_se"] == pytest.approx(math.sqrt(q * (1 - q) / 4))
    assert chosen["quality_objective_se"] == summary["trials"][chosen["row"]]["quality_objective_se"]
    rows = _json(os.path.join(out, "results.json"))
    assert [(r["method"], r["mitigation"]) for r in rows] == [("ceiling", "none"), ("freeze", "none"),
                                                              ("memcontrol", "none")]
    ceiling, rows = rows[0], rows[1:]
    assert ceiling["fid"] < rows[0]["fid"] and ceiling["in_domain"] >= 0.9  # above the floor; digits through the VAE
    for row in rows:
        for key in ("fid", "amd", "dmem", "trainable_params", "extracted_images", "copied_images"):
            assert key in row
    assert rows[0]["trainable_params"] == 0 and rows[1]["trainable_params"] > 0
    table = _read(os.path.join(out, "results.md"))
    assert "| Freeze |" in table and "| MemControl |" in table and "(ceiling) |" in table
    for name in ("trials.csv", "pareto.json"):
        assert os.path.exists(os.path.join(out, "search", "difffit", name))
    trial = _json(os.path.join(out, "trials", "memcontrol-difffit-paper", "trial-0000", "metrics.json"))
    # the search preset, but the cliques objective keeps the D_mem prompts' generations
    assert trial["config"]["extraction_generations"] == 4 and trial["memorization_metric"] == "cliques"
    assert trial["memorization_objective"] == trial["clique_share"]
    assert trial["quality_objective"] == 1 - trial["agreement"]
    assert rows[0]["extracted_images"] is not None and rows[0]["copied_images"] is not None  # stage 2: all of it
    assert "Copies (nearest-neighbour)" in table


def test_transfer_runs_stage_two_with_a_given_mask(tmp_path):
    from diffusers import UNet2DConditionModel

    from diffusers_memcontrol import MaskSpace
    from diffusers_memcontrol.data.tiny_base import tiny_base_path

    unet = UNet2DConditionModel.from_pretrained(tiny_base_path(), subfolder="unet")
    space = MaskSpace.from_unet(unet, "difffit", "paper")
    found = tmp_path / "found"
    found.mkdir()
    space.mask("10" * (len(space) // 2) + "1" * (len(space) % 2)).save(str(found / "best_mask.json"))
    out = str(tmp_path / "transfer")
    argv = ["--final", "--mask", str(found), "--dataset_name", "animal-mnist", "--feature_encoder", "tiny-domain",
            "--baselines", "freeze", "--mitigations", "none", "--stage2_protocol", "duplicated", "--stage2_holdout",
            "--output_dir", out,
            *TINY_RUN]
    result = main_search(argv)
    assert result["transfer"]["mask"] == Mask.load(str(found)).to_dict()
    rows = _json(os.path.join(out, "results.json"))
    assert [(r["method"], r["peft_method"]) for r in rows] == [("ceiling", None), ("freeze", "freeze"),
                                                               ("memcontrol", "difffit")]
    assert rows[0]["in_domain"] >= 0.9  # real animal-mnist test images through the VAE, vs the base's Fashion-MNIST
    rows = rows[1:]
    memcontrol = _json(os.path.join(out, "final", "memcontrol-none", "summary.json"))
    assert memcontrol["mask"] == Mask.load(str(found)).to_dict()
    data = _json(os.path.join(out, "final", "memcontrol-none", "training_config.json"))["data"]
    assert data["train_samples"] == data["splits"]["train"] + 4  # the 4 D_mem pairs twice (--dmem_repeats 2)
    # --stage2_holdout: the default seed's splits, held-out D_mem rows (recorded), training and generation at seed 1
    assert data["seeds"] == {"training": 1, "split_and_dmem": 0, "evaluation": 1} and len(data["dmem_rows"]) == 4
    steps_x_batch = 3 * 8
    assert rows[1]["dmem_exposures"] == round(steps_x_batch * 2 / data["train_samples"], 1)
    assert not os.path.exists(os.path.join(out, "study.db"))  # no search ran
    # a restarted command reuses finished fine-tunes with the same arguments and redoes the others
    summaries = {name: os.path.join(out, "final", name, "summary.json") for name in ("freeze-none", "memcontrol-none")}
    before = {name: os.stat(path).st_mtime_ns for name, path in summaries.items()}
    os.remove(os.path.join(out, "final", "memcontrol-none", "trial_result.json"))  # as if killed before its end
    again = main_search(argv)
    assert os.stat(summaries["freeze-none"]).st_mtime_ns == before["freeze-none"]
    assert os.stat(summaries["memcontrol-none"]).st_mtime_ns != before["memcontrol-none"]
    assert again["rows"][:2] == result["rows"][:2]  # the ceiling (cached) and Freeze, reused as they were
    assert again["rows"][2]["trainable_params"] == result["rows"][2]["trainable_params"]


def test_search_arguments_are_checked():
    for argv, message in ((["--search", "--mask", "101"], "pass one of them"),
                          (["--max_train_steps", "3"], "pass --search"),
                          (["--final", "--mask", "m.json", "--no_final"], "would do nothing"),
                          (["--search", "--eval_split", "test"], "--eval_split is set by the search"),
                          (["--search", "--duplicate_dmem"], "--duplicate_dmem is set by the search"),
                          (["--search", "--no_such_flag", "3"], "unrecognized arguments: --no_such_flag")):
        with pytest.raises(InputError, match=message):
            parse_search_args(argv)
    with pytest.raises(InputError, match="unknown or unsearchable"):
        main_search(["--search", "--search_space", "full", "--output_dir", "/tmp/unused-memcontrol"])


def test_stage_two_shares_the_pool_and_trains_freeze_last(tmp_path, monkeypatch):
    """A run submitted before stage 2 (the Pareto plot's Full FT) trains first on the same slots; Freeze rows, the
    cheapest, go last so that they fill the other slot's last run instead of delaying the table."""
    from diffusers_memcontrol.search import claims as runs
    from diffusers_memcontrol.search import stages as runner
    from diffusers_memcontrol.search.trial_result import TrialResult

    started = []

    def fake_trainer(args, run_dir, worker=None, num_workers=1, **kwargs):
        started.append((os.path.basename(run_dir), worker, num_workers))
        result = TrialResult(dmem=0.1, fid=1.0, metrics={"dmem": 0.1, "fid": 1.0})
        result.save(run_dir)
        return result

    monkeypatch.setattr(runs, "run_trainer", fake_trainer)
    monkeypatch.setattr(runner, "write_memorization_figure", lambda rows, output_dir: None)
    chosen = {"method": "difffit", "mask": {"method": "difffit", "layout": "blocks", "positions": ["a"], "bits": [1]}}
    with runs.WorkerPool(n_workers=1) as pool:  # one slot: the training order is the order of the queue
        plot_run = pool.submit(["--hpo"], str(tmp_path / "trials" / "full-ft"))
        rows = runner.run_final(["--max_train_steps", "1"], str(tmp_path), chosen, "blocks", "reference",
                                ["freeze", "full"], ["none", "rwa"], pool=pool)
        assert (plot_run.result().dmem, plot_run.result().fid) == (0.1, 1.0)
    assert [name for name, _, _ in started] == ["full-ft", "full-none", "full-rwa", "memcontrol-none", "memcontrol-rwa",
                                                "freeze-none", "freeze-rwa"]
    # the table keeps the documented row order whatever the training order
    assert [(r["method"], r["mitigation"]) for r in rows] == [
        ("freeze", "none"), ("freeze", "rwa"), ("full", "none"), ("full", "rwa"), ("memcontrol", "none"),
        ("memcontrol", "rwa")]
    assert _json(str(tmp_path / "results.json"))
