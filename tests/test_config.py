"""Composing the config with Hydra, checking every value, and flattening it for MLflow."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from mnist_logreg.config import flatten, redact, validate
from mnist_logreg.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _root_env(monkeypatch):
    monkeypatch.setenv("MNIST_LOGREG_ROOT", str(ROOT))


def make_cfg(*overrides: str):
    # ${hydra:runtime.cwd} resolves only inside a Hydra job: pin the store.
    overrides = ("tracking.uri=sqlite:////tmp/mlflow.db", *overrides)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_defaults_are_the_tutorials():
    cfg = make_cfg()
    validate(cfg)
    assert cfg.optim.lr == 0.1 and cfg.data.batch_size == 64 and cfg.model.sigma == 1.0
    assert cfg.trainer.epochs == 10 and cfg.context.device == "cpu" and cfg.data.name == "mnist"
    assert cfg.tracking.experiment == "mnist_logreg" and isinstance(cfg.seed, int)


def test_groups_switch_dataset_and_context():
    cfg = make_cfg("data=fashion_mnist", "context=gpu", "context.index=1")
    assert cfg.data.name == "fashion_mnist" and "/usr/share/datasets/fashion-mnist" in cfg.data.search
    assert cfg.context.device == "gpu" and cfg.context.index == 1


def test_default_data_root_is_a_cache_folder():
    cfg = make_cfg()
    assert cfg.data.root is None
    assert cfg.data.cache.endswith("/mnist") and ".cache/mnist_logreg" in cfg.data.cache


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-0.5", "optim.lr"),
        ("optim.lr=abc", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.batch_size=6.5", "data.batch_size"),
        ("data.batch_size=true", "data.batch_size"),
        ("model.sigma=0", "model.sigma"),
        ("model.sigma=-1", "model.sigma"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("trainer.epochs=2.5", "trainer.epochs"),
        ("context.device=tpu", "context.device"),
        ("optim.momentum=1.5", "optim.momentum"),
        ("seed=-3", "seed"),
    ],
)
def test_bad_values_are_named_with_what_is_allowed(override, key):
    cfg = make_cfg(override)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    value = override.split("=", 1)[1]
    assert message.startswith(f"{key}=") and value.lower() in message.lower() and "must be" in message
    assert "\n" not in message


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigCompositionException):
        make_cfg("optim.learning_rate=0.1")


def test_unknown_group_option_is_an_error():
    with pytest.raises(ConfigCompositionException):
        make_cfg("context=tpu")


def test_flatten_gives_dotted_keys_of_the_resolved_config():
    flat = flatten(make_cfg("optim.lr=0.05"))
    assert flat["optim.lr"] == "0.05" and flat["data.batch_size"] == "64" and flat["model.sigma"] == "1.0"
    assert flat["seed"] == "42" and flat["context.device"] == "cpu"
    assert flat["data.mirrors"].startswith('["https://')
    assert "${" not in "".join(flat.values())


def test_passwords_in_uris_are_hidden():
    assert redact("postgresql://bob:s3cret@db:5432/x") == "postgresql://bob:***@db:5432/x"
    flat = flatten({"tracking": {"uri": "http://alice:hunter2@127.0.0.1:5000"}})
    assert "hunter2" not in flat["tracking.uri"]


def test_settings_that_do_not_change_the_numbers_never_become_comparison_columns():
    import pandas as pd

    from mnist_logreg.analysis.compare import swept_axes

    runs = pd.DataFrame({"params.optim.lr": ["0.1", "0.5"], "params.force": ["False", "True"],
                         "params.data.root": ["/a", "/b"], "params.tracking.uri": ["x", "y"],
                         "params.resume": ["None", "abc"], "params.seed": ["1", "1"]})
    assert swept_axes(runs) == ["optim.lr"]


def test_known_keys_come_from_every_config_group():
    from mnist_logreg.config import known_keys

    keys = known_keys()
    assert {"optim.lr", "model.sigma", "data.batch_size", "trainer.epochs", "context.threads", "tracking.register",
            "seed", "force", "resume", "data.md5"} <= keys
    assert not any(k.startswith("hydra") for k in keys)


def test_learning_curves_of_a_large_sweep_are_drawn_by_axis(tmp_path):
    """Past 12 runs: a colour per value of the first axis, a panel per value of the second."""
    import pandas as pd

    from mnist_logreg.analysis.plots import plot_curves

    rows = [{"run_id": f"{i:032x}", "optim.lr": lr, "model.sigma": sigma, "test_acc": 0.5 + lr / 10 - sigma / 10}
            for i, (lr, sigma) in enumerate((lr, s) for lr in (0.01, 0.1, 0.5, 1.0) for s in (0.01, 0.1, 1.0, 2.0))]
    table = pd.DataFrame(rows)
    curves = {r["run_id"]: [(e, r["test_acc"] * e / 4) for e in range(5)] for r in rows}
    path = plot_curves(table, curves, tmp_path / "curves.png", ["optim.lr", "model.sigma"])
    from matplotlib.image import imread

    image = imread(path)
    assert image.shape[1] > 1.5 * image.shape[0]  # four panels side by side


@pytest.mark.parametrize("overrides", [
    (),
    ("data=fashion_mnist", "optim.wd=1e-05", "model.sigma=0.001", "data.root=null"),
    ("+note='a: b # not a comment, 1e5, ümlaut, \"quoted\" and " + "long " * 30 + "'", "+flag='true'", "+num='0.5'",
     "+empty=''", "+multi=[1,'x y',null]", "+nested={a: {b: '~'}}", "+octal='0777'", "+date='2024-01-01'",
     "+sci='1e5'", "+inf='.inf'"),
])
def test_a_runs_config_yaml_is_the_text_omegaconf_writes(overrides):
    """config.yaml of a run: the resolved config as OmegaConf.to_yaml writes it, made by libyaml
    (yaml_text) for a tenth of the time; strings YAML would read back as another type are quoted."""
    import yaml
    from omegaconf import OmegaConf

    from mnist_logreg.config import yaml_text

    resolved = OmegaConf.to_container(make_cfg(*overrides), resolve=True)
    text = yaml_text(resolved)
    assert text == OmegaConf.to_yaml(resolved)
    assert yaml.safe_load(text) == resolved
