"""One Hydra job: `train(cfg)` trains one model as the config says and tracks it in MLflow.

run.py, reproduce, resume=RUN_ID and every launcher call it. Under the stacked launcher, a prepared
job joins its launcher's gathering instead (lifecycle.gathering) and returns once its stack has
trained it, through the same lifecycle (lifecycle.train.train_jobs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .lifecycle.prepare import prepare, skip
from .lifecycle.train import objective, train_jobs

log = logging.getLogger("mnist_logreg.job")


def train(cfg: DictConfig, extra_tags: dict[str, str] | None = None, run_name: str | None = None) -> dict[str, Any]:
    """Train one model as `cfg` says, track it in MLflow, and return its final metrics and run id.

    Everything that can be wrong with the input is checked before the MLflow run is created, so
    bad input leaves no run behind.
    """
    from .lifecycle import gathering

    job = prepare(cfg, *_hydra_job())
    if job.done is not None:
        return skip(job)
    if extra_tags is None and run_name is None and gathering.active():
        return gathering.join(job)  # the launcher trains it in a stack, then hands back its result
    return train_jobs([job], extra_tags=extra_tags, run_name=run_name)[0]  # type: ignore[return-value]


__all__ = ["train", "main", "objective"]


def _hydra_job() -> tuple[Path | None, list[str]]:
    """The job's output folder and its overrides, when running under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, []
    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir), list(hc.overrides.task)


def main(cfg: DictConfig) -> dict[str, Any]:
    """run.py's entry. Outside a multirun, bad input exits with one line (Hydra would add its own)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .errors import exit_on_error

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
        with exit_on_error():
            return train(cfg)
    try:
        return train(cfg)
    except KeyboardInterrupt:
        _leave_worker_quietly()
        raise


def _leave_worker_quietly() -> None:
    """In a joblib (loky) worker, a stopped job has ended its run KILLED; the worker then exits at
    once, instead of unwinding into MXNet's teardown, which prints tracebacks while the launching
    process prints its one line."""
    import multiprocessing
    import os
    import sys

    if multiprocessing.current_process().name.startswith("LokyProcess"):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
