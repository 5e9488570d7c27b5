"""The search machinery on real Optuna storages (SQLite file, PostgreSQL server, journal file).

The trial function here is a cheap deterministic function of the mask so that these tests exercise the study, the
workers, heartbeats and retries; the trainer-backed trial function is tested with the trainer.
"""

import json
import multiprocessing
import os
import signal
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from diffusers_memcontrol import MaskSpace
from diffusers_memcontrol.search.optuna_compat import generation_key, record_heartbeat
from diffusers_memcontrol.search.study import (
    PAPER_DMEM_EXPOSURES,
    ReproducibleNSGAIISampler,
    SearchConfig,
    choose_trial,
    create_study,
    export_study,
    exposure_report,
    optimize,
    pareto_front,
    resolve_storage,
    run_worker,
    select_trial,
    select_within_budget,
)
from tests.conftest import make_small_unet


def toy_trial(mask, learning_rate, trial):
    """d_mem grows with the bits switched on, FID shrinks with them: a real two-objective tradeoff."""
    on = sum(mask.bits)
    weighted = sum(b * (i + 1) for i, b in enumerate(mask.bits))
    return {"memorization_objective": on + 0.01 * weighted,
            "quality_objective": (len(mask) - on) ** 2 + 0.001 * weighted, "trainable_params": on}


def shuffled_toy_trial(mask, learning_rate, trial):
    """toy_trial after a mask-dependent sleep, so that concurrent trials finish in a shuffled order."""
    time.sleep(0.02 * (int(mask.bitstring, 2) % 11))
    return toy_trial(mask, learning_rate, trial)


def slow_toy_trial(mask, learning_rate, trial):
    """Like toy_trial, but blocks while a flag file exists (so a test can kill the worker mid-trial)."""
    flag = os.environ["MEMCONTROL_TEST_BLOCK_FILE"]
    if os.path.exists(flag):
        # Optuna never marks a trial stale before its first heartbeat, and its heartbeat thread races this
        # function; record one here so the kill always lands on a trial the retry logic can see.
        record_heartbeat(trial.study, trial)
        open(flag + ".started", "w").close()
        while os.path.exists(flag):
            time.sleep(0.1)
    return toy_trial(mask, learning_rate, trial)


@pytest.fixture(scope="module")
def space():
    return MaskSpace.from_unet(make_small_unet(layers_per_block=1), "svdiff", "paper")


