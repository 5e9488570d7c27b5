"""MemControl's stage 1: an Optuna NSGA-II search over masks, its Pareto front and the choice of one mask.

One study per search space (method + layout on one UNet architecture). Each trial suggests one {0, 1} per mask
position (and optionally a learning rate), fine-tunes on the HPO set and reports two objectives to minimize: the
memorization metric d_mem on D_mem and FID on the validation split. Studies live in any Optuna storage (SQLite file by
default, PostgreSQL/MySQL for many machines, a journal file on a shared filesystem), so several workers on one or many
machines share a study; with an RDB storage, heartbeats fail the trials of a killed worker and re-queue them.

The search is reproducible: the same seed gives the same trials and the same chosen mask whatever the number of workers
(see `ReproducibleNSGAIISampler`).

This module is the Optuna part only: the objective (`make_objective`: `objective(trial)` suggests a mask, has a trial
function train and score it, and returns (d_mem, FID)), the workers and the choice. Running the trainer for a trial is
`launching.TrainerTrial`; Optuna's private attributes are reached through `optuna_compat`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from ..constants import BEST_MASK_FILE, PARETO_FILE, STUDY_FILE, TRIALS_FILE
from ..errors import redact_url
from ..files import atomic_open, write_json_atomic
from ..tuners import Mask, MaskSpace
from . import optuna_compat
from .launching import die_with_parent

logger = logging.getLogger(__name__)

OBJECTIVES = ("memorization_objective", "quality_objective")  # the values every trial returns
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
    max_memorization: float | None = field(default=None, metadata={
        "help": "A memorization budget: a trial whose memorization objective exceeds it is infeasible (an Optuna "
                "constraint, so NSGA-II prefers feasible parents), and the choice is the best quality among feasible "
                "trials, or the least memorizing trial when none is (selection then ignored)."})

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
        if self.max_memorization is not None and not (math.isfinite(self.max_memorization)
                                                      and self.max_memorization >= 0):
            raise ValueError(f"max_memorization must be a finite number >= 0, got {self.max_memorization}.")
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
        storage = "sqlite:///" + os.path.abspath(os.path.join(output_dir, STUDY_FILE))
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
    sqlite = storage.startswith("sqlite")
    # SQLite ignores Optuna's row locks: its storage locks the database instead (two workers never pop one trial)
    storage_class = optuna_compat.LockingSQLiteStorage if sqlite else optuna.storages.RDBStorage
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return storage_class(
                storage,
                heartbeat_interval=config.heartbeat_interval,
                grace_period=config.grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=config.max_retry),
                engine_kwargs=None if sqlite else {"pool_pre_ping": True},
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

    The order of a generation's parents is fixed too: parent selection draws positions in that list. Optuna gives
    them in elite-selection order to the worker that selects them first and in trial-number order to every worker
    that reads them back from the study, so a child depended on which worker got there first (the PostgreSQL
    reproducibility race). Here the first trial of a generation always uses the elite-selection order and the others
    the trial-number order, whoever selected them: the order a one-worker run has always had, so fixed-seed searches
    sample what they sampled before. Populations are read in trial-number order.
    """

    def __init__(self, *, population_size: int, seed: int) -> None:
        super().__init__(population_size=population_size, seed=seed)
        self._seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        key = optuna_compat.generation_key(type(self))
        generation = _wait(study, trial, lambda others: _generation(others, trial.number, key, self.population_size))
        optuna_compat.storage_of(study).set_trial_system_attr(optuna_compat.trial_id_of(trial), key, generation)
        trial.system_attrs[key] = generation  # the copy that sample_relative reads
        optuna_compat.forget_cached_trials(study)  # trials finished while this one waited
        optuna_compat.reseed_nsga2(self, np.random.SeedSequence([self._seed, trial.number]).generate_state(4))
        super().before_trial(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        """NSGA-II's child for `trial` (crossover of parents drawn from its generation's parent population)."""
        generation = self.get_trial_generation(study, trial)
        parents = self.get_parent_population(study, generation)  # selected once, stored in the study
        if not parents:
            return {}
        key = optuna_compat.generation_key(type(self))
        if not any(t.system_attrs.get(key) == generation and t.number < trial.number
                   for t in study.get_trials(deepcopy=False)):
            parents = self.select_parent(study, generation)  # the same trials, in elite-selection order
        return optuna_compat.nsga2_child(self, study, search_space, parents)

    def get_population(self, study: optuna.Study, generation: int) -> list[FrozenTrial]:
        """The completed trials of `generation`, in trial-number order."""
        return sorted(super().get_population(study, generation), key=lambda t: t.number)

    def get_parent_population(self, study: optuna.Study, generation: int) -> list[FrozenTrial]:
        """The parents of `generation` (elite selection over the previous generation and its parents), in
        trial-number order whether this worker selected them or read them from the study."""
        return sorted(super().get_parent_population(study, generation), key=lambda t: t.number)


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
    storage, study_id = optuna_compat.storage_of(study), optuna_compat.study_id_of(study)
    while True:
        if optuna_compat.record_heartbeat(study, trial):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fail_stale_trials(study)
        others = [t for t in storage.get_all_trials(study_id, deepcopy=False) if t.number != trial.number]
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
            # the --search_memorization_objective and --search_quality_objective values, both lower-is-better
            study.set_metric_names(["memorization", "quality"])
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


TrialFunction = Callable[[Mask, float | None, optuna.Trial], Mapping]
"""`run_trial(mask, learning_rate, trial) -> metrics` (at least `dmem` and `fid`): trains and scores one mask.

A trial function with a `for_worker(index, count)` method is given, in each worker, the one it returns (the trainer's
trial function takes that worker's GPUs)."""


def make_objective(space: MaskSpace, config: SearchConfig, run_trial: TrialFunction):
    """The Optuna objective of a search: `objective(trial)` suggests a mask (and learning rate), has `run_trial`
    train and score it, and returns (memorization_objective, quality_objective).

    Every scalar metric is stored as a trial user attribute and the mask JSON as the `mask` attribute, so the study
    alone holds what is needed to rebuild the Pareto plot and the chosen mask.
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
        values = tuple(float(metrics[k]) for k in OBJECTIVES)
        if config.max_memorization is not None and math.isfinite(values[0]):  # feasible when <= 0
            trial.set_constraint("memorization", values[0] - config.max_memorization)
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
    if hasattr(run_trial, "for_worker"):
        run_trial = run_trial.for_worker(worker_index, config.n_workers)
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


def select_within_budget(trials: Sequence[FrozenTrial], budget: float) -> tuple[FrozenTrial, bool]:
    """The best quality among the trials whose memorization objective is within `budget`, and True; or, when none is,
    the least memorizing trial and False."""
    done = [t for t in trials if t.values is not None]
    if not done:
        raise ValueError("No trial completed.")
    feasible = [t for t in done if t.values[0] <= budget]
    if feasible:
        return min(feasible, key=lambda t: (t.values[1], t.values[0], t.number)), True
    return min(done, key=lambda t: (t.values[0], t.values[1], t.number)), False


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


def choose_trial(front: Sequence[FrozenTrial], completed: Sequence[FrozenTrial], selection: str = "mean",
                 budget: float | None = None) -> tuple[FrozenTrial, bool | None]:
    """The search's choice: within a memorization `budget`, the best quality (`select_within_budget`, and whether it
    kept the budget); without one, the point of the front that `selection` picks (`select_trial`, and None)."""
    if budget is not None:
        return select_within_budget(completed, budget)
    return select_trial(front, selection, [t.values for t in completed]), None


def export_study(study: optuna.Study, space: MaskSpace, output_dir: str, selection: str = "mean",
                 budget: float | None = None) -> dict:
    """Write best_mask.json, pareto.json and trials.csv for a study; return the chosen trial's summary."""
    os.makedirs(output_dir, exist_ok=True)
    front = pareto_front(study)  # with a budget: the feasible trials' front (Optuna's best_trials)
    chosen, _ = choose_trial(front, study.get_trials(states=(TrialState.COMPLETE,)), selection, budget)
    mask = mask_of_trial(chosen, space)
    mask.save(os.path.join(output_dir, BEST_MASK_FILE))
    rows = [_trial_row(t, space) for t in study.get_trials(deepcopy=False)]
    pareto = {
        "study_name": study.study_name,
        "objectives": list(OBJECTIVES),
        "selection": selection,
        "max_memorization": budget,
        "chosen_trial": chosen.number,
        "front": [_trial_row(t, space) for t in front],
    }
    write_json_atomic(os.path.join(output_dir, PARETO_FILE), pareto)
    fieldnames = sorted({k for r in rows for k in r})
    with atomic_open(os.path.join(output_dir, TRIALS_FILE), newline="") as f:
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


def exposure_report(exposures: Sequence[float]) -> dict:
    """The D_mem exposures of a search's trials next to the paper's; warn when they are below a tenth of it (trials
    that short cannot memorize, so d_mem cannot tell masks that memorize from those that do not)."""
    report = {"per_trial": min(exposures) if exposures else None, "paper": PAPER_DMEM_EXPOSURES}
    if exposures and min(exposures) < PAPER_DMEM_EXPOSURES / 10:
        logger.warning("Each search trial shows each D_mem pair %s times, below a tenth of the paper's %d: trials this "
                       "short do not memorize. Raise --max_train_steps or lower --dmem_size.", report["per_trial"],
                       PAPER_DMEM_EXPOSURES)
    return report
