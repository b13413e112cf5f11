"""The launching process's pure logic, in-process with real objects: which jobs stack together
(configs composed by Hydra, prepared against a real SQLite store), how stacks are cut, how a job's
signals wait for its MLflow writes, and how runs left RUNNING by dead processes are ended."""

import os
import signal
import time

import pytest

from mnist_logreg.lifecycle.prepare import prepare
from mnist_logreg.lifecycle.signals import JobSignals
from mnist_logreg.lifecycle.train import stack_key
from mnist_logreg.sweep.launcher import job_numbers, plan_stacks
from mnist_logreg.sweep.stopping import end_orphaned_runs
from mnist_logreg.tracking.store import client_for, ensure_experiment
from mnist_logreg.tracking.tags import TAG_FAILURE, TAG_PARENT, TAG_ROLE
from conftest import compose_cfg


def test_plan_stacks_groups_equal_keys_in_first_seen_order_and_cuts_at_max_stack():
    keys = ["a", None, "b", "a", "a", None, "b", "a", "c"]
    assert plan_stacks(keys, 32) == [[0, 3, 4, 7], [2, 6], [8]]
    assert plan_stacks(keys, 3) == [[0, 3, 4], [7], [2, 6], [8]]
    assert plan_stacks(keys, 1) == [[0], [3], [4], [7], [2], [6], [8]]
    assert plan_stacks([None, None], 4) == []
    assert plan_stacks(list(range(70)), 32) == [[i] for i in range(70)]


def test_job_numbers_reads_as_ranges():
    assert job_numbers(list(range(32))) == "#0..#31"
    assert job_numbers([0, 1]) == "#0, #1"
    assert job_numbers([0, 1, 2, 5, 7, 8, 9, 10]) == "#0..#2, #5, #7..#10"
    assert job_numbers([4]) == "#4"


def test_stack_key_stacks_what_shares_a_batch_stream_and_only_that(tmp_path, mnist5k_root):
    base = [f"data.root={mnist5k_root}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "data.batch_size=96"]
    points = {
        "lr": ["optim.lr=0.5"], "sigma": ["model.sigma=0.1"], "wd": ["optim.wd=0.001"],
        "lr+sigma+wd": ["optim.lr=0.05", "model.sigma=0.01", "optim.wd=0.01"],
        "batch": ["data.batch_size=128"], "seed": ["seed=3"], "epochs": ["trainer.epochs=4"],
        "momentum": ["optim.momentum=0.9"], "momentum2": ["optim.momentum=0.9", "optim.lr=0.5"],
        "eval": ["trainer.eval_batch_size=500"], "default": [],
    }
    keys = {name: stack_key(prepare(compose_cfg(*base, *extra))) for name, extra in points.items()}
    same = {n for n in keys if keys[n] == keys["default"]}
    assert same == {"default", "lr", "sigma", "wd", "lr+sigma+wd"}
    assert keys["momentum"] == keys["momentum2"] != keys["default"]
    assert len({keys[n] for n in ("batch", "seed", "epochs", "momentum", "eval", "default")}) == 6
    names = list(points)
    stacks = plan_stacks([keys[n] for n in names], 32)
    assert [[names[i] for i in s] for s in stacks] == [
        ["lr", "sigma", "wd", "lr+sigma+wd", "default"], ["batch"], ["seed"], ["epochs"], ["momentum", "momentum2"],
        ["eval"]]


def _deliver(sig):
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler in the main thread between bytecodes


def test_a_signal_inside_a_write_takes_effect_once_the_write_is_done():
    before = signal.getsignal(signal.SIGTERM)
    signals, written = JobSignals(), []
    with signals.installed():
        with pytest.raises(KeyboardInterrupt):
            with signals.deferred():
                with signals.deferred():  # nested writes: the stop waits for the outermost
                    _deliver(signal.SIGTERM)
                    written.append("inner")
                written.append("outer")
        assert written == ["inner", "outer"] and signals.stopping
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_outside_a_write_a_signal_stops_at_once_then_sigterm_passes_and_a_second_ctrl_c_stops():
    signals = JobSignals()
    with signals.installed():
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)
            raise AssertionError("not stopped")
        assert signals.stopping
        _deliver(signal.SIGTERM)  # the launching process asking for the stop under way: let pass
        with signals.deferred():
            _deliver(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)  # the user's second Ctrl-C
            raise AssertionError("not stopped")


