"""MemControl's stage 1: an Optuna NSGA-II search over masks, its Pareto front and the choice of one mask.

One study per search space (method + layout on one UNet architecture). Each trial suggests one {0, 1} per mask
position (and optionally a learning rate), fine-tunes on the HPO set and reports two objectives to minimize: the
memorization metric d_mem on D_mem and FID on the validation split. Studies live in any Optuna storage (SQLite file by
default, PostgreSQL/MySQL for many machines, a journal file on a shared filesystem), so several workers on one or many
machines share a study; with an RDB storage, heartbeats fail the trials of a killed worker and re-queue them.

The search is reproducible: the same seed gives the same trials and the same chosen mask whatever the number of workers
(see `ReproducibleNSGAIISampler`).
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from .errors import InputError, redact_url
from .files import atomic_open, write_json_atomic
from .tuners import Mask, MaskSpace

logger = logging.getLogger(__name__)

OBJECTIVES = ("dmem", "fid")
SELECTIONS = ("mean", "normalized_mean")
_SPACE_ATTR = "memcontrol_search_space"
_POLL_SECONDS = 0.5
# The paper's stage 1 (the authors' scripts): 3,000 steps at batch 128 on 1% of MIMIC's 110k training rows plus
# 100 D_mem pairs x 50 repeats, so each pair is seen 3000 * 128 * 50 / (1100 + 5000) times.
PAPER_DMEM_EXPOSURES = round(3000 * 128 * 50 / (0.01 * 110_000 + 100 * 50))


@dataclass
class SearchConfig:
    """Settings of one MemControl search; round-trips to JSON."""

    n_trials: int = field(default=20, metadata={"help": "Completed trials to reach (over all workers)."})
    population_size: int | None = field(
        default=None, metadata={"help": "NSGA-II population; default: sized to the budget, ceil(n_trials / 3)."}
    )
    search_learning_rate: bool = field(default=False, metadata={"help": "Also search the LR (log-uniform)."})
    learning_rate_range: tuple[float, float] = field(default=(1e-5, 1e-3), metadata={"help": "LR search bounds."})
    storage: str | None = field(default=None, metadata={"help": "Optuna storage URL or journal file path."})
    study_name: str | None = field(default=None, metadata={"help": "Default: memcontrol-<method>-<layout>."})
    seed: int = field(default=0, metadata={"help": "Sampler seed."})
    n_workers: int = field(default=1, metadata={"help": "Worker processes on this machine (gpus_per_trial GPUs each)."})
    gpus_per_trial: int = field(default=1, metadata={"help": "Processes (GPUs) of each trial's accelerate launch."})
    accelerate_config: str | None = field(default=None, metadata={"help": "accelerate config file of each trial."})
    heartbeat_interval: int = field(default=30, metadata={"help": "Seconds between trial heartbeats (RDB)."})
    grace_period: int = field(default=120, metadata={"help": "Seconds without heartbeat before a trial fails."})
    max_retry: int = field(default=2, metadata={"help": "Re-queues of a trial whose worker died."})
    selection: str = field(default="mean", metadata={
        "help": "mean (the paper's: lowest mean of d_mem and FID on the front) or normalized_mean (each rescaled to "
                "[0, 1] by its spread over all trials first)."})
    max_failed_trials: int = field(default=3, metadata={"help": "Stop a worker after this many failed trials."})

    def __post_init__(self) -> None:
        self.learning_rate_range = tuple(self.learning_rate_range)
        if self.n_trials < 1:
            raise ValueError(f"n_trials must be >= 1, got {self.n_trials}.")
        if self.population_size is not None and self.population_size < 2:
            raise ValueError(f"population_size must be >= 2 (NSGA-II needs two parents), got {self.population_size}.")
        if self.n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {self.n_workers}.")
        if self.gpus_per_trial < 1:
            raise ValueError(f"gpus_per_trial must be >= 1, got {self.gpus_per_trial}.")
        if self.selection not in SELECTIONS:
            raise ValueError(f"Unknown selection {self.selection!r}; expected one of {', '.join(SELECTIONS)}.")
        low, high = self.learning_rate_range
        if not 0 < low < high:
            raise ValueError(f"learning_rate_range must satisfy 0 < low < high, got {self.learning_rate_range}.")

    @property
    def effective_population_size(self) -> int:
        """The population actually used: the given one, or about a third of the budget (at least 2)."""
        return self.population_size or max(2, math.ceil(self.n_trials / 3))

    def to_json(self) -> str:
        """JSON text of every field."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SearchConfig:
        """Inverse of `to_json`."""
        return cls(**json.loads(text))


