"""trial_result.json: what a trainer run hands back to the search and to stage 2."""

import json
from dataclasses import asdict

import pytest

from diffusers_memcontrol.constants import TRIAL_RESULT_FILE
from diffusers_memcontrol.search.trial_result import TrialResult


def test_exposures_objectives_and_round_trip(tmp_path):
    summary = {"global_step": 30, "train_samples": 40, "trainable_params": 7}
    metrics = {"dmem": 0.25, "fid": 31.5, "feature_encoder": "tiny-domain", "config": {"seed": 0}, "amd": None}
    # 30 steps x 16 samples (batch 8 x accumulation 2) x 5 copies of each D_mem pair / 40 rows
    result = TrialResult.from_run(summary, metrics, samples_per_step=16, dmem_copies=5)
    assert (result.dmem, result.fid, result.dmem_exposures) == (0.25, 31.5, 30 * 16 * 5 / 40)
    assert result.metrics == {"dmem": 0.25, "fid": 31.5, "feature_encoder": "tiny-domain", "amd": None}  # scalars
    assert result.record() == {**result.metrics, "trainable_params": 7, "train_samples": 40, "dmem_exposures": 60.0}
    result.save(str(tmp_path))
    assert TrialResult.load(str(tmp_path)) == result
    assert json.loads((tmp_path / TRIAL_RESULT_FILE).read_text()) == asdict(result)


def test_a_run_without_evaluation_has_no_objectives():
    result = TrialResult.from_run({"global_step": 3, "train_samples": 24, "trainable_params": 0}, None,
                                  samples_per_step=8, dmem_copies=1)
    assert (result.dmem, result.fid, result.metrics, result.dmem_exposures) == (None, None, {}, 1.0)


def test_a_file_that_is_not_a_trial_result_is_refused(tmp_path):
    (tmp_path / TRIAL_RESULT_FILE).write_text(json.dumps({"dmem": 1.0, "payload": "x"}))
    with pytest.raises(ValueError, match="is not a trial result"):
        TrialResult.load(str(tmp_path))


def test_a_version_0_1_result_is_read_under_todays_names_with_a_warning(tmp_path, caplog):
    old = {"dmem": 2.0, "fid": 31.5, "trainable_params": 7, "global_step": 3, "train_samples": 24,
           "dmem_exposures": 1.0, "metrics": {"dmem": 2.0, "fid": 31.5, "search_memorization": 0.4,
                                              "search_memorization_objective": "cliques", "search_quality": 0.2,
                                              "search_objective": "agreement"}}
    (tmp_path / TRIAL_RESULT_FILE).write_text(json.dumps(old))
    with caplog.at_level("WARNING", logger="diffusers_memcontrol.search.trial_result"):
        result = TrialResult.load(str(tmp_path))
    assert result.metrics == {"dmem": 2.0, "fid": 31.5, "memorization_objective": 0.4, "memorization_metric": "cliques",
                              "quality_objective": 0.2, "quality_metric": "agreement"}
    assert "written by diffusers-memcontrol 0.1.0" in caplog.text
