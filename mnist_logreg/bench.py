"""Benchmark: the harness's training path against the tutorial's own loop, and whole sweeps.

    python -m mnist_logreg.bench [--dataset fashion_mnist] [--epochs 3] [--repeats 3]

Prints (a) seconds per training epoch and per evaluation of the tutorial's loop, the harness's
path and a hand-written numpy loop, with their ratios; (b) the wall time of
`run.py -m optim.lr=0.05,0.1,0.5` with the basic and the joblib launcher, broken down into
imports, data, store, training, logging and artifacts; (c) the peak resident memory of a
training process. The figures are also written as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from .data import Split, load, locate
from .fingerprint import cpu_model

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ["-m", "optim.lr=0.05,0.1,0.5"]


def tutorial_epoch(split_train: Split, split_test: Split, epochs: int, batch_size: int, lr: float, seed: int):
    """The tutorial's loop as written there: DataLoader with a per-sample transform, a sync per
    batch (asscalar), mx.metric.Accuracy over both splits after each epoch. Returns (train_s, eval_s) lists.

    The datasets hold what gluon.data.vision.MNIST holds (a uint8 NDArray of (N, 28, 28, 1) images
    and int32 labels), so the per-sample transform runs on NDArrays as in the tutorial.
    """
    import mxnet as mx
    from mxnet import autograd, gluon, nd

    def transform(data, label):
        return data.astype(np.float32) / 255, label.astype(np.float32)

    def dataset(split: Split):
        images = nd.array(split.images.reshape(-1, 28, 28, 1), dtype=np.uint8)
        return gluon.data.ArrayDataset(images, split.labels.astype(np.int32)).transform(transform)

    train_ds, test_ds = dataset(split_train), dataset(split_test)
    train_data = gluon.data.DataLoader(train_ds, batch_size, shuffle=True)
    test_data = gluon.data.DataLoader(test_ds, batch_size, shuffle=False)
    mx.random.seed(seed)
    net = gluon.nn.Dense(10)
    net.collect_params().initialize(mx.init.Normal(sigma=1.0), ctx=mx.cpu())
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": lr})

    def evaluate_accuracy(data_iterator):
        acc = mx.metric.Accuracy()
        for data, label in data_iterator:
            acc.update(preds=nd.argmax(net(data.reshape((-1, 784))), axis=1), labels=label)
        return acc.get()[1]

    train_s, eval_s = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        cumulative_loss = 0.0
        for data, label in train_data:
            with autograd.record():
                loss = loss_fn(net(data.reshape((-1, 784))), label)
            loss.backward()
            trainer.step(batch_size)
            cumulative_loss += nd.sum(loss).asscalar()
        t1 = time.perf_counter()
        evaluate_accuracy(test_data), evaluate_accuracy(train_data)
        train_s.append(t1 - t0)
        eval_s.append(time.perf_counter() - t1)
    return train_s, eval_s


def harness_epoch(split_train: Split, split_test: Split, epochs: int, batch_size: int, lr: float, seed: int):
    """The harness's training path (mnist_logreg.training.fit). Returns (train_s, eval_s) lists."""
    import mxnet as mx

    from .model import build_net
    from .training import fit, make_trainer, to_device

    ctx = mx.cpu()
    train_d, test_d = to_device(split_train, ctx), to_device(split_test, ctx)
    net = build_net(10, 1.0, ctx, seed)
    history = fit(net, make_trainer(net, lr), train_d, test_d, epochs=epochs, batch_size=batch_size, seed=seed)
    return [m.epoch_seconds for m in history], [m.eval_seconds for m in history]


def numpy_epoch(split_train: Split, split_test: Split, epochs: int, batch_size: int, lr: float, seed: int):
    """The same maths written by hand in numpy (softmax cross-entropy, SGD on the mean gradient)."""
    x, y = split_train.x, split_train.labels.astype(np.int64)
    xt, yt = split_test.x, split_test.labels.astype(np.int64)
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1.0, (784, 10)).astype(np.float32)
    b = np.zeros(10, np.float32)
    train_s, eval_s = [], []
    for _ in range(epochs):
        order = rng.permutation(len(y))
        t0 = time.perf_counter()
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            z = xb @ w + b
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(yb)), yb] -= 1
            w -= (lr / batch_size) * (xb.T @ p)
            b -= (lr / batch_size) * p.sum(axis=0)
        t1 = time.perf_counter()
        _ = ((x @ w + b).argmax(1) == y).mean(), ((xt @ w + b).argmax(1) == yt).mean()
        train_s.append(t1 - t0)
        eval_s.append(time.perf_counter() - t1)
    return train_s, eval_s


