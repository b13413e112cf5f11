"""A composed config: its checks before anything trains, its flat form for MLflow params, its secrets hidden."""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import ConfigError

CONTEXTS = ("cpu", "gpu")
# The keys that say where things are, not what is computed: left out of the config hash (so a run
# moved to another store, cache folder or mirror still matches its original) and of reproduce's diff.
LOCATION_KEYS = ("tracking", "data.root", "data.cache", "data.search", "data.mirrors", "data.md5",
                 "data.download_timeout", "force", "resume")


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
    if rule is not None and not rule[0](value):
        raise ConfigError(f"{key}={value!r} is not allowed: {key} must be {rule[1]}")


def validate(cfg: DictConfig) -> None:
    """Check every ruled value of a composed config; raise ConfigError naming the first bad one."""
    for key in RULES:
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True, throw_on_resolution_failure=True)
        except Exception as exc:  # missing value or broken interpolation
            raise ConfigError(f"{key} cannot be resolved: {str(exc).splitlines()[0]}") from exc
        check_value(key, value)


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
