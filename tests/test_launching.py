"""Launching the trainer: its command line, each worker's GPUs and cores, and the result it hands back."""

import json
import os
import sys
from types import SimpleNamespace

import pytest

from diffusers_memcontrol.search.launching import TrainerTrial, gpus_of_worker, run_trainer, trainer_command

# a stand-in trainer: reports the environment it was given as its metrics, in trial_result.json
FAKE_TRAINER = (
    "import json, os, sys\n"
    "out = sys.argv[sys.argv.index('--output_dir') + 1]\n"
    "env = {k: os.environ.get(k) for k in ('CUDA_VISIBLE_DEVICES', 'OMP_NUM_THREADS')}\n"
    "json.dump({'dmem': 1.0, 'fid': 2.0, 'metrics': env}, open(os.path.join(out, 'trial_result.json'), 'w'))\n")


def test_trainer_command_launches_k_processes_with_accelerate():
    assert trainer_command() == [sys.executable, "-m", "diffusers_memcontrol.train"]
    cmd = trainer_command(num_processes=4, accelerate_config="fsdp.yaml", port=29600)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--config_file") + 1] == "fsdp.yaml"
    assert cmd[cmd.index("--main_process_port") + 1] == "29600" and cmd[-2:] == ["-m", "diffusers_memcontrol.train"]
    assert "--multi_gpu" in trainer_command(num_processes=2)  # no config file: torchrun's launcher


def test_each_worker_gets_its_own_gpus():
    gpus = [str(i) for i in range(8)]
    assert [gpus_of_worker(w, 2, gpus) for w in range(4)] == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert gpus_of_worker(1, 3, ["4", "5", "6", "7", "9", "11"]) == ["7", "9", "11"]
    with pytest.raises(ValueError, match="gpus_per_trial=4 but only 2 GPU"):
        gpus_of_worker(0, 4, ["0", "1"])


def test_run_trainer_gives_each_worker_its_gpu_and_a_share_of_the_cores(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    for name in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    result = run_trainer([], str(tmp_path / "b"), script=str(script))
    assert (result.dmem, result.fid) == (1.0, 2.0)
    assert result.metrics == {"CUDA_VISIBLE_DEVICES": None, "OMP_NUM_THREADS": None}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # the GPUs this search may use
    env = run_trainer([], str(tmp_path / "a"), script=str(script), worker=3, num_workers=4).metrics
    assert env == {"CUDA_VISIBLE_DEVICES": "7", "OMP_NUM_THREADS": "2"}
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's settings win
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    env = run_trainer([], str(tmp_path / "c"), script=str(script), worker=1, num_workers=2).metrics
    assert env == {"CUDA_VISIBLE_DEVICES": "7", "OMP_NUM_THREADS": "5"}  # more workers than GPUs share them
    with pytest.raises(RuntimeError, match="see .*train.log"):
        script.write_text("raise SystemExit(3)\n")
        run_trainer([], str(tmp_path / "d"), script=str(script))


def test_an_earlier_attempts_result_never_passes_for_this_ones(tmp_path):
    script = tmp_path / "silent_trainer.py"
    script.write_text("pass\n")  # exits 0 and writes nothing
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "trial_result.json").write_text(json.dumps({"dmem": 0.5, "fid": 3.0}))
    with pytest.raises(RuntimeError, match="without writing trial_result.json"):
        run_trainer([], str(run_dir), script=str(script))
    assert not (run_dir / "trial_result.json").exists()


def test_trainer_trial_runs_in_its_workers_slot(tmp_path, monkeypatch):
    """Each search worker's trial function gets its own GPUs (`for_worker`), without environment variables."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    trial_function = TrainerTrial(["--max_train_steps", "1"], str(tmp_path), "difffit", "paper", script=str(script))
    trial = SimpleNamespace(study=SimpleNamespace(study_name="study"), number=3)
    record = trial_function.for_worker(1, 2)(SimpleNamespace(bitstring="101"), None, trial)
    assert record["CUDA_VISIBLE_DEVICES"] == "5" and "dmem_exposures" in record
    assert (tmp_path / "trials" / "study" / "trial-0003" / "train.log").exists()
    assert trial_function.worker is None  # for_worker returns a copy
