"""A job before its run exists: its config checked, its data loaded, its store opened, and whether a
FINISHED run already did its work. Nothing is written here."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from omegaconf import DictConfig

from ..config import LOCATION_KEYS, check_known_keys, redact, validate
from ..errors import ConfigError
from ..ml.data import DatasetFiles, Split, load, locate
from ..tracking.queries import finished_run_with
from ..tracking.store import client_for, ensure_experiment
from ..tracking.tags import TAG_PARENT, TAG_REUSED, TAG_SWEEP
from .parent import parent_run

log = logging.getLogger("mnist_logreg.job")

# How long a sweep's job waits for a tracking server that stopped answering mid-sweep.
SERVER_PATIENCE_S = 300.0


class Clock:
    """Wall time per phase of a job, accumulated; logged as `timing.<phase>_s` tags."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def tags(self) -> dict[str, str]:
        return {f"timing.{k}_s": f"{v:.3f}" for k, v in self.seconds.items()}



@dataclass
class Resumed:
    client: Any
    run: Any
    checkpoint: Path


@dataclass
class Job:
    """A job ready to train: its config, data, store and fingerprint. Nothing is written yet."""

    cfg: DictConfig
    clock: Clock
    resumed: Resumed | None
    ctx: Any
    files: DatasetFiles
    train_split: Split
    test_split: Split
    out_dir: Path | None
    overrides: list[str]
    client: Any
    experiment_id: str
    sweep_tags: dict[str, str]
    fingerprint: dict[str, str]
    done: Any = None  # a FINISHED run with this fingerprint: the job is skipped
    log: logging.Logger | logging.LoggerAdapter = field(default=log)


# Besides where things go (LOCATION_KEYS), what a resumed run may be told: its threads, and Hydra's own keys.
RESUME_MAY_SET = (*LOCATION_KEYS, "context.threads", "hydra")


def check_resume_overrides(run_id: str, overrides: Sequence[str]) -> None:
    """resume=RUN_ID trains on with the config the run logged: refuse overrides that would change its
    numbers (they would be silently ignored), naming them."""
    changing = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key != "resume" and not any(key == k or key.startswith(f"{k}.") for k in RESUME_MAY_SET):
            changing.append(override)
    if changing:
        raise ConfigError(f"resume={run_id} continues the run with the config it logged, so {' '.join(changing)} "
                          "would be ignored: drop it, or train a new run with it (without resume=)")


def _resumable(cfg: DictConfig) -> tuple[Resumed, DictConfig]:
    """The run named by resume=RUN_ID, its config as logged, and its last checkpoint, downloaded."""
    from mlflow.exceptions import MlflowException

    from ..tracking.runconfig import config_from_run

    client = client_for(cfg.tracking.uri)
    try:
        run = client.get_run(cfg.resume)
    except MlflowException as exc:
        raise ConfigError(f"resume={cfg.resume}: no such run in {redact(cfg.tracking.uri)}; "
                          "check the run id and tracking.uri") from exc
    if run.info.status not in ("KILLED", "FAILED"):
        raise ConfigError(f"resume={cfg.resume}: the run is {run.info.status}; only KILLED or FAILED "
                          "runs can be resumed")
    folder = Path(tempfile.mkdtemp(prefix="mnist_logreg_resume_"))
    try:
        local = Path(client.download_artifacts(run.info.run_id, "checkpoint", str(folder)))
    except Exception as exc:
        raise ConfigError(f"resume={cfg.resume}: the run has no checkpoint (it stopped before its "
                          "first epoch ended); train it again instead") from exc
    resumed_cfg = config_from_run(client, run)
    resumed_cfg.tracking.uri, resumed_cfg.resume, resumed_cfg.force = cfg.tracking.uri, cfg.resume, True
    validate(resumed_cfg)
    return Resumed(client, run, local), resumed_cfg


def _experiment(cfg: DictConfig) -> tuple[Any, str, dict[str, str]]:
    """The client, the experiment id and the sweep tags: the sweep's parent in a multirun."""
    uri = cfg.tracking.uri
    parent = parent_run()
    if parent is not None and parent.tracking_uri == uri:
        # The launching process found the store up: ride out a restart instead of failing the sweep.
        client = client_for(uri, patience=SERVER_PATIENCE_S)
        return client, parent.experiment_id, {TAG_SWEEP: parent.sweep, TAG_PARENT: parent.parent_run_id}
    client = client_for(uri)
    return client, ensure_experiment(client, cfg.tracking.experiment, cfg.tracking.artifact_location), {}


def prepare(cfg: DictConfig, out_dir: Path | None = None, overrides: Sequence[str] = ()) -> Job:
    """Check everything that can be wrong with the input (config values, context, data files,
    tracking store) and find a FINISHED run to reuse, before anything is written.

    out_dir: the job's folder (Hydra's), where its log, checkpoints and staged artifacts go (None: a
    temporary folder); overrides: the command-line overrides that made this job, for its tags."""
    clock = Clock()
    validate(cfg)
    check_known_keys(cfg)
    resumed = None
    if cfg.resume:  # continue a KILLED or FAILED run from its last checkpoint, into the same run
        check_resume_overrides(cfg.resume, overrides)
        resumed, cfg = _resumable(cfg)
    with clock("imports"):
        if cfg.context.threads:  # read by MXNet when it is first imported in this process
            os.environ.setdefault("OMP_NUM_THREADS", str(cfg.context.threads))
        from ..ml.model import make_context
        from ..tracking.fingerprint import fingerprint_tags

    with clock("data"):
        ctx = make_context(cfg.context.device, cfg.context.index)
        d = cfg.data
        files = locate(d.name, d.root, d.cache, list(d.search), list(d.mirrors),
                                dict(d.md5), timeout=d.download_timeout)
        train_split, test_split = load(files)

    with clock("store"):
        if resumed is not None:
            client, experiment_id, sweep_tags = resumed.client, resumed.run.info.experiment_id, {}
        else:
            client, experiment_id, sweep_tags = _experiment(cfg)
        fp_tags = fingerprint_tags(cfg, files.digest())
        done = None
        if not cfg.force and resumed is None:
            done = finished_run_with(client, experiment_id, fp_tags["fingerprint"])
    return Job(cfg, clock, resumed, ctx, files, train_split, test_split, out_dir, list(overrides), client,
               experiment_id, sweep_tags, fp_tags, done)


def skip(job: Job) -> dict[str, Any]:
    """The job's point already has a FINISHED run: name it, on the sweep's parent too."""
    done = job.done
    job.log.info("skipped: run %s already FINISHED this config on this code and data "
                 "(force=true runs it again)", done.info.run_id)
    if TAG_PARENT in job.sweep_tags:  # so the sweep's comparison still shows this point
        job.client.set_tag(job.sweep_tags[TAG_PARENT], f"{TAG_REUSED}.{done.info.run_id}", "skipped")
    return {"run_id": done.info.run_id, "status": "SKIPPED", **done.data.metrics}


def seed_everything(seed: int) -> None:
    """Python's and numpy's global generators (MXNet's is seeded where each net is drawn)."""
    random.seed(seed)
    np.random.seed(seed)
