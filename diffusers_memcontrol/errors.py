"""A user's mistake ends a command with one line `error: ...` and exit status 2; a programming error still raises.

Library code raises `InputError` (or a plain ValueError / FileNotFoundError that `user_input` turns into one at a
point where only user input is being checked); the entry points (`python -m diffusers_memcontrol.train`,
`training/train_memcontrol.py`, `memcontrol ...`) run through `run_command`, which prints it the way argparse does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

_URL_PASSWORD = re.compile(r"(\b[A-Za-z][\w+.-]*://)[^/@\s'\"]*@")


def redact_url(text: str) -> str:
    """`text` with the credentials of every URL in it (`scheme://user:password@host`) replaced by `***`."""
    return _URL_PASSWORD.sub(r"\1***@", text)


class InputError(ValueError):
    """Bad user input (a flag value, a file, a dataset, a mask): the message names the value and what is accepted."""


@contextlib.contextmanager
def user_input(what: str | None = None,
               catch: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)) -> Iterator[None]:
    """Report the `catch` errors raised inside the block as an InputError (prefixed with `what`, e.g. a flag)."""
    try:
        yield
    except InputError:
        raise
    except catch as err:
        message = str(err) or type(err).__name__
        raise InputError(f"{what}: {message}" if what else message) from err


class ArgumentParser(argparse.ArgumentParser):
    """argparse, raising InputError instead of printing the usage and exiting (`run_command` prints one line)."""

    def error(self, message: str) -> NoReturn:
        """Raise the parsing error as an InputError."""
        raise InputError(message)


def _end_progress_bars(stream: Any) -> None:
    """Close the progress bars still on screen, so that what is printed next starts its own line.

    In a terminal a closed bar clears its line; elsewhere (a log file, a pipe) a bar's redraws end with a carriage
    return, not a newline, so one is written when any bar has been drawn in this process."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    classes, todo = [], [tqdm]
    while todo:  # tqdm.auto's class and the other flavours are subclasses, each with its own lock once it drew
        classes.append(todo.pop())
        todo.extend(classes[-1].__subclasses__())
    drawn = any("_lock" in vars(cls) for cls in classes)
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    if drawn and not (hasattr(stream, "isatty") and stream.isatty()):
        stream.write("\n")


def print_error(message: str, stream: Any = None) -> None:
    """Print `error: <message>` (whitespace folded, URL passwords hidden) on a line of its own."""
    stream = stream or sys.stderr
    if os.environ.get("RANK", "0") == "0":  # under a multi-process launcher, one line, not one per process
        _end_progress_bars(stream)
        print(f"error: {redact_url(' '.join(message.split()))}", file=stream, flush=True)


def run_command(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Run a command's `main(argv)` and return its result; an InputError prints `error: <message>` on stderr and
    exits with status 2; a disk that fills while writing prints the folder, bytes needed and free, and exits with 1."""
    from .files import DiskFullError, is_disk_full

    try:
        return main(argv)
    except InputError as err:
        print_error(str(err))
        raise SystemExit(2) from None
    except Exception as err:
        if not is_disk_full(err):
            raise
        print_error(err.strerror if isinstance(err, DiskFullError) else f"No space left on device: {err}")
        raise SystemExit(1) from None
