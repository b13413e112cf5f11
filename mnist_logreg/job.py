"""One Hydra job: check the config, load the data, train, and record everything in one MLflow run."""

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf

from . import checkpoint
from . import data as data_mod
from . import sweep as sweep_mod
from .config import flatten, redact, validate
from .errors import ConfigError, TrackingError, exit_on_error
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

log = logging.getLogger(__name__)
# How long a sweep's job waits for a tracking server that stopped answering mid-sweep.
SERVER_PATIENCE_S = 300.0


@dataclass
class Resumed:
    client: Any
    run: Any
    checkpoint: Path


def _resumable(cfg: DictConfig) -> tuple[Resumed, DictConfig]:
    """The run named by resume=RUN_ID, its config as logged, and its last checkpoint, downloaded."""
    from mlflow.exceptions import MlflowException

    from .reproduce import config_from_run

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


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM stop the job as KeyboardInterrupt, so its run ends KILLED, but
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


def _progress(epochs: int):
    def line(m) -> None:
        log.info(
            "epoch %*d/%d  loss %.4f  train_acc %.4f  test_acc %.4f  %.2fs train + %.2fs eval  (%.0f ex/s)",
            len(str(epochs)), m.epoch, epochs, m.train_loss, m.train_acc, m.test_acc,
            m.epoch_seconds, m.eval_seconds, m.examples_per_second,
        )

    return line


def _write_artifacts(cfg: DictConfig, net, test, out: Path, names) -> Path:
    """Exported model, sample predictions and confusion matrix, under out/."""
    from mxnet import nd

    from .plots import confusion_matrix, plot_confusion, plot_predictions

    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    model_dir.mkdir(exist_ok=True)
    net.export(str(model_dir / "model"), epoch=0)  # model-symbol.json + model-0000.params

    preds = np.concatenate([
        nd.argmax(net(test.x[i : i + cfg.trainer.eval_batch_size]), axis=1).asnumpy()
        for i in range(0, len(test), cfg.trainer.eval_batch_size)
    ])
    true = test.y.asnumpy()
    pick = np.random.default_rng(cfg.seed).choice(len(true), size=min(10, len(true)), replace=False)
    plot_predictions(test.x[nd.array(pick, dtype=np.int64, ctx=test.x.context)].asnumpy(),
                     true[pick], preds[pick], out / "predictions.png", names)
    counts = confusion_matrix(true, preds, cfg.model.num_outputs)
    plot_confusion(counts, out / "confusion_matrix.png", names,
                   title=f"{cfg.data.name} test set: accuracy {np.trace(counts) / counts.sum():.4f}")
    return out


class Phases:
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


def _log_artifacts(run: RunLog, cfg: DictConfig, net, test, out_dir: Path | None) -> None:
    """Model, plots, frozen requirements, git diff and Hydra's files: staged in one folder, then
    uploaded in one call. When the disk fills up (or any write fails), the files already copied
    are removed again, so no half-written artifact is left looking complete."""
    from .fingerprint import frozen_requirements, git_diff

    with tempfile.TemporaryDirectory() as tmp:
        art = (out_dir or Path(tmp)) / "artifacts"
        try:
            _write_artifacts(cfg, net, test, art, list(cfg.data.get("classes") or []) or None)
            (art / "environment").mkdir(exist_ok=True)
            (art / "environment" / "requirements.txt").write_text(frozen_requirements())
            if git_diff():
                (art / "environment" / "git.diff").write_text(git_diff())
            if out_dir is not None and (out_dir / ".hydra").is_dir():
                (art / "hydra").mkdir(exist_ok=True)
                for f in (out_dir / ".hydra").iterdir():  # Hydra's record, passwords hidden
                    (art / "hydra" / f.name).write_text(redact(f.read_text()))
            run.log_artifacts(art)
        except OSError as exc:
            _remove_uploaded(run, art)
            raise TrackingError(f"could not store the artifacts of run {run.run_id} ({exc.strerror or exc}): "
                                "free space where outputs/ and the experiment's artifacts live, then rerun "
                                "the job") from exc


def _remove_uploaded(run: RunLog, staged: Path) -> None:
    """Delete from a local artifact store the files of `staged` that an interrupted upload wrote."""
    from urllib.parse import unquote, urlparse

    uri = run.client.get_run(run.run_id).info.artifact_uri
    if not uri.startswith("file:"):
        return
    dest = Path(unquote(urlparse(uri).path))
    for f in staged.rglob("*") if staged.is_dir() else []:
        target = dest / f.relative_to(staged)
        if target.is_file():
            target.unlink()


