"""Errors the harness reports to the user as one line, without a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Callable, Iterator


class HarnessError(Exception):
    """A problem the user can fix: its message names the problem and the fix."""


class ConfigError(HarnessError):
    """A config value is out of range, of the wrong type, or unknown."""


class DataError(HarnessError):
    """A dataset file is missing, truncated or corrupt, or cannot be downloaded."""


class ContextError(HarnessError):
    """The requested MXNet context (GPU) is not available."""


class TrackingError(HarnessError):
    """The MLflow tracking store cannot be reached or used."""


def one_line(exc: BaseException) -> str:
    """An error message folded onto one line (Hydra's own messages span several)."""
    lines = []
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith(("Config search path", "full_key:", "object_type=", "provider=")):
            break
        if line:
            lines.append(line)
    cause = exc.__cause__
    text = " ".join(lines) or type(exc).__name__
    if cause is not None and not isinstance(exc, HarnessError) and str(cause).strip():
        text += f" ({str(cause).splitlines()[0].strip()})"
    return text


def exit_bad_input(exc: BaseException) -> None:
    """Bad input: print one line and exit 2 (HYDRA_FULL_ERROR=1 re-raises it with its traceback)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise exc
    print(f"Error: {one_line(exc)}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def exit_on_error(cleanup: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Turn an exception into an exit: bad input prints one line and exits 2 (after cleanup()),
    anything else a traceback and 1."""
    try:
        yield
    except HarnessError as exc:
        cleanup()
        exit_bad_input(exc)
    except Exception:
        traceback.print_exc()
        sys.exit(1)


@contextlib.contextmanager
def exit_on_interrupt() -> Iterator[None]:
    """Ctrl-C or SIGTERM (raised as KeyboardInterrupt once the runs are closed): one line, no
    traceback, and the shell's status for the signal (130 for SIGINT, 143 for SIGTERM). However the
    body ends, the process then exits without the interpreter's teardown (`_exit_now`), which takes
    0.5 to 1 s once mlflow's store and MXNet are loaded."""
    import signal

    try:
        yield
    except KeyboardInterrupt as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        text = str(exc)
        signum = int(text.split()[-1]) if text.startswith("signal ") else int(signal.SIGINT)
        print(f"Stopped by {signal.Signals(signum).name}: running jobs ended KILLED with their metrics and "
              "last checkpoint; run the same command again to train only what did not finish, or "
              "resume=RUN_ID to continue one run", file=sys.stderr)
        _exit_now(128 + signum)
    except SystemExit as exc:
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        _exit_now(exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1), threads=True)
    _exit_now(0, threads=True)


def _exit_now(code: int, threads: bool = False) -> None:
    """Exit after the exit handlers (the sweep's parent run ends there, temporary folders go) but
    without the interpreter's teardown, which is slow, and in which MXNet's NDArray finalizers print
    tracebacks once its library is gone."""
    import atexit
    import logging

    if threads:  # what an interpreter's exit does first: join threads, run their exit hooks (loky's
        import threading  # executor tells its workers to leave there, before multiprocessing joins them)

        threading._shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def install_hydra_error_handler(in_our_words: Callable[[Exception], Exception] = lambda exc: exc) -> None:
    """Make Hydra report bad input (HarnessError, bad overrides, unknown keys or options) in one line.

    Other exceptions keep Hydra's report. HYDRA_FULL_ERROR=1 shows the full traceback of any.
    The exit status is 2 for bad input, as for a command-line usage error. in_our_words(exc) may
    restate Hydra's message (config.in_our_words does).
    """
    import hydra._internal.utils as hydra_utils
    from hydra.errors import CompactHydraException, OverrideParseException

    original = hydra_utils.run_and_report

    def run_and_report(func):
        def guarded():
            try:
                return func()
            except (HarnessError, CompactHydraException, OverrideParseException) as exc:
                exit_bad_input(in_our_words(exc))

        return original(guarded)

    hydra_utils.run_and_report = run_and_report
