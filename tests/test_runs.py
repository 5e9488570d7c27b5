"""Claiming and reusing runs: half-finished rows, stale locks (dead, reused, empty, another host's), two reclaimers,
and a clear stop when another command's run never finishes."""

import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from diffusers_memcontrol.constants import TRIAL_RESULT_FILE
from diffusers_memcontrol.search import claims as runs
from diffusers_memcontrol.search.trial_result import TrialResult

ARGS = ["--max_train_steps", "1"]


@pytest.fixture
def trainings(monkeypatch):
    """A trainer stand-in that records the folders it trains and writes what the trainer writes."""
    trained = []

    def fake_trainer(args, run_dir, **kwargs):
        trained.append(os.path.basename(run_dir))
        result = TrialResult(dmem=0.1, fid=1.0, trainable_params=7, global_step=1, train_samples=8,
                             dmem_exposures=1.0, metrics={"dmem": 0.1, "fid": 1.0})
        result.save(run_dir)
        return result

    monkeypatch.setattr(runs, "run_trainer", fake_trainer)
    return trained


def _lock(run_dir, record=None, age=0.0, raw=None):
    path = run_dir + ".lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(raw if raw is not None else json.dumps(record))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_half_finished_row_is_trained_again(tmp_path, trainings):
    """Issue 19: metrics.json was written before summary.json; a kill between the two left a row that looked finished
    and crashed every restart. The trainer's last file, trial_result.json, now marks a finished run."""
    run_dir = str(tmp_path / "final" / "full-none")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "run_args.json"), "w", encoding="utf-8") as f:
        json.dump(ARGS, f)
    with open(os.path.join(run_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump({"dmem": 9.0, "fid": 9.0}, f)  # killed before summary.json and trial_result.json
    assert runs.finished_run(ARGS, run_dir) is None
    result = runs.run_claimed(ARGS, run_dir)
    assert trainings == ["full-none"] and result.dmem == 0.1
    assert runs.run_claimed(ARGS, run_dir) == result and trainings == ["full-none"]  # finished: reused
    assert runs.finished_run(["--max_train_steps", "2"], run_dir) is None  # other arguments: not this run
    with open(os.path.join(run_dir, TRIAL_RESULT_FILE), "w", encoding="utf-8") as f:
        f.write("{")  # not a result this package wrote
    assert runs.finished_run(ARGS, run_dir) is None
    assert not os.path.exists(run_dir + ".lock")


def test_a_live_holder_keeps_its_claim_and_is_named_while_others_wait(tmp_path, monkeypatch, caplog):
    run_dir = str(tmp_path / "final" / "full-none")
    claim = runs.claim_run(run_dir)
    assert claim is not None and runs.claim_run(run_dir) is None  # held by this live process
    holder = runs.lock_holder(claim.path)
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid() and holder["since"]
    assert runs.run_claimed(ARGS, run_dir, wait=False) is None
    monkeypatch.setattr(runs, "CLAIM_WAIT_TIMEOUT_SECONDS", 0.0)
    monkeypatch.setattr(runs, "CLAIM_POLL_SECONDS", 0.01)
    expected = (rf"did not finish .* held by host .* pid {os.getpid()} since {re.escape(holder['since'])}.* "
                r"remove .*full-none.lock")
    with caplog.at_level("INFO", logger="diffusers_memcontrol.search.claims"), pytest.raises(runs.ClaimTimeoutError,
                                                                                    match=expected):
        runs.run_claimed(ARGS, run_dir)
    assert f"Waiting for {run_dir}: held by host {socket.gethostname()} pid {os.getpid()}" in caplog.text
    os.utime(claim.path, (0, 0))
    assert claim.refresh() and time.time() - os.stat(claim.path).st_mtime < runs.CLAIM_STALE_SECONDS
    claim.release()
    assert not os.path.exists(claim.path)


@pytest.mark.parametrize("case", ["dead pid", "reused pid", "empty", "other host"])
def test_stale_locks_are_reclaimed(tmp_path, caplog, case):
    run_dir = str(tmp_path / "final" / "full-none")
    host = socket.gethostname()
    if case == "dead pid":
        path = _lock(run_dir, {"host": host, "pid": _dead_pid()})  # a lock of the previous version
        expected = "of this host is dead"
    elif case == "reused pid":  # this live process's pid, but the lock's owner started at another time
        path = _lock(run_dir, {"host": host, "pid": os.getpid(), "pid_start": 1, "since": "2026-01-01T00:00:00"})
        expected = "now belongs to another process"
    elif case == "empty":
        path = _lock(run_dir, raw="")
        assert runs.claim_run(run_dir) is None  # maybe being written: within the grace period
        os.utime(path, (time.time() - runs.EMPTY_LOCK_GRACE_SECONDS - 5,) * 2)
        expected = "empty or unreadable lock"
    else:
        path = _lock(run_dir, {"host": "another-machine", "pid": 1})
        assert runs.claim_run(run_dir) is None  # its liveness cannot be checked from here: it may be training
        os.utime(path, (time.time() - runs.CLAIM_STALE_SECONDS - 5,) * 2)
        expected = "host another-machine has not refreshed it"
    with caplog.at_level("WARNING", logger="diffusers_memcontrol.search.claims"):
        claim = runs.claim_run(run_dir)
    assert claim is not None and claim.owned()
    assert f"Reclaimed {path}" in caplog.text and expected in caplog.text
    assert sorted(os.listdir(os.path.dirname(path))) == ["full-none.lock"]  # the stale lock moved aside, then gone


def test_release_never_removes_another_holders_lock(tmp_path):
    run_dir = str(tmp_path / "final" / "full-none")
    claim = runs.claim_run(run_dir)
    _lock(run_dir, {"host": "another-machine", "pid": 1})  # as if another command had reclaimed it
    claim.release()
    assert runs.lock_holder(run_dir + ".lock")["host"] == "another-machine"


def _reclaimer(run_dir: str, rounds: int, start, end, wins) -> None:
    """One of two claimers of one host: each round, both reclaim the same dead process's lock at the same time."""
    for _ in range(rounds):
        start.wait()
        claim = runs.claim_run(run_dir)
        wins.put(claim is not None)
        end.wait()  # keep the claim until the other claimer has tried
        if claim is not None:
            claim.release()


def test_two_reclaimers_on_one_host_only_one_wins(tmp_path):
    """Issue 19: both claimers removed the stale lock and created their own, so both trained the row."""
    run_dir = str(tmp_path / "final" / "full-none")
    rounds, dead = 200, _dead_pid()
    context = multiprocessing.get_context("fork")
    start, end, wins = context.Barrier(3), context.Barrier(3), context.Queue()
    claimers = [context.Process(target=_reclaimer, args=(run_dir, rounds, start, end, wins)) for _ in range(2)]
    for claimer in claimers:
        claimer.start()
    winners = []
    for _ in range(rounds):
        _lock(run_dir, {"host": socket.gethostname(), "pid": dead})
        start.wait()
        winners.append(sum(wins.get(timeout=60) for _ in range(2)))
        end.wait()
    for claimer in claimers:
        claimer.join()
    assert winners == [1] * rounds
    assert [c.exitcode for c in claimers] == [0, 0]
