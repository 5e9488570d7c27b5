"""Each private part of Optuna the search uses (diffusers_memcontrol.search.optuna_compat), checked against the installed
Optuna: a rename there fails here, not in a search."""

import pickle
import sqlite3

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution

from diffusers_memcontrol.search import optuna_compat as optuna_compat
from diffusers_memcontrol.search.study import ReproducibleNSGAIISampler


def _sqlite(tmp_path, **kwargs):
    return optuna_compat.LockingSQLiteStorage("sqlite:///" + str(tmp_path / "study.db"), **kwargs)


def test_storage_and_ids():
    study = optuna.create_study()
    trial = study.ask()
    storage = optuna_compat.storage_of(study)
    assert storage.get_trial(optuna_compat.trial_id_of(trial)).number == trial.number
    assert [t.number for t in storage.get_all_trials(optuna_compat.study_id_of(study))] == [trial.number]


def test_record_heartbeat(tmp_path):
    study = optuna.create_study()
    assert not optuna_compat.record_heartbeat(study, study.ask())  # in-memory storage: no heartbeats
    storage = _sqlite(tmp_path, heartbeat_interval=60)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    assert optuna_compat.record_heartbeat(study, trial)
    with sqlite3.connect(tmp_path / "study.db") as db:
        assert db.execute("SELECT trial_id FROM trial_heartbeats").fetchall() == [(optuna_compat.trial_id_of(trial),)]


def test_forget_cached_trials(tmp_path):
    storage = _sqlite(tmp_path)
    study = optuna.create_study(storage=storage, study_name="s")
    study.ask()
    assert len(study._get_trials(use_cache=True)) == 1  # the per-thread copy
    optuna.load_study(study_name="s", storage=storage).ask()  # another worker's trial
    assert len(study._get_trials(use_cache=True)) == 1
    optuna_compat.forget_cached_trials(study)
    assert len(study._get_trials(use_cache=True)) == 2


def test_generation_key():
    assert optuna_compat.generation_key(ReproducibleNSGAIISampler) == "ReproducibleNSGAIISampler:generation"
    study = optuna.create_study(sampler=optuna.samplers.NSGAIISampler(population_size=2, seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    key = optuna_compat.generation_key(optuna.samplers.NSGAIISampler)
    assert study.trials[0].system_attrs[key] == 0


def test_reseed_nsga2():
    a, b = (optuna.samplers.NSGAIISampler(population_size=2, seed=s) for s in (1, 2))
    study = optuna.create_study()
    trial = study.ask()
    frozen = optuna_compat.storage_of(study).get_trial(optuna_compat.trial_id_of(trial))
    x = FloatDistribution(0, 1)
    state = np.random.SeedSequence([3, 4]).generate_state(4)
    for sampler in (a, b):
        optuna_compat.reseed_nsga2(sampler, state)
    assert a.sample_independent(study, frozen, "x", x) == b.sample_independent(study, frozen, "x", x)  # mutation
    assert a._rng.rng.random_sample() == b._rng.rng.random_sample()  # crossover and parent selection


def test_sqlite_transactions_take_the_write_lock_when_they_begin(tmp_path):
    """What makes two SQLite workers pop an enqueued trial once (tests/test_search.py has the two-process test)."""
    storage = _sqlite(tmp_path)
    optuna.create_study(storage=storage)
    for engine in (storage.engine, pickle.loads(pickle.dumps(storage)).engine):  # a spawned worker's copy too
        with engine.connect() as connection:
            connection.begin()
            assert connection.connection.dbapi_connection.in_transaction  # BEGIN IMMEDIATE, before any statement
            with sqlite3.connect(tmp_path / "study.db", timeout=0) as other:
                try:
                    other.execute("BEGIN IMMEDIATE")
                    locked = False
                except sqlite3.OperationalError:
                    locked = True
            assert locked
            connection.rollback()


def test_nsga2_child():
    sampler = optuna.samplers.NSGAIISampler(population_size=2, seed=0, mutation_prob=0.0)
    study = optuna.create_study(directions=["minimize", "minimize"])
    for a, b in ((0, 1), (1, 0)):
        study.enqueue_trial({"a": a, "b": b})
        trial = study.ask()
        study.tell(trial, [trial.suggest_categorical("a", [0, 1]), trial.suggest_categorical("b", [0, 1])])
    space = {name: CategoricalDistribution([0, 1]) for name in ("a", "b")}
    child = optuna_compat.nsga2_child(sampler, study, space, study.trials)
    assert set(child) == {"a", "b"} and all(value in (0, 1) for value in child.values())  # crossover, no mutation
