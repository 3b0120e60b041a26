"""Counting wake-ups instead of timing: an idle task must not run, a busy one runs a
bounded number of times per event. The ``task_steps`` fixture (conftest) installs one."""

from __future__ import annotations

from collections import Counter

import trio


class TaskSteps(trio.abc.Instrument):
    """How many times each trio task ran: every run of a task is one wake-up. An idle task
    runs no more; a task that polls or spins runs all the time."""

    def __init__(self) -> None:
        self.steps: Counter[trio.lowlevel.Task] = Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task] += 1

    def of(self, task: trio.lowlevel.Task) -> int:
        return self.steps[task]

    def besides(self, task: trio.lowlevel.Task) -> int:
        """The steps of every task but ``task``."""
        return sum(count for other, count in self.steps.items() if other is not task)

    def reset(self) -> None:
        self.steps.clear()
