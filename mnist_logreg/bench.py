"""Benchmark: the harness's training path against the tutorial's own loop, and whole sweeps.

    python -m mnist_logreg.bench [--dataset fashion_mnist] [--epochs 3] [--repeats 3]

Prints (a) seconds per training epoch and per evaluation of the tutorial's loop, the harness's
path and a hand-written numpy loop, with their ratios; (b) the training cost of one model-epoch
inside a 9- and a 32-model stack, at the width the probe proves on this machine (and the 32 at
width 1), against a lone fit, and the probe's own time; (c) real sweeps through run.py into fresh
stores: the card's `-m optim.lr=0.05,0.1,0.5` and `experiments=grid` (27 jobs), each with the
stacked (default) and the basic launcher, and a 96-job lr x sigma x wd sweep (5 epochs), each with
its wall time split by phase, peak resident memory and per-job cost besides training; (e) the JAX
peer (mnist_logreg/jax_peer.py, in its own environment); (d) the targets, from those figures. The
figures are also written as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import re
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from .ml.data import Split, load, locate
from .project import PROJECT_ROOT
from .ml.machine import cpu_model


def tutorial_epoch(split_train: Split, split_test: Split, epochs: int, batch_size: int, lr: float, seed: int):
    """The tutorial's loop (mnist_logreg.reference). Returns (train_s, eval_s) lists."""
    from .ml.reference import tutorial_loop, tutorial_net

    history = tutorial_loop(tutorial_net(1.0, seed), split_train, split_test, epochs=epochs,
                            batch_size=batch_size, lr=lr, seed=seed)
    return [e.train_seconds for e in history], [e.eval_seconds for e in history]


def harness_epoch(split_train: Split, split_test: Split, epochs: int, batch_size: int, lr: float, seed: int):
    """The harness's training path (mnist_logreg.ml.training.fit of a Lone model). Returns (train_s, eval_s) lists."""
    import mxnet as mx

    from .ml.model import build_net
    from .ml.training import Lone, fit, make_trainer, to_device

    ctx = mx.cpu()
    train_d, test_d = to_device(split_train, ctx), to_device(split_test, ctx)
    net = build_net(10, 1.0, ctx, seed)
    [member] = fit(Lone(net, make_trainer(net, lr)), train_d, test_d, epochs=epochs, batch_size=batch_size, seed=seed)
    return [m.epoch_seconds for m in member.history], [m.eval_seconds for m in member.history]


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


STACK_SIZES = (9, 32)


