"""Start child processes and supervise them: the one way this project runs a daemon, a peer
or a helper process, from the launcher, the test fixtures, the benchmarks and the tests.

A child is a :class:`Child` (trio code) or a :class:`SyncChild` (blocking code) made from an
argv its caller built once. Starting it (:meth:`Supervisor.start`,
:meth:`SyncSupervisor.start`) wires up what the supervisor reads:

* **readiness**: the child's own ``sd_notify`` ``READY=1``. With ``notify=True`` the
  supervisor binds a unix datagram socket of its own (in the abstract namespace: no file to
  clean up) and passes it as ``$NOTIFY_SOCKET``, as systemd does; :mod:`ivshmemd.sdnotify`
  sends ``READY=1`` once the daemon listens. Later notifications (``STATUS=``, ``STOPPING=1``)
  are read as well and kept in :attr:`ChildRecord.notified`, so a child never blocks on a
  full notify queue. Nobody greps a log for readiness.
* **events**: with ``events=True`` the child's stdout is a stream of JSON objects, one per
  line (``ivshmem-peer --report json``); a line that is not an object is kept as
  ``{"event": "stdout", "text": line}``.
* **its log**: every stderr line (or the last ``log_limit``), in :attr:`ChildRecord.log` and
  in the message of every :class:`ChildError`, so a failure explains itself.
* **stopping**: :meth:`Child.stop` sends SIGTERM, then SIGKILL after a grace period, and
  reaps; closing the supervisor stops every child still running, whatever happened.

Every wait (``wait_ready``, ``wait_event``, ``wait_log``, ``wait_exit``) waits for what the
child says or does, never for time; each has a timeout and fails with :class:`ChildError`
when the child ends without saying it.

The modules: :mod:`.record` (the sans-I/O part both drivers share: fed chunks and datagrams,
it answers the questions), :mod:`.spawn` (how a child is started: notify socket, options,
the constants; /proc figures), :mod:`.async_children` and :mod:`.sync_children` (the two
drivers), :mod:`.daemon` (``ivshmemd`` itself as a supervised child). Peer processes are
built on this in :mod:`peers.harness`.
"""

from __future__ import annotations

from .async_children import Child, Supervisor, open_supervisor
from .daemon import (
    DaemonProcess,
    SyncDaemon,
    daemon_command,
    daemon_process,
    sync_daemon_process,
    unique_name,
)
from .record import ChildError, ChildRecord, exit_text, parse_event, parse_notify
from .spawn import (
    NOTIFY_DATAGRAM_MAX,
    READ_CHUNK,
    STOP_GRACE,
    WAIT_TIMEOUT,
    Launch,
    cpu_seconds,
    fd_count,
    rss_bytes,
)
from .sync_children import SyncChild, SyncSupervisor, sync_supervisor

__all__ = [
    "NOTIFY_DATAGRAM_MAX",
    "READ_CHUNK",
    "STOP_GRACE",
    "WAIT_TIMEOUT",
    "Child",
    "ChildError",
    "ChildRecord",
    "DaemonProcess",
    "Launch",
    "Supervisor",
    "SyncChild",
    "SyncDaemon",
    "SyncSupervisor",
    "cpu_seconds",
    "daemon_command",
    "daemon_process",
    "exit_text",
    "fd_count",
    "open_supervisor",
    "parse_event",
    "parse_notify",
    "rss_bytes",
    "sync_daemon_process",
    "sync_supervisor",
    "unique_name",
]
