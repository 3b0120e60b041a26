"""pytest fixtures: a real ``ivshmemd`` and real peer processes inside your own tests.

The plugin is registered as the ``pytest11`` entry point ``ivshmem``, so installing this
project makes the fixtures available to every test session (``pytest -p no:ivshmem`` turns
them off). The async fixtures need **pytest-trio** (``pip install pytest-trio``, or this
project's ``[test]`` extra) and trio tests: set ``trio_mode = true`` in your pytest
configuration, or mark each test ``@pytest.mark.trio``. A plain ``def`` test (or a project
without pytest-trio) uses the ``_sync`` fixtures instead; asking for an async fixture from a
test pytest-trio does not run fails at once with that explanation.

``ivshmem_daemon``
    A factory of async context managers: ``async with ivshmem_daemon(vectors=2) as daemon``
    runs ``ivshmemd`` in the foreground on a unique socket under the test's ``tmp_path`` and
    a unique shm name, waits until it listens, and on exit stops it (SIGTERM, SIGKILL if it
    hangs) and removes the socket and the shm, whatever happened in the block. ``daemon`` is
    a :class:`ivshmemd.supervise.DaemonProcess`: ``socket_path``, ``shm_name``, ``pid``,
    ``log``, ``await daemon.wait_log("peer 3 left")``. Keyword arguments: ``vectors``
    (default 1), ``size`` (default ``"1M"``), ``args`` (more ``ivshmemd`` options).

``ivshmem_fabric``
    A federation on one machine: ``async with ivshmem_fabric(hosts=3, vectors=1) as
    daemons`` runs three federated ``ivshmemd`` (each its own "host": its own shm, its own
    range of peer ids, see :func:`ivshmemd.supervise.fabric.host_id_ranges`) and yields
    them once every one has every other as a member, so that a peer started on any of them
    sees the peers of all. Keyword arguments as ``ivshmem_daemon``, and ``timeout`` (the
    daemons' ``--federation-timeout``). Peers on different hosts find each other by id
    (``ping --partner ID``): each host has its own copy of the shared memory.

``ivshmem_session_daemon``
    One daemon for the whole test session (started on first use, stopped at the end):
    cheaper than a daemon per test when tests only add peers. Its settings come from the
    ini options ``ivshmem_session_vectors`` (default 2) and ``ivshmem_session_size``
    (default ``16M``). Peer ids grow from test to test: find partners with
    ``guest.find_partner`` (as ``ping`` and ``ring`` do), never by id.

``ivshmem_peers``
    A spawner: ``peer = await ivshmem_peers(daemon, "ping", ["--count", "100"])`` starts
    ``ivshmem-peer --report json ... --plugin ping --count 100`` against that daemon (a
    daemon of either fixture, or a socket path) and returns a :class:`PeerProcess` once the
    peer reports it is running (so ``peer.peer_id`` is known). ``args`` are the plugin's
    options; the peer's own go in ``peer_args=["--trio"]``. ``env=`` adds environment
    variables and ``pythonpath=`` directories (e.g. where a test-only plugin lives).
    ``await ivshmem_peers.many(daemon, "ping", 4, args)`` starts four at once, forked from a
    fork server that has imported the runtime once (:mod:`peers.forkserver`): much quicker
    than four interpreters. Every peer the test spawned is stopped and reaped when the test
    ends (SIGTERM, then SIGKILL after a grace period), pass or fail.

``ivshmem_daemon_sync``, ``ivshmem_peers_sync``
    The same for plain (synchronous) tests: ``with ivshmem_daemon_sync(vectors=2) as
    daemon``, ``peer = ivshmem_peers_sync(daemon, "ping")``, ``ivshmem_peers_sync.many(...)``
    (exec'ed at once), then ``peer.wait_finished()`` without ``await``.

A :class:`PeerProcess` records every JSON event the peer prints (``peer.events``) and its
stderr (``peer.stderr``). Wait for what you expect instead of sleeping:
``await peer.wait_event(event="peer-left", peer_id=3)`` (any fields, ``count=`` for the n-th
match), ``await peer.wait_finished()`` (the plugin's summary; raises if the plugin failed or
the peer died), ``await peer.wait_exit()``; signal it with ``peer.terminate()`` or
``peer.kill()``. Plugins report their own events with ``guest.report(event="...", ...)``,
and those arrive here too.

**Timeouts.** Every wait has a timeout and fails with the peer's events and stderr in the
message rather than hanging the run. The default is 30 seconds; set it for a whole project
with the ini option ``ivshmem_timeout = 60`` or for one run with ``--ivshmem-timeout 60``.

**Logs in the report.** When a test fails, the log of every daemon and peer it started
(and of the session daemon, if it used it) is attached to its report as a section
(``ivshmem peer 3 (pid 1234, ping)``, ``ivshmem daemon ...``), printed under the failure
like captured output.

The processes are supervised children (:mod:`ivshmemd.supervise`); a peer is a
:class:`peers.harness.PeerProcess`, built by the one peer argv builder,
:func:`peers.harness.peer_command`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from pathlib import Path
from typing import Any, Final, TypedDict, Unpack

import pytest
import trio

from ivshmemd.supervise import (
    STOP_GRACE,
    WAIT_TIMEOUT,
    ChildRecord,
    DaemonProcess,
    Supervisor,
    SyncDaemon,
    SyncSupervisor,
    daemon_process,
    open_supervisor,
    sync_daemon_process,
    sync_supervisor,
)
from ivshmemd.supervise.fabric import fabric_process

from .forkserver import ForkServer
from .harness import (
    PeerError,
    PeerProcess,
    PeerRecord,
    SyncPeerProcess,
    peer_command,
    peer_environment,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "STOP_GRACE",
    "DaemonFactory",
    "FabricFactory",
    "PeerError",
    "PeerOptions",
    "PeerProcess",
    "PeerRecord",
    "PeerSpawner",
    "SyncDaemon",
    "SyncPeerProcess",
    "SyncPeerSpawner",
    "ivshmem_daemon",
    "ivshmem_daemon_sync",
    "ivshmem_fabric",
    "ivshmem_peers",
    "ivshmem_peers_sync",
    "ivshmem_session_daemon",
    "peer_command",
    "peer_launch",
    "sync_daemon_process",
]

#: Seconds any wait may take before the test fails with what the peer said so far (unless
#: ``ivshmem_timeout`` / ``--ivshmem-timeout`` says otherwise).
DEFAULT_TIMEOUT: Final = WAIT_TIMEOUT
#: The async fixtures (they need a trio test).
ASYNC_FIXTURES: Final = ("ivshmem_peers", "ivshmem_daemon", "ivshmem_fabric")
#: Lines of each log attached to a failed test's report.
REPORT_LINES: Final = 200

Daemon = DaemonProcess | SyncDaemon | str
#: The ``ivshmem_daemon`` fixture: ``async with ivshmem_daemon(vectors=2) as daemon``.
DaemonFactory = Callable[..., AbstractAsyncContextManager[DaemonProcess]]
#: The ``ivshmem_fabric`` fixture: ``async with ivshmem_fabric(hosts=3) as daemons``.
FabricFactory = Callable[..., AbstractAsyncContextManager[list[DaemonProcess]]]
#: The processes a test started, for its report.
_STARTED = pytest.StashKey[list[ChildRecord]]()


# ---------------------------------------------------------------------------------------------
# Options, the trio check, the report sections
# ---------------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ivshmem", "ivshmem fixtures")
    group.addoption(
        "--ivshmem-timeout",
        type=float,
        metavar="SECONDS",
        default=None,
        help=f"default timeout of every ivshmem fixture wait (default {DEFAULT_TIMEOUT:g})",
    )
    parser.addini("ivshmem_timeout", "default timeout (seconds) of the ivshmem fixtures' waits")
    parser.addini("ivshmem_session_vectors", "vectors of ivshmem_session_daemon (default 2)")
    parser.addini("ivshmem_session_size", "shm size of ivshmem_session_daemon (default 16M)")


def fixture_timeout(config: pytest.Config) -> float:
    """``--ivshmem-timeout``, else the ``ivshmem_timeout`` ini option, else the default."""
    given = config.getoption("ivshmem_timeout", None) or config.getini("ivshmem_timeout")
    try:
        value = float(given) if given else DEFAULT_TIMEOUT
    except ValueError:
        raise pytest.UsageError(f"ivshmem_timeout: not a number: {given!r}") from None
    if value <= 0:
        raise pytest.UsageError(f"ivshmem_timeout must be positive, got {value:g}")
    return value


def pytest_configure(config: pytest.Config) -> None:
    fixture_timeout(config)  # a bad value is a usage error at once, not in every test


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """An async fixture in a test pytest-trio does not run would fail obscurely: say why."""
    wanted = [name for name in ASYNC_FIXTURES if name in getattr(item, "fixturenames", ())]
    if wanted and item.get_closest_marker("trio") is None:
        pytest.fail(
            f"{wanted[0]} is an async fixture: it needs pytest-trio (pip install pytest-trio) "
            "and a trio test: set 'trio_mode = true' in your pytest configuration or mark "
            "the test @pytest.mark.trio (plain tests: use ivshmem_daemon_sync and "
            "ivshmem_peers_sync)",
            pytrace=False,
        )


def _started(node: pytest.Item | pytest.FixtureRequest) -> list[ChildRecord]:
    item = node.node if isinstance(node, pytest.FixtureRequest) else node
    return item.stash.setdefault(_STARTED, [])


def _title(child: ChildRecord) -> str:
    if isinstance(child, PeerRecord):
        who = f"peer {child.peer_id}" if child.peer_id is not None else "peer (no id yet)"
        plugin = child.argv[child.argv.index("--plugin") + 1] if "--plugin" in child.argv else ""
        return f"ivshmem {who} (pid {child.pid}, {plugin})"
    socket_path = getattr(child, "socket_path", "")
    return f"ivshmem daemon (pid {child.pid}, {socket_path})"


def _section(child: ChildRecord) -> str:
    lines = list(child.log)[-REPORT_LINES:]
    text = "\n".join(lines) if lines else "(no log lines)"
    if isinstance(child, PeerRecord):
        events = "\n".join(str(e) for e in list(child.events)[-REPORT_LINES:])
        text = f"{text}\n-- events --\n{events or '(none)'}"
    return text


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On failure, attach the log of every daemon and peer the test started."""
    report = yield
    if report.failed:
        started: list[ChildRecord] = item.stash.get(_STARTED, [])
        children = list(started)
        session = getattr(item, "funcargs", {}).get("ivshmem_session_daemon")
        if session is not None:
            children.insert(0, session)
        for child in children:
            report.sections.append((_title(child), _section(child)))
    return report


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------


