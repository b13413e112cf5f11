"""One job's life in phases, each with one job: prepare, open the run, record the fit, finish.

    prepare(cfg)        validate, resume lookup, data, fingerprint, skip lookup; no MLflow writes
    skip(job)           a FINISHED run already has this fingerprint: point the sweep at it
    open_run(job)       create the MLflow run (or reopen the resumed one)   -> Recorder
    Recorder.begin      params, config.yaml and the untrained accuracies (step 0)
    Recorder.epoch      one epoch's metrics and checkpoint, never split by a signal
    Recorder.finish     weights hash and artifacts: the run is complete
    Recorder.running()  ends the run FINISHED, FAILED or KILLED, uploading the checkpoint if unfinished

`job.train` (one model) and the stacked launcher (K models on one batch stream) call the same
phases; only the fit in between differs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf

from . import checkpoint
from . import data as data_mod
from . import sweep as sweep_mod
from .config import flatten, redact, validate
from .links import run_url
from .errors import ConfigError
from .tracking import (
    TAG_FAILURE,
    TAG_PARENT,
    TAG_REUSED,
    TAG_ROLE,
    TAG_SWEEP,
    RunLog,
    client_for,
    command_line,
    ensure_experiment,
    environment_tags,
)

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


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM stop training as KeyboardInterrupt, so runs end KILLED, but
    never in the middle of an MLflow write: one cut short can leave a SQLite store locked, so a
    signal that arrives inside `deferred()` takes effect when the write is done."""

    def __init__(self) -> None:
        self._pending: int | None = None
        self._depth = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        self.install()
        try:
            yield self
        finally:
            self.restore()  # a second Ctrl-C from here on stops at once

    def _handle(self, signum: int, frame) -> None:
        if self._depth:
            self._pending = signum
        else:
            raise KeyboardInterrupt(f"signal {signum}")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._pending is not None:
                signum, self._pending = self._pending, None
                raise KeyboardInterrupt(f"signal {signum}")


# -- prepare ---------------------------------------------------------------------------------------

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
    files: data_mod.DatasetFiles
    train_split: data_mod.Split
    test_split: data_mod.Split
    out_dir: Path | None
    overrides: list[str]
    client: Any
    experiment_id: str
    sweep_tags: dict[str, str]
    fingerprint: dict[str, str]
    done: Any = None  # a FINISHED run with this fingerprint: the job is skipped
    log: logging.Logger | logging.LoggerAdapter = field(default=log)


def _resumable(cfg: DictConfig) -> tuple[Resumed, DictConfig]:
    """The run named by resume=RUN_ID, its config as logged, and its last checkpoint, downloaded."""
    from mlflow.exceptions import MlflowException

    from .runconfig import config_from_run

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


def _hydra_job() -> tuple[Path | None, list[str]]:
    """The job's output folder and its overrides, when running under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, []
    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir), list(hc.overrides.task)


def _experiment(cfg: DictConfig) -> tuple[Any, str, dict[str, str]]:
    """The client, the experiment id and the sweep tags: the sweep's parent in a multirun."""
    uri = cfg.tracking.uri
    sweep = sweep_mod.current()
    if sweep is not None and sweep.tracking_uri == uri:
        # The launching process found the store up: ride out a restart instead of failing the sweep.
        client = client_for(uri, patience=SERVER_PATIENCE_S)
        return client, sweep.experiment_id, {TAG_SWEEP: sweep.sweep, TAG_PARENT: sweep.parent_run_id}
    client = client_for(uri)
    return client, ensure_experiment(client, cfg.tracking.experiment, cfg.tracking.artifact_location), {}


