"""The card's sweeps through run.py (conftest.card), shared by the tests that read them: the stacked launcher
(`-m`'s default) bit-identical to the basic one, what a sweep's runs record, relaunch, resume, reproduce."""

import re
import json
import os
import shutil
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from mnist_logreg.ml.data import load, locate
from mnist_logreg.errors import ConfigError

from mnist_logreg import reproduce
from mnist_logreg.job import train
from conftest import (CARD, artifact_paths, by_config, compose_cfg, history, jobs_and_parents, numbers_of, run_cli,
                      runs_of, store_uri)

pytestmark = pytest.mark.slow


def test_stacked_runs_equal_basic_runs_bit_for_bit(card):
    client_s, stacked, parents = by_config(card["stacked"])
    client_b, basic, _ = by_config(card["basic"])
    assert sorted(basic) == ["0.05", "0.1", "0.5"] and sorted(stacked) == ["0.05", "0.1", "0.5", "1e+38"]
    for lr, run in basic.items():
        assert numbers_of(client_s, stacked[lr]) == numbers_of(client_b, run), lr
        assert len(history(client_s, stacked[lr].info.run_id, "test_acc")) == 4  # steps 0..3
    # One stack of four at batch 96, and each run still has everything a lone job has.
    assert {r.data.tags["stack.group"] for r in stacked.values()} == {f"{parents[0].data.tags['sweep']}/1"}
    assert sorted(r.data.tags["stack.index"] for r in stacked.values()) == ["0", "1", "2", "3"]
    assert all(r.data.tags["stack.size"] == "4" for r in stacked.values())
    assert "stack.group" not in basic["0.1"].data.tags
    for lr in basic:
        run = stacked[lr]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {"config.yaml", "predictions.png", "confusion_matrix.png", "model/model-symbol.json",
                "model/model-0000.params", "hydra/config.yaml", "hydra/overrides.yaml",
                "environment/requirements.txt"} <= set(artifact_paths(client_s, run.info.run_id))
    assert parents[0].info.status == "FINISHED"
    jobs = sorted((card["stacked"] / "outputs" / "sweeps").glob("*/*/[0-9]"))
    assert len(jobs) == 8
    for folder in jobs:  # each job its own folder, Hydra record, log and checkpoint
        assert (folder / ".hydra" / "overrides.yaml").is_file()
        log = (folder / "run.log").read_text()
        assert "MLflow run" in log and ("epoch 3/3" in log or "mean training loss is" in log)


def test_diverging_member_fails_alone_in_its_stacks(card):
    client, jobs, _ = jobs_and_parents(card["stacked"])
    groups = {}
    for run in jobs:
        groups.setdefault(run.data.params["data.batch_size"], set()).add(run.data.tags["stack.group"])
    assert len(groups["96"]) == len(groups["500"]) == 1 and groups["96"] != groups["500"]
    for run in jobs:
        if run.data.params["optim.lr"] == "1e+38":
            assert run.info.status == "FAILED" and "non-finite" in run.data.tags["failure"]
            assert [s for s, _ in history(client, run.info.run_id, "test_acc")] == [0]  # what was logged stays
        else:
            assert run.info.status == "FINISHED"  # and, at batch 96, bit-identical to basic (test above)


def test_reproduce_a_stacked_run_at_atol_0(card, capsys):
    _, stacked, _ = by_config(card["stacked"])
    run_id = stacked["0.5"].info.run_id
    assert reproduce.main([run_id, "--tracking-uri", store_uri(card["stacked"])]) == 0
    out = capsys.readouterr().out
    assert "REPRODUCED" in out and "atol=0" in out


