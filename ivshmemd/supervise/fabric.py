"""Several federated ``ivshmemd`` on one machine: each its own "host" (its own shm), ids
split into disjoint ranges, every daemon told of the first one (membership spreads).

:func:`host_id_ranges` and :func:`federation_args` say how (the launcher's ``up --hosts N``,
the ``ivshmem_fabric`` fixture and the tests all use them); :func:`fabric_process` runs
the daemons for the duration of a block, and returns once every daemon has every other as
a member (each logs ``member ... is up`` once per other daemon), so that a peer started on
any host sees the peers of every other.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from ..protocol import MAX_PEER_ID
from .daemon import DEFAULT_SIZE, DaemonProcess, daemon_process
from .spawn import WAIT_TIMEOUT

__all__ = [
    "MEMBER_UP",
    "fabric_process",
    "federation_args",
    "federation_endpoints",
    "federation_pid",
    "host_id_ranges",
]

#: what a daemon logs when another daemon became its member
MEMBER_UP = r"federation: member .* is up"


def host_id_ranges(hosts: int) -> list[tuple[int, int]]:
    """``hosts`` disjoint peer-id ranges covering 0..65535 (the first ids on host 0, so a
    single host keeps QEMU's numbering)."""
    if not 1 <= hosts <= 256:
        raise ValueError(f"hosts must be in 1..256, got {hosts}")
    span = (MAX_PEER_ID + 1) // hosts
    return [(i * span, (i + 1) * span - 1 if i < hosts - 1 else MAX_PEER_ID) for i in range(hosts)]


def federation_pid(daemon_pid: int) -> int:
    """The pid of a daemon's federation process (one of its children)."""
    children = [  # a child is listed under the thread that forked it
        child
        for task in Path(f"/proc/{daemon_pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"ivshmemd.federation.process" in f.read():
                return int(child)
    raise LookupError(f"daemon {daemon_pid} has no federation process among {children}")


def federation_endpoints(directory: str | os.PathLike[str], hosts: int) -> list[str]:
    """One unique ipc endpoint per host in ``directory``."""
    tag = uuid.uuid4().hex[:8]
    return [f"ipc://{Path(directory)}/fed-{tag}-{index}" for index in range(hosts)]


def federation_args(
    endpoints: Sequence[str], index: int, *, timeout: float | None = None
) -> list[str]:
    """The options of host ``index`` of a fabric listening on ``endpoints``: its id range,
    its endpoint, and (but for host 0) host 0 as the member to contact."""
    lo, hi = host_id_ranges(len(endpoints))[index]
    args = ["--peer-ids", f"{lo}-{hi}", "--federation-listen", endpoints[index]]
    if index:
        args += ["--federation-peer", endpoints[0]]
    if timeout is not None:
        args += ["--federation-timeout", f"{timeout:g}"]
    return args


@asynccontextmanager
async def fabric_process(
    directory: str | os.PathLike[str],
    hosts: int,
    *,
    vectors: int = 1,
    size: str | int = DEFAULT_SIZE,
    args: Sequence[str] = (),
    timeout: float | None = None,
    wait: float = WAIT_TIMEOUT,
) -> AsyncIterator[list[DaemonProcess]]:
    """Run ``hosts`` federated daemons (``args`` for each) until the block ends; return
    them once every one has every other as a member. ``timeout`` is
    ``--federation-timeout``."""
    endpoints = federation_endpoints(directory, hosts)
    async with AsyncExitStack() as stack:
        daemons: list[DaemonProcess] = []
        for index in range(hosts):
            extra = [*federation_args(endpoints, index, timeout=timeout), *args]
            daemon = await stack.enter_async_context(
                daemon_process(directory, vectors=vectors, size=size, args=extra, timeout=wait)
            )
            daemons.append(daemon)
        for daemon in daemons:
            await daemon.wait_log(MEMBER_UP, hosts - 1, wait)
        yield daemons