def test_a_signal_that_finds_a_finaliser_waits_for_the_training_loops_check(capfd):
    """Python swallows what a finaliser raises: a stop begun inside one would be lost (the stack trained on).
    It waits instead, unseen, until check() between epochs raises it."""
    signals = JobSignals()

    class Freed:
        def __del__(self):
            _deliver(signal.SIGINT)

    with signals.installed():
        Freed()  # freed at once, its finaliser run where the handler then runs
        assert not signals.stopping
        with pytest.raises(KeyboardInterrupt, match="signal 2"):
            signals.check()
            raise AssertionError("not stopped")
        assert signals.stopping
        with pytest.raises(KeyboardInterrupt, match="signal 2"):  # and a stop that was swallowed after all
            signals.check()
    assert "Exception ignored" not in capfd.readouterr().err


def test_the_launching_processs_stop_that_finds_a_finaliser_is_heard_again_once_it_returns(capfd):
    """The launching process of a worker launcher has no epoch loop: a signal that finds a finaliser is sent
    again, and the stop (its workers told first, once) then raises where the sweep waits."""
    from mnist_logreg.sweep.stopping import install

    told = []
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    class Freed:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        install(told.append)
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            Freed()
            for _ in range(100):  # the launcher waiting for its workers
                time.sleep(0.01)
            raise AssertionError("the stop was lost")
        assert told == [signal.SIGTERM]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert "Exception ignored" not in capfd.readouterr().err


def test_runs_left_running_by_dead_processes_end_killed_or_failed(tmp_path):
    client = client_for(f"sqlite:///{tmp_path}/mlflow.db")
    exp = ensure_experiment(client, "orphans", None)
    parent = client.create_run(exp, tags={TAG_ROLE: "sweep"}).info.run_id
    other = client.create_run(exp, tags={TAG_ROLE: "sweep"}).info.run_id

    def job(status, under=parent):
        run = client.create_run(exp, tags={TAG_ROLE: "job", TAG_PARENT: under}).info.run_id
        if status != "RUNNING":
            client.set_terminated(run, status)
        return run

    running, finished, killed, elsewhere = job("RUNNING"), job("FINISHED"), job("KILLED"), job("RUNNING", other)
    second = job("RUNNING")
    assert end_orphaned_runs(client, exp, parent, interrupted=False) == 2
    for run in (running, second):
        info = client.get_run(run)
        assert info.info.status == "FAILED" and "process died" in info.data.tags[TAG_FAILURE]
    assert client.get_run(finished).info.status == "FINISHED" and client.get_run(killed).info.status == "KILLED"
    assert client.get_run(elsewhere).info.status == "RUNNING"  # another sweep's run is not this one's
    assert end_orphaned_runs(client, exp, other, interrupted=True) == 1
    assert client.get_run(elsewhere).info.status == "KILLED" and TAG_FAILURE not in client.get_run(elsewhere).data.tags
    assert end_orphaned_runs(client, exp, parent, interrupted=True) == 0


def test_one_read_of_the_store_tells_which_points_have_runs_as_mlflows_own_search_does(tmp_path):
    """The sweep-wide lookup (one SQL query of MLflow's tables) against MLflow's search per point:
    every point with a job run is found, in any status; a deleted run, another experiment's or
    another fingerprint's is not; a server's store is not read so (None)."""
    from mnist_logreg.tracking.queries import fingerprints_with_runs, runs_with_fingerprint

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    exp, other = ensure_experiment(client, "points", None), ensure_experiment(client, "elsewhere", None)

    def run(fingerprint, status="FINISHED", where=exp):
        made = client.create_run(where, tags={TAG_ROLE: "job", "fingerprint": fingerprint}).info.run_id
        if status != "RUNNING":
            client.set_terminated(made, status)
        return made

    run("a"), run("b", "KILLED"), run("c", "RUNNING"), run("b"), run("e", where=other)
    client.delete_run(run("d"))
    points = {"a", "b", "c", "d", "e", "f"}
    found = fingerprints_with_runs(uri, exp, points)
    assert found == {fp for fp in points if runs_with_fingerprint(client, exp, fp)} == {"a", "b", "c"}
    assert fingerprints_with_runs(uri, other, points) == {"e"}
    assert fingerprints_with_runs(uri, exp, {f"x{i}" for i in range(1200)} | {"a"}) == {"a"}  # in chunks
    assert fingerprints_with_runs("http://127.0.0.1:5000", exp, points) is None


