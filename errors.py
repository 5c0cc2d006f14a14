"""The user's mistakes, and how every script reports them: one line, exit status 2, on every process.

A UserError names the input at fault and what would fix it. With several processes, work that one
process does for all (reference statistics, a quality check) goes through `on_main_process`, which
hands its UserError to every process: none is left waiting in a collective for one that stopped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the user's input. Scripts print it as one line and exit with status 2.
    `quiet`: another process prints the same line (the processes of one run agree on an error)."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def on_main_process(accelerator, work: Callable[[], T]) -> T | None:
    """`work()` on the main process alone, its result returned there (None elsewhere). A UserError it raises is
    raised on every process, printed by the main one."""
    message = None
    result = None
    if accelerator.is_main_process:
        try:
            result = work()
        except UserError as e:
            message = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        (message,) = broadcast_object_list([message])
    if message is not None:
        raise UserError(message, quiet=not accelerator.is_main_process)
    return result


def exit_on(error: UserError) -> None:
    """Print the error as one line ('error: ...') unless another process does, and exit with status 2."""
    # A DataLoader worker's error arrives wrapped in its traceback; the user's sentence is the last line.
    message = str(error).strip().splitlines()[-1].removeprefix("config.UserError: ").removeprefix("errors.UserError: ")
    if not getattr(error, "quiet", False):
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
