"""Facts about the project itself: where it lives, where it caches, and how its log lines look."""

import os
from pathlib import Path

# The checkout (or install) root: run.py, conf/, uv.lock.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Every job's log line, on the console and in its job folder (conf/hydra/job_logging says the same).
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def user_cache() -> Path:
    """The user's cache folder for the harness: fresh-store templates, width-probe answers, the
    logged model's template."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist_logreg"
