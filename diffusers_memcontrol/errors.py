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


def run_command(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Run a command's `main(argv)` and return its result; an InputError prints `error: <message>` on stderr and
    exits with status 2."""
    try:
        return main(argv)
    except InputError as err:
        if os.environ.get("RANK", "0") == "0":  # under a multi-process launcher, one line, not one per process
            print(f"error: {redact_url(' '.join(str(err).split()))}", file=sys.stderr)
        raise SystemExit(2) from None