def _postgres_url():
    url = os.environ.get("MEMCONTROL_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("MEMCONTROL_REQUIRE_POSTGRES"):
            pytest.fail("MEMCONTROL_REQUIRE_POSTGRES is set but MEMCONTROL_TEST_POSTGRES_URL is not")
        pytest.skip("no PostgreSQL server: run `export MEMCONTROL_TEST_POSTGRES_URL=$(bash .ci/postgres.sh)`")
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return "sqlite:///" + str(tmp_path / "study.db")
    return _postgres_url()


def _config(storage_url, **kw):
    return SearchConfig(storage=storage_url, study_name=f"test-{uuid.uuid4().hex[:8]}", **kw)


def test_nsga2_is_used_and_default_mask_seeded(space, tmp_path):
    config = _config(None, n_trials=8)
    study = optimize(space, config, str(tmp_path), toy_trial)
    assert os.path.exists(tmp_path / "study.db")  # the default storage
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 8
    first = min(trials, key=lambda t: t.number)
    assert all(v == 1 for k, v in first.params.items() if k.startswith("bit_"))
    assert first.user_attrs["mask"]["bits"] == [1] * len(space)
    worker_study = optuna.load_study(study_name=study.study_name, storage=resolve_storage(None, str(tmp_path)),
                                     sampler=optuna.samplers.NSGAIISampler(population_size=3))
    assert isinstance(worker_study.sampler, optuna.samplers.NSGAIISampler)


def test_the_objectives_are_the_trials_objective_values_never_its_dmem_or_fid(space, tmp_path):
    def clique_kid_trial(mask, learning_rate, trial):
        return {"dmem": 2.0, "fid": 50.0, "memorization_objective": 0.4, "memorization_metric": "cliques",
                "quality_objective": 0.25, "quality_metric": "kid"}

    study = optimize(space, _config(None, n_trials=2), str(tmp_path), clique_kid_trial)
    assert study.metric_names == ["memorization", "quality"]
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert t.values == [0.4, 0.25] and t.user_attrs["dmem"] == 2.0 and t.user_attrs["fid"] == 50.0
        assert t.user_attrs["memorization_metric"] == "cliques" and t.user_attrs["quality_metric"] == "kid"


def test_a_trial_without_its_objective_values_fails(space, tmp_path):
    def old_trial(mask, learning_rate, trial):
        return {"dmem": 2.0, "fid": 50.0}

    with pytest.raises(RuntimeError, match="trials of this worker failed"):
        optimize(space, _config(None, n_trials=1), str(tmp_path), old_trial)


def test_pareto_selection_and_exports(space, tmp_path):
    config = _config(None, n_trials=12, seed=1)
    study = optimize(space, config, str(tmp_path), toy_trial)
    front = pareto_front(study)
    values = [t.values for t in study.get_trials(states=(TrialState.COMPLETE,))]
    for t in front:  # nothing dominates a front member
        assert not any(v[0] <= t.values[0] and v[1] <= t.values[1] and tuple(v) != tuple(t.values) for v in values)
    chosen = select_trial(front, "mean")
    assert sum(chosen.values) / 2 == min(sum(t.values) / 2 for t in front)
    normalized = select_trial(front, "normalized_mean")
    assert normalized in front
    summary = export_study(study, space, str(tmp_path))
    assert summary["trial"] == chosen.number
    best = json.loads((tmp_path / "best_mask.json").read_text())
    assert best["positions"] == space.positions and len(best["bits"]) == len(space)
    pareto = json.loads((tmp_path / "pareto.json").read_text())
    assert {r["number"] for r in pareto["front"]} == {t.number for t in front}
    lines = (tmp_path / "trials.csv").read_text().splitlines()
    assert len(lines) == 1 + len(study.trials)


def test_normalized_selection_scales_by_every_trial():
    """The quickstart's front had two trials; normalized over the front alone they always tie at 0.5 (the lower
    number won). Scaled by the spread of all trials, the one with the much better FID wins."""
    front = [optuna.trial.create_trial(values=[0.784, 30.9]), optuna.trial.create_trial(values=[0.786, 29.66])]
    front[0].number, front[1].number = 0, 1
    trials = [t.values for t in front] + [[2.0, 104.0], [1.8, 61.4]]
    assert select_trial(front, "normalized_mean").number == 0  # the tie
    assert select_trial(front, "normalized_mean", trials).number == 1
    assert select_trial(front, "mean", trials).number == 1  # the paper's rule ignores the scale


def _history(study):
    """{number: (parameters, generation)} of the completed trials."""
    key = generation_key(ReproducibleNSGAIISampler)
    return {t.number: (t.params, t.system_attrs[key]) for t in study.get_trials(states=(TrialState.COMPLETE,))}


def test_restart_resumes(space, storage_url, tmp_path):
    config = _config(storage_url, n_trials=4, population_size=3)
    optimize(space, config, str(tmp_path), toy_trial)
    config.n_trials = 7
    study = optimize(space, config, str(tmp_path), toy_trial)
    numbers = [t.number for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert len(numbers) == 7 and len(set(numbers)) == 7
    assert sum(1 for t in study.trials if t.user_attrs.get("seeded")) == 1  # seeded once, not per restart
    straight = optimize(space, _config(storage_url, n_trials=7, population_size=3), str(tmp_path), toy_trial)
    assert _history(study) == _history(straight)  # resuming does not change the trials


def test_same_trials_and_mask_whatever_the_number_of_workers(space, storage_url, tmp_path):
    runs = []
    for workers in (1, 2):
        config = _config(storage_url, n_trials=9, population_size=3, seed=3, n_workers=workers)
        study = optimize(space, config, str(tmp_path), shuffled_toy_trial)
        runs.append((_history(study), export_study(study, space, str(tmp_path / f"w{workers}"))["mask"]))
    assert runs[0] == runs[1]
    history = runs[0][0]
    assert sorted(history) == list(range(9))
    assert [generation for _, generation in history.values()] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert set(history[0][0].values()) == {1}  # the default mask stays trial 0, a member of the first population
    assert len({tuple(params.values()) for params, _ in history.values()}) > 3


def test_a_trial_waits_until_its_view_shows_the_previous_generation_finished():
    """CI caught trial 4 of two PostgreSQL workers drawing its parents from a stale view (trial 2 still running)
    while trial 3 had already started generation 1: it must wait instead."""
    from types import SimpleNamespace

    from diffusers_memcontrol.search.study import _generation

    key = generation_key(ReproducibleNSGAIISampler)

    def trial(number, state, generation):
        return SimpleNamespace(number=number, state=state, system_attrs={key: generation})

    finished = [trial(0, TrialState.COMPLETE, 0), trial(1, TrialState.COMPLETE, 0)]
    assert _generation([*finished, trial(2, TrialState.RUNNING, 0), trial(3, TrialState.RUNNING, 1)], 4, key, 3) is None
    assert _generation([*finished, trial(2, TrialState.COMPLETE, 0), trial(3, TrialState.RUNNING, 1)], 4, key, 3) == 1


def test_parents_do_not_depend_on_which_worker_selects_them(space, tmp_path):
    """The PostgreSQL race: the worker that selects a generation's parents first got them in elite-selection order,
    the others read them back from the study in trial-number order, and parent selection draws positions in that
    list. Here another worker selects generation 1's parents before trial 3 samples: trial 3 must not change."""
    straight = optimize(space, _config(None, n_trials=6, population_size=3, seed=3), str(tmp_path / "a"), toy_trial)
    config = _config(None, n_trials=3, population_size=3, seed=3)
    study = optimize(space, config, str(tmp_path / "b"), toy_trial)  # generation 0
    other_worker = ReproducibleNSGAIISampler(population_size=3, seed=3)
    selected = other_worker.get_parent_population(study, 1)  # selects them and stores them in the study
    assert [t.number for t in selected] == [t.number for t in other_worker.get_parent_population(study, 1)]
    config.n_trials = 6
    interleaved = optimize(space, config, str(tmp_path / "b"), toy_trial)
    assert _history(interleaved) == _history(straight)


def recording_trial(mask, learning_rate, trial):
    """toy_trial that appends `<pid> <trial number>` to $MEMCONTROL_TEST_TRAINED_LOG."""
    with open(os.environ["MEMCONTROL_TEST_TRAINED_LOG"], "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {trial.number}\n")
    return toy_trial(mask, learning_rate, trial)


def _worker_asking_with_the_other(barrier, space, config, output_dir, index):
    """run_worker whose first ask starts together with the other worker's, on a machine so loaded that a trial's
    state update comes 0.3 s after the read that chose it (both workers then read the queue before either updates)."""
    import sqlalchemy

    ask = optuna.Study.ask
    first = [True]

    def ask_together(self, *args, **kwargs):
        if first[0]:
            first[0] = False
            barrier.wait()
        return ask(self, *args, **kwargs)

    def slow_state_update(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE TRIALS SET STATE"):
            time.sleep(0.3)

    optuna.Study.ask = ask_together
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", slow_state_update)
    run_worker(space, config, output_dir, recording_trial, index)


def test_two_sqlite_workers_never_train_one_trial_twice(space, tmp_path, monkeypatch, capfd):
    """Issue 19: both workers of a SQLite study popped the enqueued default mask (SQLite ignores SELECT ... FOR
    UPDATE), trained it, and the second `tell` killed its worker with a traceback."""
    log = tmp_path / "trained.txt"
    monkeypatch.setenv("MEMCONTROL_TEST_TRAINED_LOG", str(log))
    config = _config(None, n_trials=4, n_workers=2)
    create_study(space, config, str(tmp_path))
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_worker_asking_with_the_other, args=(barrier, space, config, str(tmp_path), i))
               for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    trained = [line.split() for line in log.read_text().splitlines()]
    numbers = [int(number) for _, number in trained]
    assert sorted(numbers) == sorted(set(numbers)), f"a trial was trained twice: {trained}"
    assert [w.exitcode for w in workers] == [0, 0]
    assert "Traceback" not in capfd.readouterr().err
    study = optuna.load_study(study_name=config.study_name, storage=resolve_storage(None, str(tmp_path)))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    assert len({pid for pid, _ in trained}) == 2  # both workers trained


def test_two_workers_share_one_study(space, storage_url, tmp_path):
    config = _config(storage_url, n_trials=10, n_workers=2)
    study = optimize(space, config, str(tmp_path), toy_trial)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 10
    extra = study.get_trials(states=(TrialState.PRUNED,))  # when both workers started the last trial
    assert len(extra) <= 1 and all("skipped" in t.user_attrs and not t.params for t in extra)
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.FAIL))


