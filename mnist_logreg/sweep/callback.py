"""The sweep's parent MLflow run: a Hydra callback in the launching process checks the sweep, opens
the store and the experiment before any job starts, opens the parent run (or reopens the stopped
sweep this launch continues) when the first run needs it, and closes it at the end, with the
sweep's comparison."""

from __future__ import annotations

import atexit
import json
import logging
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from ..config import check_known_keys, check_value, redact, validate
from ..errors import ConfigError
from ..lifecycle.lease import holder_tags
from ..lifecycle.parent import (ParentRun, forget_parent_run, interrupted, mark_interrupted, note_reused, pending_reused,
                               set_discarder, set_opener)

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

    if config.get("resume") is not None and not isinstance(config.resume, str):  # a run id of digits
        with open_dict(config):
            config.resume = str(config.resume)
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
        if key == "resume":  # run ids (a prefix of digits reads as a number)
            values = [v if v is None else str(v) for v in values]
        swept[key] = values
        for i, value in enumerate(values):
            try:
                check_value(key, value)
            except ConfigError as exc:
                hint = decimal_comma_hint(values, i)
                raise ConfigError(f"{exc} ({hint})" if hint else str(exc)) from None
    return swept


def decimal_comma_hint(values: list[Any], i: int) -> str | None:
    """`0,5` in a sweep list is 0 and 5: when values[i] is such a whole number followed by one digit,
    the guess that a decimal point was typed as a comma."""
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    pairs = [(i, i + 1), (i - 1, i)]
    for a, b in pairs:
        if 0 <= a and b < len(values) and whole(values[a]) and whole(values[b]) and 0 <= values[b] <= 9:
            return f"did you mean {values[a]}.{values[b]}? a sweep list is split at commas: write decimals with a point"
    return None


TAG_SWEEP_KEY = "sweep.key"
TAG_CONTINUATIONS = "sweep.continuations"
# Overrides that name where things go, or how jobs are launched, not which points a sweep trains.
_NOT_THE_SWEEP = ("force", "resume", "hydra", "hydra/launcher")


def axis_order(config: DictConfig, overrides: list[str]) -> list[str]:
    """The keys the sweep may vary, in the order its researcher wrote them: the sweeper's params (a
    preset's, or the search space) first, then the command line's overrides. The comparison's
    columns and plots follow it."""
    from ..config import override_key

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    keys = [str(k) for k in params] + [override_key(o) for o in overrides]
    return [k for i, k in enumerate(keys) if k not in keys[:i] and not k.startswith("hydra.")]


def sweep_key(config: DictConfig, overrides: list[str]) -> str:
    """What makes two launches the same sweep: the overrides that choose its points (never where
    things go, nor the launcher), the sweeper and its searched params, as one hash."""
    import hashlib
    import json

    from ..config import NEUTRAL_KEYS, is_under, override_key

    def counts(override: str) -> bool:
        key = override_key(override)
        if key.startswith("hydra.sweeper") or key == "hydra/sweeper":
            return True
        return not (key in _NOT_THE_SWEEP or key.startswith(("hydra.", "hydra/"))
                    or is_under(key, NEUTRAL_KEYS))

    params = OmegaConf.select(config, "hydra.sweeper.params")
    facts = {"overrides": sorted(o for o in overrides if counts(o)),
             "sweeper": str(OmegaConf.select(config, "hydra.sweeper._target_")),
             "params": OmegaConf.to_container(params, resolve=True) if params is not None else None}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def continuable_parent(client, experiment_id: str, key: str):
    """The newest parent run of this sweep key, when it did not finish (KILLED, FAILED, or RUNNING with
    its process gone): the sweep this launch continues. A sweep still running elsewhere is refused."""
    from ..errors import ConfigError
    from ..lifecycle.lease import abandoned
    from ..tracking.queries import MAX_RESULTS, runs_filter

    found = client.search_runs([experiment_id], f"{runs_filter('sweep')} and tags.`{TAG_SWEEP_KEY}` = '{key}'",
                               order_by=["attributes.start_time DESC"], max_results=min(MAX_RESULTS, 10))
    if not found or found[0].info.status == "FINISHED":
        return None
    newest = found[0]
    if newest.info.status == "RUNNING" and abandoned(newest) is None:
        raise ConfigError(f"this sweep is running now (parent run {newest.info.run_id}, process "
                          f"{newest.data.tags.get('process.pid', '?')} on {newest.data.tags.get('process.host', '?')}): "
                          "wait for it to end, or stop it, then run the command again")
    return newest