def finished_run_with(client, experiment_id: str, fingerprint: str):
    """A FINISHED run of the experiment with this fingerprint, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.fingerprint = '{fingerprint}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0] if runs else None


def prepare(cfg: DictConfig) -> Job:
    """Check everything that can be wrong with the input (config values, context, data files,
    tracking store) and find a FINISHED run to reuse, before anything is written."""
    clock = Clock()
    validate(cfg)
    resumed = None
    if cfg.resume:  # continue a KILLED or FAILED run from its last checkpoint, into the same run
        resumed, cfg = _resumable(cfg)
    with clock("imports"):
        if cfg.context.threads:  # read by MXNet when it is first imported in this process
            os.environ.setdefault("OMP_NUM_THREADS", str(cfg.context.threads))
        from .fingerprint import fingerprint_tags
        from .model import make_context

    with clock("data"):
        ctx = make_context(cfg.context.device, cfg.context.index)
        d = cfg.data
        files = data_mod.locate(d.name, d.root, d.cache, list(d.search), list(d.mirrors),
                                dict(d.md5), timeout=d.download_timeout)
        train_split, test_split = data_mod.load(files)

    with clock("store"):
        out_dir, overrides = _hydra_job()
        if resumed is not None:
            client, experiment_id, sweep_tags = resumed.client, resumed.run.info.experiment_id, {}
        else:
            client, experiment_id, sweep_tags = _experiment(cfg)
        fp_tags = fingerprint_tags(cfg, files.digest())
        done = None
        if not cfg.force and resumed is None:
            done = finished_run_with(client, experiment_id, fp_tags["fingerprint"])
    return Job(cfg, clock, resumed, ctx, files, train_split, test_split, out_dir, overrides, client,
               experiment_id, sweep_tags, fp_tags, done)


def skip(job: Job) -> dict[str, Any]:
    """The job's point already has a FINISHED run: name it, on the sweep's parent too."""
    done = job.done
    job.log.info("skipped: run %s already FINISHED this config on this code and data "
                 "(force=true runs it again)", done.info.run_id)
    if TAG_PARENT in job.sweep_tags:  # so the sweep's comparison still shows this point
        job.client.set_tag(job.sweep_tags[TAG_PARENT], f"{TAG_REUSED}.{done.info.run_id}", "skipped")
    return {"run_id": done.info.run_id, "status": "SKIPPED", **done.data.metrics}


# -- open the run ----------------------------------------------------------------------------------

def open_run(job: Job, signals: StopSignals, extra_tags: dict[str, str] | None = None) -> "Recorder":
    """Create the job's MLflow run (status RUNNING), or reopen the run it resumes."""
    with job.clock("store"):
        if job.resumed is not None:
            job.client.update_run(job.resumed.run.info.run_id, status="RUNNING")
            run = RunLog(job.client, job.resumed.run.info.run_id)
            run.set_tags({"resumed.command": command_line(), **dict(extra_tags or {})})
            run.find_model(job.experiment_id)
        else:
            tags = {
                TAG_ROLE: "job",
                "context": str(job.ctx),
                "data.root": str(job.files.root),
                "hydra.overrides": redact(" ".join(job.overrides)),
                "command": command_line(),
                **{f"data.sha256.{name}": h for name, h in job.files.sha256().items()},
                **environment_tags(),
                **job.fingerprint,
                **job.sweep_tags,
                **dict(extra_tags or {}),
            }
            run = RunLog.create(job.client, job.experiment_id,
                                redact(",".join(job.overrides)) or "defaults", tags)
            run.log_inputs(dataset_inputs(job))
            run.create_model(job.experiment_id)
    return Recorder(job, run, signals)