def test_killed_worker_trial_is_retried(space, storage_url, tmp_path, monkeypatch):
    flag = tmp_path / "block"
    flag.write_text("")
    monkeypatch.setenv("MEMCONTROL_TEST_BLOCK_FILE", str(flag))
    config = _config(storage_url, n_trials=3, heartbeat_interval=1, grace_period=2)
    create_study(space, config, str(tmp_path))
    context = multiprocessing.get_context("spawn")
    worker = context.Process(target=run_worker, args=(space, config, str(tmp_path), slow_toy_trial))
    worker.start()
    deadline = time.time() + 120
    while not os.path.exists(str(flag) + ".started"):
        assert time.time() < deadline and worker.is_alive(), "worker never started its trial"
        time.sleep(0.1)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    flag.unlink()
    time.sleep(3)  # past the grace period: the trial is stale
    study = optimize(space, config, str(tmp_path), slow_toy_trial)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == failed[0].params
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3


def test_exposure_report_warns_below_a_tenth_of_the_paper(caplog):
    with caplog.at_level("WARNING", logger="diffusers_memcontrol.search.study"):
        report = exposure_report([60.0, 200.0])
    assert report == {"per_trial": 60.0, "paper": PAPER_DMEM_EXPOSURES}
    assert "below a tenth of the paper's" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="diffusers_memcontrol.search.study"):
        exposure_report([PAPER_DMEM_EXPOSURES / 2])
    assert not caplog.text


