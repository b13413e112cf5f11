"""A stopped sweep continues: relaunched (or resume=<its parent>), every stopped run goes on from its
checkpoint in the same run and the same sweep, bit-identical to a sweep never stopped; SIGKILL leaves
runs that a relaunch recognises as abandoned; a run really training elsewhere is left alone."""

import os
import signal
import subprocess

import pytest

from conftest import jobs_and_parents, numbers_of, run_cli, signal_when, start_cli, store_uri

pytestmark = pytest.mark.slow

# Two stacks (batch 4 and 8) of two lrs each: 1,000 and 500 batches an epoch, long enough to stop mid-run.
POINTS = ["optim.lr=0.1,0.5", "data.batch_size=4,8", "trainer.epochs=4"]


def by_point(folder):
    client, jobs, parents = jobs_and_parents(folder)
    points = {}
    for run in jobs:
        key = (run.data.params["optim.lr"], run.data.params["data.batch_size"])
        assert key not in points, f"two runs for {key}"
        points[key] = run
    return client, points, parents


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, mnist5k_root):
    """The same sweep, never stopped: the numbers every continued run must equal."""
    folder = tmp_path_factory.mktemp("unbroken")
    proc = run_cli(["-m", *POINTS, f"data.root={mnist5k_root}"], cwd=folder)
    assert proc.returncode == 0, proc.stderr
    client, points, _ = by_point(folder)
    return {key: numbers_of(client, run) for key, run in points.items()}


def assert_continued_exactly(folder, unbroken, parents_expected=1):
    client, points, parents = by_point(folder)
    assert sorted(points) == sorted(unbroken)  # one run per point
    for key, run in points.items():
        assert run.info.status == "FINISHED", key
        numbers = numbers_of(client, run)
        steps = [s for s, _ in numbers["train_loss"]]
        assert steps == sorted(set(steps)), f"{key}: a step logged twice: {steps}"
        assert numbers == unbroken[key], key  # every metric at every step, and params.sha256
    assert len(parents) == parents_expected
    return client, points, parents