def test_a_running_run_whose_holder_is_alive_is_not_an_orphan(tmp_path):
    import socket
    import subprocess

    from mnist_logreg.lifecycle.lease import PID, START, HOST, process_start

    client = client_for(f"sqlite:///{tmp_path}/mlflow.db")
    exp = ensure_experiment(client, "held", None)
    parent = client.create_run(exp, tags={TAG_ROLE: "sweep"}).info.run_id
    holder = subprocess.Popen(["sleep", "30"])
    try:
        held = client.create_run(exp, tags={TAG_ROLE: "job", TAG_PARENT: parent, HOST: socket.gethostname(),
                                            PID: str(holder.pid), START: process_start(holder.pid)}).info.run_id
        reused_pid = client.create_run(exp, tags={TAG_ROLE: "job", TAG_PARENT: parent, HOST: socket.gethostname(),
                                                  PID: str(holder.pid), START: "1"}).info.run_id  # another process
        assert end_orphaned_runs(client, exp, parent, interrupted=True) == 1
        assert client.get_run(held).info.status == "RUNNING"
        assert client.get_run(reused_pid).info.status == "KILLED"
    finally:
        holder.kill()
        holder.wait()
    assert end_orphaned_runs(client, exp, parent, interrupted=True) == 1  # its holder is gone now
    assert client.get_run(held).info.status == "KILLED"


def test_a_job_config_copied_from_an_earlier_job_equals_the_one_hydra_composes():
    """SweepComposer against Hydra's own load_sweep_config, job by job, on a real config loader: plain
    value changes (copied), config groups, additions, deletions, strings and nulls (composed)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from conftest import ROOT
    from mnist_logreg.sweep.launcher import SweepComposer

    os.environ.setdefault("MNIST_LOGREG_ROOT", str(ROOT))
    setup_globals()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(ROOT / "conf")))
    master = loader.load_configuration(
        "config", ["tracking.uri=sqlite:////tmp/mlflow.db", "hydra.job.config.override_dirname.exclude_keys=[seed]"],
        run_mode=RunMode.MULTIRUN)
    jobs = [
        ["optim.lr=0.05", "model.sigma=0.01", "seed=1"], ["optim.lr=0.1", "model.sigma=0.01", "seed=1"],
        ["optim.lr=0.5", "model.sigma=1e-3", "seed=2"], ["optim.lr='0.5'", "model.sigma=0.5", "seed=2"],
        ["optim.lr=0.05", "model.sigma=null", "seed=3"],
        ["data=fashion_mnist", "optim.lr=0.1"], ["data=fashion_mnist", "optim.lr=0.3"], ["data=mnist", "optim.lr=0.3"],
        ["experiments=grid", "optim.lr=0.2"], ["experiments=grid", "optim.lr=0.4"],
        ["+extra=1", "optim.lr=0.1"], ["+extra=2", "optim.lr=0.1"], ["~optim.wd", "optim.lr=0.1"],
        ["data.batch_size=32", "trainer.epochs=3"], ["data.batch_size=128", "trainer.epochs=4"],
        ["optim.lr=0.1", "trainer=default"], ["optim.lr=0.2", "trainer=default"],
    ]
    composer = SweepComposer(loader.load_sweep_config)
    saved = HydraConfig.instance().cfg  # set below to resolve ${hydra:...}; later tests of this worker need it back
    try:
        for overrides in jobs:
            fast = composer.load_sweep_config(master, overrides)
            hydra = loader.load_sweep_config(master, overrides)
            assert OmegaConf.to_container(fast) == OmegaConf.to_container(hydra), overrides
            app = [k for k in hydra if k != "hydra"]
            HydraConfig.instance().set_config(hydra)
            assert (OmegaConf.to_container(OmegaConf.masked_copy(fast, app), resolve=True)
                    == OmegaConf.to_container(OmegaConf.masked_copy(hydra, app), resolve=True)), overrides
    finally:
        HydraConfig.instance().cfg = saved
    # The copies were copies: all but the first of each shape (7 shapes; the rest copied).
    assert len(composer.templates) == 9


def _nodes(node, path: str = "", out: list | None = None) -> list:
    """Every node of a config, as what a copy must keep of it: its path, class, ref and object types,
    key, optionality, flags, resolver cache, whether it has a parent, and a leaf's value."""
    from omegaconf import Container, DictConfig

    out = [] if out is None else out
    meta = node._metadata
    out.append((path, type(node).__name__, meta.ref_type, getattr(meta, "object_type", None), meta.key, meta.optional,
                dict(meta.flags or {}), meta.flags_root, dict(getattr(meta, "resolver_cache", None) or {}),
                node._get_parent() is not None, None if isinstance(node, Container) else node._value()))
    if isinstance(node, Container) and not (node._is_none() or node._is_missing() or node._is_interpolation()):
        content = node.__dict__["_content"]
        for key, child in (content.items() if isinstance(node, DictConfig) else enumerate(content)):
            _nodes(child, f"{path}.{key}", out)
    return out


