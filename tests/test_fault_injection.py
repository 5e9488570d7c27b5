"""SIGKILL at random moments during checkpoint saves and rotation, adapter saves and publishing (issue 19).

Each workload runs in a forked child process (a real process, killed with SIGKILL; forking after the imports and the
tiny base are loaded keeps each kill at a fraction of a second instead of a fresh interpreter's start-up). The kill
times come from a seeded generator. After every kill: `latest` is a complete checkpoint no older than the last one
the child reported saved (at most the interval being written is lost), every visible checkpoint passes its manifest,
resuming never crashes, a saved adapter always loads whole (one of the versions written, never a mix), and a
published folder always validates and can be published over again.
"""

from __future__ import annotations

import copy
import os
import random
import select
import signal
import time

import pytest
import torch

from diffusers_memcontrol.trainer import loop as training
from diffusers_memcontrol.trainer.checkpoints import list_checkpoints, resolve_checkpoint, verify_checkpoint
from diffusers_memcontrol.trainer.config import FineTuneConfig
from diffusers_memcontrol.trainer.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 6
CONFIG = {"peft_method": "svdiff", "max_train_steps": STEPS, "train_batch_size": 4, "learning_rate": 1e-2,
          "use_ema": True}


def _in_child(work, report_fd: int) -> int:
    """Fork a child running `work(report)` (report(text) writes a line to the parent); return its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            work(lambda text: os.write(report_fd, f"{text}\n".encode()))
            code = 0
        except BaseException as error:  # noqa: BLE001 - reported to the parent through the exit status
            os.write(report_fd, f"error {type(error).__name__}: {error}\n".encode())
        finally:
            os._exit(code)
    return pid


def _kill_at_random(work, rng: random.Random, max_delay: float, trigger: str | None = None, nth: int = 1
                    ) -> tuple[list[str], int | None]:
    """Run `work` in a child and SIGKILL it after a random delay (from its start, or from its `nth` report starting
    with `trigger`: aimed at a checkpoint save), unless it ended first; return its report lines and its exit status
    (None when killed)."""
    read_fd, write_fd = os.pipe()
    pid = _in_child(work, write_fd)
    os.close(write_fd)
    buffer = b""
    deadline = None if trigger else time.monotonic() + rng.uniform(0.0, max_delay)
    status = None
    while deadline is None or time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if select.select([read_fd], [], [], 0.002)[0]:
            buffer += os.read(read_fd, 1 << 16)
        if deadline is None and sum(line.startswith(trigger) for line in buffer.decode().splitlines()) >= nth:
            deadline = time.monotonic() + rng.uniform(0.0, max_delay)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        status = None
    while select.select([read_fd], [], [], 0)[0]:
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        buffer += chunk
    os.close(read_fd)
    return buffer.decode().splitlines(), (os.waitstatus_to_exitcode(status) if status is not None else None)


def _adapter(unet) -> dict:
    return {k: v.detach().clone() for k, v in unet.named_parameters() if "memcontrol_" in k}


def _train_chain(pipe, data8, out: str, limit: int | None):
    """One child's work: resume from `latest` (or start) and train, reporting every completed checkpoint."""
    def work(report):
        real = training.save_checkpoint

        def reporting(output_dir, step, total_limit, write_state, **kwargs):
            report(f"saving {step}")
            folder = real(output_dir, step, total_limit, write_state, **kwargs)
            report(f"saved {step}")
            return folder

        training.save_checkpoint = reporting
        unet = copy.deepcopy(pipe.unet)
        train(unet, pipe.scheduler, data8, FineTuneConfig(**CONFIG), output_dir=out, checkpointing_steps=1,
              checkpoints_total_limit=limit, resume_from_checkpoint="latest", progress=False)
        torch.save(_adapter(unet), os.path.join(out, "final.pt"))  # read back by the test only
        report("finished")
    return work


def _check_checkpoints(out: str, saved: list[int], limit: int | None) -> int:
    """Every visible checkpoint is complete; `latest` is no older than the last reported save. Returns its step."""
    for folder in list_checkpoints(out):
        verify_checkpoint(folder)  # never a half-written checkpoint in place
    latest = resolve_checkpoint(out, "latest")
    step = int(latest.rsplit("-", 1)[1]) if latest else 0
    assert step >= max(saved, default=0), (step, saved)
    if limit is not None:
        assert len(list_checkpoints(out)) <= limit + 1  # the new one is in place before the old one goes
    return step


