"""``ring``: a single-producer/single-consumer ring buffer in the shared memory.

Two peers pair up by id as ``ping`` does (0 with 1, 2 with 3, ...; ``--partner``
overrides); the lower id of a pair produces unless ``--role`` says otherwise. Every byte of
the ring, header included, is written and read through the vCPU (``vcpu.write`` /
``vcpu.read`` on BAR2), as a guest driver's loads and stores would be.

Layout in the shared memory (all integers little-endian)::

    0x000  magic u64 | version u32 | checksum kind u16 | producer's doorbell vector u16
           data offset u64 | ring size u64 | session u64 | total bytes u64
           start time u64 (CLOCK_MONOTONIC ns) | max message u64
    0x040  head u64    bytes the producer has published (free-running, its own cache line)
    0x080  tail u64    bytes the consumer has released (free-running, its own cache line)
    0x1000 data area, ``ring size`` bytes (a multiple of the page size)

A message is a record at a 64-byte aligned ring offset: a 32-byte header (tag, sequence
number, payload length, checksum of the payload) and the payload; a record may wrap around
the end of the data area. The checksum is a 64-bit sum of the payload's little-endian
words (C speed through numpy) or, with ``--checksum crc32``, zlib's CRC-32; the producer
records which one in the ring header.

Memory ordering, as a real shared-memory ring does it: the producer writes the record, then
publishes ``head``; the consumer reads ``head``, then the records before it, then publishes
``tail``; each side reads the other's index before reusing space or data. A doorbell (the
Doorbell register) tells the other side an index moved: the producer rings the consumer's
vector 0; the consumer rings the vector the producer names in the ring header (1 when the
producer's device has two vectors, else 0). Each side rings every quarter of a ring's worth
of records and whenever its handler stops, so the other side always hears about the last
index it published and no wake-up is lost.

Cost: every access is a vCPU access, and the vCPU translates 4K at a time, so a 64K
message is 17 ``vcpu.write`` calls on one side and 17 ``vcpu.read`` calls on the other, plus
one numpy reduction each for the checksum; that per-page call is what bounds throughput.

Everything happens in the ``interrupt`` and ``peer_joined`` hooks. A handler does at most
one ring's worth of work, then rings its own doorbell to continue, so signals and the
other events are never held up for long.

Start-up: the consumer rings the producer's vector 0 once both are present ("ready"); on
that doorbell the producer initialises the header (magic last), starts the clock and
writes ``--bytes`` in ``--message-size`` messages; it finishes once the consumer has
released all of them. The consumer reads the header on the producer's first doorbell,
verifies every record, and finishes with ``ring: N bytes in M messages, E checksum
errors, X MB/s, Y messages/s`` (the authoritative figure: from the producer's first
message to the last byte verified); any checksum error makes it fail (exit status 1).
``--corrupt-every N`` (a test aid) makes the producer flip one payload byte in every Nth
message after checksumming it. Both sides fault the shared memory in (one bulk read touch)
before they start, as a driver sets up its ring memory, so the clock measures the steady
state on TLB hits.
"""

from __future__ import annotations

import argparse
import os
import struct
import time
import zlib
from collections.abc import Callable
from typing import Final

import numpy as np

from ..plugin import Guest, Plugin

__all__ = [
    "CHECKSUMS",
    "HEADER_SIZE",
    "PAGE_SIZE",
    "RECORD_HEADER",
    "RingPlugin",
    "checksum_crc32",
    "checksum_sum64",
    "record_size",
]

