"""Determinism and `python -m mnist_logreg.reproduce` on real logged runs."""

import re
import hashlib
import shutil
import sqlite3
from pathlib import Path

import mxnet as mx
import pytest

from mnist_logreg import reproduce
from mnist_logreg.ml.data import locate
from mnist_logreg.tracking.fingerprint import config_hash, lock_hash
from mnist_logreg.ml.idx import read_idx, write_idx
from mnist_logreg.job import train
from mnist_logreg.tracking.tags import git_state
from conftest import ROOT, compose_cfg, numbers_of, run_cli, runs_of, store_uri

pytestmark = pytest.mark.slow


@pytest.fixture
def logged(tmp_path, mnist5k_root):
    """One run trained in-process on a private copy of the digits (which a test may alter)."""
    data = tmp_path / "data"
    shutil.copytree(mnist5k_root, data)
    cfg = compose_cfg("optim.lr=0.1", "trainer.epochs=2", f"data.root={data}", f"tracking.uri={store_uri(tmp_path)}")
    result = train(cfg)
    client, (run,) = runs_of(tmp_path)
    assert run.info.run_id == result["run_id"]
    return tmp_path, data, client, run, cfg


def test_same_seed_identical_in_one_process_other_seed_differs(tmp_path, mnist5k_root):
    uri = f"tracking.uri={store_uri(tmp_path)}"
    ids = [train(compose_cfg(f"seed={s}", "force=true", "trainer.epochs=2", f"data.root={mnist5k_root}", uri))["run_id"]
           for s in (1, 1, 2)]
    client, _ = runs_of(tmp_path)
    first, second, other = (numbers_of(client, client.get_run(i)) for i in ids)
    assert first == second  # 1st and 2nd model of one process: every metric and the weights
    assert first["train_loss"] != other["train_loss"] and first["params.sha256"] != other["params.sha256"]


def test_fingerprint_is_logged(logged):
    folder, data, client, run, cfg = logged
    tags = run.data.tags
    assert tags["config.sha256"] == config_hash(cfg)
    assert tags["data.sha256"] == locate("mnist", str(data), "").digest()
    assert tags["uv.lock.sha256"] == lock_hash() == hashlib.sha256((ROOT / "uv.lock").read_bytes()).hexdigest()
    assert tags["git.commit"] == git_state()["git.commit"] and len(tags["git.commit"]) == 40
    assert tags["threads.OMP_NUM_THREADS"] and tags["threads.cpus"] and tags["cpu.model"]
    assert tags["command"] and tags["platform"] and len(tags["fingerprint"]) == 64
    # the weights' hash is the hash of the exported weights
    local = client.download_artifacts(run.info.run_id, "model/model-0000.params", str(folder / "dl"))
    params = mx.nd.load(local)
    h = hashlib.sha256()
    for name in sorted(params):
        arr = params[name].asnumpy()
        h.update(name.split(":", 1)[-1].split("_", 1)[-1].encode() + str(arr.shape).encode() + arr.tobytes())
    assert tags["params.sha256"] == h.hexdigest()
    reqs = client.download_artifacts(run.info.run_id, "environment/requirements.txt", str(folder / "dl"))
    assert "mxnet==1.9.1" in Path(reqs).read_text()


def test_reproduce_passes_and_links_the_new_run(logged, capsys):
    folder, _, client, run, _ = logged
    assert reproduce.main([run.info.run_id, "--tracking-uri", store_uri(folder)]) == 0
    out = capsys.readouterr().out
    assert "REPRODUCED" in out and "NOT REPRODUCED" not in out
    # A summary per metric (steps compared, largest difference), not every step; --full gives those.
    assert re.search(r"^train_loss +1\.\.2 +0 ", out, re.M) and "train_loss      2" not in out
    _, all_runs = runs_of(folder)
    (copy,) = [r for r in all_runs if r.data.tags.get("reproduces") == run.info.run_id]
    assert copy.info.run_name == f"reproduction of {run.info.run_name} ({run.info.run_id[:8]})"
    assert copy.data.tags["reproduction.verdict"] == "reproduced"
    assert copy.data.tags["params.sha256"] == run.data.tags["params.sha256"]
    assert copy.data.tags["mnist_logreg.role"] == "reproduction"


