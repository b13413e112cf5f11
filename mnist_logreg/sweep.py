"""A sweep's shared MLflow state, created once in the launching process and handed to its jobs.

Several jobs creating one fresh SQLite store or one new experiment at once corrupt the store or
file runs into `Default`. So the Hydra callback below creates the store, the experiment and a
parent run before any job starts, and passes their ids to the jobs through an environment
variable, which joblib workers, submitit jobs and Slurm tasks inherit.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .config import redact

ENV_VAR = "MNIST_LOGREG_SWEEP"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepContext:
    """What every job of one multirun needs to file its run under the sweep's parent."""

    sweep: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def current() -> SweepContext | None:
    """The sweep this process's jobs belong to, or None outside a multirun."""
    raw = os.environ.get(ENV_VAR)
    return SweepContext(**json.loads(raw)) if raw else None


_interrupted = False


def mark_interrupted() -> None:
    """A job was stopped by Ctrl-C or SIGTERM: the sweep's parent run will end KILLED."""
    global _interrupted
    _interrupted = True


def new_sweep_id() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def share_cores(config: DictConfig) -> None:
    """Under the joblib launcher, give each worker cores / workers OpenMP threads (unless set).

    Workers inherit this process's environment when they start, before they import MXNet.
    Measured here (2 cores): 2 workers x 1 thread beat 2 workers x 2 threads; see README.
    """
    launcher = str(OmegaConf.select(config, "hydra.launcher._target_") or "")
    if "joblib" not in launcher.lower() or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs") or -1
    workers = cores if n_jobs < 0 else min(n_jobs, cores)
    threads = OmegaConf.select(config, "context.threads") or max(1, cores // max(1, workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    log.info("joblib: %d workers x %d OpenMP threads on %d cores", workers, threads, cores)


class SweepTracking(Callback):
    """Hydra callback: opens the sweep's parent MLflow run at multirun start, closes it at the end."""

    def __init__(self, compare: bool = True) -> None:
        self._compare = compare
        self._ctx: SweepContext | None = None
        self._client: Any = None
        self._experiment = ""
        self._output: str | None = None
        self._register: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns an exception raised in a callback into a warning and launches the jobs
        # anyway, so a sweep that cannot be tracked stops here, before any job starts.
        from .errors import exit_on_error

        with exit_on_error():
            self._open(config)

    def _open(self, config: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from .config import validate_sweep
        from .tracking import (
            RunLog,
            TAG_ROLE,
            TAG_SWEEP,
            client_for,
            command_line,
            context_tags,
            ensure_experiment,
            git_state,
        )

        if not HydraConfig.initialized():  # so that ${hydra:runtime.cwd} resolves here too
            HydraConfig.instance().set_config(config)
        swept = validate_sweep(config)
        if "gpu" in swept.get("context", []) + [config.context.device]:
            from .model import make_context

            make_context("gpu", config.context.index)  # no GPU: stop before the first job
        uri = OmegaConf.select(config, "tracking.uri")
        client = client_for(uri)
        experiment_id = ensure_experiment(
            client, config.tracking.experiment, OmegaConf.select(config, "tracking.artifact_location")
        )
        share_cores(config)
        sweep = new_sweep_id()
        overrides = list(OmegaConf.select(config, "hydra.overrides.task") or [])
        parent = RunLog.create(
            client,
            experiment_id,
            run_name=f"sweep {sweep}",
            tags={
                TAG_SWEEP: sweep,
                TAG_ROLE: "sweep",
                "hydra.overrides": redact(" ".join(overrides)),
                "hydra.sweep.dir": str(config.hydra.sweep.dir),
                "command": command_line(),
                **git_state(),
                **context_tags(),
            },
        )
        self._client = client
        self._experiment = config.tracking.experiment
        self._register = OmegaConf.select(config, "tracking.register")
        self._output = str(config.hydra.sweep.dir)
        self._ctx = SweepContext(sweep, uri, experiment_id, parent.run_id)
        os.environ[ENV_VAR] = json.dumps(asdict(self._ctx))
        atexit.register(lambda: self._close("KILLED" if _interrupted else "FAILED"))
        from . import stopping

        def first_signal(signum: int) -> None:
            mark_interrupted()
            if self._ctx is not None:
                stopping.stop_workers(self._client, self._ctx.experiment_id, self._ctx.parent_run_id)

        stopping.install(first_signal)
        log.info("sweep %s: parent run %s in experiment %s", sweep, parent.run_id, config.tracking.experiment)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._compare and self._ctx is not None:
            self._summarize(self._ctx)
        self._close("FINISHED")

    def _summarize(self, ctx: SweepContext) -> None:
        """Compare the sweep's runs: table and plots in the sweep folder and on the parent run; then
        register the best run's model when tracking.register names a registered model."""
        from .compare import compare, format_table, register_best

        try:
            table, output = compare(ctx.tracking_uri, self._experiment, ctx.sweep,
                                    Path(self._output or ".") / "compare")
            log.info("sweep %s, sorted by final test_acc:\n%s\n(plots in %s; python -m mnist_logreg.compare "
                     "redraws them)", ctx.sweep, format_table(table), output)
            if self._register:
                version = register_best(self._client, table, ctx.sweep, self._register)
                log.info("registered %s version %s: run %s (test_acc %s)", self._register, version.version,
                         version.run_id, version.tags["test_acc"])
        except Exception as exc:  # a comparison must not fail the sweep whose runs are recorded
            log.warning("could not compare sweep %s: %s", ctx.sweep, exc)

    def _close(self, status: str) -> None:
        """End the parent run once: FINISHED after the sweep, FAILED when the process exits mid-sweep."""
        if self._ctx is None:
            return
        ctx, self._ctx = self._ctx, None
        os.environ.pop(ENV_VAR, None)
        try:
            if status != "FINISHED":  # jobs whose processes died, or that a launcher killed
                from .stopping import end_orphaned_runs, terminate_descendants

                terminate_descendants()
                end_orphaned_runs(self._client, ctx.experiment_id, ctx.parent_run_id, status == "KILLED")
            self._client.set_terminated(ctx.parent_run_id, status)
        except Exception as exc:  # the store went away: say so, do not mask the real error
            log.warning("could not end sweep run %s: %s", ctx.parent_run_id, exc)
            return
        from .links import run_url

        log.info("sweep %s ended %s; its runs in the MLflow UI (mlflow ui --port 5000, or the server): %s",
                 ctx.sweep, status, run_url(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id))