def reopen_parent(client, previous, tags: dict[str, str]) -> str:
    """Set a stopped sweep's parent RUNNING again, one continuation more, said in its description."""
    run_id = previous.info.run_id
    old = previous.data.tags
    n = int(old.get(TAG_CONTINUATIONS, "0")) + 1
    note = old.get("mlflow.note.content", "")
    line = (f"- continuation {n}, {datetime.now():%Y-%m-%d %H:%M:%S}: after it ended {previous.info.status}, "
            f"`{tags['command']}`")
    note = (note + "\n" if note else "This sweep was stopped and continued:\n") + line
    client.update_run(run_id, status="RUNNING")
    keep = {k: v for k, v in tags.items() if k not in ("hydra.sweep.dir",)}
    for k, v in {**keep, TAG_CONTINUATIONS: str(n), "mlflow.note.content": note,
                 f"hydra.sweep.dir.{n}": tags["hydra.sweep.dir"]}.items():
        client.set_tag(run_id, k, v)
    return run_id


def in_process_launcher(config: DictConfig) -> bool:
    """Whether the launcher opens the parent itself when its first run needs it: it runs every job in
    this process (stacked, basic), or opens it just before it submits (the stacked Slurm launcher)."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_") or "")
    return target.endswith(("StackedLauncher", "BasicLauncher", "StackedSlurmLauncher"))


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
        self._continued = False

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
        from ..tracking.tags import TAG_AXES, TAG_REUSED, TAG_ROLE, TAG_SWEEP, command_line, context_tags, git_state
        from .stopping import install as install_signal_handlers, stop_workers

        if not HydraConfig.initialized():  # so that ${hydra:runtime.cwd} resolves here too
            HydraConfig.instance().set_config(config)
        swept = validate_sweep(config)
        on_cluster = "slurm" in str(OmegaConf.select(config, "hydra.launcher._target_") or "").lower()
        if "gpu" in swept.get("context", []) + [config.context.device] and not on_cluster:  # a login node has none
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
        overrides = list(OmegaConf.select(config, "hydra.overrides.task") or [])
        key = sweep_key(config, overrides)
        previous = continuable_parent(client, experiment_id, key)
        sweep = previous.data.tags[TAG_SWEEP] if previous is not None else new_sweep_id()
        self._client = client
        self._experiment = config.tracking.experiment
        self._register = OmegaConf.select(config, "tracking.register")
        self._output = str(config.hydra.sweep.dir)
        self._parent = ParentRun(sweep, uri, experiment_id)
        self._parent.hand_down()
        tags = {TAG_SWEEP: sweep, TAG_ROLE: "sweep", TAG_SWEEP_KEY: key, "hydra.overrides": redact(" ".join(overrides)),
                "hydra.overrides.json": redact(json.dumps(overrides)),
                TAG_AXES: json.dumps(axis_order(config, overrides)),
                "hydra.sweep.dir": str(config.hydra.sweep.dir), "command": command_line(), **git_state(),
                **context_tags(), **holder_tags()}

        def open_parent() -> ParentRun:
            """Create the parent run, or reopen the stopped one this launch continues (the first time a run needs it)."""
            assert self._parent is not None
            if self._parent.parent_run_id:
                return self._parent
            if previous is not None:
                run_id = reopen_parent(client, previous, tags)
                self._continued = True
            else:
                run_id = RunLog.create(client, experiment_id, run_name=f"sweep {sweep}", tags=tags).run_id
            self._parent = ParentRun(sweep, uri, experiment_id, run_id)
            self._parent.hand_down()
            for reused, how in pending_reused().items():
                client.set_tag(run_id, f"{TAG_REUSED}.{reused}", how)
            log.info("sweep %s: %s run %s in experiment %s", sweep, "continued, parent" if previous else "parent",
                     run_id, config.tracking.experiment)
            return self._parent

        def discard_parent() -> None:
            """Delete the parent this launch created (nothing joined it); a continued one stays."""
            if self._parent is not None and self._parent.parent_run_id and not self._continued:
                client.delete_run(self._parent.parent_run_id)
                self._parent = ParentRun(sweep, uri, experiment_id)
                self._parent.hand_down()

        set_opener(open_parent)
        set_discarder(discard_parent)
        atexit.register(lambda: self._close("KILLED" if interrupted() else "FAILED"))

        def first_signal(signum: int) -> None:
            mark_interrupted()
            if self._parent is not None and self._parent.parent_run_id:
                stop_workers(self._client, self._parent.experiment_id, self._parent.parent_run_id)

        install_signal_handlers(first_signal)
        if not in_process_launcher(config):  # jobs in other processes find it open
            open_parent()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._parent is not None and not self._parent.parent_run_id:
            self._say_nothing_trained()
        elif self._parent is not None and not self._drop_if_empty(self._parent):
            if self._compare and self._summary is not None:
                self._summarize(self._parent)
        self._close("FINISHED")

    def _say_nothing_trained(self) -> None:
        """A launch that trained nothing opened no parent run: say where its points' runs are."""
        from ..tracking.tags import TAG_PARENT, TAG_SWEEP

        reused = pending_reused()
        holders = set()
        for run_id in reused:
            try:
                tags = self._client.get_run(run_id).data.tags
            except Exception:
                tags = {}
            if TAG_SWEEP in tags:
                holders.add(f"sweep {tags[TAG_SWEEP]} (parent run {tags.get(TAG_PARENT, '?')})")
            else:
                holders.add(f"run {run_id}")
        if reused:
            log.info("nothing to train: all %d points have FINISHED runs already, in %s (force=true trains them "
                     "again); no new sweep was recorded", len(reused), ", ".join(sorted(holders)))
        else:
            log.info("nothing was trained, and no sweep was recorded")

    def _drop_if_empty(self, ctx: ParentRun) -> bool:
        """A parent opened before its jobs ran (their processes are elsewhere) that no run of this
        launch joined: a launch that trained nothing records no sweep, so it is deleted again."""
        from ..tracking.queries import job_runs
        from ..tracking.tags import TAG_REUSED

        try:
            if self._continued or job_runs(self._client, [ctx.experiment_id], parent=ctx.parent_run_id, max_results=1):
                return False
            reused = [k.split(".", 1)[1] for k in self._client.get_run(ctx.parent_run_id).data.tags
                      if k.startswith(f"{TAG_REUSED}.")]
            self._client.delete_run(ctx.parent_run_id)
        except Exception as exc:  # a tidy-up must not fail the sweep
            log.warning("could not check sweep %s for runs: %s", ctx.sweep, exc)
            return False
        self._parent = ParentRun(ctx.sweep, ctx.tracking_uri, ctx.experiment_id)
        for run_id in reused:
            note_reused(self._client, ctx.tracking_uri, run_id, "skipped")
        self._say_nothing_trained()
        return True

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
        if not ctx.parent_run_id:  # never opened: nothing of this launch is in the store
            return
        try:
            if status != "FINISHED":  # jobs whose processes died, or that a launcher killed
                from .stopping import end_orphaned_runs, terminate_descendants

                terminate_descendants()
                end_orphaned_runs(self._client, ctx.experiment_id, ctx.parent_run_id, status == "KILLED")
            self._client.set_terminated(ctx.parent_run_id, status)
        except Exception as exc:  # the store went away: say so, do not mask the real error
            log.warning("could not end sweep run %s: %s", ctx.parent_run_id, exc)
            return
        from ..lifecycle.lease import process_age
        from ..tracking.links import run_url
        from .progress import duration

        age = process_age()
        log.info("sweep %s ended %s%s; its runs in the MLflow UI (mlflow ui --port 5000, or the server): %s",
                 ctx.sweep, status, f" after {duration(age)}" if age is not None else "",
                 run_url(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id))
