"""What a job of a multirun learns from its launching process: the sweep's parent run; and what it
tells back: that a signal stopped it.

The launching process creates the store and the experiment once (several jobs creating one fresh
SQLite store or experiment at once corrupt it), then hands their ids to every job through an
environment variable, which joblib workers, submitit jobs and Slurm tasks inherit. The parent run
itself is opened (created, or reopened when the sweep continues) by the launching process when the
sweep's first run opens, so that a launch that trains nothing leaves no parent behind: jobs in this
process open it through `ensure_parent_run`; for jobs in other processes it is opened before they start.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Callable

ENV_VAR = "MNIST_LOGREG_SWEEP"


@dataclass(frozen=True)
class ParentRun:
    """The sweep a job belongs to: its tag, store, experiment and parent run."""

    sweep: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str = ""  # "" until the launching process opens it

    def hand_down(self) -> None:
        """Make this the parent of every job started from here on (in this process or below it)."""
        os.environ[ENV_VAR] = json.dumps(asdict(self))


def parent_run() -> ParentRun | None:
    """The sweep this process's jobs belong to, or None outside a multirun."""
    raw = os.environ.get(ENV_VAR)
    return ParentRun(**json.loads(raw)) if raw else None


def forget_parent_run() -> None:
    global _opener
    os.environ.pop(ENV_VAR, None)
    _opener = None
    _reused.clear()


_opener: Callable[[], ParentRun] | None = None
_reused: dict[str, str] = {}  # run id -> how this sweep used it (skipped, continued), until the parent opens


def set_opener(opener: Callable[[], ParentRun]) -> None:
    """How this process opens the sweep's parent run when its first run needs it."""
    global _opener
    _opener = opener


_discarder: Callable[[], None] | None = None


def set_discarder(discarder: Callable[[], None]) -> None:
    """How this process takes back a parent run it opened for a launch that then trained nothing."""
    global _discarder
    _discarder = discarder


def discard_parent_run() -> None:
    """Take back the parent run this launch opened (its submission was refused): no sweep is recorded."""
    if _discarder is not None:
        _discarder()


def ensure_parent_run() -> ParentRun | None:
    """The sweep's parent run, opened now if this process holds its opener and it is not open yet."""
    parent = parent_run()
    if parent is not None and not parent.parent_run_id and _opener is not None:
        parent = _opener()
    return parent


def sweep_tags(tracking_uri: str) -> dict[str, str]:
    """The tags that put a job's new run in its sweep (none outside a sweep, or in another store)."""
    from ..tracking.tags import TAG_PARENT, TAG_SWEEP

    parent = parent_run()
    if parent is None or parent.tracking_uri != tracking_uri:
        return {}
    parent = ensure_parent_run()
    return {TAG_SWEEP: parent.sweep, TAG_PARENT: parent.parent_run_id} if parent and parent.parent_run_id else {}


def note_reused(client, tracking_uri: str, run_id: str, how: str) -> None:
    """A run of another launch that this sweep stands on (skipped as FINISHED, or continued): tagged on
    the parent so that its comparison shows it; kept until the parent opens, if it is not open yet."""
    from ..tracking.tags import TAG_REUSED

    parent = parent_run()
    if parent is None or parent.tracking_uri != tracking_uri:
        return
    if parent.parent_run_id:
        client.set_tag(parent.parent_run_id, f"{TAG_REUSED}.{run_id}", how)
    else:
        _reused[run_id] = how


def pending_reused() -> dict[str, str]:
    """The reused runs noted before the parent opened (its opener tags them, and clears this)."""
    out = dict(_reused)
    _reused.clear()
    return out


_interrupted = False


def mark_interrupted() -> None:
    """A job (or the launching process) was stopped by Ctrl-C or SIGTERM: the parent run ends KILLED."""
    global _interrupted
    _interrupted = True


def interrupted() -> bool:
    return _interrupted