def train(cfg: DictConfig, extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train one model as `cfg` says, track it in MLflow, and return its final metrics and run id.

    Everything that can be wrong with the input (config values, context, data files, tracking
    store) is checked before the MLflow run is created, so bad input leaves no run behind.
    """
    clock = Phases()
    validate(cfg)
    resumed = None
    if cfg.resume:  # continue a KILLED or FAILED run from its last checkpoint, into the same run
        resumed, cfg = _resumable(cfg)
    with clock("imports"):
        if cfg.context.threads:  # read by MXNet when it is first imported in this process
            os.environ.setdefault("OMP_NUM_THREADS", str(cfg.context.threads))
        from .fingerprint import fingerprint_tags, params_hash
        from .model import build_net, make_context
        from .training import NonFiniteLoss, evaluate, fit, make_trainer, to_device

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
        if not cfg.force and resumed is None:
            done = finished_run_with(client, experiment_id, fp_tags["fingerprint"])
            if done is not None:
                log.info("skipped: run %s already FINISHED this config on this code and data "
                         "(force=true runs it again)", done.info.run_id)
                if TAG_PARENT in sweep_tags:  # so the sweep's comparison still shows this point
                    client.set_tag(sweep_tags[TAG_PARENT], f"{TAG_REUSED}.{done.info.run_id}", "skipped")
                return {"run_id": done.info.run_id, "status": "SKIPPED", **done.data.metrics}
        if resumed is not None:
            client.update_run(resumed.run.info.run_id, status="RUNNING")
            run = RunLog(client, resumed.run.info.run_id)
            run.set_tags({"resumed.command": command_line()})
        else:
            tags = {
                TAG_ROLE: "job",
                "context": str(ctx),
                "data.root": str(files.root),
                "hydra.overrides": redact(" ".join(overrides)),
                "command": command_line(),
                **{f"data.sha256.{name}": h for name, h in files.sha256().items()},
                **environment_tags(),
                **fp_tags,
                **sweep_tags,
                **dict(extra_tags or {}),
            }
            run = RunLog.create(client, experiment_id, redact(",".join(overrides)) or "defaults", tags)
    remote = str(cfg.tracking.uri).startswith(("http://", "https://"))
    work_dir = out_dir or Path(tempfile.mkdtemp(prefix="mnist_logreg_"))
    if remote:  # metrics wait here while the server is unreachable, and are sent when it is back
        run.spool = work_dir / f"metrics-{run.run_id}.spool.jsonl"
    patience = SERVER_PATIENCE_S if remote else 0.0
    log.info("MLflow run %s (%s)", run.run_id, redact(cfg.tracking.uri))
    status = "FAILED"
    result: dict[str, Any] = {"run_id": run.run_id}
    signals = StopSignals()
    signals.install()
    ckpt_dir = work_dir / "checkpoint"
    try:
        with clock("setup"):
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            train_d, test_d = to_device(train_split, ctx), to_device(test_split, ctx)
            net = build_net(cfg.model.num_outputs, cfg.model.sigma, ctx, cfg.seed)
            trainer = make_trainer(net, cfg.optim.lr, cfg.optim.momentum, cfg.optim.wd)
            rng, start_epoch = np.random.default_rng(cfg.seed), 1
            if resumed is not None:
                done_epochs, rng = checkpoint.load(resumed.checkpoint, net, trainer)
                start_epoch = done_epochs + 1
                log.info("resuming run %s after epoch %d", run.run_id, done_epochs)
            else:
                train_acc, test_acc = evaluate(net, train_d, test_d, cfg.trainer.eval_batch_size)
        if resumed is None:
            with clock("logging"), signals.deferred():
                run.log_params(flatten(cfg))
                # The resolved config, from the start: reproduce and resume rebuild the run from it.
                run.client.log_text(run.run_id, redact(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml")
                run.log_metrics(0, {"train_acc": train_acc, "test_acc": test_acc})
            log.info("epoch 0 (untrained)  train_acc %.4f  test_acc %.4f", train_acc, test_acc)
        progress = _progress(cfg.trainer.epochs)

        def on_epoch(m) -> None:
            # Metrics and checkpoint of an epoch are written together, never split by a signal.
            with clock("logging"), signals.deferred():
                run.log_metrics(m.epoch, m.as_metrics())
                checkpoint.save(ckpt_dir, m.epoch, net, trainer, rng)
            clock.seconds["train"] += m.epoch_seconds + m.eval_seconds
            progress(m)

        try:
            history = fit(
                net, trainer, train_d, test_d,
                epochs=cfg.trainer.epochs, batch_size=d.batch_size, seed=cfg.seed,
                eval_chunk=cfg.trainer.eval_batch_size, on_epoch=on_epoch,
                stop_on_nonfinite=cfg.trainer.stop_on_nonfinite, start_epoch=start_epoch, rng=rng,
            )
        except NonFiniteLoss as exc:
            with signals.deferred():
                run.set_tags({TAG_FAILURE: f"non-finite loss: {exc}"})
            log.error("run %s stopped: %s (lower optim.lr or model.sigma)", run.run_id, exc)
            result.update(status="FAILED", failure=str(exc))
            return result
        with clock("artifacts"), signals.deferred():
            run.drain(patience)
            run.set_tags({"params.sha256": params_hash(net)})
            _log_artifacts(run, cfg, net, test_d, out_dir)
        status = "FINISHED"
        result.update(history[-1].as_metrics(), status=status, epochs=len(history))
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        sweep_mod.mark_interrupted()
        raise
    finally:
        signals.restore()  # a second Ctrl-C from here on stops at once
        try:
            run.set_tags(clock.tags())
            if status != "FINISHED" and checkpoint.latest(ckpt_dir) is not None:
                run.log_artifacts(checkpoint.latest(ckpt_dir), "checkpoint")  # for resume=RUN_ID
        finally:
            run.end(status, patience)
            if out_dir is None:
                shutil.rmtree(work_dir, ignore_errors=True)
        log.info("MLflow run %s ended %s", run.run_id, status)


def main(cfg: DictConfig) -> dict[str, Any]:
    """run.py's entry. Outside a multirun, bad input exits with one line (Hydra would add its own)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
        with exit_on_error():
            return train(cfg)
    return train(cfg)