def resolve_storage(storage: str | None, output_dir: str, config: SearchConfig | None = None):
    """An Optuna storage from a URL (sqlite/postgresql/mysql), a journal file path, or None (output_dir/study.db)."""
    config = config or SearchConfig()
    if storage is None:
        os.makedirs(output_dir, exist_ok=True)
        storage = "sqlite:///" + os.path.abspath(os.path.join(output_dir, "study.db"))
    if storage.startswith("journal://") or storage.endswith((".log", ".journal")):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = storage.removeprefix("journal://")
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if "://" not in storage:
        raise ValueError(f"Storage {_redact(storage)!r} is neither a database URL (sqlite:///..., postgresql://..., "
                         "mysql://...) nor a journal file (*.log, *.journal, journal://path).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                storage,
                heartbeat_interval=config.heartbeat_interval,
                grace_period=config.grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=config.max_retry),
                engine_kwargs={"pool_pre_ping": True} if not storage.startswith("sqlite") else None,
            )
    except Exception as err:  # sqlalchemy raises many types; name the URL without its password
        raise ConnectionError(f"Cannot open Optuna storage {_redact(storage)}: {type(err).__name__}: "
                              f"{_redact(str(err))}") from err


def _redact(url: str) -> str:
    return redact_url(url)


def _space_record(space: MaskSpace, config: SearchConfig) -> dict:
    return {"method": space.method, "layout": space.layout, "positions": list(space.positions),
            "search_learning_rate": config.search_learning_rate}


class ReproducibleNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II whose trials depend on the seed and the objectives only, not on the workers or the finishing order.

    Trial n draws its random numbers (first population, crossover, mutation) from a state derived from (seed, n)
    instead of the worker's sampler state. Its generation is decided from the trials before it: it waits, polling the
    storage, while the current generation has no free slot but still runs trials, so a generation starts once the
    previous one has finished and its parents are the same whatever the timing. Every trial gets a generation,
    enqueued ones too (the default mask is a member of the first population).
    """

    def __init__(self, *, population_size: int, seed: int) -> None:
        super().__init__(population_size=population_size, seed=seed)
        self._seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        key = self._get_generation_key()
        generation = _wait(study, trial, lambda others: _generation(others, trial.number, key, self.population_size))
        study._storage.set_trial_system_attr(trial._trial_id, key, generation)
        trial.system_attrs[key] = generation  # the copy that sample_relative reads
        study._thread_local.cached_all_trials = None  # trials finished while this one waited
        state = np.random.SeedSequence([self._seed, trial.number]).generate_state(4)
        self._rng.rng.seed(state)
        self._random_sampler._rng.rng.seed(state)
        super().before_trial(study, trial)


def _generation(others: list[FrozenTrial], number: int, key: str, population_size: int) -> int | None:
    """The generation of trial `number` given the other trials, or None while it cannot be decided yet."""
    if any(t.state == TrialState.RUNNING and key not in t.system_attrs and t.number < number for t in others):
        return None  # an earlier trial has not taken its place yet
    placed = [t for t in others if key in t.system_attrs]
    if not placed:
        return 0
    current = max(t.system_attrs[key] for t in placed)
    if any(t.state == TrialState.RUNNING and t.system_attrs[key] < current for t in placed):
        return None  # another worker saw the previous generation finish; this view has not yet (its parents would)
    states = [t.state for t in placed if t.system_attrs[key] == current]
    complete, running = states.count(TrialState.COMPLETE), states.count(TrialState.RUNNING)
    if complete + running < population_size:
        return current
    return None if running else current + 1


def _within_budget(others: list[FrozenTrial], number: int, n_trials: int) -> bool | None:
    """Whether trial `number` is needed to reach `n_trials` completed trials, or None while earlier ones run."""
    states = [t.state for t in others if t.number < number]
    complete, running = states.count(TrialState.COMPLETE), states.count(TrialState.RUNNING)
    if complete + running < n_trials:
        return True
    return None if running else False


def _wait(study: optuna.Study, trial: FrozenTrial | optuna.Trial, decide: Callable[[list[FrozenTrial]], object]):
    """Poll the storage until `decide(the other trials)` is not None; meanwhile keep this trial's heartbeat and fail
    stale trials (a killed worker's trial would block the others forever)."""
    storage = study._storage
    while True:
        if is_heartbeat_enabled(storage):
            storage.record_heartbeat(trial._trial_id)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fail_stale_trials(study)
        others = [t for t in storage.get_all_trials(study._study_id, deepcopy=False) if t.number != trial.number]
        decision = decide(others)
        if decision is not None:
            return decision
        time.sleep(_POLL_SECONDS)


def _sampler(config: SearchConfig) -> ReproducibleNSGAIISampler:
    return ReproducibleNSGAIISampler(population_size=config.effective_population_size, seed=config.seed)


def create_study(space: MaskSpace, config: SearchConfig, output_dir: str) -> optuna.Study:
    """Create or resume the study of `space`; refuse a study of the same name built for another space."""
    storage = resolve_storage(config.storage, output_dir, config)
    name = config.study_name or f"memcontrol-{space.method}-{space.layout}"
    population = config.effective_population_size
    if config.n_trials < population:
        warnings.warn(
            f"n_trials={config.n_trials} is smaller than one NSGA-II generation (population_size={population}): "
            "every trial is then drawn at random from the initial population and no evolution happens.",
            stacklevel=2,
        )
    study = optuna.create_study(study_name=name, storage=storage, sampler=_sampler(config),
                                directions=["minimize", "minimize"], load_if_exists=True)
    record = _space_record(space, config)
    existing = study.user_attrs.get(_SPACE_ATTR)
    if existing is None:
        study.set_user_attr(_SPACE_ATTR, record)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(OBJECTIVES))
        # seed the first generation with the method's default configuration (all ones)
        params = {_param_name(i): 1 for i in range(len(space))}
        # skip_if_exists: two machines creating the study at once seed it once
        study.enqueue_trial(params, user_attrs={"seeded": "default mask"}, skip_if_exists=True)
    elif existing != record:
        raise ValueError(
            f"Study {name!r} in this storage was built for {existing['method']}/{existing['layout']} with "
            f"{len(existing['positions'])} positions (search_learning_rate={existing['search_learning_rate']}); "
            f"this run searches {record['method']}/{record['layout']} with {len(record['positions'])} positions. "
            "Use another --study_name or storage instead of mixing search spaces."
        )
    return study


def _param_name(index: int) -> str:
    return f"bit_{index:02d}"


def suggest_mask(trial: optuna.Trial, space: MaskSpace) -> Mask:
    """One categorical {0, 1} per position; returns the trial's mask."""
    bits = [trial.suggest_categorical(_param_name(i), [0, 1]) for i in range(len(space))]
    return space.mask(bits)


def suggest_learning_rate(trial: optuna.Trial, config: SearchConfig) -> float | None:
    """The trial's learning rate when the search includes it (log-uniform, the reference's range)."""
    if not config.search_learning_rate:
        return None
    low, high = config.learning_rate_range
    return trial.suggest_float("learning_rate", low, high, log=True)


def mask_of_trial(trial: FrozenTrial, space: MaskSpace) -> Mask:
    """Rebuild the mask of a finished trial from its parameters."""
    return space.mask([int(trial.params[_param_name(i)]) for i in range(len(space))])


TrialFunction = Callable[[Mask, float | None, optuna.Trial], dict]


