"""What pins a run's numbers: config, code, data, packages, machine and threads, as hashes and tags."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from importlib import metadata
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from ..config import NEUTRAL_KEYS
from ..ml.machine import cpu_model, usable_cpus
from ..project import PROJECT_ROOT
from .tags import git_state

# Environment variables that can change the bits MXNet and OpenBLAS compute.
THREAD_VARS = ("OMP_NUM_THREADS", "MXNET_CPU_WORKER_NTHREADS", "MXNET_ENGINE_TYPE",
               "MXNET_USE_OPERATOR_TUNING", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def computed_config(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """The resolved config without the location keys: what decides the numbers."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    container = json.loads(json.dumps(container))  # a deep copy of plain values
    for key in NEUTRAL_KEYS:
        *parents, leaf = key.split(".")
        node = container
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return container


def config_hash(cfg: DictConfig | Mapping) -> str:
    """sha256 of the canonical JSON of the computed config."""
    return sha256_text(json.dumps(computed_config(cfg), sort_keys=True, separators=(",", ":")))


@functools.lru_cache(maxsize=1)
def git_diff() -> str:
    """The uncommitted changes to tracked files ('' when the tree is clean or not a git checkout)."""
    try:
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), "diff", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.lru_cache(maxsize=1)
def lock_hash() -> str:
    """sha256 of the project's uv.lock ('none' without one)."""
    path = PROJECT_ROOT / "uv.lock"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "none"


@functools.lru_cache(maxsize=1)
def frozen_requirements() -> str:
    """`name==version` of every installed distribution, sorted: the environment as a requirements file."""
    names = {(d.metadata["Name"] or "").lower(): d.version for d in metadata.distributions()}
    return "".join(f"{n}=={v}\n" for n, v in sorted(names.items()) if n)


def thread_settings() -> dict[str, str]:
    """The variables that set MXNet's and OpenBLAS's threads, and the cores this process may use."""
    tags = {f"threads.{v}": os.environ.get(v, "unset") for v in THREAD_VARS}
    tags["threads.cpus"] = str(usable_cpus())
    return tags


def fingerprint_tags(cfg: DictConfig | Mapping, data_digest: str) -> dict[str, str]:
    """Every fingerprint tag of a job, and `fingerprint`: one hash of config, code, data and lock file.

    Two runs with the same `fingerprint` ran the same computation on the same inputs; a relaunched
    sweep skips a job whose fingerprint already has a FINISHED run.
    """
    git = git_state()
    diff = git_diff()
    parts = {
        "config.sha256": config_hash(cfg),
        "git.commit": git["git.commit"],
        "git.diff.sha256": sha256_text(diff) if diff else "clean",
        "data.sha256": data_digest,
        "uv.lock.sha256": lock_hash(),
    }
    return {
        **parts,
        "fingerprint": sha256_text(json.dumps(parts, sort_keys=True)),
        "cpu.model": cpu_model(),
        **thread_settings(),
    }
