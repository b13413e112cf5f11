"""The MLflow store: opening a client on it, checking it first (SQLite file or server), the experiment."""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

from ..config import redact
from ..errors import TrackingError

log = logging.getLogger(__name__)


def retry_with_backoff(attempt: Callable[[], bool], patience: float, waiting: Callable[[float], None] = lambda s: None
                       ) -> bool:
    """Call attempt() until it returns True, waiting 1, 2, 4 ... (at most 30) seconds between tries,
    for up to `patience` seconds in all; waiting(seconds) is told of each wait. Returns the last answer."""
    deadline, delay = time.monotonic() + patience, 1.0
    while not attempt():
        if time.monotonic() + delay > deadline:
            return False
        waiting(delay)
        time.sleep(delay)
        delay = min(2 * delay, 30.0)
    return True


def without_credentials(uri: str) -> str:
    """scheme://user:pw@host:port/path -> scheme://host:port/path (query and fragment kept)."""
    parts = urllib.parse.urlsplit(uri)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def server_address(uri: str) -> str:
    """scheme://host:port/path of a server: no credentials, query, fragment or trailing slash."""
    parts = urllib.parse.urlsplit(without_credentials(uri))
    return parts._replace(path=parts.path.rstrip("/"), query="", fragment="").geturl()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, or None for other stores."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


SQLITE_HEADER = b"SQLite format 3\x00"


_STORES_SEEN: set[tuple[int, int]] = set()  # (device, inode) of the files found to be MLflow stores


def check_sqlite_store(db: Path) -> None:
    """Refuse, without touching it, a file that is not an SQLite database or is another program's
    database: MLflow would fail on the first (with two tracebacks) and add its tables to the second.
    A missing or empty file is fine: MLflow creates a fresh store in it. A file found to be a store
    has its tables read once in this process (a sweep's every job opens it) while it is the same
    file; its header is read each time."""
    import sqlite3

    if not db.exists() or (db.is_file() and db.stat().st_size == 0):
        return
    fix = "point tracking.uri (or --tracking-uri) at an MLflow store or at a new file"
    if not db.is_file():
        raise TrackingError(f"{db} is not a file: {fix}")
    with open(db, "rb") as fh:
        header = fh.read(len(SQLITE_HEADER))
        stat = os.fstat(fh.fileno())
    if header != SQLITE_HEADER:
        raise TrackingError(f"{db} is not an SQLite database (corrupt, or another kind of file): {fix}; "
                            "the file was left as it is")
    if (stat.st_dev, stat.st_ino) in _STORES_SEEN:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise TrackingError(f"{db} cannot be read as an SQLite database ({exc}): {fix}") from exc
    if tables and not {"experiments", "runs", "alembic_version"} <= tables:
        raise TrackingError(f"{db} is an SQLite database but not an MLflow store (tables: "
                            f"{', '.join(sorted(tables)[:5])}): {fix}; the file was left as it is")
    if tables:
        _STORES_SEEN.add((stat.st_dev, stat.st_ino))


def store_template() -> Path:
    """Where the fresh-store template of this MLflow version lives (one per user and version)."""
    import mlflow

    from ..project import user_cache

    return user_cache() / f"mlflow-{mlflow.__version__}-empty-store.db"


def lay_fresh_sqlite_store(db: Path) -> bool:
    """Create a new SQLite store at db (absent or empty) as a copy of a template that already went
    through MLflow's migrations (68 in MLflow 3.17, about 2 s), made once per MLflow version. The
    copy appears whole, at once, so no other process can open a half-migrated store; MLflow's own
    schema check verifies it when a client opens it. False when db was not new."""
    import shutil
    import sqlite3

    if db.exists() and db.stat().st_size > 0:
        return False
    template = store_template()
    if not template.is_file():
        _make_template(template)
    staged = db.with_name(f".{db.name}.{os.getpid()}.new")
    try:
        shutil.copyfile(template, staged)
        with contextlib.closing(sqlite3.connect(staged)) as con, con:  # as MLflow would have made it here
            now = int(time.time() * 1000)
            con.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                        "WHERE experiment_id = 0", (os.path.abspath(os.path.join("mlruns", "0")), now, now))
        if db.exists():  # an empty file: take its place
            os.replace(staged, db)
        else:
            try:
                os.link(staged, db)  # fails if another process laid the store first: then use theirs
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links
                if not db.exists():
                    os.replace(staged, db)
    finally:
        staged.unlink(missing_ok=True)
    return True


def _make_template(template: Path) -> None:
    """Run MLflow's migrations once into a private file, then move it into place whole."""
    from mlflow.tracking import MlflowClient

    template.parent.mkdir(parents=True, exist_ok=True)
    staged = template.with_name(f".{template.name}.{os.getpid()}.new")
    staged.unlink(missing_ok=True)
    MlflowClient(f"sqlite:///{staged}").search_experiments(max_results=1)
    os.replace(staged, template)


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError within `timeout` seconds when the tracking server at uri does not answer.

    MLflow's own client retries for minutes before it gives up; a sweep should not start then.
    """
    parts = urllib.parse.urlsplit(uri)
    bare = server_address(uri) + "/health"
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
    """check_server, retried with backoff for up to `patience` seconds; raises its last error."""
    errors: list[TrackingError] = []

    def answers() -> bool:
        try:
            check_server(uri)
            return True
        except TrackingError as exc:
            errors.append(exc)
            return False

    if not retry_with_backoff(answers, patience, lambda s: log.warning(
            "tracking server %s is unreachable; retrying in %.0fs", redact(uri), s)):
        raise errors[-1]


def quiet_mlflow_console() -> None:
    """MLflow's own console output in a harness process: its warnings and errors, without its INFO
    lines or its artifact progress bars (a sweep prints a pair per job)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def client_for(uri: str, patience: float = 0.0):
    """An MlflowClient on uri, after checking that a SQLite store's folder exists or a server answers.

    patience: how long to wait for a server that does not answer (0: fail at once). A sweep's jobs
    wait, since the launching process already found the server up; a new command fails fast.
    """
    from mlflow.tracking import MlflowClient

    quiet_mlflow_console()
    db = sqlite_path(uri)
    if db is not None and not db.parent.is_dir():
        raise TrackingError(
            f"tracking.uri={uri}: folder {db.parent} does not exist; create it or set tracking.uri"
        )
    if db is not None:
        check_sqlite_store(db)
        lay_fresh_sqlite_store(db)
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
    return without_credentials(uri)


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


@contextlib.contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent calls (search_runs) and `models:/` sources read the process's tracking URI: set
    it for the body only, then put back both it and $MLFLOW_TRACKING_URI (which set_tracking_uri also
    sets, for later subprocesses)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env
