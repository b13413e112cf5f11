"""One Hydra job: `train(cfg)` trains one model as the config says and tracks it in MLflow.

run.py, reproduce, resume=RUN_ID and every launcher call it. Under the stacked launcher, a prepared
job joins its launcher's gathering instead (lifecycle.gathering) and returns once its stack has
trained it, through the same lifecycle (lifecycle.train.train_jobs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .lifecycle.prepare import prepare, skip
from .lifecycle.train import objective, train_jobs

log = logging.getLogger("mnist_logreg.job")


def train(cfg: DictConfig, extra_tags: dict[str, str] | None = None, run_name: str | None = None) -> dict[str, Any]:
    """Train one model as `cfg` says, track it in MLflow, and return its final metrics and run id.

    Everything that can be wrong with the input is checked before the MLflow run is created, so
    bad input leaves no run behind.
    """
    from .lifecycle import gathering

    gathered = extra_tags is None and run_name is None and gathering.active()
    job = prepare(cfg, *_hydra_job(), look_up_later=gathered)
    if gathered:  # the launcher reads its point's runs, then skips it or trains it in a stack, and hands back its result
        return gathering.join(job)
    if job.skipped:
        return skip(job)
    return train_jobs([job], extra_tags=extra_tags, run_name=run_name)[0]  # type: ignore[return-value]


__all__ = ["train", "main", "objective"]


def _hydra_job() -> tuple[Path | None, list[str]]:
    """The job's output folder and its overrides, when running under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, []
    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir), list(hc.overrides.task)


def main(cfg: DictConfig) -> dict[str, Any]:
    """run.py's entry. Outside a multirun, bad input exits with one line (Hydra would add its own) and
    leaves no job folder; resume=<a sweep's parent run> continues that whole sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .errors import exit_on_error
    from .lifecycle.prepare import ContinueSweep

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
        folder = Path(HydraConfig.get().runtime.output_dir)
        try:
            with exit_on_error(cleanup=lambda: _drop_untouched(folder)):
                return train(cfg)
        except ContinueSweep as sweep:
            _drop_untouched(folder)
            _continue_sweep(sweep, list(HydraConfig.get().overrides.task))
    try:
        return train(cfg)
    except KeyboardInterrupt:
        _leave_worker_quietly()
        raise


def _drop_untouched(folder: Path) -> None:
    """Remove a single run's job folder that holds only what Hydra wrote before the run was refused
    (.hydra/ and an empty or near-empty log), and its date folder if that is left empty."""
    import shutil

    logging.shutdown()
    if not folder.is_dir() or any(p.name not in (".hydra", "run.log") for p in folder.iterdir()):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in (folder.parent, folder.parent.parent):
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break


def _continue_sweep(sweep, overrides: list[str]) -> None:
    """resume=<parent run>: run that sweep's own command again (its logged overrides, with where
    things go taken from this command), which continues it."""
    import os
    import sys

    from .config import NEUTRAL_KEYS, is_under, override_key
    from .project import PROJECT_ROOT

    keep = [o for o in overrides if override_key(o) != "resume" and is_under(override_key(o), NEUTRAL_KEYS)]
    mine = {override_key(o) for o in keep}
    logged = [o for o in sweep.overrides if override_key(o) not in mine]
    argv = [sys.executable, str(PROJECT_ROOT / "run.py"), "-m", *logged, *keep]
    print(f"resume={sweep.run_id} is sweep {sweep.sweep}: continuing it with python run.py -m "
          f"{' '.join([*logged, *keep])}", flush=True)
    os.execv(sys.executable, argv)


# How long a stopped joblib worker waits for its launching process to end the sweep before it exits.
WORKER_LINGER_S = 15.0


def _leave_worker_quietly() -> None:
    """In a joblib (loky) worker, a stopped job has ended its run KILLED; the worker then leaves
    without unwinding into MXNet's teardown, which prints tracebacks while the launching process
    prints its one line. It leaves when its launching process does (or after WORKER_LINGER_S): loky
    kills every other worker as soon as one exits, and another may still be ending its run."""
    import multiprocessing
    import os
    import sys
    import time

    if multiprocessing.current_process().name.startswith("LokyProcess"):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        parent, deadline = os.getppid(), time.monotonic() + WORKER_LINGER_S
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(130)
