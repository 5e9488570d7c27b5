"""Claiming and reusing fine-tune runs: several commands (machines) sharing an output folder train each run once.

A run is a folder (`final/<row>`, `trials/full-ft`). `run_claimed` trains it under a claim, a lock file
`<run folder>.lock` created in one step (`files.create_exclusive`) that names its holder (host, pid, since when) and
whose time stamp the holder refreshes while it trains. A claim whose holder is gone is reclaimed by moving the lock
aside (`files.move`, atomic), never by removing and re-creating it, so two reclaimers never both win:

- a lock of this host whose process is dead, or whose pid now belongs to another process (or of an earlier boot);
- a lock that is empty or unreadable (its owner died between creating and writing it, with an older version) and
  older than `EMPTY_LOCK_GRACE_SECONDS`;
- a lock of another host not refreshed for `CLAIM_STALE_SECONDS` (its machine died or lost the shared folder).

A command that waits for another one's run logs who holds it and since when, and stops with an `error:` line after
`CLAIM_WAIT_TIMEOUT_SECONDS`. A run is finished when its folder holds the `run_args.json` of the same arguments and
the trainer's `trial_result.json`, which the trainer writes last; anything less is trained again.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from queue import SimpleQueue

from ..constants import METRICS_FILE, RUN_ARGS_FILE, TRIAL_RESULT_FILE
from ..errors import InputError
from ..files import create_exclusive, move, write_json_atomic
from ..trainer.arguments import argv_digest, public_argv
from .launching import run_trainer
from .trial_result import TrialResult

logger = logging.getLogger(__name__)

CLAIM_POLL_SECONDS = 2.0  # between two looks at a run another command holds
CLAIM_HEARTBEAT_SECONDS = 30.0  # the holder refreshes its lock's time stamp this often
CLAIM_STALE_SECONDS = 600.0  # a lock of another host not refreshed for this long is reclaimed
EMPTY_LOCK_GRACE_SECONDS = 60.0  # an empty or unreadable lock older than this is reclaimed
CLAIM_WAIT_TIMEOUT_SECONDS = 48 * 3600.0  # a command stops waiting for another one's run after this long


class ClaimTimeoutError(InputError):
    """A run another command holds did not finish in time: the message names the holder and the lock file."""


class WorkerPool:
    """The command's `n_workers` worker slots: submitted runs train `n_workers` at a time, each with its slot's GPUs
    (`gpus_per_trial`) or share of the CPU cores, in the order submitted."""

    def __init__(self, n_workers: int = 1, gpus_per_trial: int = 1, accelerate_config: str | None = None):
        self.n_workers, self.gpus_per_trial, self.accelerate_config = n_workers, gpus_per_trial, accelerate_config
        self._executor = ThreadPoolExecutor(max_workers=n_workers)
        self._slots: SimpleQueue = SimpleQueue()
        for slot in range(n_workers):
            self._slots.put(slot)

    def submit(self, args: list[str], run_dir: str, wait: bool = True) -> Future:
        """`run_claimed(args, run_dir, wait)` on the next free slot: a future of its TrialResult (None: not
        claimed)."""
        return self._executor.submit(self._run, args, run_dir, wait)

    def _run(self, args: list[str], run_dir: str, wait: bool) -> TrialResult | None:
        slot = self._slots.get()
        try:
            return run_claimed(args, run_dir, wait, worker=slot if self.n_workers > 1 else None,
                               num_workers=self.n_workers, num_processes=self.gpus_per_trial,
                               accelerate_config=self.accelerate_config)
        finally:
            self._slots.put(slot)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self._executor.shutdown(wait=True)


def run_claimed(args: list[str], run_dir: str, wait: bool = True, **kwargs) -> TrialResult | None:
    """`run_or_reuse` under a claim on `run_dir` (`claim_run`): train it here, or (`wait`) poll until the command
    that claimed it has finished it (None at once without `wait`). Raises ClaimTimeoutError after
    `CLAIM_WAIT_TIMEOUT_SECONDS` of waiting."""
    started, announced = time.monotonic(), None
    while (result := finished_run(args, run_dir)) is None:
        claim = claim_run(run_dir)
        if claim is not None:
            with claim.kept():
                return run_or_reuse(args, run_dir, **kwargs)
        if not wait:
            return None
        holder = lock_holder(run_dir + ".lock")
        if holder != announced:
            logger.info("Waiting for %s: %s.", run_dir, _describe(holder))
            announced = holder
        if time.monotonic() - started > CLAIM_WAIT_TIMEOUT_SECONDS:
            raise ClaimTimeoutError(
                f"{run_dir} did not finish within {CLAIM_WAIT_TIMEOUT_SECONDS:.0f} s: {_describe(holder)}. If that "
                f"command is gone, remove {run_dir}.lock and run this command again.")
        time.sleep(CLAIM_POLL_SECONDS)
    return result


@dataclass
class Claim:
    """This process's claim on a run: its lock file and the token that tells the lock apart from any other."""

    path: str
    token: str

    def owned(self) -> bool:
        """Whether the lock file is still this claim's."""
        holder = lock_holder(self.path)
        return holder is not None and holder.get("token") == self.token

    def refresh(self) -> bool:
        """Refresh the lock's time stamp (a live holder's lock is never stale); False when it is no longer ours."""
        if not self.owned():
            return False
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path)
            return True
        return False

    def release(self) -> None:
        """Remove the lock if it is still this claim's (never another holder's)."""
        if self.owned():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        else:
            logger.warning("The claim %s is no longer this process's; left in place.", self.path)

    @contextlib.contextmanager
    def kept(self) -> Iterator[Claim]:
        """Hold the claim for the block: refresh it every CLAIM_HEARTBEAT_SECONDS, release it at the end."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(CLAIM_HEARTBEAT_SECONDS):
                if not self.refresh():
                    logger.error("The claim %s is no longer this process's while it trains (%s).", self.path,
                                 _describe(lock_holder(self.path)))

        thread = threading.Thread(target=beat, name=f"claim {os.path.basename(self.path)}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            done.set()
            thread.join()
            self.release()


def claim_run(run_dir: str) -> Claim | None:
    """Claim a run for this process: create `run_dir.lock` naming this host, pid and time; None when another live
    holder has it. A stale lock (see the module's docstring) is moved aside first, and logged."""
    path = run_dir + ".lock"
    token = uuid.uuid4().hex
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now(), "token": token,
              "boot_id": _boot_id(), "pid_start": _process_start(os.getpid())}
    for _ in range(3):
        seen = _read_lock(path)
        if seen is None:
            if create_exclusive(path, json.dumps(record)):
                return Claim(path, token)
            continue  # another claimer was faster: look at its lock
        reason = stale_reason(path, seen)
        if reason is None:
            return None
        _reclaim(path, seen, reason)
    return None


