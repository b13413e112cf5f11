"""Per-epoch checkpoints: weights, trainer state and batch-order generator, written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

STATE = "state.json"


def save(folder: Path, epoch: int, net, trainer, rng: np.random.Generator, metrics: dict | None = None) -> Path:
    """Write epoch's checkpoint as folder/epoch-NNNN (via a temporary folder renamed into place),
    then drop older ones: a checkpoint folder is either complete or absent. metrics: the epoch's
    own, kept so that a run killed between its checkpoint and its metrics can still log them."""
    folder.mkdir(parents=True, exist_ok=True)
    target, tmp = folder / f"epoch-{epoch:04d}", folder / f".epoch-{epoch:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    net.save_parameters(str(tmp / "net.params"))
    trainer.save_states(str(tmp / "trainer.states"))
    (tmp / STATE).write_text(json.dumps({"epoch": epoch, "rng": rng.bit_generator.state, "metrics": metrics or {}}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    for old in folder.glob("epoch-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint under folder, or None."""
    found = sorted(p for p in folder.glob("epoch-*") if (p / STATE).is_file())
    return found[-1] if found else None


def load(path: Path, net, trainer) -> tuple[int, np.random.Generator]:
    """Load weights and trainer state into net and trainer; return the epoch and the generator."""
    state = json.loads((path / STATE).read_text())
    net.load_parameters(str(path / "net.params"), ctx=net.weight.data().context)
    trainer.load_states(str(path / "trainer.states"))
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    return state["epoch"], rng


def epoch_of(path: Path) -> int:
    """The epochs a checkpoint holds."""
    return int(json.loads((path / STATE).read_text())["epoch"])


def metrics_of(path: Path) -> dict:
    """The metrics of the checkpoint's epoch ({} for a checkpoint written without them)."""
    return dict(json.loads((path / STATE).read_text()).get("metrics") or {})
