"""MLflow: the store, the experiment, one run per job, and the environment tags that pin it."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import http.client
import os
import platform
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from .config import redact
from .errors import TrackingError

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Tags the harness sets; the MLflow UI nests a run under the run named by mlflow.parentRunId.
TAG_SWEEP = "sweep"
TAG_ROLE = "mnist_logreg.role"
TAG_PARENT = "mlflow.parentRunId"
TAG_FAILURE = "failure"
# On a sweep's parent run, `reused.<run id>` names a FINISHED run a skipped job stood for.
TAG_REUSED = "reused"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, or None for other stores."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


SQLITE_HEADER = b"SQLite format 3\x00"


def check_sqlite_store(db: Path) -> None:
    """Refuse, without touching it, a file that is not an SQLite database or is another program's
    database: MLflow would fail on the first (with two tracebacks) and add its tables to the second.
    A missing or empty file is fine: MLflow creates a fresh store in it."""
    import sqlite3

    if not db.exists() or (db.is_file() and db.stat().st_size == 0):
        return
    fix = "point tracking.uri (or --tracking-uri) at an MLflow store or at a new file"
    if not db.is_file():
        raise TrackingError(f"{db} is not a file: {fix}")
    with open(db, "rb") as fh:
        header = fh.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise TrackingError(f"{db} is not an SQLite database (corrupt, or another kind of file): {fix}; "
                            "the file was left as it is")
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise TrackingError(f"{db} cannot be read as an SQLite database ({exc}): {fix}") from exc
    if tables and not {"experiments", "runs", "alembic_version"} <= tables:
        raise TrackingError(f"{db} is an SQLite database but not an MLflow store (tables: "
                            f"{', '.join(sorted(tables)[:5])}): {fix}; the file was left as it is")


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError within `timeout` seconds when the tracking server at uri does not answer.

    MLflow's own client retries for minutes before it gives up; a sweep should not start then.
    """
    parts = urllib.parse.urlsplit(uri)
    bare = urllib.parse.urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""),
                                    parts.path.rstrip("/") + "/health", "", ""))
    request = urllib.request.Request(bare)
    user = parts.username or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = parts.password or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        token = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode())
        request.add_header("Authorization", f"Basic {token.decode()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise TrackingError(f"tracking server {redact(uri)} refused the credentials (HTTP {exc.code}): "
                                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from exc
        return  # it answered: an older server without /health
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"tracking server {redact(uri)} is unreachable ({reason}): start it "
                            f"(mlflow server --host 127.0.0.1 --port {parts.port or 80} ...) or fix tracking.uri") from exc


def wait_for_server(uri: str, patience: float) -> None:
    """check_server, retried with exponential backoff for up to `patience` seconds."""
    deadline, delay = time.monotonic() + patience, 1.0
    while True:
        try:
            return check_server(uri)
        except TrackingError:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("tracking server %s is unreachable; retrying in %.0fs", redact(uri), delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def client_for(uri: str, patience: float = 0.0):
    """An MlflowClient on uri, after checking that a SQLite store's folder exists or a server answers.

    patience: how long to wait for a server that does not answer (0: fail at once). A sweep's jobs
    wait, since the launching process already found the server up; a new command fails fast.
    """
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None and not db.parent.is_dir():
        raise TrackingError(
            f"tracking.uri={uri}: folder {db.parent} does not exist; create it or set tracking.uri"
        )
    if db is not None:
        check_sqlite_store(db)
    if uri.startswith(("http://", "https://")):
        wait_for_server(uri, patience)
        uri = move_credentials_to_env(uri)
    return MlflowClient(tracking_uri=uri)


def move_credentials_to_env(uri: str) -> str:
    """http://user:pw@host -> http://host, with user and password in MLflow's credential variables.

    MLflow prints the tracking URI in its run links; without this it would print the password.
    """
    parts = urllib.parse.urlsplit(uri)
    if not parts.password:
        return uri
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(parts.username or ""))
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(parts.password))
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def reading_store_uri() -> str:
    """The store a reading tool opens without --tracking-uri: $MLFLOW_TRACKING_URI, as MLflow's own
    CLI and client read it, else mlflow.db in the current folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def existing_store_client(uri: str):
    """An MlflowClient on a store that must already exist (reading tools must not create one)."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"no MLflow store at {db}: run a sweep there first, or pass --tracking-uri")
    return client_for(uri)