def test_journal_storage(space, tmp_path):
    config = _config(str(tmp_path / "study.journal"), n_trials=5)
    study = optimize(space, config, str(tmp_path), toy_trial)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 5


def test_bad_inputs(space, tmp_path):
    config = _config(None, n_trials=3)
    create_study(space, config, str(tmp_path))
    other = MaskSpace.from_unet(make_small_unet(layers_per_block=1), "difffit", "blocks")
    with pytest.raises(ValueError, match="Use another --study_name"):
        create_study(other, config, str(tmp_path))
    with pytest.raises(ConnectionError, match=r"Cannot open Optuna storage postgresql\+psycopg2://\*\*\*@127.0.0.1:1/none"
                       ) as err:
        resolve_storage("postgresql+psycopg2://user:secret@127.0.0.1:1/none", str(tmp_path))
    assert "secret" not in str(err.value)
    with pytest.raises(ValueError, match="neither a database URL"):
        resolve_storage("/tmp/somewhere/study", str(tmp_path))
    with pytest.raises(ValueError, match="population_size must be >= 2"):
        SearchConfig(population_size=1)
    with pytest.raises(ValueError, match="Unknown selection"):
        SearchConfig(selection="best")
    with pytest.warns(UserWarning, match="smaller than one NSGA-II generation"):
        create_study(space, _config(None, n_trials=2, population_size=10), str(tmp_path))


def failing_trial(mask, learning_rate, trial):
    raise RuntimeError("the trainer could not start")


def test_always_failing_trials_stop_the_search(space, tmp_path):
    config = _config(None, n_trials=5, max_failed_trials=2)
    with pytest.raises(RuntimeError, match="2 trials of this worker failed.*the trainer could not start"):
        optimize(space, config, str(tmp_path), failing_trial)


