"""``ring``: a single-producer/single-consumer ring buffer in the shared memory.

Two peers pair up by id as ``ping`` does (0 with 1, 2 with 3, ...; ``--partner``
overrides); the lower id of a pair produces unless ``--role`` says otherwise. Every byte of
the ring, header included, is written and read through the vCPU (``vcpu.write`` /
``vcpu.read`` / ``vcpu.read_into`` on BAR2), as a guest driver's loads and stores would be.

Layout in the shared memory (all integers little-endian, each index on its own cache line)::

    0x000  magic u64 | version u32 | checksum kind u16 | producer's doorbell vector u16
           data offset u64 | ring size u64 | session u64 | total bytes u64
           start time u64 (CLOCK_MONOTONIC ns) | max message u64
    0x040  head u64        bytes the producer has published (free-running)
    0x080  tail u64        bytes the consumer has released (free-running)
    0x0c0  head event u64  the consumer asks for a doorbell once ``head`` passes this value
    0x100  tail event u64  the producer asks for a doorbell once ``tail`` reaches this value
    0x1000 data area, ``ring size`` bytes (a multiple of the page size)

A message is a record at a 64-byte aligned ring offset: a 32-byte header (tag, sequence
number, payload length, checksum of the payload) and the payload; a record may wrap around
the end of the data area. The checksum is a 64-bit sum of the payload's little-endian
words (C speed through numpy) or, with ``--checksum crc32``, zlib's CRC-32; the producer
records which one in the ring header.

Memory ordering, as a real shared-memory ring does it: the producer writes the record, then
publishes ``head``; the consumer reads ``head``, then the records before it, then publishes
``tail``; each side reads the other's index before reusing space or data.

Doorbells with event suppression, as virtio rings do it (the event index scheme): a side
that runs out of work writes, in its event index, how far the other side's index must move
before it wants a doorbell, then makes a full memory fence and looks at that index again (a
move it missed means it carries on instead of sleeping). The other side, after publishing
its index, fences and reads the event index, and rings only when this publication crossed
it. Both wait for a batch (:func:`batch_bytes`: a quarter of the ring, less for rings that
hold few records): the consumer until ``head`` is that far past its ``tail``, the producer,
on a full ring, until that much (at least its next record) is free; the producer's last
record always rings. So the two sides run in parallel, a doorbell per batch rather than per
message, and they never both sleep (a blocked producer has published more than a batch;
a sleeping consumer has released all but a batch). The producer rings the
consumer's vector 0; the consumer rings the vector the producer names in the ring header (1
when the producer's device has two vectors, else 0). The fence is a locked read-modify-write
(an uncontended lock's acquire and release): on x86-64 the one reordering the hardware does
is a store passing a later load, and a locked instruction forbids it; without the fence
both sides could miss each other's update and both sleep.

Batches: the producer builds up to ``WINDOW`` bytes of records at a time in a private
staging area laid out as in the ring (random payloads, each stamped with its sequence
number in its first and last words so no two messages are alike; one numpy reduction
checksums the whole batch when the payloads are whole 64-bit words, else one per record;
then the headers) and stores the batch with one guest write; the consumer reads up to
``WINDOW`` bytes of whole records with one guest access into a buffer it reuses
(``vcpu.read_into``), checks every header, verifies every checksum (again one reduction for
a uniform window) and releases the window with one ``tail`` publication. Per message that
leaves the two copies, two checksum passes and little interpreter work; what bounds
throughput then is the copy across cores (the consumer's core must fetch every line the
producer's core wrote, and the producer must take the line back to write it again).

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
import threading
import time
import zlib
from collections.abc import Callable
from typing import Final

import numpy as np
import numpy.typing as npt

from ivshmemd.argtypes import size
from ivshmemd.protocol import MAX_PEER_ID

from ..plugin import Guest, Plugin

__all__ = [
    "CHECKSUMS",
    "HEADER_SIZE",
    "PAGE_SIZE",
    "RECORD_HEADER",
    "WINDOW",
    "RingPlugin",
    "batch_bytes",
    "checksum_at",
    "checksum_crc32",
    "checksum_sum64",
    "full_fence",
    "record_size",
]

PAGE_SIZE: Final = 4096
#: The ring header occupies the first page of BAR2; the data area starts at the next one.
HEADER_SIZE: Final = PAGE_SIZE
MAGIC: Final = int.from_bytes(b"IVSHRING", "little")
VERSION: Final = 2
OFF_MAGIC: Final = 0x00
OFF_CONFIG: Final = 0x08  # version .. max message, after the magic
OFF_HEAD: Final = 0x40
OFF_TAIL: Final = 0x80
OFF_HEAD_EVENT: Final = 0xC0
OFF_TAIL_EVENT: Final = 0x100
#: version, checksum kind, producer vector, data offset, ring, session, total, start, max message
CONFIG: Final = struct.Struct("<IHHQQQQQQ")
RECORD_ALIGN: Final = 64
RECORD_TAG: Final = 0x52454344  # "DCER" little-endian: a record starts here
RECORD_HEADER: Final = struct.Struct("<IIQQQ")  # tag, seq, length, checksum, reserved
_HDR: Final = RECORD_HEADER.size
MAX_MESSAGE: Final = 1 << 30
DEFAULT_BYTES: Final = 100 << 20
DEFAULT_MESSAGE: Final = 64 << 10
#: Each side moves about this many bytes of whole records (at least one) per guest access.
WINDOW: Final = 512 << 10
#: A sleeping side waits for 1/WAKE_FRACTION of the ring (see :func:`batch_bytes`).
WAKE_FRACTION: Final = 4
#: A payload's last word is its sequence number times this: no two messages are alike.
STAMP: Final = 0x9E37_79B9_7F4A_7C15
#: The producer publishes ``head`` this many times per batch (and before it sleeps).
PUBLISHES_PER_BATCH: Final = 4
MASK64: Final = (1 << 64) - 1
_BILLION: Final = 1_000_000_000

Words = npt.NDArray[np.uint64]

_FENCE_LOCK: Final = threading.Lock()


def full_fence() -> None:
    """A full memory fence between this process's earlier stores and later loads: a
    locked read-modify-write (an uncontended lock's acquire and release), which x86-64
    does not reorder with any load or store."""
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


def checksum_sum64(payload: bytes | bytearray | memoryview) -> int:
    """The payload's little-endian 64-bit words summed modulo 2**64 (a short tail counts as
    one zero-padded word), plus its length: one numpy reduction, C speed."""
    n = len(payload)
    words = n >> 3
    total = int(np.add.reduce(np.frombuffer(payload, np.uint64, words))) if words else 0
    if n & 7:
        total += int.from_bytes(payload[words << 3 :], "little")
    return (total + n) & MASK64


def checksum_crc32(payload: bytes | bytearray | memoryview) -> int:
    """zlib's CRC-32 of the payload (slower than ``sum64``, also catches reordering)."""
    return zlib.crc32(payload)