def test_changed_dataset_is_named(logged, capsys):
    folder, data, client, run, _ = logged
    path = data / "train-images-idx3-ubyte.gz"
    images = read_idx(path).copy()
    images[:, 10:18, 10:18] = 255 - images[:, 10:18, 10:18]
    write_idx(path, images)
    assert reproduce.main([run.info.run_id, "--tracking-uri", store_uri(folder)]) == 1
    out = capsys.readouterr().out
    assert "NOT REPRODUCED" in out and "data.sha256:" in out


def test_changed_param_is_named(logged, capsys):
    folder, _, client, run, _ = logged
    with sqlite3.connect(folder / "mlflow.db") as db:
        db.execute("UPDATE params SET value = '0.2' WHERE key = 'optim.lr' AND run_uuid = ?", (run.info.run_id,))
    assert reproduce.main([run.info.run_id, "--tracking-uri", store_uri(folder), "--full"]) == 1
    out = capsys.readouterr().out
    assert "config optim.lr: 0.1 -> 0.2" in out and "config.sha256:" in out
    assert re.search(r"^train_loss +2 ", out, re.M)  # --full: every metric at every step


def test_atol_decides_when_the_weights_differ(logged, capsys):
    """The original's stored weights are moved by 5e-7 in one place: only an atol above that passes."""
    folder, _, client, run, _ = logged
    stored = Path(client.get_run(run.info.run_id).info.artifact_uri.removeprefix("file://")) / "model" / "model-0000.params"
    params = mx.nd.load(str(stored))
    weight = next(k for k in params if k.endswith("weight"))
    params[weight][0, 0] += 5e-7
    mx.nd.save(str(stored), params)
    with sqlite3.connect(folder / "mlflow.db") as db:
        db.execute("UPDATE tags SET value = 'changed' WHERE key = 'params.sha256' AND run_uuid = ?", (run.info.run_id,))
    uri = store_uri(folder)
    assert reproduce.main([run.info.run_id, "--tracking-uri", uri]) == 1
    assert reproduce.main([run.info.run_id, "--tracking-uri", uri, "--atol", "1e-7"]) == 1
    assert reproduce.main([run.info.run_id, "--tracking-uri", uri, "--atol", "1e-6"]) == 0
    out = capsys.readouterr().out
    assert out.count("NOT REPRODUCED") == 2 and "atol=1e-06" in out


def test_unknown_run_id_through_python_m(tmp_path, logged):
    folder = logged[0]
    proc = run_cli(["0123456789abcdef0123456789abcdef"], cwd=folder, module="mnist_logreg.reproduce")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("Error: run 0123456789abcdef0123456789abcdef: no such run in sqlite:")
    assert "Traceback" not in proc.stderr


def test_a_unique_prefix_names_a_run_and_an_ambiguous_one_lists_the_candidates(logged, capsys, monkeypatch):
    import uuid

    from mnist_logreg.errors import ConfigError
    from mnist_logreg.tracking.queries import run_by_id

    folder, _, client, run, _ = logged
    assert reproduce.main([run.info.run_id[:8], "--tracking-uri", store_uri(folder)]) == 0  # as the tables print it
    assert f"run {run.info.run_id} (" in capsys.readouterr().out
    # Two runs whose ids share their first 7 hex digits (the store draws ids with uuid4).
    shared = run.info.run_id[:7]
    made = iter([uuid.UUID(shared + "0" * 25), uuid.UUID(shared + "f" * 25)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(made))
    twins = [client.create_run(run.info.experiment_id).info.run_id for _ in range(2)]
    monkeypatch.undo()
    assert all(t.startswith(shared) for t in twins)
    with pytest.raises(ConfigError) as err:
        run_by_id(client, shared, f"run {shared}", store_uri(folder))
    assert str(err.value).startswith(f"run {shared}: 3 runs begin with {shared}: ") and all(
        t in str(err.value) for t in [run.info.run_id, *twins])
    assert run_by_id(client, twins[1][:12], "x", "y").info.run_id == twins[1]  # more digits tell them apart
    proc = run_cli([shared, "--tracking-uri", store_uri(folder)], cwd=folder, module="mnist_logreg.reproduce")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "give more of the id" in proc.stderr


