"""Many processes, many commands: accelerate-launched fine-tunes (2 gloo processes on CPU) and stage-2 row claims."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess

from safetensors.torch import load_file

from diffusers_memcontrol.search import claims as runs
from diffusers_memcontrol.search import stages as runner
from diffusers_memcontrol.search.launching import run_trainer, trainer_command
from diffusers_memcontrol.search.trial_result import TrialResult

# a trial's fine-tune at its smallest: 4 steps on the HPO set (16 proxy rows + 4 D_mem pairs x 2), search scoring
TINY = ["--max_train_steps", "4", "--max_train_samples", "16", "--dmem_size", "4", "--dmem_repeats", "2",
        "--dmem_unique_captions", "--learning_rate", "1e-3", "--hpo", "--eval", "--eval_split", "validation",
        "--eval_preset", "search", "--eval_num_prompts", "2", "--eval_inference_steps", "1"]
LR = 1e-3


def _adapter(folder) -> dict:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_two_processes_train_like_one_and_resume(tmp_path, monkeypatch):
    """1 process x batch 8 and 2 gloo processes x batch 4 see the same samples and the same noise (each process draws
    the global batch's noise and keeps its rows) and DDP averages the two half-batch gradients: the adapters differ
    only by float32 rounding (gloo sums two partial gradients where one process sums one batch; Adam divides by the
    gradient's own scale, so an element whose gradient is ~0 can move by a larger share of its small step). The
    bound is 1% of one Adam step (lr), far below the lr x steps the adapter moved."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    one, two = tmp_path / "one", tmp_path / "two"
    cache = ["--latent_cache_dir", str(tmp_path / "cache")]
    r1 = run_trainer([*TINY, *cache, "--train_batch_size", "8"], str(one))
    r2 = run_trainer([*TINY, *cache, "--train_batch_size", "4", "--checkpointing_steps", "2"], str(two),
                     num_processes=2)
    assert sorted(r1.metrics) == sorted(r2.metrics) and r1.trainable_params == r2.trainable_params > 0
    # trial_result.json: 4 steps x 8 samples (1 x 8, or 2 processes x 4) x 2 copies of each D_mem pair / HPO rows
    assert r1.train_samples == r2.train_samples and r1.global_step == r2.global_step == 4
    assert r1.dmem_exposures == r2.dmem_exposures == round(4 * 8 * 2 / r1.train_samples, 1)
    assert r1.dmem == r1.metrics["dmem"] and r1.fid == r1.metrics["fid"]
    a1, a2 = _adapter(one), _adapter(two)
    assert a1.keys() == a2.keys()
    moved = max(float(t.abs().max()) for t in a1.values())
    assert moved > 2 * LR  # the adapter trained (4 Adam steps of ~lr each)
    assert max(float((a1[k] - a2[k]).abs().max()) for k in a1) < 1e-2 * LR
    log = (two / "train.log").read_text()
    assert log.count("adapter written to") == 1 and log.count('"peft_method"') == 1  # written once (main process)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["metrics"] == "metrics.json"
    names = os.listdir(two / "checkpoint-2")  # written once (main process), no pickle
    assert "rng.json" in names and "manifest.json" in names and not [n for n in names if n.endswith(".pkl")]

    # a 2-process run resumes a 2-process checkpoint and ends where the uninterrupted run did
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    cmd = [*trainer_command(num_processes=2, port=None), *TINY, *cache,  # --eval: the same splits as the run
           "--train_batch_size", "4", "--resume_from_checkpoint", "latest", "--output_dir", str(resumed),
           "--report_to", "none", "--no_progress", "--num_validation_images", "0"]
    env = dict(os.environ, ACCELERATE_USE_CPU="true")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == "checkpoint-2"
    a3 = _adapter(resumed)
    assert max(float((a2[k] - a3[k]).abs().max()) for k in a2) < 1e-2 * LR


def _stage_two_machine(output_dir: str, trained_log: str) -> list[dict]:
    """One 'machine': run_final with a trainer stand-in that records which process trained which row."""

    def fake_trainer(args, run_dir, **kwargs):
        with open(trained_log, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {os.path.basename(run_dir)}\n")
        import time

        time.sleep(0.3)
        result = TrialResult(dmem=0.1, fid=1.0, trainable_params=7,
                             metrics={"dmem": 0.1, "fid": 1.0, "memorization_objective": 0.1, "quality_objective": 1.0,
                                      "trainable_params": 7})
        result.save(run_dir)
        return result

    runs.run_trainer = fake_trainer
    runs.CLAIM_POLL_SECONDS = 0.1
    chosen = {"method": "difffit", "mask": {"method": "difffit", "layout": "blocks", "bits": [1]}}
    rows = runner.run_final(["--max_train_steps", "1"], output_dir, chosen, "blocks", "reference",
                            ["freeze", "full", "svdiff"], ["none", "rwa"], n_workers=2)
    return [(r["method"], r["mitigation"]) for r in rows]


def test_two_stage_two_commands_split_the_rows(tmp_path, monkeypatch):
    """Two stage-2 commands sharing an output folder: each row is trained once, both write the whole table."""
    monkeypatch.setattr(runner, "write_results", lambda rows, output_dir: None)
    monkeypatch.setattr(runner.Mask, "from_dict", classmethod(lambda cls, d: type("M", (), {"bitstring": "1"})()))
    log = str(tmp_path / "trained.txt")
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        tables = pool.starmap(_stage_two_machine, [(str(tmp_path), log)] * 2)
    with open(log, encoding="utf-8") as f:
        trained = [line.split() for line in f.read().splitlines()]
    rows = [name for _, name in trained]
    assert sorted(rows) == sorted(set(rows)) and len(rows) == 8  # 4 candidates x 2 mitigations, each once
    assert len({pid for pid, _ in trained}) == 2  # both machines trained some
    assert tables[0] == tables[1] and len(tables[0]) == 8
    assert not [f for f in os.listdir(tmp_path / "final") if f.endswith(".lock")]
