"""A logged run's config, rebuilt from what MLflow holds (used by reproduce and by resume=RUN_ID)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ..errors import HarnessError


def _parse(value: str) -> Any:
    """A logged param string back to its config value (the inverse of config.flatten)."""
    if value in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[value]
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _leaf_paths(node: Any, prefix: tuple = ()) -> dict[str, tuple]:
    """{dotted key as flatten() writes it: path of keys} for every leaf of a plain config tree."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(_leaf_paths(v, (*prefix, k)))
        return out
    return {".".join(map(str, prefix)): prefix}


def logged_config(client, run) -> dict:
    """The run's config.yaml artifact (the resolved config it trained with), as a plain tree."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run.info.run_id, "config.yaml", tmp)
        except Exception as exc:
            raise HarnessError(f"run {run.info.run_id} has no config.yaml artifact, so it cannot be "
                               f"re-run ({str(exc).splitlines()[0]})") from exc
        return yaml.safe_load(Path(local).read_text())


def config_from_run(client, run) -> DictConfig:
    """The run's config: the structure of its config.yaml artifact, with the values of its logged params.

    The params are the record MLflow shows and compares; config.yaml only supplies the nesting
    (so keys that contain dots, like file names, map back to the right place).
    """
    tree = logged_config(client, run)
    paths = _leaf_paths(tree)
    for key, value in run.data.params.items():
        if key in paths and key != "tracking.uri":
            *parents, leaf = paths[key]
            node = tree
            for p in parents:
                node = node[p]
            node[leaf] = _parse(value)
    return OmegaConf.create(tree)
