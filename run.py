"""Train Gluon softmax regression on MNIST as the Hydra config says; `-m` sweeps. See README.md."""

import gc
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mnist_logreg.config import in_our_words
from mnist_logreg.errors import exit_on_interrupt, install_hydra_error_handler

# conf/config.yaml adds this folder to Hydra's search path, so that experiments/ is a config group.
os.environ.setdefault("MNIST_LOGREG_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one model; return its final test accuracy (the objective of the optuna sweeper)."""
    from mnist_logreg.job import main as run_job, objective

    return objective(run_job(cfg))


if __name__ == "__main__":
    # Full collections rescan every object the imports made (MLflow's, Hydra's, MXNet's): 0.1 to 0.5 s
    # each here. A tenth as many of them (the record writer, a process of its own, freezes its imports).
    gc.set_threshold(gc.get_threshold()[0], gc.get_threshold()[1], 100)
    install_hydra_error_handler(in_our_words)  # bad input: one line on stderr and exit status 2
    with exit_on_interrupt():  # Ctrl-C / SIGTERM: runs end KILLED, then one line and status 130 / 143; no teardown
        main()
