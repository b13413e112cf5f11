"""Whether a reproduction reproduced: every metric at every step, the weights, and the likely causes."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from ..config import NEUTRAL_KEYS, flatten
from ..errors import HarnessError
from ..tracking.queries import job_runs
from ..tracking.runconfig import logged_config
from ..tracking.tags import TAG_ROLE, TAG_SWEEP

# Timings differ on every run; everything else must match.
TIMING_METRICS = {"epoch_seconds", "eval_seconds", "examples_per_second"}
# Tags that pin what a run computed: a difference here is a likely cause of a mismatch.
CAUSE_TAGS = ("config.sha256", "data.sha256", "git.commit", "git.diff.sha256", "uv.lock.sha256",
              "mxnet.version", "numpy.version", "python.version", "cpu.model", "threads.cpus",
              "threads.OMP_NUM_THREADS", "threads.MXNET_CPU_WORKER_NTHREADS", "threads.MXNET_ENGINE_TYPE",
              "threads.OPENBLAS_NUM_THREADS", "threads.OPENBLAS_CORETYPE", "context")


@dataclass
class Row:
    metric: str
    step: int
    original: float
    reproduced: float

    @property
    def difference(self) -> float:
        if math.isnan(self.original) and math.isnan(self.reproduced):
            return 0.0
        return abs(self.reproduced - self.original)


def compare_runs(source, target, original, reproduced, atol: float) -> tuple[list[Row], bool, dict[str, tuple]]:
    """Every metric at every step, the parameter hash, and the differing fingerprint tags.

    source holds the original run, target the reproduction (they may be two stores).
    """
    rows: list[Row] = []
    ok = True
    keys = sorted((set(original.data.metrics) | set(reproduced.data.metrics)) - TIMING_METRICS)
    for key in keys:
        a = {m.step: m.value for m in source.get_metric_history(original.info.run_id, key)}
        b = {m.step: m.value for m in target.get_metric_history(reproduced.info.run_id, key)}
        for step in sorted(set(a) | set(b)):
            row = Row(key, step, a.get(step, float("nan")), b.get(step, float("nan")))
            rows.append(row)
            if step not in a or step not in b or not row.difference <= atol:
                ok = False
    h_a, h_b = original.data.tags.get("params.sha256"), reproduced.data.tags.get("params.sha256")
    if h_a != h_b and not (atol > 0 and _weights_within((source, target), (original, reproduced), atol)):
        ok = False
    causes = {k: (original.data.tags.get(k), reproduced.data.tags.get(k)) for k in CAUSE_TAGS
              if original.data.tags.get(k) != reproduced.data.tags.get(k)}
    return rows, ok, causes


def _weights_within(clients, runs, atol: float) -> bool:
    """Whether the two runs' exported weights agree within atol, element by element."""
    import mxnet as mx

    with tempfile.TemporaryDirectory() as tmp:
        loaded = []
        for i, (client, run) in enumerate(zip(clients, runs)):
            path = client.download_artifacts(run.info.run_id, "model/model-0000.params", f"{tmp}/{i}")
            loaded.append({k.split("_", 1)[-1]: v.asnumpy() for k, v in mx.nd.load(path).items()})
    if loaded[0].keys() != loaded[1].keys():
        return False
    return all(abs(loaded[0][k] - loaded[1][k]).max() <= atol for k in loaded[0])


def format_verdict(rows: list[Row], ok: bool, hashes: tuple, causes: dict, config_diff: dict, full: bool = False
                   ) -> str:
    """Per metric, the steps compared and the largest difference (every step with full=True), the
    weights' hashes, the verdict and, when it failed, the likely causes."""
    if full:
        lines = [f"{'metric':<12} {'step':>4} {'original':>14} {'reproduced':>14} {'difference':>11}"]
        lines += [f"{r.metric:<12} {r.step:>4} {r.original:>14.8f} {r.reproduced:>14.8f} {r.difference:>11.3g}"
                  for r in rows]
    else:
        lines = [f"{'metric':<12} {'steps':>9} {'largest difference':>19}  {'at step':>7}"]
        for metric in sorted({r.metric for r in rows}):
            mine = [r for r in rows if r.metric == metric]
            worst = max(mine, key=lambda r: float("inf") if math.isnan(r.difference) else r.difference)
            steps = f"{min(r.step for r in mine)}..{max(r.step for r in mine)}"
            lines.append(f"{metric:<12} {steps:>9} {worst.difference:>19.3g}  {worst.step:>7}")
    lines.append(f"params.sha256  original {hashes[0][:16]}  reproduced {hashes[1][:16]}  "
                 f"{'identical' if hashes[0] == hashes[1] else 'DIFFERENT'}")
    if ok:
        lines.append("REPRODUCED")
        return "\n".join(lines)
    lines.append("NOT REPRODUCED")
    if causes or config_diff:
        lines.append("likely causes (original -> reproduction):")
        for k, (a, b) in causes.items():
            lines.append(f"  {k}: {a} -> {b}")
        for k, (a, b) in config_diff.items():
            lines.append(f"  config {k}: {a} -> {b}")
    else:
        lines.append("no fingerprint difference recorded: nondeterminism in this environment")
    return "\n".join(lines)


def config_diff(client, original, cfg: DictConfig) -> dict[str, tuple]:
    """Config values the reproduction used that differ from the original's config.yaml artifact."""
    logged = flatten(OmegaConf.create(logged_config(client, original)))
    now = flatten(cfg)
    return {k: (logged.get(k), now.get(k)) for k in sorted(set(logged) | set(now))
            if not k.startswith(NEUTRAL_KEYS) and logged.get(k) != now.get(k)}


def runs_to_reproduce(client, run_id: str | None, sweep: str | None, experiment: str) -> list:
    """The run, or every job run of the sweep it is the parent of (or of --sweep)."""
    from ..tracking.queries import run_by_id

    if run_id:
        run = run_by_id(client, run_id, f"run {run_id}", f"{client.tracking_uri}: check the run id and --tracking-uri")
        if run.data.tags.get(TAG_ROLE) != "sweep":
            return [run]
        sweep, experiment_ids = run.data.tags[TAG_SWEEP], [run.info.experiment_id]
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise HarnessError(f"experiment {experiment!r} does not exist in {client.tracking_uri}")
        experiment_ids = [exp.experiment_id]
    runs = job_runs(client, experiment_ids, sweep=sweep)
    if not runs:
        raise HarnessError(f"sweep {sweep!r} has no runs to reproduce")
    return runs
