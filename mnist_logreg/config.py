"""A composed config: its checks before anything trains, its flat form for MLflow params, its secrets hidden."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import ConfigError

CONTEXTS = ("cpu", "gpu")
# The keys that never change a run's numbers: where things are (the store, data folders, mirrors),
# what to do with existing runs (force, resume) and which search trial a run is (search). They are
# left out of the config hash (so a run moved to another store, or met again by a continued study,
# still matches its original), of run names, of reproduce's diff and of the comparison's columns.
NEUTRAL_KEYS = ("tracking", "data.root", "data.cache", "data.search", "data.mirrors", "data.md5",
                "data.download_timeout", "force", "resume", "search")


def override_key(override: str) -> str:
    """The key a command-line override sets (`+a.b=1` and `~a.b` set `a.b`)."""
    return override.split("=", 1)[0].lstrip("+~")


def is_under(key: str, prefixes) -> bool:
    """Whether key is one of prefixes or below one of them (`data.root.x` is under `data.root`)."""
    return any(key == k or key.startswith(f"{k}.") for k in prefixes)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


# key -> (check, what is allowed). Every key listed must be present in the composed config.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "optim.lr": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "optim.momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optim.wd": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "data.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "data.val_size": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (training examples held out)"),
    "data.val_seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "data.name": (_nonempty_str, "a dataset name"),
    "data.root": (lambda v: v is None or _nonempty_str(v), "null or a folder path"),
    "data.download_timeout": (lambda v: _is_number(v) and v > 0, "a number of seconds > 0"),
    "model.sigma": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "model.num_outputs": (lambda v: _is_int(v) and v >= 10, "an integer >= 10"),
    "trainer.epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "trainer.eval_batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "trainer.stop_on_nonfinite": (lambda v: isinstance(v, bool), "true or false"),
    "context.device": (lambda v: v in CONTEXTS, f"one of {', '.join(CONTEXTS)} (context=cpu or context=gpu)"),
    "context.index": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "context.threads": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
    "force": (lambda v: isinstance(v, bool), "true or false"),
    "resume": (lambda v: v is None or _nonempty_str(v), "null or the id of a KILLED or FAILED run"),
    "tracking.uri": (_nonempty_str, "a tracking URI such as sqlite:///mlflow.db"),
    "tracking.experiment": (_nonempty_str, "a non-empty experiment name"),
}


def check_value(key: str, value: Any) -> None:
    """Raise ConfigError when value is not allowed for key (keys without a rule pass)."""
    rule = RULES.get(key)
    if rule is None or rule[0](value):
        return
    if isinstance(value, (list, tuple, ListConfig)) and value:  # -m optim.lr=[0.05,0.1]
        listed = ",".join(str(v) for v in value)
        raise ConfigError(f"{key}={value!r} is a list, and {key} must be {rule[1]}: to sweep it, "
                          f"write -m {key}={listed} (no brackets, no spaces)")
    raise ConfigError(f"{key}={value!r} is not allowed: {key} must be {rule[1]}")


# Config values that are mappings of the user's own names (a file name -> its md5): any key below
# them is theirs to add.
OPEN_MAPPINGS = ("data.md5",)


def _conf_dir() -> Path:
    from .project import PROJECT_ROOT

    return Path(os.environ.get("MNIST_LOGREG_ROOT") or PROJECT_ROOT) / "conf"


@functools.lru_cache(maxsize=4)
def known_keys(conf_dir: Path | None = None) -> frozenset[str]:
    """Every config key the harness reads: the top level of conf/config.yaml and every key of every
    option of its config groups (hydra's own keys aside). Empty where conf/ is not there."""
    import yaml

    conf_dir = conf_dir or _conf_dir()
    keys: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            keys.add(name)
            if isinstance(value, dict) and name not in OPEN_MAPPINGS:
                walk(value, f"{name}.")

    if not (conf_dir / "config.yaml").is_file():
        return frozenset()
    top = yaml.safe_load((conf_dir / "config.yaml").read_text()) or {}
    walk({k: v for k, v in top.items() if k not in ("defaults", "hydra")}, "")
    for group in sorted(p for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra"):
        keys.add(group.name)
        for option in group.glob("*.yaml"):
            walk(yaml.safe_load(option.read_text()) or {}, f"{group.name}.")
    return frozenset(keys)


def unknown_key_error(key: str) -> ConfigError:
    """The one line for a key no config group defines, with the nearest known key."""
    import difflib

    known = known_keys()
    near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}?" if near else "python run.py --cfg job lists every key"
    return ConfigError(f"{key} is not a config key of mnist_logreg ({hint}); nothing was run")


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse a key that no config group defines, however it got in (`+model.sgima=0.5` included)."""
    known = known_keys()
    if not known:
        return
    container = OmegaConf.to_container(cfg, resolve=False)
    stack = [(k, v) for k, v in container.items() if k != "hydra"]
    while stack:
        key, value = stack.pop()
        if key not in known and not key.startswith(tuple(f"{m}." for m in OPEN_MAPPINGS)):
            raise unknown_key_error(key)
        if isinstance(value, dict) and key not in OPEN_MAPPINGS:
            stack.extend((f"{key}.{k}", v) for k, v in value.items())


def validate(cfg: DictConfig, resolved: dict | None = None) -> None:
    """Check every ruled value of a composed config; raise ConfigError naming the first bad one.
    resolved: the config already resolved (to_container), whose values are read instead where it
    has them (a select of each key resolves it again: 0.6 ms of a sweep's job)."""
    for key in RULES:
        found, value = _value_in(resolved, key)
        if not found:
            try:
                value = OmegaConf.select(cfg, key, throw_on_missing=True, throw_on_resolution_failure=True)
            except Exception as exc:  # missing value or broken interpolation
                raise ConfigError(f"{key} cannot be resolved: {str(exc).splitlines()[0]}") from exc
        check_value(key, value)


def _value_in(resolved: dict | None, key: str) -> tuple[bool, Any]:
    """(True, the value at dotted key) when resolved holds one that is not missing (???)."""
    node: Any = resolved
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return node != "???", node


# scheme://user:password@ , also as Hydra prints overrides (with its colons escaped: http\://u\:p@).
_SECRET_IN_URI = re.compile(
    r"(?P<scheme>[a-zA-Z][\w+.-]*\\?://)(?P<user>[^:/@\s\\]+)(?P<sep>\\?:)(?P<pw>[^@/\s]+)@"
)


def redact(text: str) -> str:
    """Hide the password of every user:password@ URI in text."""
    return _SECRET_IN_URI.sub(lambda m: f"{m['scheme']}{m['user']}{m['sep']}***@", text)


class RedactPasswords(logging.Filter):
    """A logging filter that hides passwords in URIs (used by conf/hydra/*_logging/redacted.yaml)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "@" in message:
            record.msg, record.args = redact(message), ()
        return True


class QuietJobLines(logging.Filter):
    """On the console of a large sweep (`active`, which the stacked launcher sets), each job's own
    INFO lines are left out: its log file keeps them, warnings and errors still show, and the
    launcher prints a line per stack and epoch instead (conf/hydra/job_logging/redacted.yaml)."""

    active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (QuietJobLines.active and record.levelno < logging.WARNING
                    and record.name.startswith("mnist_logreg.job"))


@functools.lru_cache(maxsize=1)
def libyaml_dumper() -> Any:
    """OmegaConf's YAML dumper (its representers: strings that would read back as another type are
    quoted) on libyaml's emitter, or None without libyaml."""
    import yaml
    from omegaconf._utils import get_omega_conf_dumper

    if not getattr(yaml, "__with_libyaml__", False):
        return None
    python = get_omega_conf_dumper()

    class Dumper(yaml.CDumper):  # type: ignore[misc,name-defined]
        pass

    for kind, representer in python.yaml_representers.items():
        Dumper.add_representer(kind, representer)
    for kind, representer in python.yaml_multi_representers.items():
        Dumper.add_multi_representer(kind, representer)
    return Dumper


def yaml_text(container: Any) -> str:
    """OmegaConf.to_yaml's text for a plain container (dicts, lists, scalars): emitted by libyaml
    with OmegaConf's representers when PyYAML has libyaml, a tenth of the time (a run's resolved
    config 2.8 ms to 0.25 ms here); tests/test_config.py compares the two."""
    import yaml

    dumper = libyaml_dumper()
    if dumper is None:
        return OmegaConf.to_yaml(container)
    return yaml.dump(container, default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=dumper)


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as {dotted.key: string}; lists become JSON, passwords in URIs are hidden."""
    container = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, str] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple, ListConfig)):
            out[name] = redact(json.dumps(list(value)))
        else:
            out[name] = redact(str(value))
    return out


def in_our_words(exc: Exception) -> Exception:
    """Hydra's messages about the command line, in the harness's words (which never advise `+key`)."""
    text = str(exc)
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown and "To append" in text:
        return unknown_key_error(unknown[1])
    present = re.match(r"Could not append to config\. An item is already at '([^']+)'", text)
    if present:
        return ConfigError(f"{present[1]} is a config key already: set it as {present[1]}=VALUE")
    override = getattr(exc, "override", None)  # hydra.errors.OverrideParseException
    if isinstance(override, str):
        if override.rstrip().endswith(","):
            key = override.split("=", 1)[0]
            return ConfigError(f"the argument {override!r} ends in a comma: a sweep is one argument with no "
                               f"spaces, as in -m {key}=0.05,0.1 (or quote it: '{key}=0.05, 0.1')")
        if "=" not in override:
            return ConfigError(f"the argument {override!r} is not KEY=VALUE: if it is a value of the sweep before "
                               "it, join them with commas and no spaces (-m optim.lr=0.05,0.1)")
        return ConfigError(f"cannot read the argument {override!r}: write KEY=VALUE, a sweep as KEY=A,B,C with "
                           "no spaces, and quote a value that has spaces or brackets")
    return exc