def test_the_launchers_run_job_leaves_what_hydras_own_leaves(tmp_path):
    """The stacked launcher's run_job (fewer copies of the config, its YAML emitted by libyaml) against
    Hydra's, on the same jobs in the same folder: what the task saw (its config and flags, HydraConfig,
    the working folder), the JobReturn, and the three .hydra/ files, byte for byte; with
    hydra.job.chdir false and true, and strings YAML must quote, fold or escape."""
    import shutil

    from hydra._internal.callbacks import Callbacks
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core import utils
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals
    from hydra.types import HydraContext, RunMode
    from omegaconf import OmegaConf, open_dict

    from conftest import ROOT
    from mnist_logreg.sweep import launcher

    os.environ.setdefault("MNIST_LOGREG_ROOT", str(ROOT))
    setup_globals()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(ROOT / "conf")))
    master = loader.load_configuration(
        "config", ["tracking.uri=sqlite:////tmp/mlflow.db", f"hydra.sweep.dir={tmp_path}/sweep"],
        run_mode=RunMode.MULTIRUN)
    context = HydraContext(config_loader=loader, callbacks=Callbacks(master))
    saved, home = HydraConfig.instance().cfg, os.getcwd()

    def left_by(run_job, overrides: list[str], num: int) -> dict:
        config = loader.load_sweep_config(master, overrides)
        with open_dict(config):
            config.hydra.job.id = config.hydra.job.num = num
        seen = {}

        def task(cfg):
            seen.update(cfg=OmegaConf.to_yaml(cfg), struct=OmegaConf.is_struct(cfg), readonly=OmegaConf.is_readonly(cfg),
                        resolved=OmegaConf.to_yaml(cfg, resolve=True), hydra=OmegaConf.to_yaml(HydraConfig.get()),
                        cwd=os.getcwd(), nodes=_nodes(cfg), hydra_nodes=_nodes(HydraConfig.instance().cfg),
                        hydra_parent=HydraConfig.get()._get_parent() is config)
            return 42

        ret = run_job(hydra_context=context, task_function=task, config=config, job_dir_key="hydra.sweep.dir",
                      job_subdir_key="hydra.sweep.subdir")
        folder = tmp_path / "sweep" / str(num) / ".hydra"
        files = {f.name: f.read_text() for f in sorted(folder.iterdir())}
        shutil.rmtree(tmp_path / "sweep")
        return dict(seen=seen, files=files, cfg=OmegaConf.to_yaml(ret.cfg), hydra_cfg=OmegaConf.to_yaml(ret.hydra_cfg),
                    overrides=ret.overrides, status=ret.status, value=ret.return_value, task_name=ret.task_name,
                    working_dir=ret.working_dir, struct=OmegaConf.is_struct(ret.cfg), after=os.getcwd(),
                    output_dir=HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None)

    try:
        tricky = ["+note='a: b # not a comment, 1e5, ümlaut, \"quoted\" and " + "long " * 30 + "'", "+flag='true'",
                  "+num='0.5'", "+empty=''", "+multi=[1,'x y',null]"]
        for num, overrides in enumerate([["optim.lr=0.05", "model.sigma=0.01"], ["data=fashion_mnist", "optim.lr=0.1"],
                                         ["optim.lr=0.5", "hydra.job.chdir=true"], tricky]):
            HydraConfig.instance().cfg = saved
            theirs = left_by(utils.run_job, overrides, num)
            HydraConfig.instance().cfg = saved
            ours = left_by(launcher.run_job, overrides, num)
            assert ours == theirs, overrides
            assert theirs["files"]["overrides.yaml"].count("+" if overrides is tricky else "optim.lr") == len(
                tricky) if overrides is tricky else 1
            assert theirs["seen"]["cwd"] == (str(tmp_path / "sweep" / str(num)) if "hydra.job.chdir=true" in overrides
                                             else home)
    finally:
        HydraConfig.instance().cfg = saved
        os.chdir(home)
