"""Gluon multiclass logistic regression on MNIST, configured by Hydra and tracked in MLflow."""

import sys
from pathlib import Path

# Hydra looks for launcher plugins in the `hydra_plugins` namespace package on sys.path:
# this makes `hydra/launcher=stacked` (mnist_logreg.launcher) one of them.
_PLUGINS = str(Path(__file__).resolve().parent / "_plugins")
if _PLUGINS not in sys.path:
    sys.path.append(_PLUGINS)
