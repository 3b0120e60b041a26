"""The launcher's view of one peer: an explicit state machine.

A peer is :attr:`PeerState.STARTING` until it reports ``running``; the launcher moves every
live peer to :attr:`PeerState.STOPPING` when it decides to stop them all (a failure, a
signal, the run is over). What it reports and how it exits then settle where it ends:

=================  ===================================  ===================================
state              entered when                         leaves for
=================  ===================================  ===================================
STARTING           started (exec'ed or forked)          RUNNING, STOPPING, FINISHING,
                                                        FAILING, or an end state
RUNNING            it reported ``running``              STOPPING, FINISHING, FAILING, end
FINISHING          it reported ``finished``, ok         FINISHED (exit 0) or FAILED
FAILING            it reported ``finished``, not ok,    FAILED
                   before the launcher stopped it
STOPPING           the launcher stops every peer        STOPPED, or FAILED when a signal
                                                        the launcher did not send killed it
FINISHED           exited 0 after finishing ok          (end)
FAILED             exited having failed on its own      (end)
STOPPED            exited after being stopped           (end)
=================  ===================================  ===================================

A failure reported while STOPPING is a consequence of the stop (its partner went first),
not a cause. A peer that dies of a signal nobody here sent failed, whenever it happens: so
``ivshmemctl up`` names every peer that was killed, not only the first.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final

from . import report
from .harness import PeerProcess

__all__ = ["Peer", "PeerState", "TransitionError"]

#: Lines of a peer's stderr kept to explain a failure.
TAIL_LINES: Final = 20
#: Events of a peer kept (the first of each kind is kept besides).
EVENT_TAIL: Final = 50


class PeerState(enum.Enum):
    """Where a peer is in its life (see the module docstring)."""

    STARTING = "starting"
    RUNNING = "running"
    FINISHING = "finishing"
    FAILING = "failing"
    STOPPING = "stopping"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def ended(self) -> bool:
        """It has exited and its outcome is decided."""
        return self in _ENDS

    @property
    def working(self) -> bool:
        """Starting or running: it has neither finished nor been stopped."""
        return self in _ALIVE


_ENDS: Final = frozenset({PeerState.FINISHED, PeerState.FAILED, PeerState.STOPPED})
_NEXT: Final[dict[PeerState, frozenset[PeerState]]] = {
    PeerState.STARTING: frozenset(PeerState) - {PeerState.STARTING},
    PeerState.RUNNING: frozenset(PeerState) - {PeerState.STARTING, PeerState.RUNNING},
    PeerState.FINISHING: frozenset({PeerState.FINISHED, PeerState.FAILED}),
    PeerState.FAILING: frozenset({PeerState.FAILED}),
    PeerState.STOPPING: frozenset({PeerState.STOPPED, PeerState.FAILED}),
    PeerState.FINISHED: frozenset(),
    PeerState.FAILED: frozenset(),
    PeerState.STOPPED: frozenset(),
}
_ALIVE: Final = frozenset({PeerState.STARTING, PeerState.RUNNING})


class TransitionError(RuntimeError):
    """A move the state machine does not allow (a bug in the launcher)."""


class Peer(PeerProcess):
    """One peer of a launcher run: the supervised process, its state, and what it said."""

    def __init__(self, argv: Sequence[str], index: int, region: str = "") -> None:
        super().__init__(argv, log_limit=TAIL_LINES, event_limit=EVENT_TAIL)
        self.index = index  # launch order, for peers that die before they have an id
        self.region = region  # its region's name, when there are several
        self.state = PeerState.STARTING
        self.summary: str | None = None
        self.problem: str | None = None  # its last error (error, server-gone, failed finish)
        self.last_log: str | None = None
        self.waiting: str | None = None  # what it said it waits for, last
        self.progress: report.Progress | None = None  # how far its work is, last

    @property
    def name(self) -> str:
        where = f"{self.region}/" if self.region else ""
        if self.peer_id is not None:
            return f"{where}peer {self.peer_id}"
        return f"{where}peer #{self.index} (no id yet)"

    def doing(self) -> str:
        """What it was doing, for a peer stopped while it ran: what it waited for and how
        far its work was."""
        parts = []
        if self.waiting:
            parts.append(f"waiting for {self.waiting}")
        if self.progress is not None:
            p = self.progress
            parts.append(f"{p.done} of {p.total} {p.unit} done")
        if not parts:
            parts.append("running" if self.state is PeerState.RUNNING else "starting")
        return ", ".join(parts)

    @property
    def ok(self) -> bool:
        """Its plugin finished ok."""
        return self.state in (PeerState.FINISHING, PeerState.FINISHED)

    def _move(self, state: PeerState) -> None:
        if state not in _NEXT[self.state]:
            raise TransitionError(f"{self.name}: {self.state.name} -> {state.name}")
        self.state = state

    # -- what happens to it -------------------------------------------------------------------

    def reported(self, event: report.Event | report.PluginEvent) -> None:
        """It printed ``event``."""
        match event:
            case report.Running() if self.state is PeerState.STARTING:
                self._move(PeerState.RUNNING)
            case report.Finished(ok=True, summary=summary):
                self.summary = summary
                if self.state in _ALIVE:
                    self._move(PeerState.FINISHING)
            case report.Finished(summary=summary):
                self.summary = self.problem = summary
                if self.state in _ALIVE:
                    self._move(PeerState.FAILING)
            case report.Error(message=message) | report.ServerGone(message=message):
                self.problem = message or type(event).__name__
            case report.Log(message=message):
                self.last_log = message
            case report.Waiting(what=what):
                self.waiting = what
            case report.Progress():
                self.progress = event
            case report.PluginEvent(kind="stdout", fields=fields):  # a plugin's print()
                self.last_log = str(fields.get("text"))

    def stopping(self) -> None:
        """The launcher stops every peer from now on: what this one does next is a
        consequence, unless it had already failed or finished."""
        if self.state in _ALIVE:
            self._move(PeerState.STOPPING)

    def exited(self) -> PeerState:
        """It has exited and its output is read: settle its end state and return it."""
        code = self.returncode
        assert code is not None
        if self.state is PeerState.FINISHING:
            self._move(PeerState.FINISHED if code == 0 else PeerState.FAILED)
        elif self.state is PeerState.FAILING:
            self._move(PeerState.FAILED)
        elif self.state is PeerState.STOPPING:
            ours = code >= 0 or -code in self.signals_sent
            self._move(PeerState.STOPPED if ours else PeerState.FAILED)
        elif self.state in _ALIVE:
            self._move(PeerState.STOPPED if code == 0 else PeerState.FAILED)
        return self.state

    def reason(self) -> str:
        """The best one-line explanation of a failure."""
        for candidate in (self.problem, *reversed(self.log), self.last_log):
            if candidate and candidate.strip():
                return candidate.strip()
        return "no message"