PAGE_SIZE: Final = 4096
#: The ring header occupies the first page of BAR2; the data area starts at the next one.
HEADER_SIZE: Final = PAGE_SIZE
MAGIC: Final = int.from_bytes(b"IVSHRING", "little")
VERSION: Final = 1
OFF_MAGIC: Final = 0x00
OFF_CONFIG: Final = 0x08  # version .. max message, after the magic
OFF_HEAD: Final = 0x40
OFF_TAIL: Final = 0x80
#: version, checksum kind, producer vector, data offset, ring, session, total, start, max message
CONFIG: Final = struct.Struct("<IHHQQQQQQ")
RECORD_ALIGN: Final = 64
RECORD_TAG: Final = 0x52454344  # "DCER" little-endian: a record starts here
RECORD_HEADER: Final = struct.Struct("<IIQQQ")  # tag, seq, length, checksum, reserved
MAX_MESSAGE: Final = 1 << 30
DEFAULT_BYTES: Final = 100 << 20
DEFAULT_MESSAGE: Final = 64 << 10
MASK64: Final = (1 << 64) - 1
_BILLION: Final = 1_000_000_000


def checksum_sum64(payload: bytes | memoryview) -> int:
    """The payload's little-endian 64-bit words summed modulo 2**64 (a short tail counts as
    one zero-padded word), plus its length: one numpy reduction, C speed."""
    n = len(payload)
    words = n >> 3
    total = int(np.frombuffer(payload, np.uint64, words).sum()) if words else 0
    if n & 7:
        total += int.from_bytes(payload[words << 3 :], "little")
    return (total + n) & MASK64


def checksum_crc32(payload: bytes | memoryview) -> int:
    """zlib's CRC-32 of the payload (slower than ``sum64``, also catches reordering)."""
    return zlib.crc32(payload)


#: Checksum kinds by name; the index is what the ring header records.
CHECKSUMS: Final[dict[str, Callable[[bytes | memoryview], int]]] = {
    "sum64": checksum_sum64,
    "crc32": checksum_crc32,
}
_CHECKSUM_NAMES: Final = list(CHECKSUMS)


