"""A hostile peer process: ``python -m tests.peers.hostile_peer SOCKET VICTIM_ID MODE``.

It connects like any peer, takes the eventfd of the victim's vector 0 that the daemon hands
it, and clears ``O_NONBLOCK`` on it, which changes the flag for every holder of that
eventfd (the flag lives in the shared open file description). Then, by ``MODE``:

* ``ring``: rings the victim once and stays connected until stdin closes. The victim wakes,
  takes the ring, and reads again with nothing there (a spinning fast path does);
* ``leave``: leaves at once. The victim, told of the leave, first collects any ring still
  pending in its eventfds (so that the plugin sees the peer's last doorbell before its
  departure): a read with nothing there.

* ``saturate``: (VICTIM_ID is ignored) does it to its *own* vector 0, after filling its
  counter to the largest value an eventfd holds, so that any further ring would have to
  wait; then rings the next peer that joins, once, and stays until stdin closes. That peer's
  answer must not wait forever.

It prints ``{"event": "attacked"}`` once the flag is cleared (and the ring sent).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys

import trio

from peers.client import PeerVector, connect

FULL = 0xFFFF_FFFF_FFFF_FFFE  # an eventfd's counter cannot go higher


async def main(path: str, victim: int, mode: str) -> None:
    client = await connect(path, vectors=1)
    with client:
        if mode == "saturate":
            own = client.own_vectors[0]
            os.eventfd_write(own, FULL)
            fcntl.fcntl(own, fcntl.F_SETFL, fcntl.fcntl(own, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            print(json.dumps({"event": "attacked"}), flush=True)
            while not isinstance(event := await client.next_event(), PeerVector):
                pass
            client.ring(event.peer_id, 0)
            await trio.lowlevel.FdStream(os.dup(0)).receive_some(1)
            return
        fd = client.peers[victim][0]
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        if mode == "ring":
            os.eventfd_write(fd, 1)
        print(json.dumps({"event": "attacked"}), flush=True)
        if mode == "ring":
            await trio.lowlevel.FdStream(os.dup(0)).receive_some(1)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]), sys.argv[3])
