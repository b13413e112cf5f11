"""One record writer per launching process: a child process that makes a local store's MLflow writes
while training goes on.

On SQLite, each MLflow call is mostly SQLAlchemy's Python (2.5 to 7 ms), paid on the training
thread, under its GIL. A launching process that trains stacks on a local store starts a writer
(`start`); `deferring(client)` then gives its runs a client whose writes are queued to the child in
order and whose reads wait for what was queued before them, so a run reads its own writes.

    writes (log_batch, log_inputs, log_text, log_artifacts, ...)   queued; their errors are kept
    settle(run_id)                                                  waits for that run's writes and
                                                                    raises the first that failed
    anything else (create_run, get_run, set_terminated, ...)        asked and answered in order
    ask_soon(fn, ...)                                               fn(client, ...) in the child, its
                                                                    answer waited for later
    write(client, run_id, fn, ...)                                  fn(client, run_id, ...) in the
                                                                    child, a write of that run's
    background(client, run_ids)                                     those runs' later requests wait
                                                                    while any other run's are queued

The child takes requests in the order they were sent, in two lanes: a run that `background` named
(a trained stack whose files are written while the next stack trains) has its requests taken only
when no other request waits, so that the training stack's epochs are never queued behind them. A
run's own requests keep their order either way (it moves to the background lane once, after its
epochs), and waiting for one request is waiting for every earlier one of its lane and of its run.

A failed write fails only its run: the child skips that run's later writes and the caller learns it
at the run's next settle (`WriteFailed`, one line). The child ignores Ctrl-C, SIGTERM and Slurm's
signals, which reach it with its parent: it finishes what was queued, so a stopping run still ends
with everything it logged. It leaves when its parent closes the pipe (at exit, or when the parent
dies), having written what it was sent.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import subprocess
import sys
import threading
from typing import Any, Callable

from ..errors import TrackingError

log = logging.getLogger(__name__)

# The client calls whose answers no caller reads: queued, not waited for.
WRITES = frozenset({"log_batch", "log_inputs", "log_outputs", "log_text", "log_artifacts", "log_artifact",
                    "set_tag", "update_run", "log_model_artifacts", "finalize_logged_model"})
# Those that name a logged model first, not a run: their errors belong to the model's run.
MODEL_WRITES = frozenset({"log_model_artifacts", "finalize_logged_model"})
CLOSE_WAIT_S = 60.0  # at exit, how long the child may take to write what it still holds
PIPE_BYTES = 1 << 20  # Linux's default most for a pipe (/proc/sys/fs/pipe-max-size)


class WriteFailed(TrackingError):
    """A queued write of this run failed in the record writer."""


class Writer:
    """The parent's end: a child process on one store, a pipe each way, and a thread that reads
    the child's answers as they come (so neither side ever waits on a full pipe)."""

    def __init__(self, uri: str) -> None:
        from multiprocessing.connection import Connection

        self.uri = uri
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:  # room for a stack's requests (a new run's is some 10 kB), so that sending one never waits
            import fcntl

            fcntl.fcntl(to_child_w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except (ImportError, AttributeError, OSError):  # not Linux, or above the system's pipe-max-size
            pass
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, uri, str(to_child_r), str(from_child_w)],
                                     pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._send = Connection(to_child_w, readable=False)
        self._recv = Connection(from_child_r, writable=False)
        self._cond = threading.Condition()
        self.sent = 0  # the number of the last request sent
        self.pending: set[int] = set()  # the requests sent that the child has not answered yet
        self.background: set[str] = set()  # the runs whose requests go in the background lane
        self.answers: dict[int, tuple[bool, Any]] = {}  # asked requests: (ok, result or message)
        self.failed: dict[str, str] = {}  # run id -> its first failed write
        self.gone: str | None = None  # why the child is no longer there
        self._reader = threading.Thread(target=self._read, name="mnist_logreg-record-writer", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                seq, key, ok, value = self._recv.recv()
            except (EOFError, OSError):
                with self._cond:
                    self.gone = self.gone or f"the record writer process ended (exit {self.proc.wait()})"
                    self._cond.notify_all()
                return
            with self._cond:
                self.pending.discard(seq)
                if key is not None and not ok:
                    self.failed.setdefault(key, value)
                elif key is None:
                    self.answers[seq] = (ok, value)
                self._cond.notify_all()

    def request(self, key: str | None, method: Any, args: tuple, kwargs: dict, lane: int = 0) -> int:
        """Send one call (key: the run a write belongs to, None for a call that is answered; method:
        a client method's name, or a module-level function the child calls with its client first;
        lane: 0, or 1 for the background lane)."""
        with self._cond:
            if self.gone:
                raise WriteFailed(f"{self.gone}: rerun the sweep to continue its runs")
            self.sent += 1
            seq = self.sent
            self.pending.add(seq)
        self._send.send((seq, key, method, args, kwargs, lane))
        return seq

    def done(self, seq: int) -> bool:
        """Whether the child has answered request seq (and so every earlier one of its lane)."""
        return seq <= self.sent and seq not in self.pending

    def wait(self, seq: int | None = None) -> None:
        """Until the child has answered request seq (every earlier request of its lane too), or with
        seq None every request sent so far."""
        with self._cond:
            upto = self.sent if seq is None else seq
            if seq is None:
                waiting = lambda: bool(self.pending) and min(self.pending) <= upto  # noqa: E731
            else:
                waiting = lambda: seq in self.pending  # noqa: E731
            while waiting() and not self.gone:
                self._cond.wait()
            if waiting():
                raise WriteFailed(f"{self.gone} before writing every record: rerun the sweep to continue its runs")

    def ask(self, method: Any, args: tuple, kwargs: dict, lane: int = 0) -> Any:
        return self.answer(self.request(None, method, args, kwargs, lane))

    def answer(self, seq: int) -> Any:
        """What asked request seq returned (it raises what the call raised)."""
        self.wait(seq)
        with self._cond:
            ok, value = self.answers.pop(seq)
        if not ok:
            from mlflow.exceptions import MlflowException

            raise MlflowException(value)
        return value

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Let the child write what it holds and leave; killed if it takes longer than timeout."""
        try:
            self._send.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the record writer did not finish within %.0f s: stopped", timeout)
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)


class Deferring:
    """An MlflowClient as its runs see it while a writer is on: writes queued, reads in order."""

    def __init__(self, client: Any, writer: Writer) -> None:
        self.direct, self.writer = client, writer
        self.tracking_uri = client.tracking_uri
        self._model_run: dict[str, str] = {}  # logged model id -> its run's id

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        if method in WRITES:
            def later(*args, **kwargs) -> None:
                key = self._model_run.get(args[0], args[0]) if method in MODEL_WRITES else args[0]
                self.call_later(str(key), method, args, kwargs)
            return later

        def now(*args, **kwargs) -> Any:
            try:  # a read of a background run's waits for its writes, in its lane
                named = self._model_run.get(args[0], args[0]) if args and isinstance(args[0], str) else None
                answer = self.writer.ask(method, args, kwargs, lane=int(named in self.writer.background))
            except WriteFailed:
                if not self.writer.gone:
                    raise
                return getattr(self.direct, method)(*args, **kwargs)  # its runs can still be read and ended
            self._note_models(answer)
            return answer
        return now

    def _note_models(self, answer: Any) -> None:
        for model in answer if isinstance(answer, list) else [answer]:
            if hasattr(model, "model_id") and hasattr(model, "source_run_id"):
                self._model_run[model.model_id] = model.source_run_id

    def ask_soon(self, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        """Send fn(client, *args) (a module-level function) to the child at once; the returned call
        waits for its answer (the caller goes on meanwhile)."""
        seq = self.writer.request(None, fn, args, {})
        return lambda: self.writer.answer(seq)

    def call_later(self, run_id: str, method: str | Callable[..., Any], args: tuple, kwargs: dict | None = None) -> None:
        """Queue a write of run_id (a run whose write failed sends no more)."""
        if self.writer.gone:  # nothing takes it now: the run fails at its next settle
            self.writer.failed.setdefault(run_id, self.writer.gone)
        elif run_id not in self.writer.failed:
            self.writer.request(run_id, method, args, kwargs or {}, lane=int(run_id in self.writer.background))

    def mark(self) -> int:
        """The number of the last request sent: settle(run_id, upto=mark) waits for those only."""
        return self.writer.sent

    def settle(self, run_id: str, upto: int | None = None) -> None:
        """Wait until the writes sent so far (or up to `upto`) are done; raise WriteFailed with the
        first of run_id's that failed."""
        self.writer.wait(upto)
        failure = self.writer.failed.get(run_id)
        if failure is not None:
            raise WriteFailed(f"a record could not be written ({failure})")


_writers: dict[str, Writer] = {}


def start(uri: str) -> None:
    """Start this process's record writer for the store at uri (once; it leaves at exit)."""
    if uri in _writers and _writers[uri].gone is None:
        return
    if not _writers:
        atexit.register(stop_all)
    _writers[uri] = Writer(uri)


def deferring(client: Any) -> Any:
    """The client its runs should write through: a Deferring one when this process has a writer on
    its store, else the client itself."""
    if isinstance(client, Deferring):
        return client
    writer = _writers.get(client.tracking_uri)
    return Deferring(client, writer) if writer is not None and writer.gone is None else client


def write(client: Any, run_id: str, fn: Callable[..., Any], *args: Any) -> None:
    """fn(client, run_id, *args) (a module-level function), a write of run_id's: queued to the record
    writer (if it fails, so does the run, at its next settle), or made now with a plain client."""
    if isinstance(client, Deferring):
        client.call_later(run_id, fn, (run_id, *args))
    else:
        fn(client, run_id, *args)


def note_model(client: Any, model_id: str, run_id: str) -> None:
    """The logged model model_id is run_id's: its writes' failures are that run's."""
    if isinstance(client, Deferring):
        client._model_run[model_id] = run_id


def settle(client: Any, run_id: str, upto: int | None = None) -> None:
    """Wait for run_id's queued writes (none with a plain client) and raise the first that failed."""
    if isinstance(client, Deferring):
        client.settle(run_id, upto)


def background(client: Any, run_ids: list[str]) -> None:
    """These runs' later writes wait in the child while any other run's are queued (their stack has
    trained; the next one's epochs go first)."""
    if isinstance(client, Deferring):
        client.writer.background.update(run_ids)


def mark(client: Any) -> int | None:
    return client.mark() if isinstance(client, Deferring) else None


def written(client: Any, upto: int | None) -> bool:
    """Whether the writes sent up to mark `upto` are done (or can no longer be): settle would not wait."""
    if not isinstance(client, Deferring) or upto is None:
        return True
    writer = client.writer
    return writer.done(upto) or writer.gone is not None


def stop_all() -> None:
    """Close every writer of this process, each once it has written what it holds."""
    while _writers:
        _writers.popitem()[1].close()


# -- the child ---------------------------------------------------------------------------------------

def _serve(uri: str, read_fd: int, write_fd: int) -> None:
    import collections
    import signal
    from multiprocessing.connection import Connection

    # Ctrl-C, SIGTERM and Slurm's warning signal reach the whole process group or job step: the parent
    # stops its runs, and this writes their ends.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    from mlflow.tracking import MlflowClient

    from ..errors import one_line
    from .store import quiet_mlflow_console
    from .tags import TAG_FAILURE

    quiet_mlflow_console()
    requests, answers = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    client = MlflowClient(uri)
    client.search_experiments(max_results=1)  # the store's engine and schema check, before the first request
    import gc

    gc.freeze()  # MLflow's and SQLAlchemy's modules stay for good: no full collection rescans them
    failed: set[str] = set()
    lanes: tuple[collections.deque, collections.deque] = (collections.deque(), collections.deque())
    arrived = threading.Condition()
    closed = []

    def receive() -> None:  # the pipe is drained as requests come, so that the parent never waits on it
        while True:
            try:
                request = requests.recv()
            except (EOFError, OSError):
                request = None
            with arrived:
                if request is None:
                    closed.append(True)
                else:
                    lanes[request[-1]].append(request)
                arrived.notify()
            if request is None:
                return

    def take() -> tuple | None:
        """The first request of the first lane that has one; None once the parent has closed the
        pipe and every request is done."""
        with arrived:
            while not (lanes[0] or lanes[1] or closed):
                arrived.wait()
            return (lanes[0] or lanes[1]).popleft() if lanes[0] or lanes[1] else None

    threading.Thread(target=receive, name="requests", daemon=True).start()
    while True:
        request = take()
        if request is None:
            return
        seq, key, method, args, kwargs, _ = request
        if key is not None and key in failed:  # its run already failed: the rest of it is not written
            answers.send((seq, key, True, None))
            continue
        try:
            value = method(client, *args, **kwargs) if callable(method) else getattr(client, method)(*args, **kwargs)
            answers.send((seq, key, True, None if key is not None else value))
        except Exception as exc:  # noqa: BLE001 - every failure is the caller's to report
            why = f"{getattr(method, '__name__', method)}: {type(exc).__name__}: {_short(one_line(exc))}"
            if key is not None:
                failed.add(key)
                try:  # on the run too, where the store still takes it
                    client.set_tag(key, TAG_FAILURE, f"a record could not be written ({why})")
                except Exception:  # noqa: BLE001 - the caller reports it either way
                    pass
            answers.send((seq, key, False, why))


def _short(text: str) -> str:
    """A store error without SQLAlchemy's statement, parameters and advice."""
    text = re.sub(r"\s*\(raised as a result of Query-invoked autoflush;[^)]*\)", "", text)
    text = re.sub(r"\s*\(Background on this error at: [^)]*\)", "", text)
    return text.split(" [SQL: ", 1)[0].strip()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    os._exit(0)  # everything is written (SQLite committed each call): no interpreter teardown to wait for