def test_relaunch_skips_finished_continues_failed_in_place_and_force(card, mnist5k_root, tmp_path):
    folder = tmp_path / "card"  # its own copy: the other tests read the card's store as it was made
    shutil.copytree(card["stacked"], folder)
    _, before, old_parents = jobs_and_parents(folder)
    proc = run_cli(["-m", "optim.lr=0.05,0.1,1e38,1.0", *CARD[1:], f"data.root={mnist5k_root}"], cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("skipped: run") == 2  # 0.05 and 0.1 were FINISHED
    client, jobs, parents = jobs_and_parents(folder)
    at_96 = sorted((r.data.params["optim.lr"], r.info.status) for r in jobs if r.data.params["data.batch_size"] == "96")
    # 1e38 FAILED before its first checkpoint: it trains again from the start, into its own run
    assert at_96 == [("0.05", "FINISHED"), ("0.1", "FINISHED"), ("0.5", "FINISHED"), ("1.0", "FINISHED"),
                     ("1e+38", "FAILED")]
    diverged = next(r for r in jobs if r.data.params["optim.lr"] == "1e+38" and r.data.params["data.batch_size"] == "96")
    assert [s for s, _ in history(client, diverged.info.run_id, "test_acc")] == [0]  # step 0 once, not twice
    assert len(jobs) == len(before) + 1  # 1.0 is new
    newest = max(parents, key=lambda r: r.info.start_time)
    assert len(parents) == len(old_parents) + 1  # another command, so another sweep
    assert {k.split(".", 1)[1]: v for k, v in newest.data.tags.items() if k.startswith("reused.")} == {
        **{r.info.run_id: "skipped" for r in jobs if r.data.params["optim.lr"] in ("0.05", "0.1")
           and r.data.params["data.batch_size"] == "96"}, diverged.info.run_id: "continued"}
    # The same points again: nothing to train, no new sweep, and the line says where the runs are.
    runs_before = len(runs_of(folder)[1])
    proc = run_cli(["-m", "optim.lr=0.05,0.1", *CARD[1:], f"data.root={mnist5k_root}"], cwd=folder)
    assert proc.returncode == 0 and "nothing to train: all 2 points have FINISHED runs already, in sweep" in proc.stdout
    assert "no new sweep was recorded" in proc.stdout and len(runs_of(folder)[1]) == runs_before
    # force=true trains a FINISHED point again (in-process, through the same phases)
    uri = store_uri(folder)
    again = train(compose_cfg("optim.lr=0.1", *CARD[1:], f"data.root={mnist5k_root}", f"tracking.uri={uri}",
                              "force=true"))
    assert again["status"] == "FINISHED"
    assert sum(r.data.params["optim.lr"] == "0.1" and r.data.params["data.batch_size"] == "96"
               for r in jobs_and_parents(folder)[1]) == 2


def test_a_sweeps_runs_record_everything(card, mnist5k_root, tmp_path):
    client, runs, parents = by_config(card["basic"])
    assert len(parents) == 1 and len(runs) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    default = client.get_experiment_by_name("Default")
    assert default is None or not client.search_runs([default.experiment_id])
    for run in runs.values():
        tags, params = run.data.tags, run.data.params
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["sweep"] == parent.data.tags["sweep"]
        assert params["data.batch_size"] == "96" and params["model.sigma"] == "1.0"
        assert params["trainer.epochs"] == "3" and params["seed"] == "42"
        assert params["data.root"] == str(mnist5k_root)
        for key in ("git.commit", "python.version", "mxnet.version", "numpy.version", "hydra.version",
                    "mlflow.version", "data.sha256", "hydra.overrides", "context"):
            assert tags.get(key), key
        assert tags["context"] == "cpu(0)"
        assert f"optim.lr={params['optim.lr']}" in tags["hydra.overrides"]
        assert [s for s, _ in history(client, run.info.run_id, "test_acc")] == [0, 1, 2, 3]
        assert [s for s, _ in history(client, run.info.run_id, "train_acc")] == [0, 1, 2, 3]
        for key in ("train_loss", "epoch_seconds", "eval_seconds", "examples_per_second"):
            assert [s for s, _ in history(client, run.info.run_id, key)] == [1, 2, 3], key
        accs = history(client, run.info.run_id, "test_acc")
        assert accs[0][1] < 0.3 and accs[-1][1] > accs[0][1] + 0.15  # chance before training, well above after
        assert {"config.yaml", "predictions.png", "confusion_matrix.png", "model/model-symbol.json",
                "model/model-0000.params", "hydra/config.yaml", "hydra/overrides.yaml",
                "hydra/hydra.yaml"} <= set(artifact_paths(client, run.info.run_id))

    # MLflow's own context tags (the UI's Created by and Source) and the dataset inputs
    for run in [*runs.values(), parent]:
        assert run.data.tags["mlflow.source.name"] == "run.py" and run.data.tags["mlflow.source.type"] == "LOCAL"
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.git.commit"] == run.data.tags["git.commit"]
    for run in runs.values():
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert sorted(inputs) == ["mnist/test", "mnist/train"]
        train_in = inputs["mnist/train"]
        assert json.loads(train_in.dataset.profile)["num_rows"] == 4000
        assert json.loads(train_in.dataset.source) == {"uri": str(mnist5k_root)}
        assert [t.value for t in train_in.tags] == ["train"] and len(train_in.dataset.digest) == 16
    found = client.search_runs([parent.info.experiment_id], "dataset.name = 'mnist/train'")
    assert {r.info.run_id for r in found} >= {r.info.run_id for r in runs.values()}  # filter by dataset
    # a direct link to every run, and to the sweep's parent, in the UI's Model-training view
    printed = (card["basic"] / "stdout.txt").read_text()
    eid = parent.info.experiment_id
    for run in [*runs.values(), parent]:
        assert f"http://127.0.0.1:5000/#/experiments/{eid}/runs/{run.info.run_id}?workflowType=machine_learning" in printed

    # The exported model reloads with SymbolBlock.imports and scores what the run logged.
    run = runs["0.5"]
    local = client.download_artifacts(run.info.run_id, "model", str(tmp_path / "dl"))
    net = mx.gluon.SymbolBlock.imports(f"{local}/model-symbol.json", ["data"], f"{local}/model-0000.params")
    _, test = load(locate("mnist", str(mnist5k_root), ""))
    pred = net(mx.nd.array(test.x)).argmax(axis=1).asnumpy()
    assert np.mean(pred == test.y) == pytest.approx(history(client, run.info.run_id, "test_acc")[-1][1])


def test_resume_refuses_a_finished_run(card):
    client, runs, _ = by_config(card["basic"])
    run_id = runs["0.1"].info.run_id
    with pytest.raises(ConfigError) as err:
        train(compose_cfg(f"resume={run_id}", f"tracking.uri={store_uri(card['basic'])}"))
    assert str(err.value) == f"resume={run_id}: the run is FINISHED; only KILLED or FAILED runs can be resumed"


def test_reproduce_a_whole_sweep_into_another_store(card, tmp_path, capsys):
    _, runs, parents = by_config(card["basic"])
    assert reproduce.main([parents[0].info.run_id, "--tracking-uri", store_uri(card["basic"]),
                           "--target-uri", store_uri(tmp_path)]) == 0
    assert "3 of 3 runs reproduced" in capsys.readouterr().out
    _, copies = runs_of(tmp_path)
    assert sorted(c.data.params["optim.lr"] for c in copies) == sorted(runs)


def _logged_model(client, run):
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run.info.run_id}'")
    return model


