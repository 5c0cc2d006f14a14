"""Running as a cluster job: the processes of a launch (their Accelerator, results gathered back in index order),
stop requests from the scheduler, one writer per run folder, and progress in a log file.

A job scheduler (SLURM, Kubernetes, most others) sends SIGTERM before it preempts or ends a job, and Ctrl-C sends
SIGINT. `StopRequest` turns the first of either into a request that the scripts honour at their next safe point:
train.py after the current optimizer step, with a checkpoint; sample.py and evaluate.py after the current batch,
keeping what is finished. The processes of a run agree on that point (any process's signal stops all of them at
the same step). A second signal exits at once. `RunLock` lets one train.py write a run folder; `progress` is a
tqdm bar on a terminal and a plain line every `PLAIN_EVERY_S` seconds in a file.

Exit statuses of train.py, sample.py and evaluate.py:
    0    done;
    2    a mistake in the input, said in one line (nothing already written is lost);
    75   stopped by SIGTERM / SIGINT with the work saved (EX_TEMPFAIL): run the same command to continue;
    128 + N  a second signal N (143: SIGTERM, 130: SIGINT): exited at once, the previous checkpoints intact.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
from tqdm import tqdm

from errors import UserError

STOPPED = 75  # the exit status after a clean stop on request
PLAIN_EVERY_S = 30.0  # seconds between progress lines when the output is not a terminal
SAME_SIGNAL_S = 1.0  # a repeat within this long is the same request (a launcher passes on the signal it got too)


class Stopped(Exception):
    """Raised at the safe point after a stop request; the scripts print it and exit with STOPPED."""


class StopRequest:
    """SIGTERM and SIGINT as a request to stop at the next safe point, while `with StopRequest() as stop:` is open.

    `stop.now(accelerator)` is True at a safe point once any process of the run got a signal, on every process
    alike. With several processes it is one all-reduce of a flag per call; the answer read is the previous call's,
    so a GPU never waits for it (a stop lands one step later, the same step on every process)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.name: str | None = None  # the first signal's name
        self._at = 0.0
        self._previous: dict[int, object] = {}
        self._pending: torch.Tensor | None = None

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.name is None:
            self.name, self._at = name, time.monotonic()
            print(f"\n{name}: stopping at the next safe point with the work saved (send it again to exit at once)",
                  file=sys.stderr, flush=True)
        elif time.monotonic() - self._at > SAME_SIGNAL_S:
            print(f"\n{name} again: exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def now(self, accelerator=None) -> bool:
        """Whether to stop here, the same answer on every process."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.name is not None
        names = [sig.name for sig in self.SIGNALS]
        flags = torch.tensor([float(self.name == name) for name in names], device=accelerator.device)
        agreed, self._pending = self._pending, accelerator.reduce(flags, "sum")  # processes that got each signal
        if agreed is None or not bool(agreed.any()):
            return False
        self.name = self.name or names[int(agreed.argmax())]  # processes the signal did not reach say which it was
        return True


class RunLock:
    """An exclusive lock on RUN/.lock held while the run folder is written: a second train.py on the folder fails
    at once, naming the holder's process id and host. The operating system releases it when the process ends,
    however it ends, so a crash never leaves a stale lock."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._file = None

    def acquire(self) -> RunLock:
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"run folder {self.path.parent} is being trained by {holder}; wait for it to finish, "
                            "stop it, or choose another folder with -e") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None


class PlainProgress:
    """tqdm's counting on a file: a line `desc n/total (p%), rate, eta, postfix` every PLAIN_EVERY_S seconds and
    at the end, instead of carriage-return refreshes that fill a log with one line per refresh."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", disable: bool = False,
                 leave: bool = True, **_):
        self.total, self.n, self.desc, self.unit, self.disable = total, initial, desc, unit, disable
        self.leave, self.shown = leave, False
        self.postfix = ""
        self._start_n, self._start, self._shown = initial, time.monotonic(), time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._shown >= PLAIN_EVERY_S:
            self._show()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _show(self) -> None:
        self._shown = time.monotonic()
        if self.disable:
            return
        self.shown = True
        elapsed = self._shown - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 and self.total else 0.0
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        line = (f"{self.desc + ': ' if self.desc else ''}{self.n}/{self.total}{share}, {rate:.3g} {self.unit}/s, "
                f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}" + (f", {self.postfix}" if self.postfix else ""))
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        """A last line, unless nothing moved or (leave=False, as tqdm's) no line was shown before."""
        if (self.n != self._start_n or not self.total) and (self.leave or self.shown):
            self._show()
        self._start_n = self.n  # closing twice shows one line


def accelerator(**kwargs):
    """accelerate's Accelerator for the processes of this launch (kwargs go to it). Without CUDA, accelerate runs
    several processes only when told to use the CPU (gloo)."""
    from accelerate import Accelerator

    cpu_multiprocess = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=cpu_multiprocess, **kwargs)


def progress(total: int, **kwargs):
    """A tqdm bar on a terminal; a PlainProgress line every PLAIN_EVERY_S seconds when stderr is a file or pipe."""
    if sys.stderr.isatty():
        return tqdm(total=total, dynamic_ncols=True, **kwargs)
    return PlainProgress(total, **kwargs)


def run_main(main: Callable[[], object]) -> NoReturn:
    """Run a script's `main` and exit with its status (0, or what it passed to sys.exit).

    A process of a multi-process run (WORLD_SIZE > 1) exits without the interpreter's teardown, its output flushed
    first. The gloo backend's worker threads hold each collective's tensors for a moment after the collective
    completes; when the last one is dropped while the interpreter is being torn down, the thread cannot take the GIL
    to free them and the process aborts ('terminate called without an active exception', SIGABRT) after its work is
    done and saved: 2 of 102 exits of a 2-process train.py run on this CPU, through the barrier of the last
    checkpoint. Everything the scripts write is closed before main returns, so nothing needs the teardown.
    """
    try:
        main()
        status = 0
    except SystemExit as e:
        status = e.code
    if status is not None and not isinstance(status, int):  # sys.exit("message"), as Python prints it
        print(status, file=sys.stderr)
        status = 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status or 0)
    sys.exit(status or 0)


def gather_indexed(accelerator, local: torch.Tensor, n: int) -> torch.Tensor:
    """Rows that process r computed for indices r, r + W, r + 2W, ... gathered back into index order (n, ...)."""
    world = accelerator.num_processes
    m = -(-n // world)
    padded = torch.zeros(m, *local.shape[1:], dtype=local.dtype, device=accelerator.device)
    padded[: len(local)] = local.to(accelerator.device)
    everything = accelerator.gather(padded).cpu().reshape(world, m, *local.shape[1:])
    return everything.transpose(0, 1).reshape(world * m, *local.shape[1:])[:n]