def make_objective(space: MaskSpace, config: SearchConfig, run_trial: TrialFunction):
    """Wrap `run_trial(mask, learning_rate, trial) -> metrics` into an Optuna objective returning (dmem, fid).

    Every metric is stored as a trial user attribute and the mask JSON as the `mask` attribute, so the study alone
    holds what is needed to rebuild the Pareto plot and the chosen mask.
    """

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        # two workers may both start a trial when one is missing: the later-numbered one stands down
        if not _wait(trial.study, trial, lambda others: _within_budget(others, trial.number, config.n_trials)):
            trial.study.stop()
            trial.set_user_attr("skipped", f"the study already had n_trials={config.n_trials} completed trials")
            raise optuna.TrialPruned("budget reached")
        mask = suggest_mask(trial, space)
        lr = suggest_learning_rate(trial, config)
        trial.set_user_attr("mask", mask.to_dict())
        try:
            metrics = run_trial(mask, lr, trial)
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
            raise
        missing = [k for k in OBJECTIVES if k not in metrics]
        if missing:
            raise KeyError(f"The trial function returned {sorted(metrics)}; it must include {list(OBJECTIVES)}.")
        for key, value in metrics.items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                trial.set_user_attr(key, value)
        # the quality objective: EvaluationConfig.search_objective's value where the evaluation reports it, else FID
        values = (float(metrics["dmem"]), float(metrics.get("search_quality", metrics["fid"])))
        if not all(math.isfinite(v) for v in values):
            raise optuna.TrialPruned(f"non-finite objectives {values}")
        return values

    return objective


def run_worker(space: MaskSpace, config: SearchConfig, output_dir: str, run_trial: TrialFunction,
               worker_index: int = 0) -> None:
    """Run trials in this process until the study holds `config.n_trials` completed trials (the sampler keeps the
    trials the same whatever the number of workers)."""
    if multiprocessing.parent_process() is not None:
        die_with_parent()  # a worker of a killed orchestrator must not go on training trials nobody collects
    os.environ["MEMCONTROL_WORKER_INDEX"] = str(worker_index)
    os.environ["MEMCONTROL_NUM_WORKERS"] = str(config.n_workers)
    storage = resolve_storage(config.storage, output_dir, config)
    name = config.study_name or f"memcontrol-{space.method}-{space.layout}"
    study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler(config))
    budget = MaxTrialsCallback(config.n_trials, states=(TrialState.COMPLETE, TrialState.RUNNING))
    if _counted(study) >= config.n_trials:
        return
    failures: list[FrozenTrial] = []

    def stop_on_failures(study: optuna.Study, trial: FrozenTrial) -> None:
        # a trial function that fails every time (bad arguments, missing data) must not loop forever
        if trial.state == TrialState.FAIL:
            failures.append(trial)
            if len(failures) >= config.max_failed_trials:
                study.stop()

    study.optimize(make_objective(space, config, run_trial), callbacks=[budget, stop_on_failures],
                   gc_after_trial=True, catch=(RuntimeError, OSError, ValueError, KeyError))
    if len(failures) >= config.max_failed_trials:
        reason = failures[-1].user_attrs.get("error", "see the trial logs")
        raise RuntimeError(f"{len(failures)} trials of this worker failed; stopping the search. Last failure: "
                           f"{reason}")


def _counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))


