"""Train Gluon softmax regression on MNIST as the Hydra config says; `-m` sweeps. See README.md."""

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
    install_hydra_error_handler(in_our_words)  # bad input: one line on stderr and exit status 2
    with exit_on_interrupt():  # Ctrl-C / SIGTERM: runs end KILLED, then one line and status 130 / 143; no teardown
        main()
