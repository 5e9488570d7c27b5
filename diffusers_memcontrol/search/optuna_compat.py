"""The few private parts of Optuna the search relies on, in one place (each has a test in tests/test_optuna_compat.py).

Optuna keeps a study's storage, ids and trial cache, and NSGA-II's random states, in private attributes. The search
needs them to make trials reproducible whatever the number of workers (`search.ReproducibleNSGAIISampler`) and to
keep heartbeats while a trial waits for its generation. When an Optuna release renames one of them, this module (and
its tests) is the only place to change.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes."""
    return study._storage


def study_id_of(study: optuna.Study) -> int:
    """The storage's id of a study."""
    return study._study_id


def trial_id_of(trial: FrozenTrial | optuna.Trial) -> int:
    """The storage's id of a trial (not its number)."""
    return trial._trial_id


def record_heartbeat(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> bool:
    """Record a heartbeat of `trial` when the study's storage keeps heartbeats; return whether it does."""
    storage = storage_of(study)
    if not is_heartbeat_enabled(storage):
        return False
    storage.record_heartbeat(trial_id_of(trial))
    return True


def forget_cached_trials(study: optuna.Study) -> None:
    """Drop the study's per-thread copy of its trials, so that the next read sees the storage as it is now."""
    study._thread_local.cached_all_trials = None


def generation_key(sampler_class: type[optuna.samplers.NSGAIISampler]) -> str:
    """The trial system attribute in which an NSGA-II sampler records a trial's generation."""
    return sampler_class._get_generation_key()


def reseed_nsga2(sampler: optuna.samplers.NSGAIISampler, state: np.ndarray) -> None:
    """Seed every random state an NSGA-II sampler draws from (crossover, parent selection, mutation, first
    population) with `state`."""
    sampler._rng.rng.seed(state)
    sampler._random_sampler._rng.rng.seed(state)


def nsga2_child(sampler: optuna.samplers.NSGAIISampler, study: optuna.Study, search_space: dict,
                parents: list[FrozenTrial]) -> dict:
    """The parameters of a child of `parents` (NSGA-II's crossover and mutation of the sampler's settings)."""
    return sampler._child_generation_strategy(study, search_space, parents)


def _begin_immediate(engine: Any) -> None:
    """Make every transaction of a pysqlite engine start with BEGIN IMMEDIATE (SQLAlchemy's documented recipe for
    pysqlite transactions, with SQLite's write lock taken at the start)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def no_implicit_transactions(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None  # pysqlite must not issue its own BEGIN (only before writes)

    @event.listens_for(engine, "begin")
    def begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened by the constructor lack the `connect` setting


class LockingSQLiteStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage on SQLite, whose transactions take the database's write lock when they begin.

    Optuna serializes read-modify-write steps with `SELECT ... FOR UPDATE`, which SQLite ignores, and pysqlite runs
    the SELECT outside any transaction: two workers that pop the same enqueued (WAITING) trial both read it as
    WAITING and both set it RUNNING, then both train it and the second `tell` fails. With BEGIN IMMEDIATE the second
    worker's read waits for the first one's commit and sees the trial RUNNING, as PostgreSQL's row lock would make
    it. Uses RDBStorage's `engine` attribute and its pickling (`__setstate__` builds a new engine).
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        engine_kwargs = dict(kwargs.pop("engine_kwargs", None) or {})
        # a worker may wait for the others' short transactions; pysqlite's default gives up after 5 s
        engine_kwargs.setdefault("connect_args", {}).setdefault("timeout", 120)
        super().__init__(url, engine_kwargs=engine_kwargs, **kwargs)
        _begin_immediate(self.engine)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _begin_immediate(self.engine)