class PeerOptions(TypedDict, total=False):
    """Keyword options of the peer spawners: ``peer_args`` are the peer's own options
    (before ``--plugin``), ``env`` adds environment variables, ``pythonpath`` directories
    (where a test-only plugin lives); ``wait_running=False`` returns at once instead of when
    the peer runs; ``timeout`` bounds that wait."""

    peer_args: Sequence[str]
    env: dict[str, str] | None
    pythonpath: Sequence[str | os.PathLike[str]]
    wait_running: bool
    timeout: float


def peer_launch(
    daemon: Daemon,
    plugin: str,
    args: Sequence[str],
    env: dict[str, str] | None = None,
    pythonpath: Sequence[str | os.PathLike[str]] = (),
    peer_args: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a peer of ``daemon`` (a daemon or a socket path): its
    device gets the daemon's vector count, ``pythonpath`` goes first on PYTHONPATH."""
    if isinstance(daemon, str):
        argv = peer_command(daemon, plugin, args, peer_args=peer_args)
    else:
        argv = peer_command(
            daemon.socket_path, plugin, args, vectors=daemon.vectors, peer_args=peer_args
        )
    return argv, peer_environment(env, pythonpath)


def _launch(daemon: Daemon, plugin: str, args: Sequence[str], options: PeerOptions) -> Any:
    return peer_launch(
        daemon,
        plugin,
        args,
        options.get("env"),
        options.get("pythonpath", ()),
        options.get("peer_args", ()),
    )


class PeerSpawner:
    """What the ``ivshmem_peers`` fixture gives: call it to start a peer, :meth:`many` to
    start several at once.

    Use it only inside one test; the fixture stops every peer it started when the test ends.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        nursery: trio.Nursery | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        started: list[ChildRecord] | None = None,
    ) -> None:
        self._supervisor = supervisor
        self._nursery = nursery
        self._forkservers: dict[tuple[Any, ...], ForkServer] = {}
        self.timeout = timeout
        self.peers: list[PeerProcess] = []
        self._started = started if started is not None else []

    async def __call__(
        self,
        daemon: Daemon,
        plugin: str,
        args: Sequence[str] = (),
        **options: Unpack[PeerOptions],
    ) -> PeerProcess:
        """Start a peer running ``plugin`` (with its ``args``) against ``daemon`` (or a
        socket path). Returns once it is running (its ``peer_id`` known), unless
        ``wait_running=False``; raises :class:`PeerError` if it exits before that."""
        argv, env = _launch(daemon, plugin, args, options)
        peer = self._adopted(PeerProcess(argv, timeout=self.timeout))
        await self._supervisor.start(peer, env=env, events=True)
        if options.get("wait_running", True):
            await peer.wait_running(options.get("timeout"))
        return peer

    def _adopted(self, peer: PeerProcess) -> PeerProcess:
        self.peers.append(peer)
        self._started.append(peer)
        return peer

    async def many(
        self,
        daemon: Daemon,
        plugin: str,
        count: int,
        args: Sequence[str] = (),
        **options: Unpack[PeerOptions],
    ) -> list[PeerProcess]:
        """Start ``count`` peers of ``plugin`` at once, forked from a fork server (started
        on first use, one per environment); return them once all run (unless
        ``wait_running=False``), in the order they were started."""
        argv, env = _launch(daemon, plugin, args, options)
        server = await self._forkserver(plugin, env)
        peers = [self._adopted(PeerProcess(argv, timeout=self.timeout)) for _ in range(count)]
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(server.start_peer, self._supervisor, peer)
        if options.get("wait_running", True):
            for peer in peers:
                await peer.wait_running(options.get("timeout"))
        return peers

    async def _forkserver(self, plugin: str, env: dict[str, str]) -> ForkServer:
        if self._nursery is None:
            raise PeerError("this spawner has no nursery for a fork server")
        key = tuple(sorted(env.items()))
        server = self._forkservers.get(key)
        if server is None or server.gone:
            server = await ForkServer.start(self._supervisor, [plugin], env)
            self._nursery.start_soon(server.run)
            with trio.fail_after(self.timeout):
                await server.ready.wait()
            if server.gone:
                raise PeerError(f"the fork server did not start: {list(server.child.log)}")
            self._forkservers[key] = server
        return server

    async def aclose(self) -> None:
        """Stop every peer, then the fork servers."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for peer in self.peers:
                    if peer.alive:
                        nursery.start_soon(peer.stop, STOP_GRACE)
            for server in self._forkservers.values():
                await server.aclose()


class SyncPeerSpawner:
    """What the ``ivshmem_peers_sync`` fixture gives: call it to start a peer (blocking)."""

    def __init__(
        self,
        supervisor: SyncSupervisor,
        timeout: float = DEFAULT_TIMEOUT,
        started: list[ChildRecord] | None = None,
    ) -> None:
        self._supervisor = supervisor
        self.timeout = timeout
        self.peers: list[SyncPeerProcess] = []
        self._started = started if started is not None else []

    def __call__(
        self, daemon: Daemon, plugin: str, args: Sequence[str] = (), **options: Unpack[PeerOptions]
    ) -> SyncPeerProcess:
        """Start a peer, as :meth:`PeerSpawner.__call__` does."""
        (peer,) = self.many(daemon, plugin, 1, args, **options)
        return peer

    def many(
        self,
        daemon: Daemon,
        plugin: str,
        count: int,
        args: Sequence[str] = (),
        **options: Unpack[PeerOptions],
    ) -> list[SyncPeerProcess]:
        """Start ``count`` peers at once (each a fresh interpreter), then wait until all
        run (unless ``wait_running=False``)."""
        argv, env = _launch(daemon, plugin, args, options)
        peers = []
        for _ in range(count):
            peer = self._supervisor.start(
                SyncPeerProcess(argv, timeout=self.timeout), env=env, events=True
            )
            self.peers.append(peer)
            self._started.append(peer)
            peers.append(peer)
        if options.get("wait_running", True):
            for peer in peers:
                peer.wait_running(options.get("timeout"))
        return peers


# ---------------------------------------------------------------------------------------------
# The fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ivshmem_daemon(tmp_path: Path, request: pytest.FixtureRequest) -> DaemonFactory:
    """Factory: ``async with ivshmem_daemon(vectors=2, size="1M", args=[...]) as daemon``
    runs a real ``ivshmemd`` under ``tmp_path`` and always cleans it up."""
    started = _started(request)
    timeout = fixture_timeout(request.config)

    @asynccontextmanager
    async def start(**kwargs: Any) -> AsyncIterator[DaemonProcess]:
        kwargs.setdefault("timeout", timeout)
        async with daemon_process(tmp_path, **kwargs) as daemon:
            started.append(daemon)
            yield daemon

    return start


@pytest.fixture
def ivshmem_fabric(tmp_path: Path, request: pytest.FixtureRequest) -> FabricFactory:
    """Factory: ``async with ivshmem_fabric(hosts=3) as daemons`` runs federated daemons
    under ``tmp_path`` (see the module docstring) and always cleans them up."""
    started = _started(request)
    timeout = fixture_timeout(request.config)

    @asynccontextmanager
    async def start(hosts: int = 2, **kwargs: Any) -> AsyncIterator[list[DaemonProcess]]:
        kwargs.setdefault("wait", timeout)
        async with fabric_process(tmp_path, hosts, **kwargs) as daemons:
            started.extend(daemons)
            yield daemons

    return start


@pytest.fixture
async def ivshmem_peers(request: pytest.FixtureRequest) -> AsyncIterator[PeerSpawner]:
    """Spawner: ``peer = await ivshmem_peers(daemon, "ping", [...])``,
    ``await ivshmem_peers.many(daemon, "ping", 4)``; every peer is stopped (SIGTERM, then
    SIGKILL) and reaped when the test ends."""
    started = _started(request)
    async with open_supervisor() as supervisor, trio.open_nursery() as nursery:
        spawner = PeerSpawner(supervisor, nursery, fixture_timeout(request.config), started)
        try:
            yield spawner
        finally:
            await spawner.aclose()
            nursery.cancel_scope.cancel()


@pytest.fixture
def ivshmem_daemon_sync(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[..., AbstractContextManager[SyncDaemon]]:
    """Factory for plain tests: ``with ivshmem_daemon_sync(vectors=2) as daemon``."""
    started = _started(request)
    timeout = fixture_timeout(request.config)

    @contextmanager
    def start(**kwargs: Any) -> Iterator[SyncDaemon]:
        kwargs.setdefault("timeout", timeout)
        with sync_daemon_process(tmp_path, **kwargs) as daemon:
            started.append(daemon)
            yield daemon

    return start


@pytest.fixture
def ivshmem_peers_sync(request: pytest.FixtureRequest) -> Iterator[SyncPeerSpawner]:
    """Spawner for plain tests: ``peer = ivshmem_peers_sync(daemon, "ping")``; every
    peer is stopped and reaped when the test ends."""
    with sync_supervisor() as supervisor:
        yield SyncPeerSpawner(supervisor, fixture_timeout(request.config), _started(request))


@pytest.fixture(scope="session")
def ivshmem_session_daemon(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[SyncDaemon]:
    """One ``ivshmemd`` for the whole session (see the module docstring); usable from trio
    and plain tests alike."""
    vectors = pytestconfig.getini("ivshmem_session_vectors") or "2"
    size = pytestconfig.getini("ivshmem_session_size") or "16M"
    try:
        count = int(vectors)
    except ValueError:
        raise pytest.UsageError(f"ivshmem_session_vectors: not an integer: {vectors!r}") from None
    directory = tmp_path_factory.mktemp("ivshmem-session")
    with sync_daemon_process(
        directory, vectors=count, size=size, timeout=fixture_timeout(pytestconfig)
    ) as daemon:
        yield daemon
