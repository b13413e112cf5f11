"""A job before its run exists: its config checked, its data loaded, its store opened, and what its
point already has in the store. Nothing is written here.

One decision per point (`resolve`), from the runs with the job's fingerprint (the same config, code
and data): a FINISHED run did its work (skip); a run that is KILLED or FAILED, or RUNNING with its
process gone, is continued in place, from its last checkpoint, or from the start when it has none;
a run RUNNING elsewhere is left alone; otherwise the job is new. force=true always trains anew."""

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
from omegaconf import DictConfig, OmegaConf, open_dict

from ..config import NEUTRAL_KEYS, check_known_keys, is_under, override_key, redact, validate
from ..errors import ConfigError
from ..ml.data import DatasetFiles, Split, hold_out, load, locate
from ..tracking.queries import runs_with_fingerprint
from ..tracking.store import client_for, ensure_experiment
from ..tracking.tags import TAG_CHECKPOINT_DIR, TAG_PRUNED, TAG_SWEEP
from .parent import note_reused, parent_run

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
    """A stopped run this job continues, into the same run."""

    client: Any
    run: Any
    checkpoint: Path | None  # its last complete checkpoint; None: it starts over, in place
    epoch: int = 0  # the epochs that checkpoint holds
    abandoned: str | None = None  # why a RUNNING run counts as stopped (its process is gone)


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
    busy: Any = None  # a run of this point still training in another process: the job is skipped
    log: logging.Logger | logging.LoggerAdapter = field(default=log)
    val_split: Split | None = None  # training examples held out (data.val_size), never trained on
    unresolved: bool = False  # prepare(..., look_up_later=True): done, busy and resumed not yet looked up
    resolved: dict | None = None  # cfg resolved (in the job's own Hydra context), for its fingerprint and its run

    @property
    def skipped(self) -> bool:
        """Whether its point has a FINISHED run, or one training elsewhere: skip(job), not training."""
        return self.done is not None or self.busy is not None

    @property
    def start_epoch(self) -> int:
        """The epochs already done: 0 for a new job or one that starts over."""
        return self.resumed.epoch if self.resumed is not None and self.resumed.checkpoint is not None else 0


# Besides the keys that never change the numbers (NEUTRAL_KEYS), what a resumed run may be told: its threads, and Hydra's own keys.
RESUME_MAY_SET = (*NEUTRAL_KEYS, "context.threads", "hydra")


def check_resume_overrides(run_id: str, overrides: Sequence[str]) -> None:
    """resume=RUN_ID trains on with the config the run logged: refuse overrides that would change its
    numbers (they would be silently ignored), naming them."""
    changing = []
    for override in overrides:
        key = override_key(override)
        if key != "resume" and not is_under(key, RESUME_MAY_SET):
            changing.append(override)
    if changing:
        raise ConfigError(f"resume={run_id} continues the run with the config it logged, so {' '.join(changing)} "
                          "would be ignored: drop it, or train a new run with it (without resume=)")


class ContinueSweep(BaseException):
    """resume= named a sweep's parent run: the command continues that sweep (job.main does). Not an
    Exception, so that nothing on the way reports it as a failure."""

    def __init__(self, run_id: str, sweep: str, overrides: list[str]) -> None:
        super().__init__(f"resume={run_id} is sweep {sweep}")
        self.run_id, self.sweep, self.overrides = run_id, sweep, overrides


def _resumable(cfg: DictConfig) -> tuple[Resumed, DictConfig]:
    """The run named by resume=RUN_ID (or a unique prefix of it), its config as logged, and its last
    checkpoint, downloaded. A sweep's parent run raises ContinueSweep."""
    import json

    from ..tracking.queries import run_by_id
    from ..tracking.runconfig import config_from_run
    from ..tracking.tags import TAG_ROLE

    client = client_for(cfg.tracking.uri)
    run = run_by_id(client, str(cfg.resume), f"resume={cfg.resume}",
                    f"{redact(cfg.tracking.uri)}; check the run id and tracking.uri")
    with open_dict(cfg):
        cfg.resume = run.info.run_id
    if run.data.tags.get(TAG_ROLE) == "sweep":
        if parent_run() is not None:
            raise ConfigError(f"resume={run.info.run_id} is a sweep's parent run: continue the whole sweep with "
                              f"python run.py resume={run.info.run_id} (without -m)")
        logged = run.data.tags.get("hydra.overrides.json")
        overrides = json.loads(logged) if logged else run.data.tags.get("hydra.overrides", "").split()
        raise ContinueSweep(run.info.run_id, run.data.tags.get(TAG_SWEEP, "?"), overrides)
    if run.info.status not in ("KILLED", "FAILED"):
        raise ConfigError(f"resume={cfg.resume}: the run is {run.info.status}; only KILLED or FAILED "
                          "runs can be resumed")
    local = find_checkpoint(client, run)
    if local is None:
        raise ConfigError(f"resume={cfg.resume}: the run has no checkpoint (it stopped before its "
                          "first epoch ended); train it again instead")
    resumed_cfg = config_from_run(client, run)
    resumed_cfg.tracking.uri, resumed_cfg.resume, resumed_cfg.force = cfg.tracking.uri, cfg.resume, True
    validate(resumed_cfg)
    return Resumed(client, run, local, _epoch_of(local)), resumed_cfg


