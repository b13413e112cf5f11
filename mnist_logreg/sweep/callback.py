"""The sweep's parent MLflow run: a Hydra callback in the launching process opens it before any job
starts (with the store and the experiment) and closes it at the end, with the sweep's comparison."""

from __future__ import annotations

import atexit
import logging
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..config import check_known_keys, check_value, redact, validate
from ..lifecycle.parent import ParentRun, forget_parent_run, interrupted, mark_interrupted

log = logging.getLogger(__name__)


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


def validate_sweep(config: DictConfig) -> dict[str, list[Any]]:
    """Check the base config and every value a multirun will sweep, before the first job starts.

    Swept values come from the command line (`optim.lr=0.1,-1`) and from `hydra.sweeper.params`
    (the experiment presets); interval sweeps are left to each job's own check.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    validate(config)
    check_known_keys(config)
    lines = list(OmegaConf.select(config, "hydra.overrides.task") or [])
    params = OmegaConf.select(config, "hydra.sweeper.params")
    if params:
        lines += [f"{k}={v}" for k, v in params.items()]
    swept: dict[str, list[Any]] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.key_or_group
        if override.is_interval_sweep():
            continue
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        swept[key] = values
        for value in values:
            check_value(key, value)
    return swept


class SweepTracking(Callback):
    """Hydra callback: opens the sweep's parent MLflow run at multirun start, closes it at the end."""

    def __init__(self, compare: bool = True, summary: Callable[..., None] | None = None) -> None:
        """compare: summarize the sweep at its end with `summary` (conf/config.yaml passes
        mnist_logreg.analysis.summary.summarize_sweep: the reading layer, above this one)."""
        self._compare, self._summary = compare, summary
        self._parent: ParentRun | None = None
        self._client: Any = None
        self._experiment = ""
        self._output: str | None = None
        self._register: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns an exception raised in a callback into a warning and launches the jobs
        # anyway, so a sweep that cannot be tracked stops here, before any job starts.
        from ..errors import exit_on_error

        with exit_on_error():
            self._open(config)

    def _open(self, config: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from ..tracking.runlog import RunLog
        from ..tracking.store import client_for, ensure_experiment
        from ..tracking.tags import TAG_ROLE, TAG_SWEEP, command_line, context_tags, git_state
        from .stopping import install as install_signal_handlers, stop_workers

        if not HydraConfig.initialized():  # so that ${hydra:runtime.cwd} resolves here too
            HydraConfig.instance().set_config(config)
        swept = validate_sweep(config)
        if "gpu" in swept.get("context", []) + [config.context.device]:
            from ..ml.model import make_context

            make_context("gpu", config.context.index)  # no GPU: stop before the first job
        uri = OmegaConf.select(config, "tracking.uri")
        client = client_for(uri)
        experiment_id = ensure_experiment(
            client, config.tracking.experiment, OmegaConf.select(config, "tracking.artifact_location")
        )
        share_cores(config)
        if "submitit" in str(OmegaConf.select(config, "hydra.launcher._target_") or "").lower():
            from .stopping import shield_submitit_controllers

            shield_submitit_controllers()
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
        self._parent = ParentRun(sweep, uri, experiment_id, parent.run_id)
        self._parent.hand_down()
        atexit.register(lambda: self._close("KILLED" if interrupted() else "FAILED"))

        def first_signal(signum: int) -> None:
            mark_interrupted()
            if self._parent is not None:
                stop_workers(self._client, self._parent.experiment_id, self._parent.parent_run_id)

        install_signal_handlers(first_signal)
        log.info("sweep %s: parent run %s in experiment %s", sweep, parent.run_id, config.tracking.experiment)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._parent is not None:
            self._say_if_all_skipped(self._parent)
        if self._compare and self._summary is not None and self._parent is not None:
            self._summarize(self._parent)
        self._close("FINISHED")

    def _say_if_all_skipped(self, ctx: ParentRun) -> None:
        """A relaunched sweep whose every point had a FINISHED run trains nothing: its parent says so
        in its name and its description, with a link to each run it stands for."""
        from ..tracking.links import run_url
        from ..tracking.queries import job_runs
        from ..tracking.tags import TAG_REUSED

        try:
            tags = self._client.get_run(ctx.parent_run_id).data.tags
            reused = sorted(k.split(".", 1)[1] for k in tags if k.startswith(f"{TAG_REUSED}."))
            if not reused or job_runs(self._client, [ctx.experiment_id], parent=ctx.parent_run_id, max_results=1):
                return
            self._client.set_tag(ctx.parent_run_id, "mlflow.runName",
                                 f"sweep {ctx.sweep} (all {len(reused)} points skipped)")
            links = "\n".join(f"- [{rid}]({run_url(ctx.tracking_uri, ctx.experiment_id, rid)})" for rid in reused)
            self._client.set_tag(ctx.parent_run_id, "mlflow.note.content",
                                 f"All {len(reused)} points of this sweep had FINISHED runs already, so nothing "
                                 f"was trained (force=true trains them again). Their runs:\n{links}")
            log.info("sweep %s: all %d points had FINISHED runs already; nothing was trained (force=true "
                     "trains them again)", ctx.sweep, len(reused))
        except Exception as exc:  # a note must not fail the sweep
            log.warning("could not describe sweep %s: %s", ctx.sweep, exc)

    def _summarize(self, ctx: ParentRun) -> None:
        try:
            self._summary(self._client, ctx.tracking_uri, self._experiment, ctx.sweep,
                          Path(self._output or ".") / "compare", self._register)
        except Exception as exc:  # a comparison must not fail the sweep whose runs are recorded
            log.warning("could not compare sweep %s: %s", ctx.sweep, exc)

    def _close(self, status: str) -> None:
        """End the parent run once: FINISHED after the sweep, FAILED when the process exits mid-sweep."""
        if self._parent is None:
            return
        ctx, self._parent = self._parent, None
        forget_parent_run()
        try:
            if status != "FINISHED":  # jobs whose processes died, or that a launcher killed
                from .stopping import end_orphaned_runs, terminate_descendants

                terminate_descendants()
                end_orphaned_runs(self._client, ctx.experiment_id, ctx.parent_run_id, status == "KILLED")
            self._client.set_terminated(ctx.parent_run_id, status)
        except Exception as exc:  # the store went away: say so, do not mask the real error
            log.warning("could not end sweep run %s: %s", ctx.parent_run_id, exc)
            return
        from ..tracking.links import run_url

        log.info("sweep %s ended %s; its runs in the MLflow UI (mlflow ui --port 5000, or the server): %s",
                 ctx.sweep, status, run_url(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id))
