"""The launching process: the sweep's parent run (a Hydra callback, found again when a sweep
continues), grouping jobs into stacks, the stacked and the Slurm launchers' work, and stopping a
sweep (signals, orphaned runs)."""

from .callback import SweepTracking

__all__ = ["SweepTracking"]