def _run_kills(pipe, data8, tmp_path, rng, kills: int, limit: int | None, max_delay: float, aimed: bool = False):
    """Kill a training run `kills` times at random; resume after each kill; the finished adapter must match an
    uninterrupted run's."""
    reference = copy.deepcopy(pipe.unet)
    train(reference, pipe.scheduler, data8, FineTuneConfig(**CONFIG), progress=False)
    expected = _adapter(reference)
    killed = chains = 0
    while killed < kills:
        out = str(tmp_path / f"chain{chains}")
        chains += 1
        os.makedirs(out)
        saved: list[int] = []
        for _ in range(4 * STEPS):
            lines, code = _kill_at_random(_train_chain(pipe, data8, out, limit), rng, max_delay,
                                          trigger="saving" if aimed else None, nth=rng.randint(1, 2))
            assert code in (None, 0), lines  # resuming never crashes
            saved += [int(line.split()[1]) for line in lines if line.startswith("saved")]
            if code is None and any(n.startswith(".checkpoint-") for n in os.listdir(out)):
                print(f"killed while a checkpoint was being written or rotated: {sorted(os.listdir(out))}")
            _check_checkpoints(out, saved, limit)
            if code is None:
                killed += 1
            if "finished" in lines:
                final = torch.load(os.path.join(out, "final.pt"))
                assert final.keys() == expected.keys()
                for key, value in final.items():
                    torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-5)
                break
            if killed >= kills:
                break
    return killed


def test_kills_during_training_checkpoints_and_rotation(pipe, data8, tmp_path):
    rng = random.Random(19)
    killed = _run_kills(pipe, data8, tmp_path / "limit1", rng, kills=4, limit=1, max_delay=1.5)
    killed += _run_kills(pipe, data8, tmp_path / "aimed", rng, kills=8, limit=1, max_delay=0.05, aimed=True)
    killed += _run_kills(pipe, data8, tmp_path / "nolimit", rng, kills=4, limit=None, max_delay=1.5)
    assert killed >= 16


def test_kills_during_adapter_saves_and_publishing(pipe, tmp_path):
    """Two adapter versions saved in turn, and published in turn, each killed at random moments."""
    from diffusers_memcontrol.hub.adapters import save_adapter
    from diffusers_memcontrol.hub.loaders import load_unet_adapter
    from diffusers_memcontrol.hub.publish import _is_earlier_publication, download_memcontrol, publish

    rng = random.Random(20)
    versions = []
    for value in (0.01, -0.02):
        unet = copy.deepcopy(pipe.unet)
        unet.add_adapter(FineTuneConfig(peft_method="svdiff").adapter_config())
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "memcontrol_" in name:
                    p.fill_(value)
        versions.append(unet)
    expected = [{k.rsplit(".", 1)[0]: v for k, v in _adapter(u).items()} for u in versions]
    folder, published = str(tmp_path / "adapter"), str(tmp_path / "published")

    def save_loop(report):
        for i in range(1000):
            save_adapter(versions[i % 2], folder)

    def publish_loop(report):
        for _ in range(1000):
            publish(folder, "user/repo", dry_run=True, local_dir=published)

    save_adapter(versions[0], folder)
    killed = 0
    for work, check in ((save_loop, "adapter"), (publish_loop, "published")) * 4:
        for _ in range(2 if check == "adapter" else 1):
            lines, code = _kill_at_random(work, rng, max_delay=0.4)
            assert code is None, lines
            killed += 1
            source = folder if check == "adapter" else published
            if check == "published" and not os.path.exists(published):
                continue  # killed before the first publication was in place
            download_memcontrol(source)  # validates: mask, config and weights present and consistent
            unet = copy.deepcopy(pipe.unet)
            name = load_unet_adapter(unet, source, local_files_only=True)
            loaded = {k.rsplit(".", 1)[0]: v for k, v in _adapter(unet).items() if k.endswith(f".{name}")}
            assert any(loaded.keys() == v.keys() and all(torch.equal(loaded[k], v[k]) for k in v)
                       for v in expected)  # one version, never a mix
            if check == "published":
                assert _is_earlier_publication(published)  # the next publish may replace it
    assert killed >= 10
