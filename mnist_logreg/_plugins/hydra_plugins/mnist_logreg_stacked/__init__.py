"""Hydra finds launchers only under the `hydra_plugins` namespace: this registers mnist_logreg's.

mnist_logreg/__init__.py puts the folder above `hydra_plugins/` on sys.path.
"""

from mnist_logreg.launcher import StackedLauncher as _StackedLauncher


class StackedLauncher(_StackedLauncher):
    """hydra/launcher=stacked (see mnist_logreg.launcher)."""