def find_checkpoint(client, run) -> Path | None:
    """A stopped run's last complete checkpoint: the one it uploaded when it ended, else the one it
    left in its job folder (a process killed outright uploads nothing), or None."""
    from ..ml import checkpoint

    if any(a.path == "checkpoint" for a in client.list_artifacts(run.info.run_id)):
        folder = Path(tempfile.mkdtemp(prefix="mnist_logreg_resume_"))
        local = checkpoint.latest(Path(client.download_artifacts(run.info.run_id, "checkpoint", str(folder))))
        if local is not None:
            return local
    left = run.data.tags.get(TAG_CHECKPOINT_DIR)
    return checkpoint.latest(Path(left)) if left and Path(left).is_dir() else None


def _epoch_of(path: Path) -> int:
    from ..ml.checkpoint import epoch_of

    return epoch_of(path)


def resolve(client, experiment_id: str, fingerprint: str) -> tuple[Any, Any, Resumed | None]:
    """What a point's runs say it needs: (FINISHED run, busy run, Resumed): at most one is set;
    none for a new point."""
    return decide(client, runs_with_fingerprint(client, experiment_id, fingerprint))


def points_with_runs(jobs: Sequence["Job"]) -> set[tuple[str, str, str]] | None:
    """Of jobs prepared with look_up_later, the points that have any run: (store, experiment,
    fingerprint), found for a whole sweep in one read of each SQLite store (an MLflow query per
    point is some 3 ms of SQLAlchemy here, and a new sweep's points have none); None where that
    cannot be told (a server's store): looked_up then asks for each point."""
    from ..tracking.queries import fingerprints_with_runs

    wanted: dict[tuple[str, str], set[str]] = defaultdict(set)
    for job in jobs:
        if job.unresolved:
            wanted[(job.client.tracking_uri, job.experiment_id)].add(job.fingerprint["fingerprint"])
    found: set[tuple[str, str, str]] = set()
    for (uri, experiment_id), fingerprints in wanted.items():
        with_runs = fingerprints_with_runs(uri, experiment_id, fingerprints)
        if with_runs is None:
            return None
        found.update((uri, experiment_id, fp) for fp in with_runs)
    return found


def looked_up(job: "Job", with_runs: set[tuple[str, str, str]] | None = None) -> "Job":
    """The job of prepare(..., look_up_later=True), with what its point's runs say (done, busy,
    resumed), once; with_runs (points_with_runs): a point not in it has no run to read."""
    if job.unresolved:
        with job.clock("store"):
            fingerprint = job.fingerprint["fingerprint"]
            if with_runs is None or (job.client.tracking_uri, job.experiment_id, fingerprint) in with_runs:
                job.done, job.busy, job.resumed = resolve(job.client, job.experiment_id, fingerprint)
            job.unresolved = False
    return job


def decide(client, runs: list) -> tuple[Any, Any, Resumed | None]:
    """resolve's decision, from the point's runs (newest first)."""
    from .lease import abandoned

    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished:
        return finished[0], None, None
    for run in runs:  # newest first
        why = None
        if run.info.status in ("RUNNING", "SCHEDULED"):
            why = abandoned(run)
            if why is None:
                return None, run, None
        local = find_checkpoint(client, run)
        return None, None, Resumed(client, run, local, _epoch_of(local) if local else 0, why)
    return None, None, None


def _experiment(cfg: DictConfig) -> tuple[Any, str, dict[str, str]]:
    """The client, the experiment id and the sweep tag: the sweep's experiment in a multirun (its
    parent run's tag is added when the job's run opens)."""
    uri = cfg.tracking.uri
    parent = parent_run()
    if parent is not None and parent.tracking_uri == uri:
        # The launching process found the store up: ride out a restart instead of failing the sweep.
        client = client_for(uri, patience=SERVER_PATIENCE_S)
        return client, parent.experiment_id, {TAG_SWEEP: parent.sweep}
    client = client_for(uri)
    return client, ensure_experiment(client, cfg.tracking.experiment, cfg.tracking.artifact_location), {}


