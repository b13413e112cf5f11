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
    return write(folder, epoch, contents(epoch, net, trainer, rng, metrics))


def contents(epoch: int, net, trainer, rng: np.random.Generator, metrics: dict | None = None) -> dict[str, bytes]:
    """A checkpoint's three files as bytes, the same bytes as `net.save_parameters` and
    `trainer.save_states` write (tests/test_training.py compares them), so that another process can
    write them (`write`): 0.2 ms here, where writing them took 0.6 to 1.4 ms."""
    import struct

    params = net._collect_params_with_prefix()  # what save_parameters saves, in its order
    blob = [struct.pack("<QQQ", _NDARRAY_LIST_MAGIC, 0, len(params))]
    blob += [param._reduce().__getstate__()["handle"] for param in params.values()]  # each NDArray as MXNet saves it
    blob.append(struct.pack("<Q", len(params)))
    for name in params:
        blob.append(struct.pack("<Q", len(name.encode())) + name.encode())
    if not trainer._kv_initialized:  # as Trainer.save_states does
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    if trainer._update_on_kvstore:  # the harness's Trainers have no kvstore (training.make_trainer)
        raise ValueError("a checkpoint of a Trainer that updates on its kvstore is not supported")
    state = json.dumps({"epoch": epoch, "rng": rng.bit_generator.state, "metrics": metrics or {}})
    return {"net.params": b"".join(blob), "trainer.states": trainer._updaters[0].get_states(dump_optimizer=True),
            STATE: state.encode()}


_NDARRAY_LIST_MAGIC = 0x112  # MXNet's header of a saved list of NDArrays


def write(folder: Path, epoch: int, files: dict[str, bytes]) -> Path:
    """Write a checkpoint's files (`contents`) as folder/epoch-NNNN, atomically, and drop older ones."""
    folder.mkdir(parents=True, exist_ok=True)
    target, tmp = folder / f"epoch-{epoch:04d}", folder / f".epoch-{epoch:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, data in files.items():
        (tmp / name).write_bytes(data)
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