def stacked_epochs(args, train: Split, test: Split) -> dict:
    """(b): training seconds per model-epoch, a lone fit against each model of a 9- and a 32-model
    stack (lr x sigma x wd) at the width the probe proves here, and the 32 at width 1 (one product
    per model, the fallback); the probe's own time per stack, with nothing cached."""
    import mxnet as mx

    from .ml import probe
    from .ml.model import build_net
    from .ml.stack import MemberSpec, Stack
    from .ml.training import Lone, fit, make_trainer, to_device

    ctx = mx.cpu()
    train_d, test_d = to_device(train, ctx), to_device(test, ctx)
    grid = [MemberSpec(sigma, lr, wd=wd) for lr in (0.05, 0.1, 0.3, 0.5) for sigma in (0.01, 0.1, 0.5, 1.0)
            for wd in (0.0, 1e-3)]
    shapes = probe.run_shapes(len(train.labels), len(test.labels), 64, 10000)
    cases = []
    for k in STACK_SIZES:
        cold = probe.widest_exact(k, 10, ctx, shapes, rounds=probe.probe)  # every width probed anew
        cases.append({"models": k, "width": cold.width, "products": cold.products(), "probe_s": cold.seconds,
                      "describe": cold.describe()})
    cases.append({"models": 32, "width": 1, "products": [1] * 32, "probe_s": 0.0, "describe": "fallback"})
    lone_train, lone_eval = [], []
    for case in cases:
        case["train"], case["eval"] = [], []
    for r in range(args.repeats):
        net = build_net(10, 1.0, ctx, r)
        [lone] = fit(Lone(net, make_trainer(net, 0.1)), train_d, test_d, epochs=args.epochs, batch_size=64, seed=r)
        lone_train += [m.epoch_seconds for m in lone.history]
        lone_eval += [m.eval_seconds for m in lone.history]
        for case in cases:
            specs = grid[:: len(grid) // case["models"]][: case["models"]]
            stack = Stack(specs, 10, ctx, r, case["width"])
            fit(stack, train_d, test_d, epochs=args.epochs, batch_size=64, seed=r)
            case["train"] += [m.epoch_seconds / len(specs) for m in stack.members[0].history]
            case["eval"] += [m.eval_seconds / len(specs) for m in stack.members[0].history]
    lone_s = statistics.median(lone_train)
    for case in cases:
        train_s, eval_s = statistics.median(case.pop("train")), statistics.median(case.pop("eval"))
        case["stacked_per_model"] = {"train_epoch_s": train_s, "eval_s": eval_s}
        case["per_model_train_share"] = train_s / lone_s
    return {"lone": {"train_epoch_s": lone_s, "eval_s": statistics.median(lone_eval)}, "stacks": cases}


def _import_seconds(module: str, first: str = "") -> float:
    """Seconds to import module in a fresh process (after `first`, which is not counted)."""
    before = f"import {first}; " if first else ""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"{before}import {module}"], check=True, capture_output=True)
    t1 = time.perf_counter()
    subprocess.run([sys.executable, "-c", before or "pass"], check=True, capture_output=True)
    return (t1 - t0) - (time.perf_counter() - t1)


# Per-job work besides training: opening the run, logging, checkpoints, artifacts.
FIXED_PHASES = ("store", "logging", "artifacts")


STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def _stamps(output: str, pattern: str) -> list[float]:
    """Epoch seconds of the log lines of output that match pattern."""
    out = []
    for line in output.splitlines():
        found = STAMP.match(line)
        if found and re.search(pattern, line):
            out.append(datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return out


# Runs a command and writes its peak resident memory (KB) to a file. The sweep is started from this
# small process, not from the bench's own: a child's ru_maxrss starts from its parent's at fork time.
_PEAK_RSS = ("import os, subprocess, sys\n"
             "proc = subprocess.Popen(sys.argv[2:])\n"
             "_, status, usage = os.wait4(proc.pid, 0)\n"
             "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
             "sys.exit(os.waitstatus_to_exitcode(status))\n")


def sweep(args, overrides: list[str], epochs: int | None = None, folder: Path | None = None) -> dict:
    """One real sweep through run.py into a fresh store (in folder, kept; default a temporary one):
    wall time, the peak resident memory of the process, the jobs' own phase timings, and the wall
    time split by the sweep's own log lines: start-up (to the launcher's first line), composing and preparing
    (to the first stack), training (the compute the stacks log: epoch and eval seconds, once per
    stack), per-run records (the rest of the stacks' time) and the end (comparison and exit)."""
    from mlflow.tracking import MlflowClient

    from .tracking.queries import job_runs

    with tempfile.TemporaryDirectory() as scratch:
        tmp = str(folder or scratch)
        cmd = [sys.executable, str(PROJECT_ROOT / "run.py"), "-m", *overrides,
               f"trainer.epochs={epochs or args.sweep_epochs}", f"data={args.dataset}",
               *([f"data.root={args.data_root}"] if args.data_root else [])]
        out_path, rss_path = Path(tmp) / "output.txt", Path(scratch) / "peak_rss_kb"
        with open(out_path, "w") as out:
            started = time.time()
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(rss_path), *cmd], cwd=tmp, stdout=out,
                                  stderr=subprocess.STDOUT)
            wall = time.perf_counter() - t0
        output = out_path.read_text()
        if proc.returncode != 0:
            raise SystemExit(f"sweep failed: {' '.join(cmd)}: {output.strip().splitlines()[-1:]}")
        peak_mb = int(rss_path.read_text()) / 1024
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        exp = client.get_experiment_by_name("mnist_logreg")
        runs = job_runs(client, [exp.experiment_id])
        stacks: dict[str, str] = {}
        for run in runs:
            stacks.setdefault(run.data.tags.get("stack.group", run.info.run_id), run.info.run_id)
        compute = sum(m.value for rid in stacks.values() for key in ("epoch_seconds", "eval_seconds")
                      for m in client.get_metric_history(rid, key))
    phases: dict[str, float] = {}
    fixed = []
    for run in runs:
        timing = {k[len("timing."):-2]: float(v) for k, v in run.data.tags.items() if k.startswith("timing.")}
        for name, value in timing.items():
            phases[name] = phases.get(name, 0.0) + value
        fixed.append(sum(timing.get(p, 0.0) for p in FIXED_PHASES))
    parent = (_stamps(output, r"\] Launching \d+ jobs") or _stamps(output, r"parent run") or [started])[0]
    first_stack = (_stamps(output, r"\] stack .*: jobs") or _stamps(output, r"MLflow run .* \(") or [parent])[0]
    # the last run's end: its own line, or in a large sweep (whose console leaves those out) its stack's
    last_run = max(_stamps(output, r"ended (FINISHED|FAILED|KILLED):") + _stamps(output, r"\] stack \S+ done in ")
                   or [first_stack])
    split = {"start-up": parent - started, "composing and preparing": first_stack - parent, "training": compute,
             "per-run records": (last_run - first_stack) - compute, "end of the sweep": started + wall - last_run}
    return {"wall_s": wall, "jobs": len(runs), "peak_rss_mb": peak_mb, "phases_s": phases,
            "fixed_per_job_s": {"median": statistics.median(fixed), "max": max(fixed)},
            "stacks": len(stacks), "stack_compute_s": compute, "split_s": split,
            "outside_training_per_job_s": (wall - compute) / max(1, len(runs))}


CARD = ["optim.lr=0.05,0.1,0.5"]
GRID = ["experiments=grid"]


SCALE = ["optim.lr=0.01,0.03,0.1,0.3,0.5,1.0", "model.sigma=0.01,0.1,0.5,1.0", "optim.wd=0,0.0001,0.001,0.01"]
SCALE_EPOCHS = 5


def print_per_epoch(args, pe: dict, examples: int) -> None:
    print(f"(a) per epoch, {args.dataset}, {examples} training examples, batch 64, medians")
    print(f"    {'':<10} {'train epoch s':>14} {'eval s':>9}")
    for name in ("tutorial", "harness", "numpy"):
        print(f"    {name:<10} {pe[name]['train_epoch_s']:>14.4f} {pe[name]['eval_s']:>9.4f}")
    r = pe["ratios"]
    print(f"    tutorial/harness: training {r['tutorial_over_harness_train']:.1f}x, "
          f"evaluation {r['tutorial_over_harness_eval']:.1f}x; harness/numpy training "
          f"{r['harness_over_numpy_train']:.2f}x")


def print_stacked(st: dict) -> None:
    print("\n(b) one model-epoch, a lone fit against one model of a stack (lr x sigma x wd), medians")
    print(f"    {'':<34} {'train s':>9} {'eval s':>9} {'of lone':>8} {'probe s':>8}")
    print(f"    {'lone':<34} {st['lone']['train_epoch_s']:>9.4f} {st['lone']['eval_s']:>9.4f}")
    for case in st["stacks"]:
        label = f"stack of {case['models']}, width {case['width']}"
        per = case["stacked_per_model"]
        print(f"    {label:<34} {per['train_epoch_s']:>9.4f} {per['eval_s']:>9.4f} "
              f"{case['per_model_train_share']:>8.2f} {case['probe_s']:>8.3f}")
    for case in st["stacks"]:
        if case["describe"] != "fallback":
            print(f"    probed: {case['models']} models as {case['describe']}")


