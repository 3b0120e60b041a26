"""The memory side of the federation driver's steps, sans-I/O (issue 13).

:class:`Replication` joins the two state machines: the :class:`~.membership.Membership`
(streams to members) and the :class:`~.replica.Replica` (what to send and apply). Its
methods are what the driver does when it flushes, before a ring leaves, when the membership
hands it a memory frame, and when a member's stream starts or stops; each returns the
membership actions to carry out, in order, and the rings the replica released (to deliver
after them). :class:`ivshmemd.federation.node.Federation` carries them out over zmq and
eventfds; the tests drive the same steps over an in-memory network.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from .membership import Action, Deliver, Membership, Memory, Stream
from .replica import Replica, ReplicaError
from .schema import Diff, RegionRequest

__all__ = ["Replication"]

I64 = npt.NDArray[np.int64]
Released = tuple[list[Action], list[Deliver]]


class Replication:
    """This host's replication over its membership (see the module docstring)."""

    def __init__(self, machine: Membership, replica: Replica[Deliver]) -> None:
        self.machine = machine
        self.replica = replica
        #: members that answered our region request without one (they hold none either)
        self.no_region: set[str] = set()

    def flush(self, pages: I64 | None, now: float) -> list[Action]:
        """This host's changes (in ``pages``, or a scan of the region if None) as a diff
        to every member, ahead of whatever is sent after it."""
        frames = self.replica.flush(pages, now)
        return self.machine.broadcast(frames) if frames else []

    def before_ring(self, member: str) -> list[Action]:
        """What goes ahead of a ring to ``member``'s host (after a flush): an
        :class:`~.schema.After` if the diffs it must wait for changed."""
        after = self.replica.after_for(member)
        return [] if after is None else self.machine.send_to(member, [after])

    def on_memory(self, action: Memory, now: float, pages: Callable[[], I64 | None]) -> Released:
        """A memory frame from a member: a diff part is received (a member whose diff
        cannot be applied is dropped), a region request is answered after a flush (of
        ``pages()``), an after is noted for the member's next rings."""
        replica, machine = self.replica, self.machine
        frame, member = action.frame, action.member
        if isinstance(frame, Diff):
            try:
                released = replica.receive(member, frame, now)
            except ReplicaError as exc:
                return machine.drop(now, member, str(exc)), []
            if frame.last and frame.flags & Diff.NOT_HOLDER:
                self.no_region.add(member)
            return [], released
        if isinstance(frame, RegionRequest):  # our changes go to everyone as a diff first
            return [*self.flush(pages(), now), *machine.send_to(member, replica.region(member))], []
        replica.after(member, frame)
        return [], []

    def on_stream(self, action: Stream) -> Released:
        """A member's stream to us started (a new session that may have lost frames asks
        for its region) or stopped (nothing waits for its diffs any more)."""
        replica = self.replica
        if not action.up:
            return [], replica.member_gone(action.member)
        replica.member_up(action.member)
        if action.intact:
            return [], []
        return self.machine.send_to(action.member, [RegionRequest("new session")]), []
