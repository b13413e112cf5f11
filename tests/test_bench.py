"""The benchmark at a small size: the structure of its report and the ratios it prints (no timing targets)."""

import json
from argparse import Namespace

import pytest

from mnist_logreg import bench

pytestmark = pytest.mark.slow


def test_bench_report_structure_and_ratios(tmp_path, mnist5k_root, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--dataset", "mnist", "--data-root", str(mnist5k_root), "--epochs", "2", "--repeats", "1",
                       "--skip-sweeps", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    pe, st = report["per_epoch"], report["stacked"]
    assert report["train_examples"] == 4000 and report["dataset"] == "mnist"
    for name in ("tutorial", "harness", "numpy"):
        assert pe[name]["samples"] == (1 if name == "tutorial" else 2)
        assert pe[name]["train_epoch_s"] > 0 and pe[name]["eval_s"] > 0
    # the ratios are what the figures say, and what is printed
    r = pe["ratios"]
    assert r["tutorial_over_harness_train"] == pytest.approx(pe["tutorial"]["train_epoch_s"] / pe["harness"]["train_epoch_s"])
    assert r["harness_over_numpy_train"] == pytest.approx(pe["harness"]["train_epoch_s"] / pe["numpy"]["train_epoch_s"])
    assert f"training {r['tutorial_over_harness_train']:.1f}x" in printed
    assert st["models"] == 9
    assert st["per_model_train_share"] == pytest.approx(st["stacked_per_model"]["train_epoch_s"] / st["lone"]["train_epoch_s"])
    assert f"costs {st['per_model_train_share']:.2f} of a lone one" in printed
    # The tutorial's per-batch loop is far slower than the fast path (a margin of 10x and more here,
    # so this holds on a noisy machine). How much a stacked model-epoch saves is a speed figure for the
    # bench, not a test: with one Dense(10) per model it is 0.4-0.7 of a lone one here, by load.
    assert r["tutorial_over_harness_train"] > 2 and st["per_model_train_share"] > 0


def test_bench_sweep_through_run_py(tmp_path, mnist5k_root):
    args = Namespace(sweep_epochs=1, dataset="mnist", data_root=str(mnist5k_root))
    s = bench.sweep(args, [*bench.CARD, "data.batch_size=500"])
    assert s["jobs"] == 3 and s["stacks"] == 1 and s["wall_s"] > 0
    assert 100 < s["peak_rss_mb"] < 4000  # the run.py process's own peak, in MB
    assert {"imports", "data", "store", "setup", "train", "logging", "artifacts"} <= set(s["phases_s"])
    assert 0 < s["fixed_per_job_s"]["median"] <= s["fixed_per_job_s"]["max"]
    # The wall-time split adds up to the wall time, and training is the compute the stack logged.
    split = s["split_s"]
    assert set(split) == {"start-up", "composing and preparing", "training", "per-run records", "end of the sweep"}
    assert sum(split.values()) == pytest.approx(s["wall_s"], abs=0.05)
    assert all(v >= 0 for v in split.values()) and split["training"] == s["stack_compute_s"] > 0
    assert s["outside_training_per_job_s"] == pytest.approx((s["wall_s"] - s["stack_compute_s"]) / 3)