def dataset_inputs(job: Job) -> list:
    """The train and test splits as MLflow dataset inputs: name, a digest of the files' sha256,
    the folder as source, the schema (uint8 pixels and labels) and the number of rows."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from .fingerprint import sha256_text

    hashes = job.files.sha256()
    out = []
    for context, split in (("train", job.train_split), ("test", job.test_split)):
        names = [job.files.paths[f"{context}_{kind}"].name for kind in ("images", "labels")]
        digest = sha256_text("".join(hashes[n] for n in names))[:16]
        schema = {"mlflow_tensorspec": {
            "features": json.dumps([{"name": "image", "type": "tensor",
                                     "tensor-spec": {"dtype": "uint8", "shape": [-1, split.images.shape[1]]}}]),
            "targets": json.dumps([{"name": "label", "type": "tensor",
                                    "tensor-spec": {"dtype": "uint8", "shape": [-1]}}]),
        }}
        profile = {"num_rows": int(len(split.labels)), "files": names}
        dataset = Dataset(f"{job.cfg.data.name}/{context}", digest, "local", json.dumps({"uri": str(job.files.root)}),
                          json.dumps(schema), json.dumps(profile))
        out.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
    return out


# -- record the fit, finish --------------------------------------------------------------------------

class Recorder:
    """Everything one run writes while it trains and when it ends."""

    def __init__(self, job: Job, run: RunLog, signals: StopSignals) -> None:
        self.job, self.run, self.signals = job, run, signals
        self.log = job.log
        cfg = job.cfg
        remote = str(cfg.tracking.uri).startswith(("http://", "https://"))
        self.work_dir = job.out_dir or Path(tempfile.mkdtemp(prefix="mnist_logreg_"))
        if remote:  # metrics wait here while the server is unreachable, and are sent when it is back
            run.spool = self.work_dir / f"metrics-{run.run_id}.spool.jsonl"
        self.patience = SERVER_PATIENCE_S if remote else 0.0
        self.ckpt_dir = self.work_dir / "checkpoint"
        self.status = "FAILED"
        self.result: dict[str, Any] = {"run_id": run.run_id}
        self.log.info("MLflow run %s (%s)", run.run_id, redact(cfg.tracking.uri))

    @contextlib.contextmanager
    def running(self) -> Iterator["Recorder"]:
        """End the run however the body ends: FINISHED after finish(), KILLED on Ctrl-C or SIGTERM,
        FAILED otherwise; an unfinished run uploads its last checkpoint for resume=RUN_ID."""
        try:
            yield self
        except KeyboardInterrupt:
            self.status = "KILLED"
            sweep_mod.mark_interrupted()
            raise
        finally:
            self.close()

    def begin(self, train_acc: float, test_acc: float) -> None:
        """Params, the resolved config and the untrained accuracies (step 0); none on resume."""
        if self.job.resumed is not None:
            return
        cfg = self.job.cfg
        with self.job.clock("logging"), self.signals.deferred():
            self.run.log_params(flatten(cfg))
            # The resolved config, from the start: reproduce and resume rebuild the run from it.
            self.run.client.log_text(self.run.run_id, redact(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml")
            self.run.log_metrics(0, {"train_acc": train_acc, "test_acc": test_acc})
        self.log.info("epoch 0 (untrained)  train_acc %.4f  test_acc %.4f", train_acc, test_acc)

    def epoch(self, m, net, trainer, rng: np.random.Generator) -> None:
        """One epoch's metrics and checkpoint, written together, never split by a signal."""
        with self.job.clock("logging"), self.signals.deferred():
            self.run.log_metrics(m.epoch, m.as_metrics())
            checkpoint.save(self.ckpt_dir, m.epoch, net, trainer, rng)
        self.job.clock.seconds["train"] += m.epoch_seconds + m.eval_seconds
        epochs = self.job.cfg.trainer.epochs
        self.log.info(
            "epoch %*d/%d  loss %.4f  train_acc %.4f  test_acc %.4f  %.2fs train + %.2fs eval  (%.0f ex/s)",
            len(str(epochs)), m.epoch, epochs, m.train_loss, m.train_acc, m.test_acc,
            m.epoch_seconds, m.eval_seconds, m.examples_per_second,
        )

    def nonfinite(self, reason: str) -> dict[str, Any]:
        """The loss diverged: the run ends FAILED with a `failure` tag; a sweep goes on."""
        with self.signals.deferred():
            self.run.set_tags({TAG_FAILURE: f"non-finite loss: {reason}"})
        self.log.error("run %s stopped: %s (lower optim.lr or model.sigma)", self.run.run_id, reason)
        self.result.update(status="FAILED", failure=reason)
        return self.result

    def finish(self, net, test, history) -> dict[str, Any]:
        """Weights hash and artifacts; the run then ends FINISHED."""
        from .artifacts import log_artifacts
        from .fingerprint import params_hash

        with self.job.clock("artifacts"), self.signals.deferred():
            self.run.drain(self.patience)
            self.run.set_tags({"params.sha256": params_hash(net)})
            log_artifacts(self.run, self.job.cfg, net, test, self.job.out_dir)
        self.status = "FINISHED"
        self.result.update(history[-1].as_metrics(), status=self.status, epochs=len(history))
        return self.result

    def close(self) -> None:
        """Timing tags, the checkpoint of an unfinished run, and the run's end."""
        try:
            self.run.set_tags(self.job.clock.tags())
            latest = checkpoint.latest(self.ckpt_dir)
            if self.status != "FINISHED" and latest is not None:
                self.run.log_artifacts(latest, "checkpoint")  # for resume=RUN_ID
            if self.status != "FINISHED" and self.run.model_id is not None:
                self.run.client.finalize_logged_model(self.run.model_id, "FAILED")
        finally:
            self.run.end(self.status, self.patience)
            if self.job.out_dir is None:
                shutil.rmtree(self.work_dir, ignore_errors=True)
        self.result.setdefault("status", self.status)
        self.log.info("MLflow run %s ended %s: %s", self.run.run_id, self.status,
                      run_url(self.job.cfg.tracking.uri, self.job.experiment_id, self.run.run_id))


def seed_everything(seed: int) -> None:
    """Python's and numpy's global generators (MXNet's is seeded where each net is drawn)."""
    random.seed(seed)
    np.random.seed(seed)
