"""A client process for multi-process tests: ``python -m tests.peer_probe SOCKET VECTORS``.

It connects with ``peers.client``, then prints one JSON object per line on stdout:
``{"event": "welcome", "id": N, "peers": {...}}``, ``{"event": "joined", "peer": P}`` once all
of a peer's vectors have arrived, ``{"event": "left", "peer": P}``, and
``{"event": "rung", "vector": V, "counter": C}`` when one of its own eventfds fires. It reads
commands on stdin: ``ring PEER VECTOR`` (prints ``{"event": "ringed", "ok": bool}``).

:class:`ProbeProcess` is such a process under supervision (the ``probe`` fixture starts them).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable

import trio

from ivshmemd.supervise import Child
from peers.client import ClientError, IvshmemClient, PeerLeft, PeerVector, connect


class ProbeProcess(Child):
    """A probe process: its JSON events, its id, and its ``ring`` command."""

    @classmethod
    def command(cls, socket_path: str, vectors: int) -> ProbeProcess:
        return cls([sys.executable, "-m", "tests.peer_probe", socket_path, str(vectors)])

    @property
    def peer_id(self) -> int:
        """The id the daemon gave it (from its welcome line)."""
        return int(self.first_of["welcome"]["id"])

    async def ring(self, peer_id: int, vector: int) -> None:
        """Ask it to ring ``peer_id``'s ``vector`` (it reports ``ringed``)."""
        await self.send_line(f"ring {peer_id} {vector}")


#: The ``probe`` fixture: ``client = await probe(socket_path, vectors)``.
StartProbe = Callable[[str, int], Awaitable[ProbeProcess]]


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def watch_vector(index: int, fd: int) -> None:
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            count = os.eventfd_read(fd)
        except BlockingIOError:
            continue
        emit(event="rung", vector=index, counter=count)


async def watch_server(client: IvshmemClient, vectors: int) -> None:
    while True:
        event = await client.next_event()
        if isinstance(event, PeerVector) and not event.own and event.index == vectors - 1:
            emit(event="joined", peer=event.peer_id)
        elif isinstance(event, PeerLeft):
            emit(event="left", peer=event.peer_id)


async def commands(client: IvshmemClient) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buffer = b""
    async for chunk in stdin:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            words = line.decode().split()
            if words and words[0] == "ring":
                emit(event="ringed", ok=client.ring(int(words[1]), int(words[2])))


async def main(path: str, vectors: int) -> None:
    client = await connect(path, vectors=vectors)
    with client:
        emit(
            event="welcome",
            id=client.peer_id,
            shm_size=client.shm_size,
            peers={str(p): len(v) for p, v in client.peers.items()},
        )
        async with trio.open_nursery() as nursery:
            for index, fd in enumerate(client.own_vectors):
                nursery.start_soon(watch_vector, index, fd)
            nursery.start_soon(commands, client)
            await watch_server(client, vectors)


if __name__ == "__main__":
    try:
        trio.run(main, sys.argv[1], int(sys.argv[2]))
    except ClientError as exc:
        emit(event="error", message=str(exc))
        sys.exit(1)