#: Checksum kinds by name; the index is what the ring header records.
CHECKSUMS: Final[dict[str, Callable[[bytes | bytearray | memoryview], int]]] = {
    "sum64": checksum_sum64,
    "crc32": checksum_crc32,
}
_CHECKSUM_NAMES: Final = list(CHECKSUMS)


def _sum64_at(buf: memoryview, words: Words, start: int, n: int) -> int:
    k = n >> 3
    w = start >> 3
    total = int(np.add.reduce(words[w : w + k]))
    if n & 7:
        total += int.from_bytes(buf[start + (k << 3) : start + n], "little")
    return (total + n) & MASK64


def _crc32_at(buf: memoryview, words: Words, start: int, n: int) -> int:
    return zlib.crc32(buf[start : start + n])


#: The same checksums of ``buf[start:start + n]`` (``start`` a multiple of 8), where
#: ``words`` is ``buf`` seen as 64-bit words: no new array object per message.
_CHECKSUMS_AT: Final[dict[str, Callable[[memoryview, Words, int, int], int]]] = {
    "sum64": _sum64_at,
    "crc32": _crc32_at,
}


def checksum_at(kind: str, buf: memoryview, words: Words, start: int, n: int) -> int:
    """Checksum ``kind`` of ``buf[start:start + n]``; ``start`` is a multiple of 8 and
    ``words`` is ``buf`` seen as little-endian 64-bit words (the hot path's form)."""
    if start & 7:
        raise ValueError(f"checksum_at needs an 8-byte aligned start, got {start}")
    return _CHECKSUMS_AT[kind](buf, words, start, n)