def per_epoch(args, train: Split, test: Split) -> dict:
    """(a): medians over repeats of seconds per training epoch and per evaluation, and ratios."""
    out = {}
    for name, fn, epochs in (("tutorial", tutorial_epoch, 1), ("harness", harness_epoch, args.epochs),
                             ("numpy", numpy_epoch, args.epochs)):
        train_s, eval_s = [], []
        for r in range(args.repeats):
            t, e = fn(train, test, epochs, 64, 0.1, seed=r)
            train_s += t
            eval_s += e
        out[name] = {"train_epoch_s": statistics.median(train_s), "eval_s": statistics.median(eval_s),
                     "samples": len(train_s)}
    h, t, n = out["harness"], out["tutorial"], out["numpy"]
    out["ratios"] = {
        "tutorial_over_harness_train": t["train_epoch_s"] / h["train_epoch_s"],
        "tutorial_over_harness_eval": t["eval_s"] / h["eval_s"],
        "harness_over_numpy_train": h["train_epoch_s"] / n["train_epoch_s"],
    }
    return out


def _import_seconds(module: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, capture_output=True)
    t1 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, capture_output=True)
    return (t1 - t0) - (time.perf_counter() - t1)


def sweep(args, launcher: list[str]) -> dict:
    """(b): wall time of one real sweep through run.py, with its jobs' own phase timings summed."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "run.py"), *SWEEP, f"trainer.epochs={args.sweep_epochs}",
               f"data={args.dataset}", *([f"data.root={args.data_root}"] if args.data_root else []), *launcher]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"sweep failed: {proc.stderr.strip().splitlines()[-1:]}")
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        exp = client.get_experiment_by_name("mnist_logreg")
        runs = client.search_runs([exp.experiment_id], "tags.`mnist_logreg.role` = 'job'")
    phases: dict[str, float] = {}
    for run in runs:
        for k, v in run.data.tags.items():
            if k.startswith("timing."):
                name = k[len("timing."):-2]
                phases[name] = phases.get(name, 0.0) + float(v)
    in_jobs = sum(phases.values())
    return {"wall_s": wall, "jobs": len(runs), "phases_s": phases,
            "launcher_and_startup_s": wall - in_jobs if not launcher else None,
            "logging_share": (phases.get("logging", 0.0) + phases.get("artifacts", 0.0)) / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_logreg.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "mnist"])
    parser.add_argument("--data-root", help="folder of the IDX files (default: where the data config finds them)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per repeat of the fast loops")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep-epochs", type=int, default=10)
    parser.add_argument("--skip-sweeps", action="store_true", help="only (a), the per-epoch figures")
    parser.add_argument("--json", type=Path, default=None, help="default outputs/bench/bench-TIME.json")
    args = parser.parse_args(argv)

    search = {"fashion_mnist": ["/usr/share/datasets/fashion-mnist"], "mnist": []}[args.dataset]
    cache = Path(os.environ.get("MNIST_LOGREG_CACHE", Path.home() / ".cache" / "mnist_logreg")) / args.dataset
    files = locate(args.dataset, args.data_root, str(cache), search)
    train, test = load(files)
    report = {"when": datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(), "cores": os.cpu_count(),
              "python": platform.python_version(), "dataset": args.dataset, "train_examples": len(train.labels),
              "threads.OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")}

    report["per_epoch"] = pe = per_epoch(args, train, test)
    print(f"(a) per epoch, {args.dataset}, {len(train.labels)} training examples, batch 64, medians")
    print(f"    {'':<10} {'train epoch s':>14} {'eval s':>9}")
    for name in ("tutorial", "harness", "numpy"):
        print(f"    {name:<10} {pe[name]['train_epoch_s']:>14.4f} {pe[name]['eval_s']:>9.4f}")
    r = pe["ratios"]
    print(f"    tutorial/harness: training {r['tutorial_over_harness_train']:.1f}x, "
          f"evaluation {r['tutorial_over_harness_eval']:.1f}x; harness/numpy training "
          f"{r['harness_over_numpy_train']:.2f}x")

    if not args.skip_sweeps:
        report["imports_s"] = {m: _import_seconds(m) for m in ("mxnet", "mlflow", "hydra")}
        print(f"\n(b) python run.py {' '.join(SWEEP)} trainer.epochs={args.sweep_epochs} data={args.dataset}")
        print("    imports in a fresh process: " + ", ".join(f"{m} {s:.2f}s" for m, s in report["imports_s"].items()))
        for name, launcher in (("basic", []), ("joblib", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])):
            usage_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            report[f"sweep_{name}"] = s = sweep(args, launcher)
            if name == "basic":
                report["peak_rss_mb"] = max(usage_before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
            phases = ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["phases_s"].items()))
            print(f"    {name:<7} wall {s['wall_s']:6.2f}s for {s['jobs']} jobs; inside jobs (s, summed): {phases}")
            if s["launcher_and_startup_s"] is not None:
                print(f"            outside jobs (process start, imports, Hydra, store, sweep run): "
                      f"{s['launcher_and_startup_s']:.2f}s; MLflow logging+artifacts {100 * s['logging_share']:.1f}% of wall")
        print(f"\n(c) peak resident memory of the basic sweep's process: {report['peak_rss_mb']:.0f} MB")

    path = args.json or ROOT / "outputs" / "bench" / f"bench-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nfigures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
