"""A TCP proxy on loopback between two federated daemons: capture, cut and heal the link.

Each daemon advertises the proxy's endpoint (``FederationConfig.advertise``), so everything
sent to it passes through here. :attr:`TcpProxy.captured` holds every byte forwarded (in
both directions); :meth:`TcpProxy.cut` closes every connection and refuses new ones until
:meth:`TcpProxy.heal`, as a link that went down and came back.
"""

from __future__ import annotations

import trio

__all__ = ["TcpProxy"]


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
                        nursery.start_soon(self._pump, inbound, outbound, nursery.cancel_scope)
                        nursery.start_soon(self._pump, outbound, inbound, nursery.cancel_scope)
                finally:
                    self._scopes.discard(scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        try:
            async for chunk in source:
                self.captured += chunk
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()