def record_size(length: int) -> int:
    """Ring bytes a message of ``length`` payload bytes takes (header, payload, padding)."""
    return -(-(_HDR + length) // RECORD_ALIGN) * RECORD_ALIGN


def _records_per_window(largest: int, ring: int) -> int:
    """How many of the largest records one guest access moves: about ``WINDOW`` bytes' worth
    (at least one, never more than the ring holds)."""
    return max(1, min((WINDOW + largest // 2) // largest, ring // largest))


def batch_bytes(ring: int, largest: int) -> int:
    """How far a sleeping side lets the other run before it wants a doorbell: a quarter of
    the ring, but at most ``ring - largest`` (``largest``: the largest record).

    The consumer sleeps until ``head`` passes its ``tail`` plus this; the producer, on a
    full ring, sleeps until this much (at least its record) is free. The bound keeps them
    from both sleeping: a blocked producer has more than this much published, and a
    sleeping consumer has released everything but this much, which is past the tail the
    producer waits for. The producer's last record always rings.
    """
    return min(ring // WAKE_FRACTION, ring - largest)


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
            type=size,
            default=DEFAULT_BYTES,
            metavar="SIZE",
            help="total payload to move (default 100M)",
        )
        group.add_argument(
            "--message-size",
            type=size,
            default=DEFAULT_MESSAGE,
            metavar="SIZE",
            help="payload bytes per message (default 64K)",
        )
        group.add_argument(
            "--ring-size",
            type=size,
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
        if options.ring_partner is not None and not 0 <= options.ring_partner <= MAX_PEER_ID:
            return f"--partner must be a peer id 0..{MAX_PEER_ID}, got {options.ring_partner}"
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
        self.ring_size = 0
        # ring indices as this side last wrote or saw them (free-running byte counts)
        self.head = self.tail = 0
        self.checked = 0  # our own index when we last looked at the partner's event index

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
        base = guest.shm_gpa
        self.head_gpa, self.tail_gpa = base + OFF_HEAD, base + OFF_TAIL
        self.head_event_gpa, self.tail_event_gpa = base + OFF_HEAD_EVENT, base + OFF_TAIL_EVENT
        self.data_gpa = base + HEADER_SIZE
        # Fault the shared memory into our stage-2 table and TLB now, in one batch, as a
        # driver sets up its ring memory before use: the transfer then runs on TLB hits.
        # A read touch: it maps pages writable but leaves the partner's data alone.
        guest.vcpu.touch(guest.shm_gpa, guest.shm_size, write=False)
        if self.producing:
            self._setup_producer(guest)
        else:
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
        self.batch = batch_bytes(ring, record_size(self.message_size))
        #: publish ``head`` every this many bytes: a few times per batch
        self.publish = max(1, self.batch // PUBLISHES_PER_BATCH)
        # The consumer rings us on vector 1 when our device has it (see the header).
        self.doorbell_vector = 1 if guest.vectors >= 2 else 0
        self.checksum_kind = _CHECKSUM_NAMES.index(opts.checksum)
        self.check = _CHECKSUMS_AT[opts.checksum]
        self.total = opts.ring_bytes
        self.seq = 0
        # The staging area: ``slots`` records laid out as in the ring, random payloads. A
        # batch of records is built there (each payload stamped with its sequence number in
        # its first and last words, so no two messages are alike, then checksummed, then
        # its header packed) and stored with one guest write.
        full = record_size(self.message_size)
        self.slots = _records_per_window(full, ring)
        stage = bytearray(self.slots * full)
        stage[:] = np.random.default_rng(self.me).bytes(len(stage))
        self.stage = memoryview(stage)
        self.stage_words: Words = np.frombuffer(stage, np.uint64)
        # one numpy reduction per batch when the payloads are whole 64-bit words
        self.vector_sum = opts.checksum == "sum64" and self.message_size % 8 == 0
        guest.log(
            f"ring: producing {self.total} bytes for peer {self.partner} in "
            f"{self.message_size}-byte messages through a {ring}-byte ring"
        )

    def _begin(self) -> None:
        """The consumer is ready: initialise the ring header and start producing."""
        assert self.guest is not None
        self.started = True
        vcpu, base = self.guest.vcpu, self.guest.shm_gpa
        vcpu.write64(base + OFF_MAGIC, 0)
        for offset in (OFF_HEAD, OFF_TAIL, OFF_HEAD_EVENT, OFF_TAIL_EVENT):
            vcpu.write64(base + offset, 0)  # head event 0: the consumer waits for record 1
        self.start_ns = time.monotonic_ns()
        vcpu.write(base + OFF_CONFIG, CONFIG.pack(
            VERSION, self.checksum_kind, self.doorbell_vector, HEADER_SIZE, self.ring_size,
            int.from_bytes(os.urandom(8), "little"), self.total, self.start_ns,
            self.message_size,
        ))  # fmt: skip
        vcpu.write64(base + OFF_MAGIC, MAGIC)  # publishes the header
        self._produce()

    def _partner_vector(self) -> int:
        """The producer's vector for our doorbells: the one it put in the ring header, if the
        device says the producer has it connected; vector 0 before we have read the header."""
        assert self.guest is not None
        wanted = self.doorbell_vector
        return wanted if wanted < self.guest.peers().get(self.partner, 0) else 0

    # -- producer -------------------------------------------------------------------------

    def _produce(self) -> None:
        """Write as many messages as fit, in batches of up to ``slots`` records (one guest
        write each), publishing ``head`` every ``publish`` bytes (and before sleeping or
        yielding) and ringing the consumer when a publication crosses its head event; sleep
        (return) when the ring is full, after asking for a doorbell once a batch of it is
        free."""
        guest = self.guest
        assert guest is not None
        vcpu = guest.vcpu
        read, write = vcpu.read, vcpu.write
        tail_gpa, data_gpa = self.tail_gpa, self.data_gpa
        ring, stage, stage_words = self.ring_size, self.stage, self.stage_words
        size, total, check, slots = self.message_size, self.total, self.check, self.slots
        batch, publish, vector_sum = self.batch, self.publish, self.vector_sum
        corrupt = self.options.corrupt_every
        pack_into = RECORD_HEADER.pack_into
        add_reduce = np.add.reduce
        fence_acquire, fence_release = _FENCE_LOCK.acquire, _FENCE_LOCK.release
        head, tail = self.head, self.tail
        moved, seq = self.moved, self.seq
        budget = ring
        while moved < total:
            left = total - moved
            if left >= size:
                length, count = size, left // size
            else:  # the last, shorter message
                length, count = left, 1
            rec = (_HDR + length + RECORD_ALIGN - 1) & -RECORD_ALIGN
            free = ring - (head - tail)
            if free < rec:
                tail = int.from_bytes(read(tail_gpa, 8), "little")
                free = ring - (head - tail)
                if free < rec:
                    # Full: publish what we wrote, ask for a doorbell once a batch (at
                    # least this record) is free, fence, and look again before sleeping.
                    if head != self.checked:
                        self._publish(head, False)
                    want = head - ring + max(batch, rec)
                    write(self.tail_event_gpa, want.to_bytes(8, "little"))
                    fence_acquire()
                    fence_release()
                    tail = int.from_bytes(read(tail_gpa, 8), "little")
                    if tail < want:
                        break  # the release that reaches ``want`` rings us
                    free = ring - (head - tail)
            if budget < rec:  # yield to the event loop, continue on our own doorbell
                guest.ring(self.me, 0)
                break
            k = min(count, slots, free // rec, budget // rec)
            size_k = k * rec
            budget -= size_k
            # Build the batch in the staging area: stamp, checksum, header.
            words = length >> 3
            step = rec >> 3
            for j in range(k):
                if words:
                    stage_words[j * step + 4] = seq + 1 + j
                    stage_words[j * step + 3 + words] = ((seq + 1 + j) * STAMP) & MASK64
            if vector_sum and k > 1:
                sums = add_reduce(
                    stage_words[: k * step].reshape(k, step)[:, 4 : 4 + words], axis=1
                ).tolist()
                checksums = [(x + length) & MASK64 for x in sums]
            else:
                checksums = [check(stage, stage_words, j * rec + _HDR, length) for j in range(k)]
            for j in range(k):
                seq += 1
                pack_into(stage, j * rec, RECORD_TAG, seq & 0xFFFFFFFF, length, checksums[j], 0)
            flipped = []
            if corrupt:  # test aid: damage the payload after checksumming it
                for j in range(k):
                    if (seq - k + 1 + j) % corrupt == 0:
                        where = j * rec + _HDR + length // 2
                        stage[where] ^= 0x5A
                        flipped.append(where)
            pos = head % ring
            if pos + size_k <= ring:
                write(data_gpa + pos, stage[:size_k])
            else:  # wraps (a header never does: records are 64-byte aligned)
                first = ring - pos
                write(data_gpa + pos, stage[:first])
                write(data_gpa, stage[first:size_k])
            for where in flipped:
                stage[where] ^= 0x5A
            head += size_k
            moved += k * length
            if head - self.checked >= publish or moved >= total:
                self._publish(head, moved >= total)
        if head != self.checked:
            self._publish(head, moved >= total)
        self.messages += seq - self.seq
        self.head, self.tail, self.moved, self.seq = head, tail, moved, seq
        if moved >= total:
            self._check_released()

    def _publish(self, head: int, last: bool) -> None:
        """Publish ``head`` (the records before it are complete), fence, and ring the
        consumer if this publication moved head past the value it waits on, or if it is
        the ``last`` one."""
        assert self.guest is not None
        vcpu = self.guest.vcpu
        vcpu.write(self.head_gpa, head.to_bytes(8, "little"))
        _FENCE_LOCK.acquire()
        _FENCE_LOCK.release()
        event = int.from_bytes(vcpu.read(self.head_event_gpa, 8), "little")
        if self.checked <= event < head or last:
            self.guest.ring(self.partner, 0)
        self.checked = head

    def _producer_event(self) -> None:
        if self.moved < self.total:
            self._produce()
        else:
            self._check_released()

    def _read_tail(self) -> int:
        assert self.guest is not None
        return self.guest.vcpu.read64(self.tail_gpa)

    def _check_released(self) -> None:
        """Everything is written: finish once the consumer has released it all (asking for
        a doorbell when it has, and looking again after the fence, before sleeping)."""
        assert self.guest is not None
        if self.done:
            return
        tail = self._read_tail()
        if tail != self.head:
            self.guest.vcpu.write64(self.tail_event_gpa, self.head)
            full_fence()
            tail = self._read_tail()
        if tail == self.head:
            self.done = True
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
                or not 0 < max_message <= MAX_MESSAGE
                or record_size(max_message) > ring):  # fmt: skip
            self._fail(
                f"ring: bad ring header (version {version}, checksum {kind}, data at "
                f"{data_off:#x}, ring {ring}, total {total}, max message {max_message})"
            )
            return False
        self.ring_size = ring
        self.check = _CHECKSUMS_AT[_CHECKSUM_NAMES[kind]]
        self.total = total
        self.max_message = max_message
        self.start_ns = start_ns
        self.doorbell_vector = vector
        self.tail = self.checked = guest.vcpu.read64(self.tail_gpa)
        self.head = self.tail
        # The window: as many whole maximal records as fit in WINDOW (at least one), and
        # never more than the ring; a buffer reused for every read.
        largest = record_size(max_message)
        self.window = largest * _records_per_window(largest, ring)
        self.vector_sum = kind == _CHECKSUM_NAMES.index("sum64") and max_message % 8 == 0
        self.batch = batch_bytes(ring, largest)
        self.buf = memoryview(bytearray(self.window))
        self.words: Words = np.frombuffer(self.buf, np.uint64)
        self.started = True
        return True

    def _consume(self) -> None:
        """Verify and release everything the producer has published: read a window of
        whole records per guest access, verify each, release the window (``tail``), and
        ring the producer if that release reached its tail event. With nothing left, ask
        for a doorbell on the next record, fence, look again, and sleep (return)."""
        guest = self.guest
        assert guest is not None
        vcpu = guest.vcpu
        read, write, read_into = vcpu.read, vcpu.write, vcpu.read_into
        head_gpa, tail_gpa, data_gpa = self.head_gpa, self.tail_gpa, self.data_gpa
        head_event_gpa, tail_event_gpa = self.head_event_gpa, self.tail_event_gpa
        ring, window, buf, words, check = (
            self.ring_size,
            self.window,
            self.buf,
            self.words,
            self.check,
        )
        fence_acquire, fence_release = _FENCE_LOCK.acquire, _FENCE_LOCK.release
        unpack_from = RECORD_HEADER.unpack_from
        limit, total, batch = self.max_message, self.total, self.batch
        largest, vector_sum, add_reduce = record_size(limit), self.vector_sum, np.add.reduce
        tail, head, checked = self.tail, self.head, self.checked
        messages, moved = self.messages, self.moved
        budget = ring
        while moved < total:
            if head == tail:
                head = int.from_bytes(read(head_gpa, 8), "little")
                if head == tail:
                    # Nothing published: ask for a doorbell once a batch is (head past
                    # ``want``), fence, and look again before sleeping.
                    want = tail + batch
                    write(head_event_gpa, want.to_bytes(8, "little"))
                    fence_acquire()
                    fence_release()
                    head = int.from_bytes(read(head_gpa, 8), "little")
                    if head <= want:
                        break  # the publication that passes ``want`` (or the last) rings us
            if not 0 < head - tail <= ring:
                self._fail(f"ring: impossible head {head} with tail {tail} in a {ring}-byte ring")
                return
            if budget <= 0:
                guest.ring(self.me, 0)
                break
            # One guest access (two where the ring wraps) for a window of whole records.
            n = min(head - tail, window)
            pos = tail % ring
            if pos + n <= ring:
                read_into(data_gpa + pos, buf[:n])
            else:
                first = ring - pos
                read_into(data_gpa + pos, buf[:first])
                read_into(data_gpa, buf[first:n])
            # Check every whole record's header, then every checksum: all in one numpy
            # reduction when the records are uniform, else one by one.
            off = 0
            first_seq = messages + 1
            found: list[tuple[int, int, int]] = []  # (offset in the window, length, checksum)
            uniform = vector_sum
            while off < n and moved < total:
                tag, seq, length, expected, _ = unpack_from(buf, off)
                messages += 1
                if tag != RECORD_TAG or seq != messages & 0xFFFFFFFF or not 0 < length <= limit:
                    self._fail(
                        f"ring: corrupt record header at ring offset {(tail + off) % ring} "
                        f"(tag {tag:#x}, sequence {seq}, expected {messages & 0xFFFFFFFF}, "
                        f"length {length})"
                    )
                    return
                rec = (_HDR + length + RECORD_ALIGN - 1) & -RECORD_ALIGN
                if off + rec > n:
                    messages -= 1
                    if rec > head - tail - off:
                        self._fail(f"ring: record {seq} ({rec} bytes) runs past head {head}")
                        return
                    break  # it continues past the window: read it in the next one
                found.append((off, length, expected))
                uniform = uniform and length == limit
                off += rec
                moved += length
            if uniform and len(found) > 1:
                step = largest >> 3
                sums = add_reduce(
                    words[: len(found) * step].reshape(-1, step)[:, 4 : 4 + (limit >> 3)], axis=1
                ).tolist()
                got = [(x + limit) & MASK64 for x in sums]
            else:
                got = [check(buf, words, o + _HDR, length) for o, length, _ in found]
            for j, (o, _length, expected) in enumerate(found):
                if got[j] != expected:
                    self.errors += 1
                    if not self.first_error:
                        self.first_error = (
                            f"first in message {first_seq + j} at ring offset "
                            f"{(tail + o) % ring} (checksum {got[j]:#x}, header says "
                            f"{expected:#x})"
                        )
            # Release the window, fence, and ring the producer if it waits for this much.
            tail += off
            budget -= off
            write(tail_gpa, tail.to_bytes(8, "little"))
            fence_acquire()
            fence_release()
            event = int.from_bytes(read(tail_event_gpa, 8), "little")
            if checked < event <= tail:
                guest.ring(self.partner, self._partner_vector())
            checked = tail
        self.tail, self.head, self.checked, self.messages, self.moved = (
            tail,
            head,
            checked,
            messages,
            moved,
        )
        if moved >= total:
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
            if self.moved >= self.total:
                self._check_released()
            if self.done:
                return
        self.done = True
        released = self._read_tail() if self.producing and self.started else self.moved
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
