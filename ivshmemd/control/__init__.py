"""The daemon's control plane: ``ivshmemctl``'s requests and the peer event stream.

- :mod:`~ivshmemd.control.schema`: requests, replies and events, pure (no socket, no trio).
- :mod:`~ivshmemd.control.server`: the trio server (zmq ROUTER and XPUB) and the event
  publisher.
- :mod:`~ivshmemd.control.client`: the blocking client (requests, the event stream).
- :mod:`~ivshmemd.control.process`: the server in a process of its own, relaying to the daemon.
- :mod:`~ivshmemd.control.view`: the daemon as the control plane sees it.

Access control lives beside it, shared with the federation: :mod:`ivshmemd.access`
(allow-lists), :mod:`ivshmemd.curve` (CURVE keys), :mod:`ivshmemd.zap` (the ZAP handler).
"""
