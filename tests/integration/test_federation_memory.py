"""One shared memory across federated daemons (issue 13): real daemons, raw clients that
write their shm mappings as QEMU would (nobody logs their writes: the scan path), our peers
(the dirty-log path), and the guarantee checked exactly: what a client wrote before ringing
is in the rung client's memory when its interrupt arrives, on whatever host.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from contextlib import contextmanager

from peers.pytest_plugin import FabricFactory
from tests.integration.test_federation import clients, first_ids, joined, ring, rung
from tests.rawclient import RawClient

SIZE = 1 << 20


@contextmanager
def mapped(client: RawClient, size: int = SIZE) -> Iterator[mmap.mmap]:
    """``client``'s view of its daemon's shm (what a VM's BAR2 is)."""
    view = mmap.mmap(client.shm_fd(), size, mmap.MAP_SHARED)
    try:
        yield view
    finally:
        view.close()


async def test_a_write_before_a_ring_is_there_when_the_remote_interrupt_arrives(
    ivshmem_fabric: FabricFactory,
) -> None:
    async with ivshmem_fabric(2, size="1M") as (a, b):
        first_a, first_b = first_ids(2)
        async with clients(a.socket_path, b.socket_path) as (on_a, on_b):
            await joined(on_a, first_b)
            await joined(on_b, first_a)
            with mapped(on_a) as mem_a, mapped(on_b) as mem_b:
                for round_ in range(20):
                    offset = (round_ * 4099) % (SIZE - 64)
                    payload = f"round {round_} from a".encode()
                    mem_a[offset : offset + len(payload)] = payload
                    ring(on_a, first_b)
                    assert await rung(on_b) == 1
                    assert mem_b[offset : offset + len(payload)] == payload
                    answer = f"answer {round_} from b".encode()
                    mem_b[offset + 32 : offset + 32 + len(answer)] = answer
                    ring(on_b, first_a)
                    assert await rung(on_a) == 1
                    assert mem_a[offset + 32 : offset + 32 + len(answer)] == answer