def print_sweep(name: str, launcher: str, overrides: list[str], s: dict) -> None:
    phases = ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["phases_s"].items()))
    print(f"    {name} ({' '.join(overrides)}), {launcher}: wall {s['wall_s']:.2f}s for {s['jobs']} jobs in "
          f"{s['stacks']} passes, peak RSS {s['peak_rss_mb']:.0f} MB")
    print("        wall split: " + ", ".join(f"{k} {v:.2f}s" for k, v in s["split_s"].items()))
    print(f"        per job besides training ({'+'.join(FIXED_PHASES)}): median "
          f"{s['fixed_per_job_s']['median']:.3f}s, max {s['fixed_per_job_s']['max']:.3f}s")
    print(f"        inside jobs (s, summed): {phases}")


def jax_peer() -> dict:
    """(e): the JAX peer (mnist_logreg/jax_peer.py) in its own environment, or why it could not run."""
    import shutil

    uv = shutil.which("uv")
    if uv is None:
        return {"skipped": "uv is not on PATH (pip install uv)"}
    cmd = [uv, "run", "--quiet", "--no-project", "--with", "jax[cpu]", "python", str(Path(__file__).with_name("jax_peer.py"))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "VIRTUAL_ENV": ""})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"skipped": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def print_jax_peer(peer: dict, st: dict | None) -> None:
    if "skipped" in peer:
        print(f"\n(e) JAX peer skipped: {peer['skipped']}")
        return
    print(f"\n(e) the JAX peer (jax {peer['jax']}, jit(scan(vmap(sgd))), batch 64, 60,000 random images)")
    ours = {c["models"]: c["stacked_per_model"]["train_epoch_s"] for c in (st or {}).get("stacks", []) if c["describe"] != "fallback"}
    if st:
        ours[1] = st["lone"]["train_epoch_s"]
    for k, seconds in peer["model_epoch_s"].items():
        mine = ours.get(int(k))
        vs = f", this harness {mine:.4f} s ({mine / seconds:.1f}x JAX's)" if mine else ""
        same = f", {peer['identical'][k]} identical to their lone training" if k in peer["identical"] else ""
        print(f"    K = {k:>2}: {seconds:.4f} s per model-epoch{vs}{same}")


