"""Launching the trainer: one fine-tune (a search trial or a stage-2 run) in a process of its own.

`run_trainer` runs `python -m diffusers_memcontrol.train` (or `accelerate launch` of it over `gpus_per_trial`
processes) with a worker's own GPUs or share of the CPU cores, ties the process to this one's life
(`die_with_parent`) and returns the run's `TrialResult` (trial_result.json). `TrainerTrial` is the search's trial
function built on it: it turns a mask into the trainer's arguments and the result into the objectives' metrics.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..constants import TRIAL_RESULT_FILE
from ..errors import InputError
from .trial_result import TrialResult

if TYPE_CHECKING:
    from ..tuners import Mask


@dataclass
class TrainerTrial:
    """A trial function that fine-tunes and scores one mask with the installed trainer in its own process.

    Each trial gets a fresh process (accelerate's state is per process) and its own folder
    `output_dir/trials/<study>/trial-<n>`; `train_args` are the trainer arguments shared by every trial (model, data,
    steps, D_mem settings). The trial trains on the HPO set (proxy + D_mem x repeats) and is scored on the validation
    split; it returns the run's `TrialResult.record()` (with `dmem` and `fid`).
    """

    train_args: list[str]
    output_dir: str
    method: str
    layout: str
    scope: str = "reference"
    script: str | None = None
    python: str | None = None
    gpus_per_trial: int = 1
    accelerate_config: str | None = None
    worker: int | None = None
    num_workers: int = 1

    def for_worker(self, worker: int, num_workers: int) -> TrainerTrial:
        """This trial function for search worker `worker` of `num_workers` (its own GPUs, its share of the cores)."""
        return dataclasses.replace(self, worker=worker, num_workers=num_workers)

    def __call__(self, mask: Mask, learning_rate: float | None, trial: Any) -> dict:
        trial_dir = os.path.join(self.output_dir, "trials", trial.study.study_name, f"trial-{trial.number:04d}")
        args = [*self.train_args, "--peft_method", self.method, "--mask_layout", self.layout,
                "--mask_scope", self.scope, "--mask", mask.bitstring, "--hpo", "--eval", "--eval_split", "validation",
                "--eval_preset", "search"]
        if learning_rate is not None:
            args += ["--learning_rate", repr(learning_rate)]
        result = run_trainer(args, trial_dir, script=self.script, python=self.python, worker=self.worker,
                             num_workers=self.num_workers, num_processes=self.gpus_per_trial,
                             accelerate_config=self.accelerate_config)
        return result.record()


def trainer_command(script: str | None = None, python: str | None = None, num_processes: int = 1,
                    accelerate_config: str | None = None, port: int | None = None) -> list[str]:
    """The command that runs the installed trainer, `python -m diffusers_memcontrol.train` (or `script` instead); with
    `num_processes` > 1 or an accelerate config file, `accelerate launch` of it (data parallel over the processes:
    one per visible GPU, or gloo processes on CPU)."""
    python = python or sys.executable
    target = [script] if script else ["-m", "diffusers_memcontrol.train"]
    if num_processes == 1 and accelerate_config is None:
        return [python, *target]
    launch = [python, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes), "--num_machines", "1"]
    if accelerate_config is not None:
        launch += ["--config_file", accelerate_config]
    else:  # torchrun's launcher: NCCL on GPUs, gloo on CPU
        launch += ["--multi_gpu", "--dynamo_backend", "no"] if num_processes > 1 else ["--dynamo_backend", "no"]
    if port is not None:
        launch += ["--main_process_port", str(port)]
    return [*launch, *target]


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES's entries, else every device torch counts."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpus_of_worker(worker: int, gpus_per_trial: int, gpus: Sequence[str]) -> list[str]:
    """Worker `worker`'s `gpus_per_trial` devices among `gpus`: the w-th consecutive group (more workers than groups
    share them, round robin)."""
    groups = len(gpus) // gpus_per_trial
    if groups == 0:
        raise ValueError(f"gpus_per_trial={gpus_per_trial} but only {len(gpus)} GPU(s) are visible "
                         f"({','.join(gpus) or 'none'}): lower --gpus_per_trial.")
    first = (worker % groups) * gpus_per_trial
    return list(gpus[first:first + gpus_per_trial])


def default_n_workers(gpus_per_trial: int = 1) -> int:
    """Workers that fit this machine: visible GPUs // gpus_per_trial (1 without GPUs)."""
    return max(1, len(visible_gpus()) // gpus_per_trial)


@functools.cache
def _prctl():
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """Have Linux SIGKILL this process when its parent dies (PR_SET_PDEATHSIG); elsewhere, nothing."""
    prctl = _prctl()  # resolved before any fork: a forked child only calls it
    if prctl is not None:
        prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_trainer(args: list[str], output_dir: str, script: str | None = None, python: str | None = None,
                worker: int | None = None, num_workers: int = 1, num_processes: int = 1,
                accelerate_config: str | None = None) -> TrialResult:
    """Run the trainer (`trainer_command`) with `args` in a fresh process writing to `output_dir`; return its
    trial_result.json. The log goes to output_dir/train.log (it holds no captions or prompts); a user's mistake
    reported by the trainer (exit status 2) is raised again here as an InputError with the trainer's message.

    `worker` of `num_workers` gets its own `num_processes` GPUs (CUDA_VISIBLE_DEVICES: the worker's group of the
    visible ones) and, on CPU, a share of the cores (OMP_NUM_THREADS, unless already set). The trainer (and each of
    its accelerate processes) is killed when this process dies, so no run goes on that nobody collects.
    """
    os.makedirs(output_dir, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):  # an earlier attempt's result must never pass for this one's
        os.remove(os.path.join(output_dir, TRIAL_RESULT_FILE))
    launched = num_processes > 1 or accelerate_config is not None
    cmd = [*trainer_command(script, python, num_processes, accelerate_config, _free_port() if launched else None),
           *args, "--output_dir", output_dir, "--report_to", "none", "--no_progress", "--num_validation_images", "0"]
    env = dict(os.environ, MEMCONTROL_DIE_WITH_PARENT="1")  # accelerate's processes: see train.main
    _prctl()
    gpus = visible_gpus()
    if gpus and (worker is not None or num_processes > 1):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus_of_worker(worker or 0, num_processes, gpus))
    elif not gpus and launched:
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate's MULTI_CPU (gloo) under its torchrun launcher
    processes = num_workers * num_processes
    if processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    with open(os.path.join(output_dir, "train.log"), "w", encoding="utf-8") as log:
        result = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=die_with_parent)
    if result.returncode == 2:
        with open(os.path.join(output_dir, "train.log"), encoding="utf-8", errors="replace") as f:
            errors = [line[len("error: "):].strip() for line in f if line.startswith("error: ")]
        if errors:
            raise InputError(errors[-1])
    if result.returncode != 0:
        raise RuntimeError(f"Trainer run failed (exit {result.returncode}); see {output_dir}/train.log.")
    if not os.path.isfile(os.path.join(output_dir, TRIAL_RESULT_FILE)):
        raise RuntimeError(f"Trainer run ended without writing {TRIAL_RESULT_FILE}; see {output_dir}/train.log.")
    return TrialResult.load(output_dir)