def _processes_naming(text: str) -> list[int]:
    """Pids of the live processes whose command line holds `text` (Linux /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if text in cmdline and not zombie:
            pids.append(int(pid))
    return pids


def test_two_machines_share_one_study_and_survive_a_sigkill(tmp_path):
    """Two real `--search --stage 1` commands (two 'machines': own output folders, one PostgreSQL study). One is
    SIGKILLed during a trial: its trainer dies with it, the other finishes the study with the killed trial retried
    once; run again, the killed command trains nothing and reports the same chosen mask."""
    import subprocess
    import sys

    url = _postgres_url()
    name = f"machines-{uuid.uuid4().hex[:8]}"
    tiny = ["--max_train_steps", "1", "--train_batch_size", "4", "--max_train_samples", "8", "--dmem_size", "2",
            "--dmem_repeats", "1", "--proxy_fraction", "0.05", "--dmem_unique_captions", "--eval_num_prompts", "2",
            "--eval_inference_steps", "1"]
    out = {m: str(tmp_path / m) for m in ("a", "b")}

    def command(machine):
        return [sys.executable, "-m", "diffusers_memcontrol.cli", "search", "--stage", "1", "--search_space",
                "difffit", "--mask_layout", "paper", "--n_trials", "3", "--population_size", "2", "--storage", url,
                "--study_name", name, "--heartbeat_interval", "1", "--grace_period", "3", "--output_dir", out[machine],
                *tiny]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / "a.log", "w", encoding="utf-8") as log_a, open(tmp_path / "b.log", "w", encoding="utf-8") as log_b:
        a = subprocess.Popen(command("a"), env=env, stdout=log_a, stderr=subprocess.STDOUT)
        b = subprocess.Popen(command("b"), env=env, stdout=log_b, stderr=subprocess.STDOUT)
    trials_a = os.path.join(out["a"], "trials", f"{name}-difffit-paper")
    while not (os.path.isdir(trials_a) and _processes_naming(trials_a)) and a.poll() is None:
        time.sleep(0.2)  # until machine a's trainer runs
    assert a.poll() is None, "machine a finished before it could be killed"
    a.send_signal(signal.SIGKILL)
    a.wait()
    for _ in range(100):  # PR_SET_PDEATHSIG: the trainer goes with its search
        if not _processes_naming(trials_a):
            break
        time.sleep(0.1)
    assert not _processes_naming(trials_a)
    assert b.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()[-3000:]

    storage = resolve_storage(url, str(tmp_path))
    study = optuna.load_study(study_name=f"{name}-difffit-paper", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(complete) == 3 and len(failed) == 1
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retried) == 1 and retried[0].params == failed[0].params
    trained = {m: sorted(os.listdir(os.path.join(out[m], "trials", f"{name}-difffit-paper"))) for m in out}
    assert not set(trained["a"]) & set(trained["b"])  # no trial ran on both machines
    assert f"trial-{failed[0].number:04d}" in trained["a"]

    subprocess.run(command("a"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=300, check=True)
    assert sorted(os.listdir(trials_a)) == trained["a"]  # nothing trained again
    assert len(optuna.load_study(study_name=f"{name}-difffit-paper", storage=storage).trials) == 4
    summaries = []
    for folder in out.values():
        with open(os.path.join(folder, "search_summary.json"), encoding="utf-8") as f:
            summaries.append(json.load(f))
    assert summaries[0]["chosen"] == summaries[1]["chosen"]
    fronts = [sorted(s["trials"][i]["trial"] for i in s["front"]) for s in summaries]
    assert fronts[0] == fronts[1]


def test_a_memorization_budget_is_an_optuna_constraint_and_the_choice_is_the_best_quality_within_it(space, tmp_path):
    budget = 3.5  # the toy's memorization objective is about the number of bits on
    study = optimize(space, _config(None, n_trials=10, population_size=4, max_memorization=budget), str(tmp_path),
                     toy_trial)
    completed = study.get_trials(states=(TrialState.COMPLETE,))
    feasible = [t for t in completed if t.values[0] <= budget]
    assert feasible and len(feasible) < len(completed)  # the budget separates the trials
    for t in completed:  # the constraint Optuna reads (feasible when <= 0)
        assert [v for k, v in t.system_attrs.items() if "constraint" in k] == [pytest.approx(t.values[0] - budget)]
    assert {t.number for t in pareto_front(study)} <= {t.number for t in feasible}  # the front is the feasible one
    chosen, within = choose_trial(pareto_front(study), completed, "mean", budget)
    assert within and chosen.values[1] == min(t.values[1] for t in feasible)
    export = export_study(study, space, str(tmp_path / "export"), budget=budget)
    assert export["trial"] == chosen.number
    assert json.loads((tmp_path / "export" / "pareto.json").read_text())["max_memorization"] == budget


def test_without_a_feasible_trial_the_choice_is_the_least_memorizing_and_says_so():
    def trial(number, memorization, quality):
        made = optuna.trial.create_trial(values=[memorization, quality])
        made.number = number
        return made

    trials = [trial(0, 0.6, 0.1), trial(1, 0.4, 0.9), trial(2, 0.4, 0.5)]
    assert select_within_budget(trials, 0.2) == (trials[2], False)  # least memorizing, then best quality
    assert select_within_budget(trials, 0.5) == (trials[2], True)
    assert select_within_budget(trials, 1.0) == (trials[0], True)
    assert choose_trial(trials, trials, "mean", None)[1] is None  # no budget: the front's selection


@pytest.mark.parametrize("budget", [-0.1, float("nan"), float("inf")])
def test_a_budget_is_a_finite_number_at_least_0(budget):
    with pytest.raises(ValueError, match="max_memorization"):
        SearchConfig(max_memorization=budget)