def record_size(length: int) -> int:
    """Ring bytes a message of ``length`` payload bytes takes (header, payload, padding)."""
    return -(-(RECORD_HEADER.size + length) // RECORD_ALIGN) * RECORD_ALIGN


def _size(text: str) -> int:
    from ivshmemd.sizes import SizeError, parse_size

    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _RingView:
    """The ring's shared memory as the guest reaches it: vCPU accesses on BAR2 only.

    Transfers are split at page boundaries, the granularity at which the vCPU translates,
    so that each access is one TLB hit and one slice (the vCPU's own multi-page path copies
    more); the data area is page-aligned and a whole number of pages, so no page straddles
    its end. A record's header and the start of its payload go in one access.
    """

    def __init__(self, guest: Guest, ring_size: int) -> None:
        self.vcpu = guest.vcpu
        self.shm_gpa = guest.shm_gpa
        self.data_gpa = guest.shm_gpa + HEADER_SIZE
        self.ring_size = ring_size

    def read64(self, offset: int) -> int:
        return int.from_bytes(self.vcpu.read(self.shm_gpa + offset, 8), "little")

    def write64(self, offset: int, value: int) -> None:
        self.vcpu.write(self.shm_gpa + offset, value.to_bytes(8, "little"))

    def write_header(self, offset: int, data: bytes) -> None:
        self.vcpu.write(self.shm_gpa + offset, data)

    def _span(self, pos: int, n: int) -> list[tuple[int, int, int]]:
        """``n`` bytes from ring offset ``pos`` as (gpa, start, length) runs: one run, or
        two where the ring wraps. The vCPU moves each run leaf by leaf (a 2M block is one
        slice), so a message costs one or two guest accesses, not one per page."""
        base, ring = self.data_gpa, self.ring_size
        pos %= ring
        if pos + n <= ring:
            return [(base + pos, 0, n)]
        first = ring - pos
        return [(base + pos, 0, first), (base, first, n - first)]

    def store_record(self, pos: int, header: bytes, payload: memoryview) -> None:
        """Write a record (``header`` then ``payload``) at the 64-byte aligned offset ``pos``
        (a header never straddles the ring's end: records are 64-byte aligned)."""
        write = self.vcpu.write
        write(self.data_gpa + pos, header)
        for gpa, start, length in self._span(pos + len(header), len(payload)):
            write(gpa, payload[start : start + length])

    def load_record(self, pos: int, limit: int) -> tuple[bytes, bytes | memoryview]:
        """A record's header bytes and its payload, at the 64-byte aligned offset ``pos``;
        ``limit`` bounds the length the header may claim (a bad one gets no payload)."""
        read = self.vcpu.read
        raw = read(self.data_gpa + pos, RECORD_HEADER.size)
        length = int.from_bytes(raw[8:16], "little")
        if not 0 < length <= limit:
            return raw, b""
        runs = self._span(pos + RECORD_HEADER.size, length)
        if len(runs) == 1:
            return raw, read(runs[0][0], length)
        return raw, b"".join(read(gpa, n) for gpa, _start, n in runs)


class RingPlugin(Plugin):
    """An SPSC ring buffer between two peers, through the vCPU; reports MB/s, messages/s."""

    name = "ring"
    description = "SPSC ring buffer in the shared memory between pairs of peers; MB/s, msg/s"
    prefers_fast_path = True

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--bytes",
            dest="ring_bytes",
            type=_size,
            default=DEFAULT_BYTES,
            metavar="SIZE",
            help="total payload to move (default 100M)",
        )
        group.add_argument(
            "--message-size",
            type=_size,
            default=DEFAULT_MESSAGE,
            metavar="SIZE",
            help="payload bytes per message (default 64K)",
        )
        group.add_argument(
            "--ring-size",
            type=_size,
            default=None,
            metavar="SIZE",
            help="data area bytes, a multiple of 4K (default: the shared "
            "memory minus the 4K header)",
        )
        group.add_argument(
            "--role",
            choices=("producer", "consumer", "auto"),
            default="auto",
            help="auto: the lower id of the pair produces (default)",
        )
        group.add_argument(
            "--partner",
            dest="ring_partner",
            type=int,
            default=None,
            metavar="ID",
            help="the peer to pair with (default: own id XOR 1)",
        )
        group.add_argument(
            "--checksum",
            choices=tuple(CHECKSUMS),
            default="sum64",
            help="payload checksum the producer uses (default sum64)",
        )
        group.add_argument("--corrupt-every", type=int, default=0, metavar="N",
                           help="test aid: the producer corrupts every Nth message after "
                           "checksumming it (default 0: never)")  # fmt: skip

    @classmethod
    def check_options(cls, options: argparse.Namespace) -> str | None:
        if options.ring_bytes < 1:
            return f"--bytes must be at least 1, got {options.ring_bytes}"
        if not 1 <= options.message_size <= MAX_MESSAGE:
            return f"--message-size must be 1..{MAX_MESSAGE}, got {options.message_size}"
        ring = options.ring_size
        if ring is not None:
            if ring < PAGE_SIZE or ring % PAGE_SIZE:
                return f"--ring-size must be a positive multiple of {PAGE_SIZE}, got {ring}"
            need = record_size(min(options.message_size, options.ring_bytes))
            if ring < need:
                return (
                    f"--ring-size {ring} cannot hold one {options.message_size}-byte message "
                    f"(a record takes {need} bytes)"
                )
        if options.ring_partner is not None and not 0 <= options.ring_partner <= 0xFFFF:
            return f"--partner must be a peer id 0..65535, got {options.ring_partner}"
        if options.corrupt_every < 0:
            return f"--corrupt-every must not be negative, got {options.corrupt_every}"
        return None

    # -- set-up ---------------------------------------------------------------------------

    def __init__(self, options: argparse.Namespace) -> None:
        super().__init__(options)
        self.me = self.partner = -1
        self.producing = False
        self.done = False  # finished or failed: hooks do nothing more
        self.started = False  # producer: header written; consumer: header read
        self.messages = 0
        self.moved = 0
        self.total = options.ring_bytes
        self.errors = 0
        self.first_error = ""
        self.start_ns = 0
        self.doorbell_vector = 0

    def start(self, guest: Guest) -> None:
        super().start(guest)
        guest.enable_msix()
        opts = self.options
        self.me = guest.peer_id
        self.partner = opts.ring_partner if opts.ring_partner is not None else self.me ^ 1
        if self.partner == self.me:
            self._fail(f"ring: peer {self.me} cannot pair with itself")
            return
        if opts.role == "auto":
            self.producing = self.me < self.partner
        else:
            self.producing = opts.role == "producer"
        # Fault the shared memory into our stage-2 table and TLB now, in one batch, as a
        # driver sets up its ring memory before use: the transfer then runs on TLB hits.
        # A read touch: it maps pages writable but leaves the partner's data alone.
        guest.vcpu.touch(guest.shm_gpa, guest.shm_size, write=False)
        if self.producing:
            self._setup_producer(guest)
        else:
            self.ring_size = 0  # learnt from the producer's header
            guest.log(f"ring: consuming from peer {self.partner}")
            if self.partner in guest.peers():
                self._ready()

    def _setup_producer(self, guest: Guest) -> None:
        opts = self.options
        room = guest.shm_size - HEADER_SIZE
        ring = opts.ring_size if opts.ring_size is not None else room
        if ring > room:
            self._fail(
                f"ring: --ring-size {ring} does not fit in the {guest.shm_size}-byte shared "
                f"memory (at most {room} after the {HEADER_SIZE}-byte header)"
            )
            return
        self.message_size = min(opts.message_size, opts.ring_bytes)
        if record_size(self.message_size) > ring:
            self._fail(
                f"ring: a {self.message_size}-byte message (a {record_size(self.message_size)}"
                f"-byte record) does not fit in the {ring}-byte ring; use a larger shared "
                "memory (ivshmemd -l) or a smaller --message-size"
            )
            return
        self.ring_size = ring
        self.view = _RingView(guest, ring)
        # The consumer rings us on vector 1 when our device has it (see the header).
        self.doorbell_vector = 1 if guest.vectors >= 2 else 0
        self.checksum_kind = _CHECKSUM_NAMES.index(opts.checksum)
        self.checksum = CHECKSUMS[opts.checksum]
        self.total = opts.ring_bytes
        self.head = 0
        self.tail_seen = 0
        self.seq = 0
        # The payload source: random bytes, each message a different 8-byte aligned window.
        pool = np.random.default_rng(self.me).integers(
            0, 256, 2 * self.message_size + PAGE_SIZE, dtype=np.uint8
        )
        self.pool = memoryview(pool.tobytes())
        self.batch = max(1, ring // record_size(self.message_size) // 4)
        guest.log(
            f"ring: producing {self.total} bytes for peer {self.partner} in "
            f"{self.message_size}-byte messages through a {ring}-byte ring"
        )

    def _begin(self) -> None:
        """The consumer is ready: initialise the ring header and start producing."""
        assert self.guest is not None
        self.started = True
        view = self.view
        view.write64(OFF_MAGIC, 0)
        view.write64(OFF_HEAD, 0)
        view.write64(OFF_TAIL, 0)
        self.start_ns = time.monotonic_ns()
        view.write_header(OFF_CONFIG, CONFIG.pack(
            VERSION, self.checksum_kind, self.doorbell_vector, HEADER_SIZE, self.ring_size,
            int.from_bytes(os.urandom(8), "little"), self.total, self.start_ns,
            self.message_size,
        ))  # fmt: skip
        view.write64(OFF_MAGIC, MAGIC)  # publishes the header
        self._produce()

    def _partner_vector(self) -> int:
        """The producer's vector for our doorbells: the one it put in the ring header, if the
        device says the producer has it connected; vector 0 before we have read the header."""
        assert self.guest is not None
        wanted = self.doorbell_vector
        return wanted if wanted < self.guest.peers().get(self.partner, 0) else 0

    # -- producer -------------------------------------------------------------------------

    def _produce(self) -> None:
        """Write as many messages as fit, publishing ``head`` after each one."""
        guest = self.guest
        assert guest is not None
        view, ring, pool = self.view, self.ring_size, self.pool
        size, checksum = self.message_size, self.checksum
        corrupt = self.options.corrupt_every
        head, tail = self.head, self.tail_seen
        budget = ring
        published = 0
        while self.moved < self.total:
            length = min(size, self.total - self.moved)
            rec = record_size(length)
            if head + rec - tail > ring:
                tail = self.tail_seen = view.read64(OFF_TAIL)
                if head + rec - tail > ring:
                    break
            if budget < rec:  # yield to the event loop, continue on our own doorbell
                guest.ring(self.me, 0)
                break
            budget -= rec
            start = (self.seq * 8 * 131) % size
            payload = pool[start : start + length]
            pos = head % ring
            self.seq += 1
            header = RECORD_HEADER.pack(RECORD_TAG, self.seq & 0xFFFFFFFF, length,
                                        checksum(payload), 0)  # fmt: skip
            if corrupt and self.seq % corrupt == 0:
                bad = bytearray(payload)
                bad[length // 2] ^= 0x5A
                payload = memoryview(bad)
            view.store_record(pos, header, payload)
            head += rec
            view.write64(OFF_HEAD, head)  # publish: the record is complete
            self.moved += length
            self.messages += 1
            published += 1
            if published % self.batch == 0:
                guest.ring(self.partner, 0)
        self.head = head
        if published % self.batch:
            guest.ring(self.partner, 0)

    def _producer_event(self) -> None:
        if self.moved < self.total:
            self._produce()
        else:
            self._check_released()

    def _check_released(self) -> None:
        """Everything is written: finish once the consumer has released it all."""
        if self.moved >= self.total and self.view.read64(OFF_TAIL) == self.head:
            self.done = True
            assert self.guest is not None
            self.guest.finish(self._summary("released by the consumer"))

    # -- consumer -------------------------------------------------------------------------

    def _attach(self) -> bool:
        """Read the producer's header; False (after failing) if it is not a valid ring."""
        guest = self.guest
        assert guest is not None
        raw = guest.read_shm(0, 0x40)  # the header, through the vCPU
        magic = int.from_bytes(raw[:8], "little")
        if magic != MAGIC:
            self._fail(
                f"ring: peer {self.partner} rang but there is no ring header in the shared "
                f"memory (magic {magic:#x}): is it running the ring plugin as the producer?"
            )
            return False
        version, kind, vector, data_off, ring, _session, total, start_ns, max_message = (
            CONFIG.unpack_from(raw, OFF_CONFIG)
        )
        room = guest.shm_size - HEADER_SIZE
        if (version != VERSION or kind >= len(_CHECKSUM_NAMES) or data_off != HEADER_SIZE
                or ring % PAGE_SIZE or not 0 < ring <= room or total < 1
                or not 0 < max_message <= min(MAX_MESSAGE, ring)):  # fmt: skip
            self._fail(
                f"ring: bad ring header (version {version}, checksum {kind}, data at "
                f"{data_off:#x}, ring {ring}, total {total}, max message {max_message})"
            )
            return False
        self.ring_size = ring
        self.view = _RingView(guest, ring)
        self.checksum = CHECKSUMS[_CHECKSUM_NAMES[kind]]
        self.total = total
        self.max_message = max_message
        self.start_ns = start_ns
        self.doorbell_vector = vector
        self.tail = self.view.read64(OFF_TAIL)
        self.batch = max(1, ring // record_size(max_message) // 4)
        self.started = True
        return True

    def _consume(self) -> None:
        """Verify and release everything the producer has published."""
        guest = self.guest
        assert guest is not None
        view, ring, checksum = self.view, self.ring_size, self.checksum
        unpack_from = RECORD_HEADER.unpack_from
        tail = self.tail
        head = view.read64(OFF_HEAD)
        budget = ring
        released = 0
        while True:
            if tail == head:
                head = view.read64(OFF_HEAD)
                if tail == head:
                    break
            if head - tail > ring or head < tail:
                self._fail(f"ring: impossible head {head} with tail {tail} in a {ring}-byte ring")
                return
            if budget <= 0:
                guest.ring(self.me, 0)
                break
            pos = tail % ring
            raw, payload = view.load_record(pos, self.max_message)
            tag, seq, length, expected, _ = unpack_from(raw)
            want = (self.messages + 1) & 0xFFFFFFFF
            if tag != RECORD_TAG or seq != want or not 0 < length <= self.max_message:
                self._fail(
                    f"ring: corrupt record header at ring offset {pos} (tag {tag:#x}, "
                    f"sequence {seq}, expected {want}, length {length})"
                )
                return
            rec = record_size(length)
            if rec > head - tail:
                self._fail(f"ring: record {seq} ({rec} bytes) runs past head {head}")
                return
            if checksum(payload) != expected:
                self.errors += 1
                if not self.first_error:
                    self.first_error = (
                        f"first in message {seq} at ring offset {pos} (checksum "
                        f"{checksum(payload):#x}, header says {expected:#x})"
                    )
            tail += rec
            view.write64(OFF_TAIL, tail)  # release: the producer may reuse the space
            budget -= rec
            self.messages += 1
            self.moved += length
            released += 1
            if released % self.batch == 0:
                guest.ring(self.partner, self._partner_vector())
            if self.moved >= self.total:
                break
        self.tail = tail
        if released % self.batch:
            guest.ring(self.partner, self._partner_vector())
        if self.moved >= self.total:
            self.done = True
            summary = self._summary("verified")
            if self.errors:
                guest.fail(f"{summary}; FAILED: {self.errors} checksum errors, "
                           f"{self.first_error}")  # fmt: skip
            else:
                guest.finish(summary)

    def _fail(self, reason: str) -> None:
        self.done = True
        assert self.guest is not None
        self.guest.fail(reason)

    # -- hooks ----------------------------------------------------------------------------

    def interrupt(self, vector: int) -> None:
        if self.done or self.guest is None:
            return
        if self.producing:
            if self.started:
                self._producer_event()
            else:  # the consumer is ready
                self._begin()
            return
        if not self.started and not self._attach():
            return
        self._consume()

    def peer_joined(self, peer_id: int) -> None:
        if peer_id != self.partner or self.done or self.guest is None:
            return
        if not self.producing:
            self._ready()
        elif self.started:  # a doorbell may have gone out before we knew the partner
            self.guest.ring(self.partner, 0)

    def _ready(self) -> None:
        """Tell the producer we are set up (it starts the clock and the transfer)."""
        assert self.guest is not None
        self.guest.ring(self.partner, self._partner_vector())

    def peer_left(self, peer_id: int) -> None:
        if peer_id != self.partner or self.done or self.guest is None:
            return
        if self.producing and self.started:
            # Its last doorbell and its leave notice race: the ring itself says if it is done.
            self._check_released()
            if self.done:
                return
        self.done = True
        released = self.view.read64(OFF_TAIL) if self.producing and self.started else self.moved
        self.guest.fail(
            f"ring: partner {peer_id} left; {released} of "
            f"{self.total} bytes "
            f"{'released' if self.producing else 'verified'}"
        )

    # -- results --------------------------------------------------------------------------

    def _summary(self, how: str) -> str:
        elapsed = max(time.monotonic_ns() - self.start_ns, 1) / _BILLION
        assert self.guest is not None
        self.guest.report(
            event="ring", role="producer" if self.producing else "consumer",
            bytes=self.moved, messages=self.messages, checksum_errors=self.errors,
            seconds=elapsed, mb_per_s=self.moved / elapsed / 1e6,
            messages_per_s=self.messages / elapsed,
        )  # fmt: skip
        role = "producer" if self.producing else "consumer"
        return (
            f"ring: {self.moved} bytes in {self.messages} messages, {self.errors} checksum "
            f"errors, {self.moved / elapsed / 1e6:.1f} MB/s, {self.messages / elapsed:.0f} "
            f"messages/s ({role}, {how})"
        )
