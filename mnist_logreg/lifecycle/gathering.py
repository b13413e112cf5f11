"""Jobs that pause once prepared, so that their launcher can train them together, then go on.

A stacking launcher runs each job's own code (for Hydra: `run_job` around the app's task function,
its callbacks included) in a greenlet on the main thread. A job that reaches `join(job)` hands its
prepared job to the launcher and pauses there; the launcher trains the joined jobs as stacks (on the
main thread, where signals arrive), then resumes each one with its result, and the job's own code
runs to its end. Code that never joins (another app's task function, a skipped or refused job)
simply runs to its end at start(). Nothing here knows Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import greenlet

from .prepare import Job


@dataclass
class Joined:
    """A job paused at join(), waiting for its result."""

    job: Job
    glet: greenlet.greenlet


_active: list["Gathering"] = []  # the gathering whose job is running now (innermost last)


def active() -> bool:
    """Whether the code running now is a job of a gathering, which may join it."""
    return bool(_active) and greenlet.getcurrent() is not _active[-1].hub


def join(job: Job) -> Any:
    """Hand job to the launcher and wait for its result (returned), or for the exception that ended
    its run (raised here)."""
    me = greenlet.getcurrent()
    return me.parent.switch(Joined(job, me))


class Gathering:
    """The launcher's side: start jobs one by one, then finish each joined one with its result.

    train_alone(job) trains a job that joins a second time from the same code (a task function that
    trains two models) by itself, and returns its result."""

    def __init__(self, train_alone: Callable[[Job], Any]) -> None:
        self.hub = greenlet.getcurrent()
        self.train_alone = train_alone

    def start(self, fn: Callable[..., Any], *args, **kwargs) -> tuple[Joined | None, Any]:
        """Run fn in a new greenlet until it joins: (Joined, None); or until it ends: (None, its value)."""
        glet = greenlet.greenlet(lambda: fn(*args, **kwargs), parent=self.hub)
        out = self._switch(glet.switch)
        return (out, None) if isinstance(out, Joined) else (None, out)

    def finish(self, joined: Joined, result: Any) -> Any:
        """Resume a joined job with its result (an exception is raised at its join), run its code to
        its end and return what that code returns."""
        out = self._switch(joined.glet.throw if isinstance(result, BaseException) else joined.glet.switch, result)
        while isinstance(out, Joined):  # the same code joined again: that job trains alone
            try:
                nxt = self.train_alone(out.job)
            except Exception as exc:
                nxt = exc
            out = self._switch(out.glet.throw if isinstance(nxt, BaseException) else out.glet.switch, nxt)
        return out

    def abandon(self, joined: Joined) -> None:
        """End a joined job that will not train (the launch is stopping): its code unwinds from join()."""
        if not joined.glet.dead:
            self._switch(joined.glet.throw, greenlet.GreenletExit())

    def _switch(self, go: Callable[..., Any], *args) -> Any:
        _active.append(self)
        try:
            return go(*args)
        finally:
            _active.pop()
