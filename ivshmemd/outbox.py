"""One recipient's unsent messages, with join/leave coalescing and bounds (sans-I/O).

The daemon queues the protocol's messages per recipient and sends them as the recipient's
socket takes them. What sits in a queue costs the daemon memory and, for a join notice, a
reference on the newcomer's eventfds: a recipient that reads slowly must not make the daemon
hoard fds of peers that are long gone. So the queue is kept in *runs*, each either the
announcement of one peer (its vectors: a join notice, or a newcomer's view of an existing
peer) or anything else (the greeting, a leave notice), and:

* **A leave withdraws what is still queued of the leaver's announcement.** If none of it
  was sent, the recipient never needed either the join or the leave: both are dropped
  (and the fds released at once). If part of it was sent, the rest is dropped and the leave
  still goes out (the recipient knows of the peer and must hear that it left).
* **Bounds.** After coalescing, a recipient's queue holds at most its greeting, one
  announcement per live peer and one leave per peer announced to it and gone since:
  :func:`limits` sizes that from the vector count and the peer limit. A recipient whose
  queue exceeds it is too slow to keep (the daemon drops it).

:class:`Outbox` knows nothing of sockets or fds: handles are opaque (the daemon's are
reference-counted eventfds); the caller releases the handles this module hands back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, NamedTuple, TypeVar

from .protocol import Message

__all__ = ["Limits", "Outbox", "limits"]

H = TypeVar("H")


class Limits(NamedTuple):
    """The most a recipient that reads may have queued."""

    messages: int
    fds: int


def limits(n_vectors: int, max_peers: int) -> Limits:
    """Greeting (3 messages, 1 fd) + an announcement of ``n_vectors`` per peer slot + one
    leave per peer slot; every slot may be taken at once (``max_peers``)."""
    slots = max_peers + 1
    return Limits(messages=3 + (n_vectors + 1) * slots, fds=1 + n_vectors * slots)


class _Run(Generic[H]):
    """Consecutive messages for one recipient; ``cursor`` is the next one to send."""

    __slots__ = ("announces", "cursor", "messages")

    def __init__(self, messages: Sequence[Message[H]], announces: int | None) -> None:
        self.messages = messages
        self.cursor = 0
        self.announces = announces


class Outbox(Generic[H]):
    """A FIFO of messages in runs (see the module docstring). ``messages`` and ``fds``
    count what is queued and not yet sent."""

    __slots__ = ("_announced", "_runs", "fds", "messages")

    def __init__(self) -> None:
        self._runs: deque[_Run[H]] = deque()
        self._announced: dict[int, _Run[H]] = {}
        self.messages = 0
        self.fds = 0

    def __len__(self) -> int:
        return self.messages

    def __bool__(self) -> bool:
        return self.messages > 0

    def push(
        self, messages: Sequence[Message[H]], announces: int | None = None, start: int = 0
    ) -> None:
        """Queue ``messages[start:]`` (kept by reference, not copied; the first ``start``
        were sent already). ``announces`` names the peer whose vectors they are, when they
        are its announcement (one fd per message)."""
        queued = len(messages) - start
        if queued <= 0:
            return
        run = _Run(messages, announces)
        run.cursor = start
        self._runs.append(run)
        self.messages += queued
        if announces is not None:
            self._announced[announces] = run
            self.fds += queued
        else:
            self.fds += sum(1 for message in messages[start:] if message.fd is not None)

    def head(self) -> Message[H] | None:
        """The next message to send, or None. (Per message sent: keep it short.)"""
        runs = self._runs
        while runs:
            run = runs[0]
            if run.cursor < len(run.messages):
                return run.messages[run.cursor]
            runs.popleft()
            if run.announces is not None:
                self._retire(run)
        return None

    def pop(self) -> Message[H]:
        """Remove the head (it was sent) and return it; its handle is now the caller's."""
        runs = self._runs
        exhausted = not runs or runs[0].cursor >= len(runs[0].messages)
        if exhausted and self.head() is None:
            raise IndexError("pop from an empty outbox")
        run = runs[0]
        message = run.messages[run.cursor]
        run.cursor += 1
        self.messages -= 1
        if message.fd is not None:
            self.fds -= 1
        if run.cursor == len(run.messages):
            runs.popleft()
            if run.announces is not None:
                self._retire(run)
        return message

    def drain(self, send: Callable[[Message[H]], bool]) -> int:
        """Hand the queued messages to ``send`` in order, until it returns False (that
        message stays queued: it was not sent) or none is left. Returns how many went; their
        handles are now the caller's. This is the daemon's per-message path: kept short."""
        runs = self._runs
        sent = fds = 0
        try:
            while runs:
                run = runs[0]
                messages, cursor = run.messages, run.cursor
                end = len(messages)
                while cursor < end:
                    message = messages[cursor]
                    if not send(message):
                        run.cursor = cursor
                        return sent
                    cursor += 1
                    sent += 1
                    if message.fd is not None:
                        fds += 1
                run.cursor = cursor
                runs.popleft()
                if run.announces is not None:
                    self._retire(run)
            return sent
        finally:
            self.messages -= sent
            self.fds -= fds

    def _retire(self, run: _Run[H]) -> None:
        if self._announced.get(run.announces) is run:  # type: ignore[arg-type]
            del self._announced[run.announces]  # type: ignore[arg-type]

    def withdraw_announcement(self, peer_id: int) -> tuple[list[H], bool]:
        """``peer_id`` left: drop what is unsent of its announcement. Returns the handles
        dropped (for the caller to release) and whether the recipient still needs the
        leave notice (False only if none of the announcement had been sent)."""
        run = self._announced.pop(peer_id, None)
        if run is None:
            return [], True
        unsent = run.messages[run.cursor :]
        handles = [message.fd for message in unsent if message.fd is not None]
        self.messages -= len(unsent)
        self.fds -= len(handles)
        needed = run.cursor > 0
        run.cursor = len(run.messages)  # now empty: head() retires it when it gets there
        return handles, needed

    def pending_runs(self) -> list[tuple[int | None, int, Sequence[Message[H]]]]:
        """The queue as ``(announces, sent, unsent)`` per run, oldest first: what a handover
        carries to rebuild it with :meth:`push` (``sent`` matters to a later withdrawal)."""
        return [
            (run.announces, run.cursor, run.messages[run.cursor :])
            for run in self._runs
            if run.cursor < len(run.messages)
        ]

    def clear(self) -> list[H]:
        """Drop everything; returns the handles of the unsent messages."""
        handles = [
            message.fd
            for run in self._runs
            for message in run.messages[run.cursor :]
            if message.fd is not None
        ]
        self._runs.clear()
        self._announced.clear()
        self.messages = 0
        self.fds = 0
        return handles

    def exceeds(self, bound: Limits) -> bool:
        """Whether more is queued than a reading recipient can have."""
        return self.messages > bound.messages or self.fds > bound.fds
