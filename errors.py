"""The user's mistakes, and how every script reports them: one line, exit status 2, on every process.

A UserError names the input at fault and what would fix it. With several processes, work that one
process does for all (reference statistics, a quality check) goes through `on_main_process`, and work
that each does its part of (a checkpoint) through `together`: either hands a UserError to every
process, so none is left waiting in a collective for one that stopped. `full_disk` turns a full disk
into such an error, naming the path and the space left, and `atomic_write` writes a file whole or
not at all.
"""

from __future__ import annotations

import difflib
import errno
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the user's input. Scripts print it as one line and exit with status 2.
    `quiet`: another process prints the same line (the processes of one run agree on an error)."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def check_name(registry, name: str, key: str) -> None:
    """Fail with the nearest valid name when `name` is not in `registry` (any container of names)."""
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=1, cutoff=0.4)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"config key {key}: unknown name '{name}'{hint} (valid: {', '.join(registry)})")


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
        accelerator.wait_for_everyone()  # a sender may return first; a process ending then crashes gloo
    if message is not None:
        raise UserError(message, quiet=not accelerator.is_main_process)
    return result


def together(accelerator, work: Callable[[], T]) -> T:
    """`work()` on every process, then a UserError any of them raised is raised on every process (the first one's
    message, printed by the main process)."""
    message = None
    result = None
    try:
        result = work()
    except UserError as e:
        message = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        message = next((m for m in gather_object([message]) if m is not None), None)
        accelerator.wait_for_everyone()
    if message is not None:
        raise UserError(message, quiet=not accelerator.is_main_process)
    return result


@contextmanager
def full_disk(path: str | Path) -> Iterator[None]:
    """A full disk (or quota) while writing `path` becomes one line naming it and the space left there. Writers say
    it differently: OSError ENOSPC (Python, numpy, PIL), "os error 28" (safetensors), and torch.save only
    "unexpected pos" (a RuntimeError, taken as a full disk when under 1 MiB is left)."""
    try:
        yield
    except Exception as e:
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        said = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or any(
            text in str(e) for text in ("No space left on device", "os error 28", "Disk quota exceeded"))
        if not said and not (isinstance(e, RuntimeError) and free < 2**20):
            raise
        raise UserError(f"no space left on the device while writing {path} ({free / 2**20:.1f} MiB free there); "
                        "free some space or choose another folder, then run the same command again") from None


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a temporary name beside `path` (same suffix), then a rename: `path` appears whole or not at
    all. The temporary file is removed when writing fails; a full disk is one line (full_disk)."""
    path = Path(path)
    tmp = path.with_name(f".tmp_{os.getpid()}_{path.name}")
    try:
        with full_disk(path):
            write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def writable_folder(folder: Path, name: str, fix: str) -> None:
    """Create `folder` and check that it is writable before any work is done, or one sentence: '{name} {folder} is
    not writable (why); {fix}'."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{name} {folder} is not writable ({e.strerror}); {fix}") from None


def exit_on(error: UserError) -> None:
    """Print the error as one line ('error: ...') unless another process does, and exit with status 2."""
    # A DataLoader worker's error arrives wrapped in its traceback; the user's sentence is the last line.
    message = str(error).strip().splitlines()[-1].removeprefix("config.UserError: ").removeprefix("errors.UserError: ")
    if not getattr(error, "quiet", False):
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
