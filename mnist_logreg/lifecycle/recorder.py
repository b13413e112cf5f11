"""One job's run: opened (or reopened on resume), recorded epoch by epoch, finished, and always ended.

    open_run(job)()     create the MLflow run (or reopen the resumed one)   -> Recorder
    Recorder.begin      params, config.yaml and the untrained accuracies (step 0)
    Recorder.epoch      one epoch's metrics and checkpoint, never split by a signal
    Recorder.finish     weights hash and artifacts, sent
    Recorder.finished   the artifacts written (a record writer's queue settled): the run is complete
    Recorder.running()  ends the run FINISHED, FAILED or KILLED, uploading the checkpoint if unfinished
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from omegaconf import OmegaConf

from ..config import flatten, redact
from ..ml import checkpoint
from ..tracking import writer
from ..tracking.datasets import dataset_inputs
from ..tracking.links import run_url
from ..tracking.runlog import RunLog, log_config
from ..tracking.tags import (TAG_CHECKPOINT_DIR, TAG_FAILURE, TAG_PARENT, TAG_PRUNED, TAG_PRUNED_WHY, TAG_ROLE,
                             command_line, environment_tags)
from ..tracking.writer import WriteFailed, deferring
from .artifacts import MODEL_STAGING, log_artifacts, remove_uploaded
from .lease import Heartbeat, holder_tags
from .parent import mark_interrupted
from .prepare import SERVER_PATIENCE_S, Job
from .signals import JobSignals


def open_run(job: Job, signals: JobSignals, extra_tags: dict[str, str] | None = None, run_name: str | None = None
             ) -> Callable[[], "Recorder"]:
    """Create the job's MLflow run (status RUNNING), named run_name or by its overrides, or reopen the
    stopped run it continues. Either way the run records this process as its holder. The returned
    call gives its Recorder: with a record writer a new run is created while the caller goes on
    (a stack's setup), and the call waits for it."""
    from .parent import note_reused, sweep_tags

    size = int((extra_tags or {}).get("stack.size", 1))
    with job.clock("store"):
        work_dir = job.out_dir or Path(tempfile.mkdtemp(prefix="mnist_logreg_"))
        holder = {**holder_tags(), TAG_CHECKPOINT_DIR: str((work_dir / "checkpoint").resolve())}
        client = deferring(job.client)  # through this process's record writer, if it has one
        if job.resumed is not None:
            client.update_run(job.resumed.run.info.run_id, status="RUNNING")
            run = RunLog(client, job.resumed.run.info.run_id)
            notes = {"abandoned": job.resumed.abandoned} if job.resumed.abandoned else {}
            before = job.resumed.run.info
            if before.end_time:  # the time it spent stopped does not count as its wall time
                gap = time.time() - before.end_time / 1000
                notes["stopped_s"] = f"{float(job.resumed.run.data.tags.get('stopped_s', 0)) + max(0.0, gap):.2f}"
            run.set_tags({"resumed.command": command_line(), **holder, **notes, **dict(extra_tags or {})})
            run.find_model(job.experiment_id)
            current = sweep_tags(job.cfg.tracking.uri).get(TAG_PARENT)
            if current and job.resumed.run.data.tags.get(TAG_PARENT) != current:  # a run of another sweep
                note_reused(job.client, job.cfg.tracking.uri, run.run_id, "continued")
            if job.resumed.abandoned:
                job.log.warning("run %s was left RUNNING, but %s: continuing it", run.run_id, job.resumed.abandoned)
            recorder = Recorder(job, run, signals, work_dir, size)
            return lambda: recorder
        tags = {
            TAG_ROLE: "job",
            "context": str(job.ctx),
            "data.root": str(job.files.root),
            "hydra.overrides": redact(" ".join(job.overrides)),
            "command": command_line(),
            **{f"data.sha256.{name}": h for name, h in job.files.sha256().items()},
            **environment_tags(),
            **job.fingerprint,
            **sweep_tags(job.cfg.tracking.uri),
            **{f"search.{k}": ",".join(map(str, v)) if OmegaConf.is_list(v) else str(v)
               for k, v in (job.cfg.get("search") or {}).items() if v is not None},
            **holder,
            **dict(extra_tags or {}),
        }
        splits = {"train": job.train_split, "test": job.test_split}
        if job.val_split is not None:
            splits["val"] = job.val_split
        opened = RunLog.open_soon(client, job.experiment_id, run_name or run_name_of(job.overrides), tags,
                                  dataset_inputs(job.cfg.data.name, job.files, splits))

    def recorder() -> Recorder:
        with job.clock("store"):
            run = opened()
        return Recorder(job, run, signals, work_dir, size)
    return recorder


def save_checkpoint(client, run_id: str, folder: str, epoch: int, files: dict[str, bytes]) -> None:
    """One epoch's checkpoint files (checkpoint.contents) written into the run's folder: a record
    writer's write, or this process's."""
    checkpoint.write(Path(folder), epoch, files)


def upload_checkpoint(client, run_id: str, folder: str) -> None:
    """The run's last complete checkpoint, uploaded once those sent before it are written."""
    latest = checkpoint.latest(Path(folder))
    if latest is not None:
        client.log_artifacts(run_id, str(latest), "checkpoint")


def run_name_of(overrides: list[str]) -> str:
    """What a run is, in its name: the overrides that change its numbers (never where things go)."""
    from ..config import NEUTRAL_KEYS, is_under, override_key

    def where(override: str) -> bool:
        key = override_key(override)
        return key.startswith("hydra") or is_under(key, NEUTRAL_KEYS)

    return redact(" ".join(o for o in overrides if not where(o))) or "defaults"


class Recorder:
    """Everything one run writes while it trains and when it ends."""

    def __init__(self, job: Job, run: RunLog, signals: JobSignals, work_dir: Path, stack_size: int = 1) -> None:
        self.job, self.run, self.signals = job, run, signals
        self.stack_size = stack_size  # an epoch's timing is the whole stack's when above 1
        self.closing_tags: dict[str, str] = {}  # set with the timing tags as the run ends
        self.log = job.log
        self.heartbeat = Heartbeat()
        cfg = job.cfg
        remote = str(cfg.tracking.uri).startswith(("http://", "https://"))
        self.work_dir = work_dir
        if remote:  # metrics wait here while the server is unreachable, and are sent when it is back
            run.spool = run.spool_file(self.work_dir)
        self.patience = SERVER_PATIENCE_S if remote else 0.0
        self.ckpt_dir = self.work_dir / "checkpoint"
        self.status = "FAILED"
        self.reported = False  # whether this run's failure was already told, in its own line
        self.result: dict[str, Any] = {"run_id": run.run_id}
        self.sent = False  # whether finish() sent the run's last records
        self.sent_upto: int | None = None  # then, with a record writer, the writer's mark
        self.ended = False  # whether a record writer was sent this run's end (FINISHED) after its last record
        self.log.info("MLflow run %s (%s)", run.run_id, redact(cfg.tracking.uri))

    @contextlib.contextmanager
    def running(self) -> Iterator["Recorder"]:
        """End the run however the body ends: FINISHED after finish(), KILLED on Ctrl-C or SIGTERM,
        FAILED otherwise; an unfinished run uploads its last checkpoint for resume=RUN_ID."""
        try:
            yield self
        except KeyboardInterrupt:
            if self.status != "FINISHED":  # a stop after finish() leaves a finished run finished
                self.status = "KILLED"
            mark_interrupted()
            raise
        finally:
            self.close()

    def begin(self, train_acc: float, test_acc: float, val_acc: float | None = None) -> None:
        """Params, the resolved config and the untrained accuracies (step 0). A run that starts over
        in place logs only what it lacks, so no step appears twice."""
        resumed, cfg = self.job.resumed, self.job.cfg
        logged = self.run.client.get_run(self.run.run_id).data if resumed is not None else None
        with self.job.clock("logging"), self.signals.deferred():
            untrained = {"train_acc": train_acc, "test_acc": test_acc,
                         **({"val_acc": val_acc} if val_acc is not None else {})}
            need_params = logged is None or not logged.params
            need_step0 = logged is None or "test_acc" not in logged.metrics
            if need_params:
                # The resolved config (as prepare resolved it, in the job's own Hydra context), from the
                # start: reproduce and resume rebuild the run from it.
                resolved = self.job.resolved
                if resolved is None:
                    resolved = OmegaConf.to_container(cfg, resolve=True)
                writer.write(self.run.client, self.run.run_id, log_config, resolved)
                if need_step0:
                    self.run.log_params_and_metrics(flatten(resolved), 0, untrained)  # one write where it can be
                else:
                    self.run.log_params(flatten(resolved))
            elif need_step0:
                self.run.log_metrics(0, untrained)
        self.log.info("epoch 0 (untrained)  train_acc %.4f  test_acc %.4f%s", train_acc, test_acc,
                      f"  val_acc {val_acc:.4f}" if val_acc is not None else "")

    def resume(self) -> None:
        """A run continued from a checkpoint: log that checkpoint's epoch if the run lacks it (its
        process was killed after writing the checkpoint, before its metrics)."""
        epoch = self.job.resumed.epoch
        have = {m.step for m in self.run.client.get_metric_history(self.run.run_id, "train_loss")}
        kept = checkpoint.metrics_of(self.job.resumed.checkpoint)
        if epoch not in have and kept:
            with self.job.clock("logging"), self.signals.deferred():
                self.run.log_metrics(epoch, kept)
            self.log.info("logged epoch %d from its checkpoint (the run had its checkpoint, not its metrics)", epoch)

    def epoch(self, m, net, trainer, rng: np.random.Generator) -> None:
        """One epoch's checkpoint and metrics, written together, never split by a signal (the
        checkpoint first: it keeps the metrics too, for a process killed in between). With a record
        writer both are its writes, in that order: this process only makes the checkpoint's bytes."""
        with self.job.clock("logging"), self.signals.deferred():
            self.run.settle_last_step()  # a checkpoint never outlives the previous epoch's metrics
            files = checkpoint.contents(m.epoch, net, trainer, rng, m.as_metrics())
            writer.write(self.run.client, self.run.run_id, save_checkpoint, str(self.ckpt_dir), m.epoch, files)
            self.run.log_metrics(m.epoch, m.as_metrics())
            beat = self.heartbeat.due()
            if beat:
                self.run.set_tags(beat)
        self.job.clock.seconds["train"] += m.epoch_seconds + m.eval_seconds
        epochs = self.job.cfg.trainer.epochs
        whose = f"the stack of {self.stack_size}: " if self.stack_size > 1 else ""
        self.log.info(
            "epoch %*d/%d  loss %.4f  train_acc %.4f  test_acc %.4f%s  %s%.2fs train + %.2fs eval  (%.0f ex/s)",
            len(str(epochs)), m.epoch, epochs, m.train_loss, m.train_acc, m.test_acc,
            f"  val_acc {m.val_acc:.4f}" if m.val_acc is not None else "", whose,
            m.epoch_seconds, m.eval_seconds, m.examples_per_second,
        )

    def nonfinite(self, reason: str) -> dict[str, Any]:
        """The loss diverged: the run ends FAILED with a `failure` tag; a sweep goes on."""
        with self.signals.deferred():
            self.run.set_tags({TAG_FAILURE: f"non-finite loss: {reason}"})
        self.log.error("run %s stopped: %s (lower optim.lr or model.sigma)", self.run.run_id, reason)
        self.result.update(status="FAILED", failure=reason)
        return self.result

    def pruned(self, reason: str, epoch: int) -> None:
        """A search stopped this run after `epoch`: it is complete as far as it went (it ends
        FINISHED, so a relaunch never continues it), tagged `pruned` with the epoch, and says so
        in the UI's description; its result and the comparison call it PRUNED."""
        with self.signals.deferred():
            self.run.set_tags({TAG_PRUNED: str(epoch), TAG_PRUNED_WHY: reason,
                               "mlflow.note.content": f"Pruned after epoch {epoch}: {reason}"})
        self.log.info("run %s pruned after epoch %d: %s", self.run.run_id, epoch, reason)
        self.result["pruned"] = epoch

    def finish(self, net, test, history, predicted=None, stage: bool = True) -> None:
        """Weights hash and artifacts, sent (test: the test split on the device; predicted: the net's
        labels for it, when known; stage: whether this process stages the files, else a record
        writer does). With a record writer, the run's end is sent after them: it
        ends FINISHED once they are written, unless one failed, while the caller goes on;
        finished() then confirms them."""
        from ..ml.model import params_hash

        with self.signals.deferred():  # a signal meanwhile takes effect once all of it is sent
            with self.job.clock("artifacts"):
                self.run.drain(self.patience)
                self.closing_tags["params.sha256"] = params_hash(net)  # written with the timing tags, before the end
                log_artifacts(self.run, self.job.cfg, net, test, self.job.test_split, self.job.out_dir,
                              self.work_dir, predicted, stage)
            self.ended = self.run.end_soon("FINISHED", {**self.job.clock.tags(), **self.closing_tags})
            self.sent_upto = writer.mark(self.run.client)
            self.history = history
            self.sent = True

    def finished(self) -> dict[str, Any]:
        """Once everything the run sent is written, it is complete: it then ends FINISHED (its result
        says PRUNED if pruned). A write that failed raises here, and the run ends FAILED."""
        with self.job.clock("artifacts"), self.signals.deferred():
            try:
                self.run.settle(self.sent_upto)  # what it sent, not what later stacks sent since
            except WriteFailed:  # e.g. a full disk under the writer's upload: no half of it stays
                remove_uploaded(self.run.client, self.run.run_id, self.work_dir / "artifacts")
                raise
        self.status = "FINISHED"
        resumed = self.job.resumed
        last = (self.history[-1].as_metrics() if self.history  # else it was stopped after its last epoch
                else checkpoint.metrics_of(resumed.checkpoint) if resumed is not None and resumed.checkpoint else {})
        self.result.update(last, status="PRUNED" if "pruned" in self.result else self.status, epochs=len(self.history))
        return self.result

    def close(self) -> None:
        """Timing tags, the checkpoint of an unfinished run, and the run's end (a signal meanwhile
        takes effect once the run has ended); a finished run whose end a record writer wrote after
        its last record has ended already. A write the record writer could not make ends the run
        FAILED with one line; its stack's other runs are not affected."""
        with self.signals.deferred():
            try:
                if not (self.status == "FINISHED" and self.ended):
                    self._end()
            finally:
                shutil.rmtree(self.work_dir if self.job.out_dir is None else self.work_dir / MODEL_STAGING,
                              ignore_errors=True)
            self.result.setdefault("status", self.status)
            self.log.info("MLflow run %s ended %s: %s", self.run.run_id, self.status,
                          run_url(self.job.cfg.tracking.uri, self.job.experiment_id, self.run.run_id))

    def _end(self) -> None:
        try:
            self.run.set_tags({**self.job.clock.tags(), **self.closing_tags})
            if self.status != "FINISHED":  # for resume=RUN_ID
                writer.write(self.run.client, self.run.run_id, upload_checkpoint, str(self.ckpt_dir))
            if self.status != "FINISHED" and self.run.model_id is not None:
                self.run.client.finalize_logged_model(self.run.model_id, "FAILED")
            self.run.settle()  # what a record writer still held of this run
        except Exception as exc:
            if self.status == "FINISHED":  # a finished run without its weights' hash is not one
                self.status = "FAILED"
                self.result["status"] = self.status
            if not isinstance(exc, WriteFailed):
                raise
            if not self.reported:
                self.log.error("run %s: %s", self.run.run_id, exc)
        finally:
            self.run.end(self.status, self.patience)