def prepare(cfg: DictConfig, out_dir: Path | None = None, overrides: Sequence[str] = (),
            look_up_later: bool = False) -> Job:
    """Check everything that can be wrong with the input (config values, context, data files,
    tracking store) and find a FINISHED run to reuse, before anything is written.

    out_dir: the job's folder (Hydra's), where its log, checkpoints and staged artifacts go (None: a
    temporary folder); overrides: the command-line overrides that made this job, for its tags;
    look_up_later: the point's runs are only asked for (a launcher preparing many jobs reads them
    with looked_up before it trains or skips any)."""
    clock = Clock()
    if cfg.get("resume") is not None and not isinstance(cfg.resume, str):
        # A run id prefix of digits only (or digits and one e) reads as a number: take it as typed.
        typed = [o.split("=", 1)[1] for o in overrides if override_key(o) == "resume"]
        with open_dict(cfg):
            cfg.resume = typed[-1] if typed else str(cfg.resume)
    resolved = _resolved(cfg)
    validate(cfg, resolved)
    check_known_keys(cfg)
    resumed = None
    if cfg.resume:  # continue a KILLED or FAILED run from its last checkpoint, into the same run
        check_resume_overrides(cfg.resume, overrides)
        resumed, cfg = _resumable(cfg)
        resolved = None
    with clock("data"):
        d = cfg.data
        files = locate(d.name, d.root, d.cache, list(d.search), list(d.mirrors),
                                dict(d.md5), timeout=d.download_timeout)
        loading = _loading(files)
    with clock("imports"):
        if cfg.context.threads:  # read by MXNet when it is first imported in this process
            os.environ.setdefault("OMP_NUM_THREADS", str(cfg.context.threads))
        from ..ml.model import make_context
        from ..tracking.fingerprint import fingerprint_tags

    with clock("data"):
        ctx = make_context(cfg.context.device, cfg.context.index)
        train_split, test_split = loading()
        train_split, val_split = hold_out(train_split, d.val_size, d.val_seed)

    with clock("store"):
        if resumed is not None:
            client, experiment_id, sweep_tags = resumed.client, resumed.run.info.experiment_id, {}
        else:
            client, experiment_id, sweep_tags = _experiment(cfg)
        resolved = resolved if resolved is not None else OmegaConf.to_container(cfg, resolve=True)
        fp_tags = fingerprint_tags(resolved, files.digest())
        done = busy = None
        unresolved = not cfg.force and resumed is None
        if unresolved and not look_up_later:
            done, busy, resumed = resolve(client, experiment_id, fp_tags["fingerprint"])
    return Job(cfg, clock, resumed, ctx, files, train_split, test_split, out_dir, list(overrides), client,
               experiment_id, sweep_tags, fp_tags, done, busy, val_split=val_split,
               unresolved=unresolved and look_up_later, resolved=resolved)


def _resolved(cfg: DictConfig) -> dict | None:
    """The config resolved, or None when a value does not resolve (validate then names it)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - validate, or the resolution later, reports it
        return None


def _loading(files: DatasetFiles):
    """The splits of files (load) and their digest, read by the returned call. In a process that
    has not imported MXNet yet, they are read in a thread meanwhile: decompressing and hashing the
    files (some 0.3 s for MNIST's) run in zlib and hashlib, which release the GIL, while MXNet's
    import (0.5 s of Python) holds it. The caller touches no data until the call returns."""
    import sys
    import threading

    if "mxnet" in sys.modules:
        return lambda: load(files)
    out: list = []

    def read() -> None:
        try:
            files.digest()  # cached per file: the fingerprint's, later
            out.append(load(files))
        except BaseException as exc:  # noqa: BLE001 - raised in the caller
            out.append(exc)

    thread = threading.Thread(target=read, name="mnist_logreg-data", daemon=True)
    thread.start()

    def result() -> tuple[Split, Split]:
        thread.join()
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]
    return result


def skip(job: Job) -> dict[str, Any]:
    """The job's point already has a FINISHED run, or one still training elsewhere: name it, on the
    sweep's parent too."""
    if job.busy is not None:
        from .lease import HOST, PID

        tags = job.busy.data.tags
        job.log.warning("skipped: run %s of this config is still training (process %s on %s); it is left alone",
                        job.busy.info.run_id, tags.get(PID, "?"), tags.get(HOST, "another host"))
        return {"run_id": job.busy.info.run_id, "status": "RUNNING"}
    done = job.done
    job.log.info("skipped: run %s already FINISHED this config on this code and data "
                 "(force=true runs it again)", done.info.run_id)
    note_reused(job.client, job.cfg.tracking.uri, done.info.run_id, "skipped")  # the comparison still shows it
    status = "PRUNED" if TAG_PRUNED in done.data.tags else "SKIPPED"  # a search stopped that run early
    return {"run_id": done.info.run_id, "status": status, **done.data.metrics}


def seed_everything(seed: int) -> None:
    """Python's and numpy's global generators (MXNet's is seeded where each net is drawn)."""
    random.seed(seed)
    np.random.seed(seed)