def release_run(claim: Claim) -> None:
    """Release a claim of `claim_run`."""
    claim.release()


def lock_holder(lock_path: str) -> dict | None:
    """The record in a lock file (host, pid, since, ...), {} for an empty or unreadable one, None without one."""
    seen = _read_lock(lock_path)
    return None if seen is None else seen[1]


def stale_reason(lock_path: str, seen: tuple[bytes, dict, os.stat_result] | None = None) -> str | None:
    """Why the lock at `lock_path` is stale (its holder is gone), or None while its holder may be alive."""
    seen = seen or _read_lock(lock_path)
    if seen is None:
        return None
    _, holder, stat = seen
    age = time.time() - stat.st_mtime
    if not holder:
        return f"empty or unreadable lock, {age:.0f} s old" if age > EMPTY_LOCK_GRACE_SECONDS else None
    if holder.get("host") == socket.gethostname() and holder.get("boot_id") in (None, _boot_id()):
        pid = holder.get("pid")
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return f"process {pid} of this host is dead"
        except PermissionError:  # alive, another user's
            pass
        except (TypeError, ValueError):
            return f"lock names no process ({pid!r})"
        recorded = holder.get("pid_start")
        if recorded is not None and _process_start(int(pid)) not in (None, recorded):
            return f"pid {pid} now belongs to another process"
        return None
    if holder.get("host") == socket.gethostname():
        return "its process ran before this host restarted"
    if age > CLAIM_STALE_SECONDS:
        return f"host {holder.get('host')} has not refreshed it for {age:.0f} s"
    return None


def _reclaim(path: str, seen: tuple[bytes, dict, os.stat_result], reason: str) -> bool:
    """Move the stale lock `seen` aside; True when this process moved it. Another claimer may have moved it first and
    claimed the run: the lock then moved here is that claimer's, and it goes back in place."""
    grave = f"{path}.stale-{uuid.uuid4().hex[:12]}"
    try:
        move(path, grave)
    except FileNotFoundError:
        return False
    moved = _read_lock(grave)
    try:
        if moved is None or moved[0] != seen[0] or moved[2].st_ino != seen[2].st_ino:
            if moved is not None and not create_exclusive(path, moved[0].decode("utf-8", errors="replace")):
                logger.error("Could not put back the claim %s (%s) after reclaiming it by mistake.", path,
                             _describe(moved[1]))
            return False
        logger.warning("Reclaimed %s (%s): %s.", path, _describe(seen[1]), reason)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(grave)


def _read_lock(path: str) -> tuple[bytes, dict, os.stat_result] | None:
    """(raw bytes, parsed record or {}, stat) of a lock file, None when there is none."""
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        holder = {}
    return raw, holder if isinstance(holder, dict) else {}, stat


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "no lock"
    if not holder:
        return "held by an empty lock file"
    return f"held by host {holder.get('host')} pid {holder.get('pid')} since {holder.get('since', '?')}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot, Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def finished_run(args: list[str], run_dir: str) -> TrialResult | None:
    """The result of a finished run of `args` in `run_dir`, or None (not run, other arguments, or half finished:
    the trainer writes trial_result.json last)."""
    args_path = os.path.join(run_dir, RUN_ARGS_FILE)
    if not (os.path.isfile(args_path) and os.path.isfile(os.path.join(run_dir, TRIAL_RESULT_FILE))):
        return None
    with open(args_path, encoding="utf-8") as f:
        recorded = json.load(f)
    if not isinstance(recorded, dict) or recorded.get("sha256") != argv_digest(args):  # compared by digest only
        return None
    try:
        return TrialResult.load(run_dir)
    except (ValueError, TypeError):
        return None  # not a result this package wrote: train again


def run_or_reuse(args: list[str], run_dir: str, **kwargs) -> TrialResult:
    """`launching.run_trainer`, unless `run_dir` already holds the result of a finished run with the same arguments:
    a restarted command redoes only the fine-tunes that had not finished (half-finished ones included)."""
    finished = finished_run(args, run_dir)
    if finished is not None:
        return finished
    os.makedirs(run_dir, exist_ok=True)
    for name in (TRIAL_RESULT_FILE, METRICS_FILE):  # another run's figures must never pass for this one's
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, name))
    record = {"sha256": argv_digest(args), "args": public_argv(args)}  # no token, no prompt
    write_json_atomic(os.path.join(run_dir, RUN_ARGS_FILE), record)
    return run_trainer(args, run_dir, **kwargs)
