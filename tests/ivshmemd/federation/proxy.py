"""A TCP proxy on loopback between two federated daemons: capture, cut and heal the link.

Each daemon advertises the proxy's endpoint (``FederationConfig.advertise``), so everything
sent to it passes through here. :attr:`TcpProxy.captured` holds every byte forwarded (in
both directions); :meth:`TcpProxy.cut` closes every connection and refuses new ones until
:meth:`TcpProxy.heal`, as a link that went down and came back.

:meth:`TcpProxy.hold` makes one sender's link slow: what the daemon behind a given endpoint
sends on its connections waits (in order, the connection open) until :meth:`TcpProxy.release`,
while every other sender's bytes flow. A connection's sender is the daemon whose endpoint
its bytes name first: a member link and a probe both open with the sender's hello, and the
hello names the sender before anything it sends names another daemon (gossip comes after).
"""

from __future__ import annotations

import re

import trio

__all__ = ["TcpProxy"]

#: what a daemon's hello names it by (its TCP endpoint)
_ENDPOINT = re.compile(rb"tcp://[0-9.]+:[0-9]+")
#: a sender not named in this many bytes never will be
_NAMED_WITHIN = 4096


class TcpProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target> (set once the target is bound)."""

    def __init__(self) -> None:
        self.target: int | None = None
        #: the endpoint it listens on (set by :meth:`run`)
        self.endpoint = ""
        self.captured = bytearray()
        self.connections = 0
        self._cut = False
        self._scopes: set[trio.CancelScope] = set()
        #: the sender held, and what lets it go
        self._held: bytes | None = None
        self._gate = trio.Event()
        self._gate.set()
        #: bytes held back so far (a test waits on it to know the hold took effect)
        self.held_bytes = 0

    @property
    def is_cut(self) -> bool:
        return self._cut

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{port}"
        async with trio.open_nursery() as nursery:
            task_status.started(self.endpoint)
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    def cut(self) -> None:
        self._cut = True
        for scope in list(self._scopes):
            scope.cancel()

    def heal(self) -> None:
        self._cut = False

    def hold(self, sender: str) -> None:
        """From now on, what the daemon at endpoint ``sender`` sends through here waits."""
        self._held = sender.encode()
        if self._gate.is_set():
            self._gate = trio.Event()

    def release(self) -> None:
        """What was held goes on, in order, and nothing is held any more."""
        self._held = None
        self._gate.set()

    async def _serve(self, inbound: trio.SocketStream) -> None:
        async with inbound:
            if self._cut or self.target is None:
                return
            try:
                outbound = await trio.open_tcp_stream("127.0.0.1", self.target)
            except OSError:
                return
            self.connections += 1
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    async with outbound, trio.open_nursery() as nursery:
                        cancel = nursery.cancel_scope
                        nursery.start_soon(self._pump, inbound, outbound, cancel, True)
                        nursery.start_soon(self._pump, outbound, inbound, cancel, False)
                finally:
                    self._scopes.discard(scope)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        done: trio.CancelScope,
        inbound: bool,
    ) -> None:
        head = bytearray()  # the start of what a dialler sends, until it names itself
        sender: bytes | None = None
        try:
            async for chunk in source:
                self.captured += chunk
                if inbound and sender is None and len(head) < _NAMED_WITHIN:
                    head += chunk
                    named = _ENDPOINT.search(head)
                    sender = named.group() if named else None
                if sender is not None and sender == self._held:
                    self.held_bytes += len(chunk)
                    while sender == self._held:  # in order: nothing more is read meanwhile
                        await self._gate.wait()
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()