def default_artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go to `mlartifacts/` beside the database file."""
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


def ensure_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created (with its artifact location) when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"tracking.experiment={name} is deleted in {redact(client.tracking_uri)}: "
                    "restore it in the MLflow UI (or `mlflow experiments restore`) or pick another name"
                )
            return exp.experiment_id
        location = artifact_location or default_artifact_location(client.tracking_uri)
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        raise TrackingError(
            f"tracking store {redact(client.tracking_uri)} cannot be used: {str(exc).splitlines()[0]}; "
            "check tracking.uri"
        ) from exc


@functools.lru_cache(maxsize=1)
def git_state(root: str = str(PROJECT_ROOT)) -> dict[str, str]:
    """The project's git commit and whether its tree has uncommitted changes ('unknown' outside git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower(), "mlflow.source.git.commit": commit}


def context_tags() -> dict[str, str]:
    """The tags mlflow.start_run adds (user, source name and type, git commit), which the UI shows
    as Created by and Source; runs made through MlflowClient get none unless given them."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = resolve_tags()
    if sys.argv and sys.argv[0]:
        tags["mlflow.source.name"] = Path(sys.argv[0]).name if sys.argv[0] != "-c" else "python -c"
    commit = git_state().get("mlflow.source.git.commit")
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return {k: str(v) for k, v in tags.items()}


def environment_tags() -> dict[str, str]:
    """Versions of Python and the packages that decide a run's numbers, and the platform."""
    import hydra
    import mlflow
    import mxnet
    import numpy

    return {
        "python.version": platform.python_version(),
        "mxnet.version": mxnet.__version__,
        "numpy.version": numpy.__version__,
        "hydra.version": hydra.__version__,
        "mlflow.version": mlflow.__version__,
        "platform": platform.platform(),
        **git_state(),
        **context_tags(),
    }


def command_line() -> str:
    """The command as typed, with any password in it hidden."""
    return redact(" ".join([Path(sys.executable).name, *sys.argv]))


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

    @classmethod
    def create(cls, client, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> "RunLog":
        """Start a new run (status RUNNING)."""
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
        return cls(client, run.info.run_id)

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for part in chunks(items, 100):
            self.client.log_batch(self.run_id, params=part)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for part in chunks(items, 100):
            self.client.log_batch(self.run_id, tags=part)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log several metrics at one step in a single call.

        When the store does not answer (after MLflow's retries), the points go to a local spool
        file instead and training goes on; they are sent with the next call that gets through,
        or at the end of the run.
        """
        points = [(k, float(v), int(time.time() * 1000), step, self.model_id) for k, v in metrics.items()]
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

    def create_model(self, experiment_id: str, name: str = "classifier") -> str:
        """A logged model (PENDING until finished) linked to this run, as its output; later metrics
        are linked to it too. Returns its id."""
        from mlflow.entities import LoggedModelOutput

        model = self.client.create_logged_model(experiment_id, name=name, source_run_id=self.run_id,
                                                model_type="gluon-pyfunc")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, 0)])
        self.model_id = model.model_id
        return model.model_id

    def find_model(self, experiment_id: str) -> str | None:
        """The logged model this run created (when a resumed run goes on), or None."""
        found = self.client.search_logged_models(experiment_ids=[experiment_id],
                                                  filter_string=f"source_run_id = '{self.run_id}'", max_results=1)
        self.model_id = found[0].model_id if found else None
        return self.model_id

    def log_inputs(self, datasets: list) -> None:
        """Link the datasets to the run. Two jobs that log a new dataset at once can both try to
        insert it (MLflow checks, then inserts): the loser retries, and then finds it."""
        from mlflow.exceptions import MlflowException

        for attempt in range(5):
            try:
                return self.client.log_inputs(self.run_id, datasets=datasets)
            except MlflowException as exc:
                if "UNIQUE constraint" not in str(exc) and "duplicate key" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_artifacts(self, folder: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def end(self, status: str, patience: float = 0.0) -> None:
        """Send any spooled metrics, then mark the run FINISHED, FAILED or KILLED."""
        self.drain(patience)
        self.client.set_terminated(self.run_id, status)

    def drain(self, patience: float = 0.0) -> None:
        """Send the spooled metrics, retrying with backoff for up to `patience` seconds."""
        deadline, delay = time.monotonic() + patience, 1.0
        while not self.flush():
            if time.monotonic() + delay > deadline:
                raise TrackingError(f"the tracking store is still unreachable: the metrics of run "
                                    f"{self.run_id} stay in {self.spool}")
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


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
