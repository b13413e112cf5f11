"""The benchmark at a small size: its figures checked against what the test finds itself (the probe's
widths, the sweep's own store and log), not against the report's own arithmetic; no timing targets."""

import json
from argparse import Namespace
from datetime import datetime

import mxnet as mx
import pytest

from mnist_logreg import bench
from mnist_logreg.ml import probe
from conftest import jobs_and_parents

pytestmark = pytest.mark.slow


def test_the_bench_loops_report_the_widths_the_probe_proves(tmp_path, mnist5k_root, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--dataset", "mnist", "--data-root", str(mnist5k_root), "--epochs", "2", "--repeats", "1",
                       "--skip-sweeps", "--skip-peer", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["train_examples"] == 4000 and report["dataset"] == "mnist"
    pe = report["per_epoch"]
    assert pe["tutorial"]["samples"] == 1 and pe["harness"]["samples"] == pe["numpy"]["samples"] == 2
    # The tutorial's per-batch loop is far slower than the fast path (10x and more here; 2x holds on any machine).
    assert pe["tutorial"]["train_epoch_s"] > 2 * pe["harness"]["train_epoch_s"]

    shapes = probe.run_shapes(4000, 1000, 64, 10000)
    stacks = report["stacked"]["stacks"]
    assert [(c["models"], c["width"]) for c in stacks] == [
        (9, probe.widest_exact(9, 10, mx.cpu(), shapes).width), (32, probe.widest_exact(32, 10, mx.cpu(), shapes).width),
        (32, 1)]
    for case in stacks:
        assert sum(case["products"]) == case["models"] and max(case["products"]) == case["width"]
        assert case["stacked_per_model"]["train_epoch_s"] > 0
    assert f"probed: 32 models as {probe.Width(32, stacks[1]['width'], 0).describe()}" in printed


def test_a_bench_sweeps_split_matches_its_own_store_and_log(tmp_path, mnist5k_root):
    args = Namespace(sweep_epochs=2, dataset="mnist", data_root=str(mnist5k_root))
    s = bench.sweep(args, [*bench.CARD, "data.batch_size=500,1000"], folder=tmp_path)
    client, jobs, parents = jobs_and_parents(tmp_path)
    assert s["jobs"] == len(jobs) == 6 and len(parents) == 1
    groups = {}
    for run in jobs:
        groups.setdefault(run.data.tags["stack.group"], run.info.run_id)
    assert s["stacks"] == len(groups) == 2
    # Training, as the split counts it, is what each stack logged as its epochs' compute, once per stack.
    logged = sum(m.value for rid in groups.values() for key in ("epoch_seconds", "eval_seconds")
                 for m in client.get_metric_history(rid, key))
    assert s["split_s"]["training"] == pytest.approx(logged) and logged > 0
    # The start-up phase ends at the launcher's first line, and the sweep's end after the last run ended.
    output = (tmp_path / "output.txt").read_text()
    stamp = lambda line: datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # noqa: E731
    lines = output.splitlines()
    parent_line = next(line for line in lines if "] Launching 6 jobs" in line)
    last_end = [line for line in lines if " ended FINISHED: " in line][-1]
    first_stack = next(line for line in lines if "] stack " in line)
    assert s["split_s"]["composing and preparing"] == pytest.approx(stamp(first_stack) - stamp(parent_line), abs=2e-3)
    assert s["split_s"]["per-run records"] == pytest.approx(stamp(last_end) - stamp(first_stack) - logged, abs=2e-3)
    # Each job's timing tags, summed by phase.
    assert s["phases_s"]["artifacts"] == pytest.approx(sum(float(r.data.tags["timing.artifacts_s"]) for r in jobs))
    assert 100 < s["peak_rss_mb"] < 4000  # the sweep process's own peak, in MB
