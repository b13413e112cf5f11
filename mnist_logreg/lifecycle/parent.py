"""What a job of a multirun learns from its launching process: the sweep's parent run; and what it
tells back: that a signal stopped it.

The launching process creates the store, the experiment and the parent run once (several jobs
creating one fresh SQLite store or experiment at once corrupt it), then hands their ids to every job
through an environment variable, which joblib workers, submitit jobs and Slurm tasks inherit.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

ENV_VAR = "MNIST_LOGREG_SWEEP"


@dataclass(frozen=True)
class ParentRun:
    """The sweep a job belongs to: its tag, store, experiment and parent run."""

    sweep: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    def hand_down(self) -> None:
        """Make this the parent of every job started from here on (in this process or below it)."""
        os.environ[ENV_VAR] = json.dumps(asdict(self))


def parent_run() -> ParentRun | None:
    """The sweep this process's jobs belong to, or None outside a multirun."""
    raw = os.environ.get(ENV_VAR)
    return ParentRun(**json.loads(raw)) if raw else None


def forget_parent_run() -> None:
    os.environ.pop(ENV_VAR, None)


_interrupted = False


def mark_interrupted() -> None:
    """A job (or the launching process) was stopped by Ctrl-C or SIGTERM: the parent run ends KILLED."""
    global _interrupted
    _interrupted = True


def interrupted() -> bool:
    return _interrupted
