"""The benchmark runs end to end at a small size (a smoke test: no timing assertions)."""

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_bench_smoke(tmp_path, mnist5k_root):
    out = tmp_path / "bench.json"
    proc = run_cli(["--dataset", "mnist", "--data-root", str(mnist5k_root), "--epochs", "1", "--repeats", "1",
                    "--sweep-epochs", "1", "--json", str(out)], cwd=tmp_path, module="mnist_logreg.bench")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    for name in ("tutorial", "harness", "numpy"):
        assert report["per_epoch"][name]["train_epoch_s"] > 0 and report["per_epoch"][name]["eval_s"] > 0
    assert report["sweep_basic"]["jobs"] == 3 and report["sweep_joblib"]["jobs"] == 3
    assert {"imports", "data", "store", "train", "logging", "artifacts"} <= set(report["sweep_basic"]["phases_s"])
    assert report["peak_rss_mb"] > 50
    assert "(a) per epoch" in proc.stdout and "(c) peak resident memory" in proc.stdout