@pytest.mark.parametrize("sweep, lr", [("basic", "0.5"), ("stacked", "0.05"), ("stacked", "0.5")])
def test_the_logged_model_predicts_the_logged_test_accuracy(card, mnist5k_root, monkeypatch, sweep, lr):
    """Each run's logged model holds its own weights (a stack's runs share every other file of it)."""
    import mlflow

    client, runs, _ = by_config(card[sweep])
    run = runs[lr]
    model = _logged_model(client, run)
    assert str(model.status).endswith("READY")
    assert model.source_run_id == run.info.run_id
    assert {m.key for m in model.metrics} >= {"test_acc", "train_loss"}  # the run's metrics are linked to it
    assert model.model_id in [o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(card[sweep]))
    loaded = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    assert str(loaded.metadata.signature.inputs) == "[Tensor('float32', (-1, 784))]"
    assert loaded.metadata.signature.outputs.input_names()[-1] == "label"
    _, test = load(locate("mnist", str(mnist5k_root), ""))
    predicted = loaded.predict(test.x)
    assert np.allclose(predicted.filter(like="prob_").sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(predicted["label"].values == test.labels) == run.data.metrics["test_acc"]  # exactly


def test_mlflow_models_serve_scores_real_images(card, mnist5k_root, tmp_path):
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from mnist_logreg.services.tracking import free_port

    client, runs, _ = by_config(card["basic"])
    model = _logged_model(client, runs["0.5"])
    port = free_port()
    # MLflow starts the server as `uvicorn` from PATH: the venv's, also when the suite runs without `uv run`
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri(card["basic"]), "PATH": path}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{model.model_id}",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow models serve did not come up"
                time.sleep(0.5)
        _, test = load(locate("mnist", str(mnist5k_root), ""))
        pick = [0, 250, 500, 750, 999]  # one digit of several classes (the test split is sorted by class)
        body = json.dumps({"inputs": test.x[pick].tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            predictions = json.load(resp)["predictions"]
        served = [int(p["label"]) for p in predictions]
        assert len(served) == 5
        assert sum(s == t for s, t in zip(served, test.labels[pick])) >= 3  # a trained model, on real digits
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_compare_registers_the_best_run_of_a_sweep(card, capsys):
    from mnist_logreg import compare

    client, runs, parents = by_config(card["basic"])
    uri = store_uri(card["basic"])
    sweep = parents[0].data.tags["sweep"]
    assert compare.main(["--tracking-uri", uri, "--sweep", sweep, "--no-log", "--output",
                         str(card["basic"] / "cmp"), "--register", "mnist-best"]) == 0
    assert "registered mnist-best version 1" in capsys.readouterr().out
    best = max(runs.values(), key=lambda r: r.data.metrics["test_acc"])
    (found,) = client.search_model_versions("name = 'mnist-best'")
    version = client.get_model_version("mnist-best", found.version)
    assert version.run_id == best.info.run_id
    assert version.source == f"models:/{_logged_model(client, best).model_id}"
    assert version.tags == {"sweep": sweep, "test_acc": f"{best.data.metrics['test_acc']:.6g}"}


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser():
    """Headless Debian Chromium driven through chromedriver (.ci/run installs both)."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1500,950"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_mlflow_ui_shows_the_sweep_in_a_real_browser(card, browser, tmp_path):
    """`mlflow ui`'s Model-training view, as a person sees it: the sweep's parent run in the runs
    view, its jobs once expanded, and a job's page naming its parent run, dataset and logged model."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from mnist_logreg.tracking.links import experiment_url, run_url
    from mnist_logreg.services.tracking import MlflowServer

    client, runs, parents = by_config(card["basic"])
    parent, child = parents[0], runs["0.5"]
    sweep_name = parent.info.run_name
    with MlflowServer(store_uri(card["basic"]), tmp_path / "served") as server:
        wait = WebDriverWait(browser, 60)
        browser.get(experiment_url(server.url, parent.info.experiment_id))
        wait.until(lambda d: sweep_name in d.find_element(By.TAG_NAME, "body").text)
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "Model training" in body and "Run Name" in body and "Trace" not in body.split("Run Name")[1][:200]
        for close in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):  # the assistant panel
            close.click()
        # the + before the sweep's name shows its jobs
        name = browser.find_element(By.XPATH, f"//span[text()='{sweep_name}']")
        name.find_element(By.XPATH, "./ancestor::div[contains(@class,'ag-cell-wrapper')]//button").click()
        wait.until(lambda d: all(r.info.run_name[:20] in d.find_element(By.TAG_NAME, "body").text for r in runs.values()))
        shot = tmp_path / "mlflow_runs_view.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        if os.environ.get("MNIST_LOGREG_UPDATE_DOCS") == "1":  # the README's picture
            shutil.copy(shot, Path(__file__).resolve().parent.parent / "docs" / "mlflow_runs_view.png")

        # The README's click path to the jobs' test accuracy: the chart view (the second of the three
        # view buttons left of the search box), then `test_acc` in "Search metric charts".
        chart_view = browser.find_element(By.CSS_SELECTOR, "input[value='CHART']")
        browser.execute_script("arguments[0].click();", chart_view)
        search = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']"))
        search.send_keys("test_acc")
        legend = [f"{r.info.run_name} (test_acc)" for r in runs.values()]
        wait.until(lambda d: all(entry in d.find_element(By.TAG_NAME, "body").text for entry in legend))
        charts = browser.find_element(By.TAG_NAME, "body").text.split("Search", 1)[-1]
        assert "Model metrics\n(1)\ntest_acc" in charts and "epoch_seconds" not in charts  # one chart: test_acc
        shot = tmp_path / "mlflow_test_acc_chart.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("MNIST_LOGREG_UPDATE_DOCS") == "1":
            shutil.copy(shot, Path(__file__).resolve().parent.parent / "docs" / "mlflow_test_acc_chart.png")

        browser.get(run_url(server.url, child.info.experiment_id, child.info.run_id))
        wait.until(lambda d: "Parent run" in d.find_element(By.TAG_NAME, "body").text)
        wait.until(lambda d: "classifier" in d.find_element(By.TAG_NAME, "body").text)
        page = browser.find_element(By.TAG_NAME, "body").text
        after = page.split("Parent run", 1)[1]
        assert after.lstrip().startswith(sweep_name)  # names its parent run
        assert "mnist/train" in page  # its dataset
        assert "classifier" in page and "Ready" in page  # its logged model
        assert "run.py" in page  # its source
        (tmp_path / "child_page.txt").write_text(page)


@pytest.mark.parametrize("launcher", ["stacked", "basic"])
def test_a_sweeps_console_is_the_harness_lines_only(card, launcher):
    """No MLflow warnings, INFO lines or progress bars: every line is the harness's (a log line,
    or the comparison table at the end)."""
    stdout, stderr = ((card[launcher] / name).read_text() for name in ("stdout.txt", "stderr.txt"))
    assert stderr == ""
    table = re.compile(r"^ *run_id |^[0-9a-f]{8} |^\(plots in |^python run\.py -m ")  # the table, the seeds hint
    foreign = [line for line in stdout.splitlines() if not line.startswith("[20") and not table.match(line)]
    assert not foreign, foreign[:5]
    for noise in ("WARNING mlflow", "INFO mlflow", "Downloading artifacts", "UserWarning", "CloudPickle", "pip version"):
        assert noise not in stdout


def test_with_a_validation_split_a_stack_equals_lone_training_and_logs_val_acc(tmp_path, mnist5k_root):
    from mnist_logreg.job import train

    from conftest import compose_cfg, numbers_of, runs_of, run_cli, store_uri

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    proc = run_cli(["-m", "optim.lr=0.1,0.5", "data.val_size=1000", "trainer.epochs=2", "data.batch_size=96",
                    f"data.root={mnist5k_root}"], cwd=sweep)
    assert proc.returncode == 0, proc.stderr
    assert "sorted by final val_acc (the held-out validation split" in proc.stdout
    client, jobs, _ = jobs_and_parents(sweep)
    run = next(r for r in jobs if r.data.params["optim.lr"] == "0.5")
    assert [s for s, _ in history(client, run.info.run_id, "val_acc")] == [0, 1, 2]
    inputs = {i.dataset.name: json.loads(i.dataset.profile)["num_rows"] for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert inputs == {"mnist/train": 3000, "mnist/test": 1000, "mnist/val": 1000}
    alone = train(compose_cfg("optim.lr=0.5", "data.val_size=1000", "trainer.epochs=2", "data.batch_size=96",
                              f"data.root={mnist5k_root}", f"tracking.uri={store_uri(tmp_path)}"))
    mine = runs_of(tmp_path)[0]
    assert numbers_of(client, run) == numbers_of(mine, mine.get_run(alone["run_id"]))
