"""The shared-memory directory: named regions of BAR2 and partners, agreed between peers.

Several plugins (and several pairs of one plugin) share one shared memory. So that none of
them ever writes over another, they take their memory from this directory instead of
picking offsets: ``guest.shm.allocate("my-table", 64 * 1024)`` returns a :class:`Region`
(an offset and a size in BAR2) that no other live peer holds. Peers that need a partner
(``ping``, ``ring``, a request/acknowledge protocol) find one here too
(:meth:`ShmDirectory.seek`): the pair is written down once, both sides read the same
entry, and each pair gets its own region.

Where it lives: the **last 4 KiB of the shared memory** (:data:`DIRECTORY_SIZE`). Regions
are handed out from offset 0 up, page-aligned, below it. A QEMU guest (or any software)
that does not use the directory is unaffected as long as it leaves that last page alone and
its own data where no directory user allocates; the directory is only created (its page
overwritten) when a peer first uses it.

Layout (little-endian)::

    +0x000  magic u64 "IVSHDIR1" | version u32 | entry count u32 | reserved to 0x40
    +0x040  63 entries of 64 bytes:
            kind u8 | reserved u8 | owner peer id u16 | partner peer id u16 | reserved u16
            owner token u64 | partner token u64 | offset u64 | size u64 | name 24 bytes

    kind  0 free, 1 region (``allocate``), 2 a peer seeking a partner (its ``name`` is the
          pairing key, its region reserved for the pair), 3 a pair (owner: the peer that
          waited, partner: the peer that claimed it)

Exclusion and liveness, with POSIX record locks (``fcntl``) on the shm fd every peer holds.
They sit far beyond the end of the shared memory, so they lock no real byte:

* the directory lock (one byte at :data:`DIRECTORY_LOCK`) is held while the directory is
  read or changed, so one peer at a time does either;
* each peer using the directory draws a random 60-bit *token* and holds a lock on the byte
  at ``LIVENESS_BASE + token`` for as long as it runs. The kernel drops the lock when the
  process exits, however it exits; so an entry whose owner's byte is no longer locked
  belongs to a peer that has gone, and is reclaimed (a pair once both of its peers have
  gone). Tokens, not peer ids, name owners: ids are reused (they wrap, and a daemon
  restarted on the same ``-M`` shm starts again from 0), tokens are not.

The directory is used at set-up only: the doorbell and data paths never touch it. It is
host-local (the locks are the host kernel's).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DIRECTORY_LOCK",
    "DIRECTORY_SIZE",
    "LIVENESS_BASE",
    "MAX_NAME",
    "PAGE_SIZE",
    "Entry",
    "Kind",
    "Pair",
    "Region",
    "ShmDirectory",
    "ShmDirectoryError",
]

#: The directory takes the last this many bytes of the shared memory.
DIRECTORY_SIZE: Final = 4096
#: Regions start and end on page boundaries (a plugin's ring or table is page-aligned).
PAGE_SIZE: Final = 4096
MAGIC: Final = int.from_bytes(b"IVSHDIR1", "little")
VERSION: Final = 1
HEADER: Final = struct.Struct("<QII")
HEADER_SIZE: Final = 64
ENTRY: Final = struct.Struct("<BBHHHQQQQ24s")
ENTRY_SIZE: Final = ENTRY.size
CAPACITY: Final = (DIRECTORY_SIZE - HEADER_SIZE) // ENTRY_SIZE
#: Longest region name or pairing key, in UTF-8 bytes.
MAX_NAME: Final = 24
#: The byte locked while the directory is read or changed (beyond any shm size).
DIRECTORY_LOCK: Final = 1 << 61
#: Peer liveness: the byte ``LIVENESS_BASE + token`` is locked by its owner while it runs.
LIVENESS_BASE: Final = 1 << 62
TOKEN_BITS: Final = 60
#: struct flock on Linux (short type, short whence, off_t start, off_t len, pid_t pid).
_FLOCK: Final = struct.Struct("@hhqqi4x")


class Kind:
    """What an entry is (its first byte)."""

    FREE: Final = 0
    REGION: Final = 1
    SEEKING: Final = 2
    PAIRED: Final = 3


class ShmDirectoryError(Exception):
    """The directory cannot do what was asked (no room, a name taken, a bad name)."""


@dataclass(frozen=True)
class Region:
    """A part of the shared memory: ``size`` bytes at ``offset`` in BAR2, held by peer
    ``owner``."""

    name: str
    offset: int
    size: int
    owner: int

    @property
    def end(self) -> int:
        """The first offset after it."""
        return self.offset + self.size


@dataclass(frozen=True)
class Pair:
    """Two peers that agreed to work together: ``partner`` is the other one's id.

    ``leader`` is true for the peer that waited (it was there first and was claimed): by
    the pairing rule it speaks first, the other one only answers. ``region`` is the pair's
    own memory (None when no size was asked for)."""

    key: str
    partner: int
    leader: bool
    region: Region | None


@dataclass
class Entry:
    """One directory slot, decoded."""

    index: int
    kind: int
    owner: int
    partner: int
    owner_token: int
    partner_token: int
    offset: int
    size: int
    name: str

    def pack(self) -> bytes:
        return ENTRY.pack(
            self.kind,
            0,
            self.owner,
            self.partner,
            0,
            self.owner_token,
            self.partner_token,
            self.offset,
            self.size,
            self.name.encode(),
        )

    @classmethod
    def unpack(cls, index: int, raw: bytes) -> Entry:
        kind, _r, owner, partner, _r2, otoken, ptoken, offset, size, name = ENTRY.unpack(raw)
        text = name.rstrip(b"\0").decode(errors="replace")
        return cls(index, kind, owner, partner, otoken, ptoken, offset, size, text)

    def region(self) -> Region | None:
        return Region(self.name, self.offset, self.size, self.owner) if self.size else None


def _page_round(size: int) -> int:
    return -(-size // PAGE_SIZE) * PAGE_SIZE


def _check_name(name: str, what: str) -> None:
    encoded = name.encode()
    if not encoded or len(encoded) > MAX_NAME or b"\0" in encoded:
        raise ShmDirectoryError(f"bad {what} {name!r}: 1..{MAX_NAME} bytes of UTF-8, no NUL")


class ShmDirectory:
    """The directory of one peer's shared memory (see the module docstring).

    ``read(offset, size)`` and ``write(offset, data)`` access BAR2 (the runtime passes the
    guest's vCPU accessors, so the directory's writes are guest writes like any other);
    ``fd`` is the shm fd the daemon sent (the locks are taken on it).
    """

    def __init__(
        self,
        fd: int,
        shm_size: int,
        read: Callable[[int, int], bytes],
        write: Callable[[int, bytes], None],
        peer_id: int,
    ) -> None:
        self.fd = fd
        self.shm_size = shm_size
        self.base = shm_size - DIRECTORY_SIZE
        self._read = read
        self._write = write
        self.peer_id = peer_id
        self.token = 0  # drawn, and its liveness byte locked, on first use

    # -- locks ----------------------------------------------------------------------------

    def _lock(self, command: int, kind: int, start: int) -> int:
        """fcntl record lock ``command`` on one byte; returns the resulting lock type."""
        request = _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0)
        try:
            answer = fcntl.fcntl(self.fd, command, request)
        except OSError as exc:
            raise ShmDirectoryError(
                f"cannot lock the shared memory's directory: {os.strerror(exc.errno or 0)}"
            ) from None
        return int(_FLOCK.unpack(answer)[0])

    def _register(self) -> None:
        """Draw our token and lock its liveness byte (held until the process exits)."""
        if self.token:
            return
        if self.base < PAGE_SIZE:
            raise ShmDirectoryError(
                f"the shared memory ({self.shm_size} bytes) is too small for the "
                f"{DIRECTORY_SIZE}-byte directory and a region: use at least "
                f"{DIRECTORY_SIZE + PAGE_SIZE} bytes (ivshmemd -l)"
            )
        while True:
            token = secrets.randbits(TOKEN_BITS)
            if token and self._lock(fcntl.F_GETLK, fcntl.F_WRLCK, LIVENESS_BASE + token) == (
                fcntl.F_UNLCK
            ):
                break
        self._lock(fcntl.F_SETLK, fcntl.F_WRLCK, LIVENESS_BASE + token)
        self.token = token

    def alive(self, token: int) -> bool:
        """Whether the peer holding ``token`` still runs."""
        if token == self.token:
            return True
        locked = self._lock(fcntl.F_GETLK, fcntl.F_WRLCK, LIVENESS_BASE + token)
        return locked != fcntl.F_UNLCK

    @contextmanager
    def _locked(self) -> Iterator[list[Entry]]:
        """Hold the directory lock; yield the live entries (dead owners' entries freed)."""
        self._register()
        self._lock(fcntl.F_SETLKW, fcntl.F_WRLCK, DIRECTORY_LOCK)
        try:
            yield self._load()
        finally:
            self._lock(fcntl.F_SETLK, fcntl.F_UNLCK, DIRECTORY_LOCK)

    # -- the table ------------------------------------------------------------------------

    def _load(self) -> list[Entry]:
        raw = self._read(self.base, DIRECTORY_SIZE)
        magic, version, count = HEADER.unpack_from(raw)
        if magic != MAGIC or version != VERSION or count != CAPACITY:
            # never used (or by something else): start a fresh directory
            self._write(self.base, bytes(DIRECTORY_SIZE))
            self._write(self.base, HEADER.pack(MAGIC, VERSION, CAPACITY))
            return []
        entries = []
        for index in range(CAPACITY):
            at = HEADER_SIZE + index * ENTRY_SIZE
            entry = Entry.unpack(index, raw[at : at + ENTRY_SIZE])
            if entry.kind == Kind.FREE:
                continue
            if self._dead(entry):
                self._free(entry)
                continue
            entries.append(entry)
        return entries

    def _dead(self, entry: Entry) -> bool:
        if entry.kind not in (Kind.REGION, Kind.SEEKING, Kind.PAIRED):
            return True
        if entry.kind == Kind.PAIRED:
            return not (self.alive(entry.owner_token) or self.alive(entry.partner_token))
        return not self.alive(entry.owner_token)

    def _store(self, entry: Entry) -> None:
        self._write(self.base + HEADER_SIZE + entry.index * ENTRY_SIZE, entry.pack())

    def _free(self, entry: Entry) -> None:
        entry.kind = Kind.FREE
        self._write(self.base + HEADER_SIZE + entry.index * ENTRY_SIZE, bytes(ENTRY_SIZE))

    def _new_entry(self, entries: list[Entry], **fields: int | str) -> Entry:
        used = {e.index for e in entries}
        index = next((i for i in range(CAPACITY) if i not in used), None)
        if index is None:
            raise ShmDirectoryError(
                f"the shared memory's directory is full ({CAPACITY} entries in use)"
            )
        entry = Entry(index, Kind.FREE, self.peer_id, 0, self.token, 0, 0, 0, "")
        for key, value in fields.items():
            setattr(entry, key, value)
        self._store(entry)
        entries.append(entry)
        return entry

    def _place(self, entries: list[Entry], size: int, name: str) -> int:
        """The lowest page-aligned offset where ``size`` bytes fit between live regions."""
        want = _page_round(size)
        taken = sorted((e.offset, e.offset + _page_round(e.size)) for e in entries if e.size)
        at = 0
        for start, end in taken:
            if start - at >= want:
                return at
            at = max(at, end)
        if self.base - at >= want:
            return at
        used = sum(end - start for start, end in taken)
        raise ShmDirectoryError(
            f"no room for {name} ({want} bytes) in the shared memory: {self.shm_size} bytes, "
            f"{used} held by {len(taken)} region{'s' if len(taken) != 1 else ''}, "
            f"{DIRECTORY_SIZE} for the directory; give the daemon more (ivshmemd -l, "
            "ivshmemctl up --size) or ask for less"
        )

    # -- regions --------------------------------------------------------------------------

    def allocate(self, name: str, size: int) -> Region:
        """A new region of ``size`` bytes (rounded up to whole pages) named ``name``, held
        by this peer until it exits or :meth:`free`\\ s it. Raises
        :class:`ShmDirectoryError` if a live peer holds that name or there is no room."""
        _check_name(name, "region name")
        if size < 1:
            raise ShmDirectoryError(f"region {name!r}: the size must be at least 1, got {size}")
        with self._locked() as entries:
            for entry in entries:
                if entry.kind == Kind.REGION and entry.name == name:
                    raise ShmDirectoryError(
                        f"region {name!r} is held by peer {entry.owner} "
                        f"({entry.size} bytes at {entry.offset:#x})"
                    )
            offset = self._place(entries, size, f"region {name!r}")
            entry = self._new_entry(
                entries, kind=Kind.REGION, offset=offset, size=_page_round(size), name=name
            )
        region = entry.region()
        assert region is not None
        return region

    def lookup(self, name: str) -> Region | None:
        """The live region named ``name`` (whoever holds it), or None."""
        with self._locked() as entries:
            for entry in entries:
                if entry.kind == Kind.REGION and entry.name == name:
                    return entry.region()
        return None

    def free(self, name: str) -> bool:
        """Give back our region ``name``; False if we hold none of that name."""
        with self._locked() as entries:
            for entry in entries:
                if entry.kind == Kind.REGION and entry.name == name and self._ours(entry):
                    self._free(entry)
                    return True
        return False

    def entries(self) -> list[Entry]:
        """The live entries (for listings and tests)."""
        with self._locked() as entries:
            return sorted(entries, key=lambda e: e.index)

    def _ours(self, entry: Entry) -> bool:
        return entry.owner_token == self.token

    # -- partners -------------------------------------------------------------------------

    def seek(self, key: str, size: int = 0) -> Pair | None:
        """Find a partner among the peers seeking one under ``key``.

        If one is waiting, claim it: the pair is written down at once and returned (we are
        not its leader). Otherwise write down that we are waiting (reserving ``size`` bytes
        for the pair now, so that a shared memory too small says so at once) and return
        None: :meth:`claimed` then tells when someone claimed us. Idempotent: seeking again
        returns our pair if we have one, and keeps our place in the queue otherwise.
        """
        _check_name(key, "pairing key")
        with self._locked() as entries:
            mine = self._our_pairing(entries, key)
            if mine is not None and mine.kind == Kind.PAIRED:
                return self._pair_of(mine)
            if mine is None:
                waiting = sorted(
                    (e for e in entries if e.kind == Kind.SEEKING and e.name == key),
                    key=lambda e: (e.owner, e.index),
                )
                if waiting:
                    entry = waiting[0]
                    entry.kind, entry.partner, entry.partner_token = (
                        Kind.PAIRED,
                        self.peer_id,
                        self.token,
                    )
                    self._store(entry)
                    return self._pair_of(entry)
                offset = self._place(entries, size, f"a {key} pair's region") if size else 0
                self._new_entry(
                    entries,
                    kind=Kind.SEEKING,
                    offset=offset,
                    size=_page_round(size) if size else 0,
                    name=key,
                )
        return None

    def claimed(self, key: str) -> Pair | None:
        """Our pair under ``key`` if a partner has claimed us (and still runs), else None.
        A partner that claimed us and died before we noticed is forgotten: we wait again."""
        with self._locked() as entries:
            mine = self._our_pairing(entries, key)
            if mine is None or mine.kind != Kind.PAIRED:
                return None
            return self._pair_of(mine)

    def _our_pairing(self, entries: list[Entry], key: str) -> Entry | None:
        """Our seeking or paired entry under ``key``; a pair whose other peer has gone goes
        back to seeking (same region)."""
        for entry in entries:
            if entry.name != key or entry.kind not in (Kind.SEEKING, Kind.PAIRED):
                continue
            if entry.kind == Kind.PAIRED and entry.partner_token == self.token:
                # we claimed it; the owner is us only if we paired with ourselves (never)
                if not self.alive(entry.owner_token):
                    self._free(entry)
                    return None
                return entry
            if entry.owner_token == self.token:
                if entry.kind == Kind.PAIRED and not self.alive(entry.partner_token):
                    entry.kind, entry.partner, entry.partner_token = Kind.SEEKING, 0, 0
                    self._store(entry)
                return entry
        return None

    def _pair_of(self, entry: Entry) -> Pair:
        leader = entry.owner_token == self.token
        partner = entry.partner if leader else entry.owner
        return Pair(entry.name, partner, leader, entry.region())
