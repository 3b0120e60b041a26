"""The memory-log side channel: a peer tells its daemon which shm pages it wrote.

With a federation that replicates the shared memory (issue 13), every write a peer made
before ringing a doorbell must reach the rung peer's host before its interrupt. A peer that
runs our VMM model knows exactly which pages of the shm memslot it wrote (the stage-2 dirty
log), so it hands them to its daemon before each doorbell it rings, and the daemon diffs only
those pages against its twin instead of scanning the whole region.

Never on the ivshmem socket (any byte a client sends there is a protocol error, and QEMU's
server disconnects it): on a socket of its own beside it, ``SOCK.memlog`` (:func:`memlog_path`),
a ``SOCK_SEQPACKET`` unix socket, so that every message is one packet. The daemon only
listens there while its federation replicates memory; a peer that cannot connect simply does
not report (its daemon has nothing to replicate, or scans for it).

Every packet is one msgpack array, first element :data:`VERSION`, then the kind:

``[1, "hello", peer_id, page_size, npages]`` or ``[..., npages, local]``
    First, once: who reports (checked by the daemon against the connection's credentials and
    the peer it admitted) and the geometry of its bitmap (must match the region). ``local``
    (optional): ``[[offset, length], ...]``, byte ranges of the region that are *host-local*
    for this peer's software and must never be replicated, either way (our peers' directory,
    the last 4 KiB, whose exclusion rests on the host kernel's record locks). The daemon keeps
    every range any of its peers declared for as long as it runs.
``[1, "dirty", first_page, words]``
    Pages written since the previous report, in vfio's IOVA-bitmap format
    (:mod:`vmm.iova_bitmap`): ``words`` is little-endian uint64 words, bit ``k % 64`` of word
    ``k // 64`` for page ``first_page + k``; ``first_page`` is a multiple of 64 (whole words,
    so the receiver ORs words without shifting). Leading and trailing zero words are trimmed
    by :func:`encode_dirty`.

Nothing travels back: a report never waits for an answer. A peer whose report cannot be sent
(its daemon does not read) closes the channel; from then on its daemon scans the whole region
for its writes, which is slower but loses nothing.

This module is sans-I/O: encoding and strict decoding only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgpack
import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_PACKET",
    "SUFFIX",
    "VERSION",
    "Dirty",
    "MemlogError",
    "MemlogHello",
    "decode",
    "encode_dirty",
    "encode_hello",
    "memlog_path",
]

VERSION: Final = 1
#: the side channel's path is the ivshmem socket's path plus this
SUFFIX: Final = ".memlog"
#: bytes of one packet at most: a bitmap of 64 GiB of 4 KiB pages, and the header
MAX_PACKET: Final = (1 << 21) + 64
_WORD_BITS: Final = 64

U64Words = npt.NDArray[np.uint64]


class MemlogError(ValueError):
    """A packet that is not a valid memory-log message (the message says why)."""


@dataclass(frozen=True, slots=True)
class MemlogHello:
    """Who reports, its bitmap's geometry, and the ranges it keeps host-local."""

    peer_id: int
    page_size: int
    npages: int
    local: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Dirty:
    """Pages written since the last report: ``words`` (uint64) from page ``first_page``."""

    first_page: int
    words: U64Words

    def pages(self) -> npt.NDArray[np.int64]:
        """The dirty page numbers, ascending."""
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits).astype(np.int64) + self.first_page


def memlog_path(socket_path: str) -> str:
    """Where the daemon serving ``socket_path`` listens for memory logs."""
    return socket_path + SUFFIX


def encode_hello(
    peer_id: int, page_size: int, npages: int, local: tuple[tuple[int, int], ...] = ()
) -> bytes:
    """The first packet of a channel (``local``: host-local byte ranges, offset and length)."""
    fields: list[Any] = [VERSION, "hello", peer_id, page_size, npages]
    if local:
        fields.append([list(entry) for entry in local])
    return msgpack.packb(fields)  # type: ignore[no-any-return]


def encode_dirty(words: U64Words, first_page: int = 0) -> bytes | None:
    """The report of the dirty pages in ``words`` (bitmap words from page ``first_page``, a
    multiple of 64), trimmed of zero words at both ends; None if no bit is set."""
    if first_page % _WORD_BITS:
        raise ValueError(f"first page {first_page} is not a multiple of {_WORD_BITS}")
    nonzero = np.flatnonzero(words)
    if nonzero.size == 0:
        return None
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    data = np.ascontiguousarray(words[lo:hi], dtype="<u8").tobytes()
    return msgpack.packb(  # type: ignore[no-any-return]
        [VERSION, "dirty", first_page + lo * _WORD_BITS, data]
    )


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise MemlogError(f"{what} must be a non-negative integer, not {value!r:.40}")
    return value


def decode(packet: bytes, *, npages: int | None = None) -> MemlogHello | Dirty:
    """The message in ``packet``; :class:`MemlogError` if it is not a valid one (or, given
    the region's ``npages``, if a dirty report reaches past it)."""
    if len(packet) > MAX_PACKET:
        raise MemlogError(f"a packet of {len(packet)} bytes (at most {MAX_PACKET})")
    try:
        message = msgpack.unpackb(packet, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MemlogError(f"not msgpack: {exc}") from None
    if not isinstance(message, list) or len(message) < 2:
        raise MemlogError("a message is an array [version, kind, ...]")
    if message[0] != VERSION:
        raise MemlogError(f"version {message[0]!r:.20} (this daemon speaks {VERSION})")
    kind = message[1]
    if kind == "hello" and len(message) in (5, 6):
        page_size = _uint(message[3], "page_size")
        if page_size == 0 or page_size & (page_size - 1):
            raise MemlogError(f"page size {page_size} is not a power of two")
        npages_said = _uint(message[4], "npages")
        local = _ranges(message[5], npages_said * page_size) if len(message) == 6 else ()
        return MemlogHello(_uint(message[2], "peer_id"), page_size, npages_said, local)
    if kind == "dirty" and len(message) == 4:
        first_page = _uint(message[2], "first_page")
        data = message[3]
        if not isinstance(data, bytes) or len(data) % 8:
            raise MemlogError("dirty words must be bytes, a whole number of uint64 words")
        if first_page % _WORD_BITS:
            raise MemlogError(f"first page {first_page} is not a multiple of {_WORD_BITS}")
        words = np.frombuffer(data, dtype="<u8").astype(np.uint64, copy=False)
        if npages is not None and first_page + len(words) * _WORD_BITS > _round_up(npages):
            raise MemlogError(
                f"dirty pages up to {first_page + len(words) * _WORD_BITS}, "
                f"past the region's {npages}"
            )
        return Dirty(first_page, words)
    raise MemlogError(f"unknown message {kind!r:.20} with {len(message)} elements")


#: host-local ranges a hello may declare
MAX_LOCAL_RANGES: Final = 16


def _ranges(value: Any, size: int) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or len(value) > MAX_LOCAL_RANGES:
        raise MemlogError(f"local ranges must be a list of at most {MAX_LOCAL_RANGES}")
    out = []
    for entry in value:
        if not isinstance(entry, list) or len(entry) != 2:
            raise MemlogError("a local range is [offset, length]")
        offset, length = _uint(entry[0], "offset"), _uint(entry[1], "length")
        if length == 0 or offset + length > size:
            raise MemlogError(f"local range {offset}+{length} is empty or past the region")
        out.append((offset, length))
    return tuple(out)


def _round_up(npages: int) -> int:
    return -(-npages // _WORD_BITS) * _WORD_BITS
