"""A process that uses the shared-memory directory on an inherited fd, driven line by line.

    python tests/peers/shmdir_peer.py FD SIZE PEER_ID

Each line on stdin is a command; each answer is one JSON object on stdout:
``allocate NAME SIZE``, ``lookup NAME``, ``free NAME``, ``seek KEY SIZE``, ``claimed KEY``,
``entries``. Errors of the directory come back as ``{"error": message}``. Its own process
holds its directory locks, as a peer does; killing it is a peer leaving.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import sys
from typing import Any

from peers.shmdir import ShmDirectory, ShmDirectoryError


def main() -> None:
    fd, size, peer_id = (int(x) for x in sys.argv[1:4])
    memory = mmap.mmap(fd, size)

    def read(offset: int, n: int) -> bytes:
        return memory[offset : offset + n]

    def write(offset: int, data: bytes) -> None:
        memory[offset : offset + len(data)] = data

    directory = ShmDirectory(fd, size, read, write, peer_id)
    print(json.dumps({"ready": peer_id}), flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        result: Any
        try:
            if command == "allocate":
                result = directory.allocate(args[0], int(args[1]))
            elif command == "lookup":
                result = directory.lookup(args[0])
            elif command == "free":
                result = directory.free(args[0])
            elif command == "seek":
                result = directory.seek(args[0], int(args[1]))
            elif command == "claimed":
                result = directory.claimed(args[0])
            else:
                result = [dataclasses.asdict(e) for e in directory.entries()]
        except ShmDirectoryError as exc:
            result = {"error": str(exc)}
        if dataclasses.is_dataclass(result) and not isinstance(result, type):
            result = dataclasses.asdict(result)
        print(json.dumps({"command": command, "result": result}), flush=True)


if __name__ == "__main__":
    main()