def print_targets(report: dict) -> None:
    """The issues' target tables, from this run."""
    rows = []
    for case in report.get("stacked", {}).get("stacks", []):
        if case["describe"] != "fallback":
            rows += [(f"a model-epoch in a stack of {case['models']} / a lone one", f"{case['per_model_train_share']:.2f}",
                      "0.2 or less" if case["models"] == 32 else "0.3 or less"),
                     (f"the probe's time for a stack of {case['models']}", f"{case['probe_s']:.3f} s", "0.5 s or less")]
    if "grid_stacked" in report and "grid_basic" in report:
        rows.append(("the 27-job grid: basic wall / default wall",
                     f"{report['grid_basic']['wall_s'] / report['grid_stacked']['wall_s']:.2f}", "3 or more"))
    if "scale_stacked" in report:
        s = report["scale_stacked"]
        split = s["split_s"]
        rows += [("96-job sweep: composing and preparing, per job", f"{split['composing and preparing'] / s['jobs']:.3f} s",
                  "0.02 s or less"),
                 ("96-job sweep: per-run records, per run", f"{split['per-run records'] / s['jobs']:.3f} s", "0.03 s or less"),
                 ("96-job sweep: end of the sweep", f"{split['end of the sweep']:.2f} s", "1 s or less"),
                 ("96-job sweep: wall / the training its stacks log", f"{s['wall_s'] / s['stack_compute_s']:.2f}",
                  "1.25 or less"),
                 ("peak RSS of the 96-job sweep", f"{s['peak_rss_mb']:.0f} MB", "1,100 MB or less")]
    if "card_stacked" in report:
        c = report["card_stacked"]
        rows += [("the card's sweep: start-up", f"{c['split_s']['start-up']:.2f} s", "3 s or less"),
                 ("the card's sweep, end to end", f"{c['wall_s']:.2f} s", "7 s or less")]
    if rows:
        print("\n(d) targets")
        for what, value, target in rows:
            print(f"    {what:<56} {value:>10}   target {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_logreg.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "mnist"])
    parser.add_argument("--data-root", help="folder of the IDX files (default: where the data config finds them)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per repeat of the in-process loops")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep-epochs", type=int, default=10)
    parser.add_argument("--skip-loops", action="store_true", help="leave out (a) and (b), the in-process figures")
    parser.add_argument("--skip-sweeps", action="store_true", help="only (a) and (b), the in-process figures")
    parser.add_argument("--skip-grid", action="store_true", help="leave out the 27-job grid sweep")
    parser.add_argument("--skip-scale", action="store_true", help="leave out the 96-job sweep")
    parser.add_argument("--skip-peer", action="store_true", help="leave out the JAX peer")
    parser.add_argument("--json", type=Path, default=None, help="default outputs/bench/bench-TIME.json")
    args = parser.parse_args(argv)

    search = {"fashion_mnist": ["/usr/share/datasets/fashion-mnist"], "mnist": []}[args.dataset]
    cache = Path(os.environ.get("MNIST_LOGREG_CACHE", Path.home() / ".cache" / "mnist_logreg")) / args.dataset
    files = locate(args.dataset, args.data_root, str(cache), search)
    train, test = load(files)
    report = {"when": datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(), "cores": os.cpu_count(),
              "python": platform.python_version(), "dataset": args.dataset, "train_examples": len(train.labels),
              "threads.OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")}
    if not args.skip_loops:
        report["per_epoch"] = per_epoch(args, train, test)
        print_per_epoch(args, report["per_epoch"], len(train.labels))
        report["stacked"] = stacked_epochs(args, train, test)
        print_stacked(report["stacked"])
    if not args.skip_sweeps:
        report["imports_s"] = {**{m: _import_seconds(m) for m in ("mxnet", "mlflow", "hydra")},
                               "mxnet as the harness imports it": _import_seconds("mxnet", "mnist_logreg")}
        print(f"\n(c) sweeps through run.py into a fresh store, data={args.dataset}")
        print("    imports in a fresh process: " + ", ".join(f"{m} {s:.2f}s" for m, s in report["imports_s"].items()))
        runs = [("card", "stacked", CARD, None), ("card", "basic", [*CARD, "hydra/launcher=basic"], None)]
        runs += [] if args.skip_grid else [("grid", "stacked", GRID, None), ("grid", "basic", [*GRID, "hydra/launcher=basic"], None)]
        runs += [] if args.skip_scale else [("scale", "stacked", SCALE, SCALE_EPOCHS)]
        for name, launcher, overrides, epochs in runs:
            report[f"{name}_{launcher}"] = s = sweep(args, overrides, epochs)
            print_sweep(name, launcher, [*overrides, f"trainer.epochs={epochs or args.sweep_epochs}"], s)
        card_s, card_b = report["card_stacked"], report["card_basic"]
        print(f"    card sweep: stacked {card_s['wall_s']:.2f}s vs basic {card_b['wall_s']:.2f}s "
              f"({card_b['wall_s'] / card_s['wall_s']:.2f}x faster)")
    if not args.skip_peer:
        report["jax_peer"] = jax_peer()
        print_jax_peer(report["jax_peer"], report.get("stacked"))
    print_targets(report)

    path = args.json or PROJECT_ROOT / "outputs" / "bench" / f"bench-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nfigures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
