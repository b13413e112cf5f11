"""Gluon multiclass logistic regression on MNIST, configured by Hydra and tracked in MLflow.

The layers, lowest first (a module imports only from its own layer or the ones above it in this list):

    errors, config, project   cross-cutting: one-line errors, config checks, the project root
    ml/                       numbers only: data, the model, the one training loop, checkpoints
    tracking/                 MLflow only: the store, RunLog, tags and fingerprints, links, the pyfunc
    lifecycle/                one job's life: prepare, record, finish, in-job signals, artifacts
    sweep/                    the launching process: parent run, stacks, launchers' work, stopping
    analysis/                 reading a store afterwards: compare, registry, reproduce's verdict
    job, compare, reproduce, spool, bench, soak    the commands, thin
    services/                 throwaway PostgreSQL and mlflow server for tests and trials
"""

import importlib.abc
import sys


# What mxnet imports, when installed, for features the harness never uses (each import guarded by
# mxnet with a fallback): sklearn for the deprecated FeedForward's base class (0.4 s with scipy.stats
# and joblib; mlxtend, a dev dependency, installs it), scipy.stats for int8 quantization's entropy
# calibration and for test_utils' distribution checks (0.15 s).
_UNUSED_BY_MXNET = {"mxnet.model": ("sklearn",), "mxnet.contrib.quantization": ("scipy.stats",),
                    "mxnet.test_utils": ("scipy.stats",)}


class _MxnetWithoutUnused(importlib.abc.MetaPathFinder):
    """For those importers only, the modules of _UNUSED_BY_MXNET are absent (mxnet falls back, as
    without them); anyone else imports them as usual."""

    def find_spec(self, name, path=None, target=None):
        if any(name == m or name.startswith(f"{m}.") for names in _UNUSED_BY_MXNET.values() for m in names):
            frame = sys._getframe(1)
            while frame is not None:
                blocked = _UNUSED_BY_MXNET.get(frame.f_globals.get("__name__"), ())
                if any(name == m or name.startswith(f"{m}.") for m in blocked):
                    raise ModuleNotFoundError(f"No module named {name!r} (for {frame.f_globals['__name__']})",
                                              name=name)
                frame = frame.f_back
        return None


if not any(isinstance(f, _MxnetWithoutUnused) for f in sys.meta_path):
    sys.meta_path.insert(0, _MxnetWithoutUnused())
