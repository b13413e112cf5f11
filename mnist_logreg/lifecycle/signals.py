"""Ctrl-C and SIGTERM inside a job: its runs end KILLED, and never in the middle of an MLflow write."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any, Iterator


def stop_signals() -> tuple[int, ...]:
    """Ctrl-C and SIGTERM; in a Slurm task also SIGUSR2, Slurm's warning before a preemption or a
    time limit (the task then ends its runs KILLED and requeues itself, see sweep.slurm)."""
    usr2 = (signal.SIGUSR2,) if os.environ.get("SLURM_JOB_ID") else ()
    return (signal.SIGINT, signal.SIGTERM, *usr2)


class JobSignals:
    """Ctrl-C (SIGINT) and SIGTERM stop training as KeyboardInterrupt, so runs end KILLED, but
    never in the middle of an MLflow write: one cut short can leave a SQLite store locked, so a
    signal that arrives inside `deferred()` takes effect when the write is done.

    Once a stop has begun, the job's runs are ending (metrics, checkpoint, status): a SIGTERM then
    is the launching process asking for the same stop (a terminal's Ctrl-C reaches both), and is
    let pass; a second Ctrl-C is the user's and stops at once. Install these handlers around the
    whole life of the runs, their ends included.

    A handler runs in whatever frame the signal finds, and Python swallows what a finaliser raises
    (it prints "Exception ignored in" and goes on): MXNet frees its arrays in `NDArray.__del__` at
    every batch, so a stop raised there would be lost and the stack would train on. A signal that
    finds a finaliser on the stack waits, like one inside `deferred()`, and the training loop
    calls `check()` between epochs, which raises a stop that has not taken effect."""

    def __init__(self) -> None:
        self._pending: int | None = None
        self._depth = 0
        self._previous: dict[int, Any] = {}
        self.stopping = False
        self.signum: int | None = None  # the signal that began the stop

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in stop_signals():
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator["JobSignals"]:
        self.install()
        try:
            yield self
        finally:
            self.restore()

    def _handle(self, signum: int, frame) -> None:
        if self.stopping:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt(f"signal {signum}")
            return  # the launching process's SIGTERM for the stop under way
        if self._depth or in_finaliser(frame):
            self._pending = signum
        else:
            self._stop(signum)

    def _stop(self, signum: int) -> None:
        self.stopping, self.signum = True, signum
        raise KeyboardInterrupt(f"signal {signum}")

    def check(self) -> None:
        """Between epochs, outside any write: raise the stop that is waiting (its signal found a
        finaliser), or again one that a finaliser swallowed (nothing trains once a stop has
        taken effect, so a stop seen here never did)."""
        if self._depth:
            return
        if self.stopping:
            raise KeyboardInterrupt(f"signal {self.signum}")
        self._stop_pending()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                self._stop_pending()

    def _stop_pending(self) -> None:
        """The stop a signal left waiting (inside a write, or in a finaliser), if any, begins now."""
        if self._pending is not None and not self.stopping:
            signum, self._pending = self._pending, None
            self._stop(signum)


def redeliver(signum: int, delay: float = 0.02) -> None:
    """Send this process signum again in `delay` seconds: for a handler that found a finaliser and has
    no loop of its own to raise the stop from (the launching process of worker launchers)."""
    def again() -> None:
        time.sleep(delay)
        os.kill(os.getpid(), signum)

    threading.Thread(target=again, name="mnist_logreg-redeliver", daemon=True).start()


def in_finaliser(frame) -> bool:
    """Whether frame is a finaliser's (`__del__`), or called from one."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False
