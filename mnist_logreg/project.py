"""Facts about the project itself: where it lives and how its log lines look."""

from pathlib import Path

# The checkout (or install) root: run.py, conf/, uv.lock.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Every job's log line, on the console and in its job folder (conf/hydra/job_logging says the same).
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
