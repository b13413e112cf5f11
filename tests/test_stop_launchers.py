"""A stop under every local launcher: a terminal's Ctrl-C to the whole process group, or SIGTERM to the
launching process alone, mid-training, is prompt and leaves every run whole."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, artifact_paths, history, jobs_and_parents

pytestmark = pytest.mark.slow

# The stacked launch hands its records to the record writer (a launch this small would not by default).
LAUNCHERS = {"stacked": ["hydra.launcher.record_writer=true"], "basic": ["hydra/launcher=basic"],
             "local": ["hydra/launcher=local"], "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]}


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


@pytest.mark.parametrize("how", ["ctrl-c to the group", "sigterm to the launcher"])
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_stop_under_every_local_launcher_is_prompt_and_leaves_every_run_whole(tmp_path, mnist5k_root, launcher,
                                                                                 how):
    """A terminal's Ctrl-C (SIGINT to the whole process group) or SIGTERM to the launching process alone
    (timeout, a scheduler), mid-training: every process of the sweep gone within 10 s, every run ended
    KILLED by its own process with its metrics and last checkpoint, the parent KILLED, one line."""
    args = ["-m", *LAUNCHERS[launcher], "optim.lr=0.1,0.5", "trainer.epochs=1000", "data.batch_size=500",
            f"data.root={mnist5k_root}"]
    env = {**os.environ, "MNIST_LOGREG_CACHE": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    out_file = tmp_path / "out.txt"
    with open(out_file, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    training = 1 if launcher == "basic" else 2  # jobs training at once
    deadline = time.monotonic() + 120
    while True:  # every job's own log (in its job folder, whichever process runs it) shows epoch 2
        logs = [p.read_text() for p in tmp_path.glob("outputs/sweeps/*/*/*/run.log")]
        if sum(bool(re.search(r"epoch +2/1000", text)) for text in logs) >= training:
            break
        assert proc.poll() is None and time.monotonic() < deadline, out_file.read_text()[-3000:]
        time.sleep(0.2)
    t0 = time.monotonic()
    if how == "ctrl-c to the group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    while _group_alive(proc.pid) and time.monotonic() - t0 < 30:
        time.sleep(0.1)
    stopped_in = time.monotonic() - t0
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{launcher}, {how}: still running 60 s after the signal:\n{out_file.read_text()[-3000:]}")
    output = out_file.read_text()
    sig = signal.SIGINT if how == "ctrl-c to the group" else signal.SIGTERM
    assert proc.returncode == 128 + sig, output[-3000:]
    assert stopped_in <= 10, f"{launcher}, {how}: processes left {stopped_in:.1f}s after the signal"
    assert "Traceback" not in output and output.count(f"Stopped by {sig.name}") == 1, output[-3000:]
    assert "left RUNNING" not in output  # every run was ended by its own process
    client, jobs, parents = jobs_and_parents(tmp_path)
    assert parents[0].info.status == "KILLED" and len(jobs) == training
    for run in jobs:
        assert run.info.status == "KILLED"
        assert len(history(client, run.info.run_id, "train_loss")) >= 2
        assert any(p.startswith("checkpoint/") for p in artifact_paths(client, run.info.run_id))
