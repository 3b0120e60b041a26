"""A federated daemon in its own process, for tests that kill one (``kill -9``).

``python -m tests.ivshmemd.federation.member_proc LISTEN INDEX [--peer EP]... [--locals N]``
runs a :class:`~ivshmemd.federation.Federation` with a :class:`RecordingHost` and N local
peers, and prints one JSON line per event: ``listening`` (with the bound endpoint), then
``joined``/``left`` for remote peers (with ``member`` and ``peer``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from ivshmemd.federation import Federation
from ivshmemd.registry import SharedFd

from .hosts import RecordingHost, make_config


class PrintingHost(RecordingHost):
    def remote_peer_joined(self, member: str, peer_id: int, vectors: int) -> Sequence[SharedFd]:
        made = super().remote_peer_joined(member, peer_id, vectors)
        _say(event="joined", member=member, peer=peer_id)
        return made

    def remote_peer_left(self, member: str, peer_id: int) -> None:
        super().remote_peer_left(member, peer_id)
        _say(event="left", member=member, peer=peer_id)

    def member_event(self, kind: str, info: Mapping[str, Any]) -> None:
        super().member_event(kind, info)
        _say(event=kind, member=info["member"])


def _say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    config = make_config(args.listen, args.index, peers=tuple(args.peer), timeout=args.timeout)
    host = PrintingHost(config.vectors, config.id_range)
    federation = Federation(config, host)
    host.federation = federation
    async with trio.open_nursery() as nursery:
        endpoint = await nursery.start(federation.run)
        peers = [host.add_local().peer_id for _ in range(args.locals)]
        _say(
            event="listening",
            endpoint=endpoint,
            identity=federation.status()["identity"],
            peers=peers,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("listen")
    parser.add_argument("index", type=int)
    parser.add_argument("--peer", action="append", default=[])
    parser.add_argument("--locals", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1.0)
    trio.run(main, parser.parse_args())