def optimize(space: MaskSpace, config: SearchConfig, output_dir: str, run_trial: TrialFunction) -> optuna.Study:
    """Create or resume the study and run it with `config.n_workers` worker processes (each trial in the worker
    that asked for it); return the study."""
    study = create_study(space, config, output_dir)
    if config.n_workers == 1:
        run_worker(space, config, output_dir, run_trial)
    else:
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=run_worker, args=(space, config, output_dir, run_trial, i), daemon=False)
                   for i in range(config.n_workers)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        failed = [w.exitcode for w in workers if w.exitcode]
        if failed:
            logger.warning("%d of %d search workers exited with errors %s; the study keeps their finished trials "
                           "and restarting the command resumes it.", len(failed), len(workers), failed)
    return optuna.load_study(study_name=study.study_name, storage=resolve_storage(config.storage, output_dir, config))


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The non-dominated completed trials (Optuna's `best_trials`)."""
    return sorted(study.best_trials, key=lambda t: t.number)


def select_trial(front: Sequence[FrozenTrial], selection: str = "mean",
                 scale: Sequence[Sequence[float]] | None = None) -> FrozenTrial:
    """Pick one trial of the front: lowest arithmetic mean of the objectives (the paper), or of min-max normalized
    objectives (`normalized_mean`, robust when d_mem and FID live on different scales).

    `scale`: the objective values whose spread normalizes (every completed trial of the search; default the
    front's own). Over the front alone, the two ends of a two-trial front always tie at 0.5.
    """
    if not front:
        raise ValueError("The Pareto front is empty: no trial completed.")
    if selection not in SELECTIONS:
        raise ValueError(f"Unknown selection {selection!r}; expected one of {', '.join(SELECTIONS)}.")
    values = [list(t.values) for t in front]
    if selection == "normalized_mean":
        spread = [list(v) for v in scale] if scale else values
        lows = [min(v[i] for v in spread) for i in range(len(OBJECTIVES))]
        highs = [max(v[i] for v in spread) for i in range(len(OBJECTIVES))]
        values = [[(x - lo) / (hi - lo) if hi > lo else 0.0 for x, lo, hi in zip(v, lows, highs)] for v in values]
    scores = [sum(v) / len(v) for v in values]
    return front[min(range(len(front)), key=lambda i: (scores[i], front[i].number))]


def export_study(study: optuna.Study, space: MaskSpace, output_dir: str, selection: str = "mean") -> dict:
    """Write best_mask.json, pareto.json and trials.csv for a study; return the chosen trial's summary."""
    os.makedirs(output_dir, exist_ok=True)
    front = pareto_front(study)
    chosen = select_trial(front, selection, [t.values for t in study.get_trials(states=(TrialState.COMPLETE,))])
    mask = mask_of_trial(chosen, space)
    mask.save(os.path.join(output_dir, "best_mask.json"))
    rows = [_trial_row(t, space) for t in study.get_trials(deepcopy=False)]
    pareto = {
        "study_name": study.study_name,
        "objectives": list(OBJECTIVES),
        "selection": selection,
        "chosen_trial": chosen.number,
        "front": [_trial_row(t, space) for t in front],
    }
    write_json_atomic(os.path.join(output_dir, "pareto.json"), pareto)
    fieldnames = sorted({k for r in rows for k in r})
    with atomic_open(os.path.join(output_dir, "trials.csv"), newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return {"trial": chosen.number, "values": dict(zip(OBJECTIVES, chosen.values)), "mask": mask.to_dict()}


def _trial_row(trial: FrozenTrial, space: MaskSpace) -> dict:
    row = {"number": trial.number, "state": trial.state.name}
    if trial.values is not None:
        row.update(dict(zip(OBJECTIVES, trial.values)))
    if all(_param_name(i) in trial.params for i in range(len(space))):
        row["mask"] = mask_of_trial(trial, space).bitstring
    if "learning_rate" in trial.params:
        row["learning_rate"] = trial.params["learning_rate"]
    for key, value in trial.user_attrs.items():
        if key != "mask" and isinstance(value, (int, float, str, bool)):
            row[key] = value
    return row


@dataclass
class TrainerTrial:
    """A trial function that fine-tunes and scores one mask with the installed trainer in its own process.

    Each trial gets a fresh process (accelerate's state is per process) and its own folder
    `output_dir/trials/<study>/trial-<n>`; `train_args` are the trainer arguments shared by every trial (model, data,
    steps, D_mem settings). The trial trains on the HPO set (proxy + D_mem x repeats) and is scored on the validation
    split; its metrics.json must hold `dmem` and `fid`.
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

    def __call__(self, mask: Mask, learning_rate: float | None, trial: optuna.Trial) -> dict:
        trial_dir = os.path.join(self.output_dir, "trials", trial.study.study_name, f"trial-{trial.number:04d}")
        args = [*self.train_args, "--peft_method", self.method, "--mask_layout", self.layout,
                "--mask_scope", self.scope, "--mask", mask.bitstring, "--hpo", "--eval", "--eval_split", "validation",
                "--eval_preset", "search"]
        if learning_rate is not None:
            args += ["--learning_rate", repr(learning_rate)]
        metrics = run_trainer(args, trial_dir, script=self.script, python=self.python,
                              num_processes=self.gpus_per_trial, accelerate_config=self.accelerate_config)
        return {**metrics, **dmem_exposures(trial_dir)}


def dmem_exposures(run_dir: str) -> dict:
    """How often a trainer run showed each D_mem pair (samples trained on x copies of the pair / training-set size),
    read from its training_config.json and summary.json, with the training-set size (`train_samples`). A pair has
    --dmem_repeats copies under --hpo or --duplicate_dmem, else one."""
    with open(os.path.join(run_dir, "training_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        steps = json.load(f)["global_step"]
    fine_tune, images, run = config["fine_tune"], config["data"]["train_samples"], config["run"]
    samples = steps * fine_tune["train_batch_size"] * fine_tune["gradient_accumulation_steps"]
    copies = run["dmem_repeats"] if run.get("hpo") or run.get("duplicate_dmem") else 1
    return {"train_samples": images, "dmem_exposures": round(samples * copies / images, 1)}


def exposure_report(exposures: Sequence[float]) -> dict:
    """The D_mem exposures of a search's trials next to the paper's; warn when they are below a tenth of it (trials
    that short cannot memorize, so d_mem cannot tell masks that memorize from those that do not)."""
    report = {"per_trial": min(exposures) if exposures else None, "paper": PAPER_DMEM_EXPOSURES}
    if exposures and min(exposures) < PAPER_DMEM_EXPOSURES / 10:
        logger.warning("Each search trial shows each D_mem pair %s times, below a tenth of the paper's %d: trials this "
                       "short do not memorize. Raise --max_train_steps or lower --dmem_size.", report["per_trial"],
                       PAPER_DMEM_EXPOSURES)
    return report


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
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """Have Linux SIGKILL this process when its parent dies (PR_SET_PDEATHSIG); elsewhere, nothing."""
    prctl = _prctl()  # resolved before any fork: a forked child only calls it
    if prctl is not None:
        prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_trainer(args: list[str], output_dir: str, script: str | None = None, python: str | None = None,
                worker: int | None = None, num_workers: int | None = None, num_processes: int = 1,
                accelerate_config: str | None = None) -> dict:
    """Run the trainer (`trainer_command`) with `args` in a fresh process writing to `output_dir`; return its
    metrics.json. The log goes to output_dir/train.log (it holds no captions or prompts); a user's mistake reported
    by the trainer (exit status 2) is raised again here as an InputError with the trainer's message.

    `worker` of `num_workers` (default: this search worker's, from the environment) gets its own `num_processes`
    GPUs (CUDA_VISIBLE_DEVICES: the worker's group of the visible ones) and, on CPU, a share of the cores
    (OMP_NUM_THREADS, unless already set). The trainer (and each of its accelerate processes) is killed when this
    process dies, so no run goes on that nobody collects.
    """
    import subprocess

    os.makedirs(output_dir, exist_ok=True)
    launched = num_processes > 1 or accelerate_config is not None
    cmd = [*trainer_command(script, python, num_processes, accelerate_config, _free_port() if launched else None),
           *args, "--output_dir", output_dir, "--report_to", "none", "--no_progress", "--num_validation_images", "0"]
    env = dict(os.environ, MEMCONTROL_DIE_WITH_PARENT="1")  # accelerate's processes: see train.main
    _prctl()
    if worker is None and os.environ.get("MEMCONTROL_WORKER_INDEX") is not None:
        worker = int(os.environ["MEMCONTROL_WORKER_INDEX"])
    num_workers = num_workers or int(os.environ.get("MEMCONTROL_NUM_WORKERS", "1"))
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
    with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)
