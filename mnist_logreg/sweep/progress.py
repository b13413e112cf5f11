"""What the console of a large sweep shows instead of every job's lines: a line per stack and epoch
(epoch k of n, the jobs still going, the best test_acc any epoch reached so far and its job, the time
so far and an estimate of the time left) and a line as each stack ends. Each job's own lines go to its log file.

    progress = SweepProgress(log, stacks)    stacks: per stack, its jobs' (number, overrides, epochs to train)
    progress.epoch(stack, epoch, {position in the stack: EpochMetrics})
    progress.trained(stack)                  its training is over
    progress.stack_done(stack, results)      its runs have ended
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

# A launch of more jobs than this shows progress lines instead of each job's lines on the console.
CONSOLE_JOBS = 8


def varied_overrides(overrides: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each job's overrides that not every job shares: what tells the jobs apart."""
    common = set(overrides[0]).intersection(*map(set, overrides[1:])) if overrides else set()
    return [[o for o in job if o not in common] for job in overrides]


def duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class SweepProgress:
    """Progress lines for the stacks of one launch, trained one after another."""

    def __init__(self, log: logging.Logger, stacks: Sequence[Sequence[tuple[int, list[str], int]]],
                 names: Sequence[str]) -> None:
        self.log, self.names = log, list(names)
        self.nums = [[num for num, _, _ in stack] for stack in stacks]
        self.epochs = [[todo for _, _, todo in stack] for stack in stacks]
        labels = varied_overrides([o for stack in stacks for _, o, _ in stack])
        flat = [num for stack in stacks for num, _, _ in stack]
        self.label = {num: " ".join(label) or "(all alike)" for num, label in zip(flat, labels)}
        self.left = sum(sum(e) for e in self.epochs)  # model-epochs still to train
        self.done = 0
        self.best: dict[int, float] = {}  # job number -> the best test_acc of its epochs so far
        self.started: float | None = None
        self.spans: dict[int, list[float]] = {}  # stack -> its start and the end of its training

    def start(self, stack: int) -> None:
        now = time.perf_counter()
        self.started = self.started if self.started is not None else now
        self.spans[stack] = [now, now]

    def trained(self, stack: int) -> None:
        """The stack's last epoch is recorded (its runs end once their last records are written)."""
        self.spans[stack][1] = time.perf_counter()

    def epoch(self, stack: int, epoch: int, metrics: dict[int, Any]) -> None:
        """An epoch of stack `stack` is recorded by every run still going in it."""
        nums = self.nums[stack]
        self.done += len(metrics)
        self.left -= len(metrics)
        for position, m in metrics.items():
            num = nums[position]
            self.best[num] = max(self.best.get(num, m.test_acc), m.test_acc)
        best = max(self.best, key=lambda n: (self.best[n], -n))
        elapsed = time.perf_counter() - (self.started or time.perf_counter())
        left = elapsed / self.done * max(self.left, 0) if self.done else float("nan")
        self.log.info("stack %s (%d of %d): epoch %d/%d, %d of %d jobs going; best test_acc %.4f (#%d %s); "
                      "%s so far, about %s left", self.names[stack], stack + 1, len(self.nums), epoch,
                      max(self.epochs[stack]), len(metrics), len(nums), self.best[best], best, self.label[best],
                      duration(elapsed), duration(left))

    def stack_done(self, stack: int, results: Sequence[Any]) -> None:
        """The stack's runs have ended: how many FINISHED, and which did not."""
        nums = self.nums[stack]
        statuses = [r.get("status", "FAILED") if isinstance(r, dict) else "FAILED" for r in results]
        self.left = sum(sum(e) for e in self.epochs[stack + 1:])  # without the epochs stopped runs skipped
        others = [f"#{n} {s}" for n, s in zip(nums, statuses) if s != "FINISHED"]
        start, trained = self.spans.get(stack, [time.perf_counter()] * 2)
        self.log.info("stack %s done in %s: %d of %d runs FINISHED%s", self.names[stack], duration(trained - start), statuses.count("FINISHED"), len(nums),
                      f" (not: {', '.join(others)})" if others else "")
