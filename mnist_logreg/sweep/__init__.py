"""The launching process: the sweep's parent run (a Hydra callback), grouping jobs into stacks and
the stacked launcher's work, and stopping a sweep (signals, orphaned runs)."""

from .callback import SweepTracking

__all__ = ["SweepTracking"]
