"""A federation of daemons: several ivshmemd on several hosts form one ivshmem fabric.

A peer (or a QEMU VM) on one daemon sees the peers of every other daemon as ordinary peers:
their ids and one eventfd per vector, in the unchanged ivshmem protocol. Ringing one of
them reaches the peer on its own host. This package is the core of that (issue 12, part 1);
part 2 replicates the shared memory over the same links.

Modules, one job each:

- :mod:`~ivshmemd.federation.schema`: the daemon-to-daemon frames (frozen dataclasses,
  msgpack, schema version, strict decoding to :class:`~.schema.FrameError`).
- :mod:`~ivshmemd.federation.membership`: the sans-I/O state machine (members, hellos and
  their checks, gossip, ordered loss-detecting sessions, heartbeats, dead/rejoin); events
  in, actions out.
- :mod:`~ivshmemd.federation.relay`: the eventfd side of the doorbell relay (remote peers'
  vectors watched in one epoll set; rings written into local peers' eventfds).
- :mod:`~ivshmemd.federation.transport`: the zmq sockets (one ROUTER in, one DEALER per
  link out) driven from trio through :class:`ivshmemd.zmqtrio.TrioSocket`; bounded outboxes.
- :mod:`~ivshmemd.federation.keys` and :mod:`~ivshmemd.federation.zap`: CURVE certificates
  (owned by :mod:`ivshmemd.curve`, re-exported) and the federation's use of the daemon's
  ZAP handler (:mod:`ivshmemd.zap`: CURVE only, the allow directory's keys).
- :mod:`~ivshmemd.federation.config`: :class:`~.config.FederationConfig` and the rule for
  which endpoints may be used without keys.
- :mod:`~ivshmemd.federation.node`: :class:`~.node.Federation`, the object the daemon owns.
- :mod:`~ivshmemd.federation.bench`: ``python -m ivshmemd.federation.bench``.

Integration seam (what the daemon's server does; nothing else in ``ivshmemd`` changes)
---------------------------------------------------------------------------------------

1. **Configuration.** Build a :class:`FederationConfig` from the flags:
   ``--federation-listen`` -> ``listen``, ``--federation-peer`` (repeatable) -> ``peers``,
   ``--federation-timeout`` -> ``timeout``, ``--federation-key`` -> ``key_file``,
   ``--federation-allow`` -> ``allow_dir``, ``--federation-insecure`` -> ``insecure``, and
   from the server's own settings ``id_range`` (``--peer-ids``), ``shm_size`` (the rounded
   ``-l``) and ``vectors`` (``-n``). ``Federation(config, host)`` raises
   :class:`FederationConfigError` or :class:`KeyFileError` with one clear line: print it
   and exit non-zero.
2. **Running.** ``endpoint = await nursery.start(federation.run)`` in the daemon's nursery
   (it raises :class:`TransportError` if it cannot listen); cancelling the nursery stops it
   (byes sent, every remote peer unregistered through the host, all fds released).
3. **Local peers.** In ``IvshmemServer.admit``, right after ``registry.add(peer)`` (same
   synchronous step, before the next await): ``federation.local_peer_joined(peer)``. In
   ``IvshmemServer.drop``, after the peer's socket is closed:
   ``federation.local_peer_left(peer_id)``. Remote peers are never passed to these.
4. **Host interface** (:class:`FederationHost`, implemented by the server):
   ``remote_peer_joined(member, peer_id, vectors) -> Sequence[SharedFd]`` creates the
   vectors with ``registry.create_vectors()``, adds ``Peer(peer_id, vectors,
   info={"member": member, ...})`` to the registry and queues ``join_messages`` exactly as
   ``admit`` does, but with no Connection (the peer's eventfds are watched by the
   federation, not owned by a socket); ``remote_peer_left(member, peer_id)`` removes it and
   queues ``leave_messages`` as ``drop`` does; ``member_event(kind, info)`` forwards
   ``member-joined``/``member-left``/``member-refused`` to the event publisher. Remote
   peer ids never collide with local ones: the hello refuses overlapping ranges, and the
   server's ``IdAllocator`` only hands out ids in its own ``--peer-ids`` range.
5. **Control plane.** ``federation.status()`` goes under ``"federation"`` in ``ivshmemctl
   status`` (members with endpoint, id range, state, last heard, rtt; probes; refusals;
   ring counters); ``federation.remote_peers()`` (or ``Peer.info["member"]``) marks remote
   peers in ``ivshmemctl peers``.
6. **Keys.** ``ivshmemctl keygen DIR NAME`` calls :func:`keygen`.

What the next issues build on
-----------------------------

- **Part 2 (memory).** Frame kinds 32..63 are reserved for replication. A member's session
  is one ordered, loss-detecting stream, and every frame has its sequence number, so a
  diff sent before a ring on the same session is applied before that ring is delivered:
  release consistency at doorbells needs no extra ordering machinery, only a new frame
  kind and larger frame limits (:data:`schema.MAX_FRAME_BYTES`).
- **Zero-loss restart (issue 14).** A member is keyed by ``identity`` (configurable, stable)
  and its peer set by ``incarnation`` (configurable: a restart that keeps its peers passes
  the old one). ``Membership.shutdown(restarting=True)`` says bye without making the
  others drop our peers for up to the timeout, and a new session whose hello names the
  previous session and its last seq (as the receiver holds them) is reconciled without
  churn. What a handover must still carry: the per-member session counters and seqs
  (``Member.out_session``/``out_seq``, ``in_session``/``in_expected``) and the remote peer
  table, since zmq sockets cannot be handed to a new process.
"""

from __future__ import annotations

from ivshmemd.curve import CurveKeyPair, KeyFileError, keygen, load_allowed_keys, load_secret_key

from .config import FederationConfig, FederationConfigError
from .membership import DEFAULT_TIMEOUT
from .node import Federation, FederationHost
from .transport import TransportError

__all__ = [
    "DEFAULT_TIMEOUT",
    "CurveKeyPair",
    "Federation",
    "FederationConfig",
    "FederationConfigError",
    "FederationHost",
    "KeyFileError",
    "TransportError",
    "keygen",
    "load_allowed_keys",
    "load_secret_key",
]
