"""One MLflow run written through MlflowClient, its metrics spooled to a file while the store is away."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from ..errors import HarnessError, TrackingError
from . import writer
from .store import retry_with_backoff

log = logging.getLogger(__name__)


def chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class RunLog:
    """One MLflow run written through MlflowClient (no global active-run state, so jobs can share a process)."""

    def __init__(self, client, run_id: str, spool: Path | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.spool = spool  # where metrics wait while the store is unreachable (None: raise)
        self.model_id: str | None = None  # the run's logged model: its metrics are linked to it
        self._last_step: int | None = None  # with a record writer: where the previous step's write was sent

    @classmethod
    def create(cls, client, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> "RunLog":
        """Start a new run (status RUNNING)."""
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
        return cls(client, run.info.run_id)

    @classmethod
    def open_soon(cls, client, experiment_id: str, run_name: str, tags: Mapping[str, str],
                  datasets: list) -> Callable[[], "RunLog"]:
        """Start a new run (RUNNING) with its dataset inputs and its logged model (`open_records`);
        the returned call gives the RunLog. With a record writer the run is opened while the caller
        goes on, and the call waits for it; else it is opened now."""
        if isinstance(client, writer.Deferring):
            answer = client.ask_soon(open_records, experiment_id, run_name, dict(tags), datasets)
            return lambda: cls._opened(client, *answer())
        opened = cls._opened(client, *open_records(client, experiment_id, run_name, dict(tags), datasets))
        return lambda: opened

    @classmethod
    def _opened(cls, client, run_id: str, model_id: str) -> "RunLog":
        run = cls(client, run_id)
        run.model_id = model_id
        writer.note_model(client, model_id, run_id)
        return run

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for part in chunks(items, 100):
            self.client.log_batch(self.run_id, params=part)

    def log_params_and_metrics(self, params: Mapping[str, str], step: int, metrics: Mapping[str, float]) -> None:
        """Params and one step's metrics in a single write when they fit in one batch and no spool
        is in play (a server's metrics must be able to wait in the spool; params never do)."""
        from mlflow.entities import Metric, Param

        if self.spool is not None or len(params) > 100:
            self.log_params(params)
            self.log_metrics(step, metrics)
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()],
                              metrics=[Metric(k, float(v), now, step, model_id=self.model_id) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for part in chunks(items, 100):
            self.client.log_batch(self.run_id, tags=part)

    def spool_file(self, folder: Path) -> Path:
        """Where this run's metrics wait, in folder, while its store is unreachable."""
        return folder / f"metrics-{self.run_id}.spool.jsonl"

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log several metrics at one step in a single call.

        When the store does not answer (after MLflow's retries), the points go to a local spool
        file instead and training goes on; they are sent with the next call that gets through,
        or at the end of the run.
        """
        points = [(k, float(v), int(time.time() * 1000), step, self.model_id) for k, v in metrics.items()]
        self.settle_last_step()
        if self.spool is not None and self.spool.exists():
            self.flush()
        try:
            self._send(points)
        except Exception as exc:
            if self.spool is None or not _unreachable(exc):
                raise
            with open(self.spool, "a") as fh:
                fh.write(json.dumps(points) + "\n")
            log.warning("tracking store unreachable (%s): metrics of step %d kept in %s",
                        type(exc).__name__, step, self.spool)

    def _send(self, points: list) -> None:
        from mlflow.entities import Metric

        with _few_retries(self.spool is not None):
            self.client.log_batch(self.run_id, metrics=[Metric(*p) for p in points])
        self._last_step = writer.mark(self.client)

    def settle_last_step(self) -> None:
        """With a record writer, the previous step's metrics must be written before the next step goes
        (and before the checkpoint that would outlive them): wait for them, raise if they failed."""
        if self._last_step is not None:
            self.settle(self._last_step)

    def settle(self, upto: int | None = None) -> None:
        """With a record writer, wait until this run's writes sent so far (or up to mark `upto`) are
        done, and raise the first that failed (writer.WriteFailed); a plain client wrote them already."""
        writer.settle(self.client, self.run_id, upto)

    def flush(self) -> bool:
        """Send the spooled metrics, if any; True when none are left."""
        if self.spool is None or not self.spool.exists():
            return True
        try:
            for line in self.spool.read_text().splitlines():
                self._send(json.loads(line))
        except Exception as exc:
            if not _unreachable(exc):
                raise
            return False
        self.spool.unlink()
        log.info("sent the spooled metrics of run %s", self.run_id)
        return True

    def find_model(self, experiment_id: str) -> str | None:
        """The logged model this run created (when a resumed run goes on), or None."""
        found = self.client.search_logged_models(experiment_ids=[experiment_id],
                                                  filter_string=f"source_run_id = '{self.run_id}'", max_results=1)
        self.model_id = found[0].model_id if found else None
        return self.model_id

    def log_artifacts(self, folder: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def end(self, status: str, patience: float = 0.0) -> None:
        """Send any spooled metrics, then mark the run FINISHED, FAILED or KILLED (after everything it
        queued: with a record writer, set_terminated is answered in order)."""
        self.drain(patience)
        self.client.set_terminated(self.run_id, status)

    def end_soon(self, status: str, tags: Mapping[str, str]) -> bool:
        """With a record writer: send tags and then the run's end, which the writer makes after
        everything the run sent before, and skips if any of it failed (the caller learns that at
        its next settle, and ends the run itself). False with a plain client: end() ends it."""
        if not isinstance(self.client, writer.Deferring):
            return False
        self.set_tags(tags)
        self.client.call_later(self.run_id, "set_terminated", (self.run_id, status))
        return True

    def drain(self, patience: float = 0.0) -> None:
        """Send the spooled metrics, retrying with backoff for up to `patience` seconds."""
        if not retry_with_backoff(self.flush, patience):
            raise TrackingError(f"the tracking store is still unreachable: the metrics of run "
                                f"{self.run_id} stay in {self.spool}")


def log_config(client, run_id: str, resolved: dict) -> None:
    """The run's resolved config as config.yaml, passwords hidden (a record writer makes the YAML)."""
    from ..config import redact, yaml_text

    client.log_text(run_id, redact(yaml_text(resolved)), "config.yaml")


def open_records(client, experiment_id: str, run_name: str, tags: dict[str, str], datasets: list,
                 model_name: str = "classifier") -> tuple[str, str]:
    """A new run (status RUNNING) with its tags and dataset inputs, and a logged model (PENDING until
    finished) linked to it as its output, whose metrics the run then logs: (run id, model id). A
    record writer runs this in its own process, on its client."""
    from mlflow.entities import LoggedModelOutput

    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    _log_inputs(client, run_id, datasets)
    model = client.create_logged_model(experiment_id, name=model_name, source_run_id=run_id,
                                       model_type="gluon-pyfunc")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    return run_id, model.model_id


def _log_inputs(client, run_id: str, datasets: list) -> None:
    """Link the datasets to the run. Two jobs that log a new dataset at once can both try to insert
    it (MLflow checks, then inserts): the loser retries, and then finds it."""
    from mlflow.exceptions import MlflowException

    for attempt in range(5):
        try:
            return client.log_inputs(run_id, datasets=datasets)
        except MlflowException as exc:
            if "UNIQUE constraint" not in str(exc) and "duplicate key" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


@contextlib.contextmanager
def _few_retries(active: bool) -> Iterator[None]:
    """While active, MLflow gives up on an unanswered request after one quick retry (it reads these
    variables on every request), so a spooling run does not stall for minutes on each epoch."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in names}
    if active:
        os.environ.update(names)
    try:
        yield
    finally:
        if active:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _unreachable(exc: BaseException) -> bool:
    """Whether exc means the store did not answer (as opposed to rejecting the request)."""
    import requests

    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    if isinstance(exc, MlflowException):
        text = str(exc)
        return "Max retries exceeded" in text or "Connection" in text or "timed out" in text
    return False


# -- spool files read back later (python -m mnist_logreg.spool) ---------------------------------------

SPOOL_NAME = re.compile(r"metrics-(?P<run_id>[0-9a-f]{32})\.spool\.jsonl$")


def read_spool(path: Path) -> tuple[str, list[tuple]]:
    """The run id (from the file name) and the points (key, value, timestamp, step, model_id)."""
    match = SPOOL_NAME.search(path.name)
    if match is None:
        raise HarnessError(f"{path} is not a spool file (metrics-RUN_ID.spool.jsonl): give the file a job left")
    if not path.is_file():
        raise HarnessError(f"{path} does not exist")
    points = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            for p in json.loads(line):
                key, value, timestamp, step, *rest = p
                points.append((str(key), float(value), int(timestamp), int(step), rest[0] if rest else None))
        except (ValueError, TypeError) as exc:
            raise HarnessError(f"{path}:{number} is not a line of spooled metrics ({exc})") from exc
    return match["run_id"], points


def upload(client, run_id: str, points: list[tuple]) -> tuple[int, int]:
    """Log the points the run does not have yet; return (sent, already there)."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise HarnessError(f"run {run_id} is not in {client.tracking_uri}: this spool file belongs to another "
                           "store; pass that store's --tracking-uri") from exc
    have = {}
    for key in {p[0] for p in points}:
        have[key] = {(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)}
    todo = [p for p in points if (p[3], p[2], p[1]) not in have[p[0]]]
    for part in chunks(todo, 500):
        client.log_batch(run_id, metrics=[Metric(k, v, t, s, model_id=m) for k, v, t, s, m in part])
    return len(todo), len(points) - len(todo)