def until_line(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> None:
    """Wait until proc prints a line matching pattern, and keep draining its output afterwards (so
    that it never blocks on a full pipe) while it goes on running."""
    import re
    import threading

    seen = threading.Event()

    def drain() -> None:
        for line in proc.stdout:
            if re.search(pattern, line):
                seen.set()

    threading.Thread(target=drain, daemon=True).start()
    assert seen.wait(timeout), f"no line matching {pattern!r} within {timeout:.0f} s"


def stop_midway(folder, args, sig=signal.SIGINT) -> tuple[subprocess.Popen, str]:
    """Start the sweep as a terminal would and send sig to its whole process group once a job
    has logged its second epoch; return the process (ended) and its output."""
    proc = start_cli(args, folder, new_session=True)
    out = signal_when(proc, r"job\.[0-9]\]\[INFO\] - epoch 2/4", None, before=lambda: os.killpg(proc.pid, sig))
    return proc, out


def test_a_sweep_stopped_by_ctrl_c_continues_in_its_runs_when_relaunched(tmp_path, mnist5k_root, unbroken):
    args = ["-m", *POINTS, f"data.root={mnist5k_root}"]
    proc, out = stop_midway(tmp_path, args)
    assert proc.returncode == 130 and "Traceback" not in out, out[-2000:]
    client, stopped, parents = by_point(tmp_path)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert any(r.info.status == "KILLED" for r in stopped.values())

    # compare on the half-stopped sweep: the FINISHED runs rank first, a stopped one is never the best
    from mnist_logreg import compare
    import io
    import contextlib

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert compare.main(["--tracking-uri", store_uri(tmp_path), "--sweep", parents[0].info.run_id[:8], "--no-log",
                             "--output", str(tmp_path / "cmp")]) == 0
    rows = [line.split() for line in printed.getvalue().splitlines() if line[:8] in {r.info.run_id[:8] for r in stopped.values()}]
    statuses = [row[-1] for row in rows]
    assert statuses == sorted(statuses, key=lambda s: s != "FINISHED")

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr
    assert "continued, parent run " + parents[0].info.run_id in again.stdout
    client, points, parents = assert_continued_exactly(tmp_path, unbroken)
    from mnist_logreg.analysis.compare import compare as comparison

    table, _ = comparison(store_uri(tmp_path), "mnist_logreg", None, tmp_path / "cmp2", False)
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.continuations"] == "1"
    assert "continuation 1" in parent.data.tags["mlflow.note.content"]
    for key, run in points.items():
        if key in stopped and stopped[key].info.status != "FINISHED":  # continued: its wall time leaves out the time it was stopped
            assert float(run.data.tags["stopped_s"]) > 0
            wall = float(table.loc[table["run_id"] == run.info.run_id, "wall_s"].iloc[0])
            span = (run.info.end_time - run.info.start_time) / 1000
            assert wall == pytest.approx(span - float(run.data.tags["stopped_s"]), abs=0.02)


def test_resume_the_parent_continues_the_whole_sweep(tmp_path, mnist5k_root, unbroken):
    args = ["-m", *POINTS, f"data.root={mnist5k_root}"]
    stop_midway(tmp_path, args)
    _, _, parents = by_point(tmp_path)
    again = run_cli([f"resume={parents[0].info.run_id[:8]}", f"data.root={mnist5k_root}"], cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr
    assert f"resume={parents[0].info.run_id} is sweep " in again.stdout
    assert_continued_exactly(tmp_path, unbroken)
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").rglob("*.log"))


def test_points_stopped_at_different_epochs_continue_in_stacks_by_epoch(tmp_path, mnist5k_root, unbroken):
    """A relaunch that adds a point: the stopped ones go on from their epoch, the new one starts at 0,
    in separate stacks of one stack key; all are bit-identical to the unbroken sweep."""
    first = ["-m", "optim.lr=0.1", "data.batch_size=4,8", "trainer.epochs=4", f"data.root={mnist5k_root}"]
    stop_midway(tmp_path, first)
    _, stopped, _ = by_point(tmp_path)
    assert any(r.info.status == "KILLED" for r in stopped.values())
    again = run_cli(["-m", *POINTS, f"data.root={mnist5k_root}"], cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr
    assert "continuing" in again.stdout and "after epoch" in again.stdout
    client, points, parents = assert_continued_exactly(tmp_path, unbroken, parents_expected=2)
    groups = {}
    for key, run in points.items():
        groups.setdefault(run.data.tags["stack.group"], set()).add(key)
    newest = max(parents, key=lambda p: p.info.start_time)
    continued = {k.split(".", 1)[1] for k, v in newest.data.tags.items() if k.startswith("reused.") and v == "continued"}
    assert continued == {stopped[k].info.run_id for k in stopped if stopped[k].info.status != "FINISHED"}


def test_dash_m_resume_of_one_run_continues_it_under_the_default_launcher(tmp_path, mnist5k_root, unbroken):
    args = ["-m", *POINTS, f"data.root={mnist5k_root}"]
    stop_midway(tmp_path, args)
    client, stopped, _ = by_point(tmp_path)
    key, killed = next((k, r) for k, r in stopped.items() if r.info.status == "KILLED")
    again = run_cli(["-m", f"resume={killed.info.run_id}", f"data.root={mnist5k_root}"], cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and numbers_of(client, run) == unbroken[key]


def test_sigkill_leaves_runs_a_relaunch_continues_and_a_live_run_is_left_alone(tmp_path, mnist5k_root, unbroken):
    # A run of one point training in its own process the whole time (it must never be touched).
    live = start_cli(["optim.lr=0.5", "data.batch_size=4", "trainer.epochs=400", f"data.root={mnist5k_root}",
                      "tracking.experiment=mnist_logreg"], tmp_path)
    until_line(live, r"epoch +1/400")  # it is training; it goes on
    try:
        args = ["-m", *POINTS, f"data.root={mnist5k_root}"]
        proc, _ = stop_midway(tmp_path, args, signal.SIGKILL)
        client, jobs, _ = jobs_and_parents(tmp_path)
        assert any(r.info.status == "RUNNING" and r.data.tags.get("process.pid") == str(proc.pid) for r in jobs)
        # The lone live run is at lr 0.5, batch 4, 400 epochs: another point, so the relaunch never
        # resolves it. The same point with 400 epochs is what must be left alone:
        again = run_cli(args, cwd=tmp_path)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr
        assert "was left RUNNING, but its process" in again.stdout
        client, jobs, _ = jobs_and_parents(tmp_path)
        sweep_runs = [r for r in jobs if r.data.params["trainer.epochs"] == "4"]
        assert all(r.info.status == "FINISHED" for r in sweep_runs)
        for run in sweep_runs:
            key = (run.data.params["optim.lr"], run.data.params["data.batch_size"])
            assert numbers_of(client, run) == unbroken[key], key
        same_point = run_cli(["-m", "optim.lr=0.5", "data.batch_size=4", "trainer.epochs=400", f"data.root={mnist5k_root}"],
                             cwd=tmp_path)
        assert same_point.returncode == 0 and "is still training (process" in same_point.stdout, same_point.stdout[-2000:]
        lone = next(r for r in jobs_and_parents(tmp_path)[1] if r.data.params["trainer.epochs"] == "400")
        assert lone.info.status == "RUNNING" and live.poll() is None  # untouched, still training
    finally:
        live.send_signal(signal.SIGINT)
        live.wait(timeout=60)


def test_runs_stopped_after_their_last_epoch_get_their_files_and_finish_with_the_same_numbers(tmp_path, mnist5k_root):
    """A stop after a stack's last epoch, before its runs' files were written, leaves KILLED runs
    whose checkpoint holds every epoch: the relaunch trains nothing, writes their files and ends
    them FINISHED, each in its own run, with every number unchanged."""
    import shutil
    from urllib.parse import unquote, urlparse

    from conftest import artifact_paths

    args = ["-m", "optim.lr=0.1,0.5", "trainer.epochs=2", f"data.root={mnist5k_root}"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    client, jobs, _ = jobs_and_parents(tmp_path)
    before = {run.info.run_id: numbers_of(client, run) for run in jobs}
    for run in jobs:  # as a stop during its files leaves it: its config, metrics and checkpoint, no files
        client.set_terminated(run.info.run_id, "KILLED")
        for path in artifact_paths(client, run.info.run_id):
            if path != "config.yaml":
                target = os.path.join(unquote(urlparse(run.info.artifact_uri).path), path)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0 and "Traceback" not in again.stdout + again.stderr, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("after epoch 2") == 1  # the stack of two, continued at its end
    client, jobs, _ = jobs_and_parents(tmp_path)
    assert {run.info.run_id: numbers_of(client, run) for run in jobs} == before
    for run in jobs:
        assert run.info.status == "FINISHED"
        assert {"config.yaml", "predictions.png", "confusion_matrix.png", "model/model-0000.params"} <= set(
            artifact_paths(client, run.info.run_id))
