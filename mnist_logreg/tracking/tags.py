"""The tags a run carries: the harness's own names, and what pins its environment (git, packages, source)."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from pathlib import Path

from ..config import redact
from ..project import PROJECT_ROOT

# Tags the harness sets; the MLflow UI nests a run under the run named by mlflow.parentRunId.
TAG_SWEEP = "sweep"
TAG_ROLE = "mnist_logreg.role"
TAG_PARENT = "mlflow.parentRunId"
TAG_FAILURE = "failure"
# On a run a search pruned: the last epoch it trained, and why.
TAG_PRUNED, TAG_PRUNED_WHY = "pruned", "pruned.reason"
# On a sweep's parent run: the keys it may vary, in the order its command gave them (JSON).
TAG_AXES = "sweep.axes"
# On a sweep's parent run, `reused.<run id>` names a FINISHED run a skipped job stood for.
TAG_REUSED = "reused"
# Where a run keeps its per-epoch checkpoints while it trains (a relaunch looks there when a
# killed process uploaded none).
TAG_CHECKPOINT_DIR = "checkpoint.dir"


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


@functools.lru_cache(maxsize=1)
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


