"""``ring``: a single-producer/single-consumer ring buffer in the shared memory.

Two peers pair up through the shared-memory directory (``guest.find_partner``), as ``ping``
does, and each pair gets its own region of the shared memory for its ring (``--ring-size``
bytes after a 4 KiB header; by default 1 MiB less 8 KiB, so that four pairs fit in the
daemon's default 4 MiB, or what one pair can have in a smaller shared memory), so any number
of pairs share one daemon; a shared memory too small for another region is refused at once
with how much there is. The peer that waited for a partner produces, the other consumes.
Every byte of the ring, header included, is written and read through the vCPU
(``vcpu.write`` / ``vcpu.read`` / ``vcpu.read_into`` on BAR2), as a guest driver's loads and
stores would be.

The format (layout, ring header, records, checksums, index arithmetic) is
:mod:`peers.plugins.ringformat`; this module moves the bytes and rings the doorbells.

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

Across hosts (``--partner ID``): the shared-memory directory is host-local, so a partner on
another host of a federation is named by its id instead. The lower id produces and the ring
is at offset 0 of the shared memory (one such pair per shared memory). Each host has its own
copy of the memory, and the federation promises release consistency at doorbells only: what
a side wrote before it rang is in the other side's copy when the interrupt arrives; what it
writes without a doorbell arrives eventually, in no particular order (a later ``head`` may
arrive before the records it covers). Event suppression cannot work on that: it reads the
other side's index and event index between doorbells, gets stale values and both sides
sleep, or a torn one and the consumer reads records that are not there yet. So the pair
hands the indices over with doorbells, one publication at a time (the handshake): the
producer publishes ``head`` and rings only once the consumer has released everything
published before; the consumer reads ``head`` once per doorbell of the producer's, verifies
and releases up to it, and rings back when it has released all of it. The producer keeps
writing records into the free space meanwhile, and may read ``tail`` at any time (a tail
value, however early it arrives, was written after the consumer was done with those bytes).
That is a doorbell each way per publication; on one host it works too.

Everything happens in the ``paired`` and ``interrupt`` hooks. A handler does at most
one ring's worth of work, then rings its own doorbell to continue, so signals and the
other events are never held up for long.

Start-up: once paired (the consumer has set up before the pairing's doorbell reaches the
producer), the producer initialises the header (magic last), starts the clock and
writes ``--bytes`` in ``--message-size`` messages; it finishes once the consumer has
released all of them. The consumer reads the header on the producer's first doorbell,
verifies every record, and finishes with ``ring: N bytes in M messages, E checksum
errors, X MB/s, Y messages/s`` (the authoritative figure: from the producer's first
message to the last byte verified); any checksum error makes it fail (exit status 1).
With ``--partner``, the consumer sets up at once and rings the producer once it knows it;
the producer begins on that doorbell.
``--corrupt-every N`` (a test aid) makes the producer flip one payload byte in every Nth
message after checksumming it. Both sides fault the shared memory in (one bulk read touch)
before they start, as a driver sets up its ring memory, so the clock measures the steady
state on TLB hits.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Final

import numpy as np

from ivshmemd.argtypes import size
from ivshmemd.protocol import MAX_PEER_ID

from ..plugin import Guest, Pair, Plugin
from ..shmdir import DIRECTORY_SIZE, Region
from .ringformat import (
    CHECKSUM_NAMES,
    CHECKSUMS,
    HEADER_READ,
    HEADER_SIZE,
    INDEX_OFFSETS,
    MAGIC,
    MAX_MESSAGE,
    OFF_CONFIG,
    OFF_HEAD,
    OFF_HEAD_EVENT,
    OFF_MAGIC,
    OFF_TAIL,
    OFF_TAIL_EVENT,
    PAGE_SIZE,
    RECORD_HEADER_SIZE,
    VERSION,
    RingHeader,
    Window,
    Words,
    bad_records,
    batch_bytes,
    build_records,
    head_event_passed,
    parse_records,
    producer_wake_tail,
    record_size,
    records_per_window,
    spans,
    tail_event_reached,
    unstamped_sums,
    used,
)

__all__ = ["RingPlugin", "full_fence"]

DEFAULT_BYTES: Final = 100 << 20
DEFAULT_MESSAGE: Final = 64 << 10
#: The data area's default size (larger when one record needs more): with its header page,
#: a pair's region is 1 MiB less a page, so four pairs fit in the daemon's default 4 MiB
#: beside the directory's page.
DEFAULT_RING: Final = (1 << 20) - 2 * PAGE_SIZE
#: The producer publishes ``head`` this many times per batch (and before it sleeps).
PUBLISHES_PER_BATCH: Final = 4
#: What ``--corrupt-every`` XORs into a payload byte (a test aid).
CORRUPTION: Final = 0x5A
#: The vector each side rings its own doorbell on, to continue after yielding.
SELF_VECTOR: Final = 0
#: With ``--partner``, the consumer tells the producer it is ready on this vector.
READY_VECTOR: Final = 0
#: The producer rings the consumer on this vector.
CONSUMER_VECTOR: Final = 0
#: The consumer rings the producer on this vector when the producer's device has it (the
#: producer names it in the ring header), else on vector 0.
PRODUCER_VECTOR: Final = 1
_BILLION: Final = 1_000_000_000

_FENCE_LOCK: Final = threading.Lock()


def full_fence() -> None:
    """A full memory fence between this process's earlier stores and later loads: a
    locked read-modify-write (an uncontended lock's acquire and release), which x86-64
    does not reorder with any load or store."""
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


class RingPlugin(Plugin):
    """An SPSC ring buffer between two peers, through the vCPU; reports MB/s, messages/s."""

    name = "ring"
    description = "SPSC ring buffer in the shared memory between pairs of peers; MB/s, msg/s"
    prefers_fast_path = True
    pairing = True

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
            help="data area bytes, a multiple of 4K (default 1M-8K: four pairs fit in 4M; "
            "less in a smaller shared memory, more if one record needs it); each pair takes "
            "this plus a 4K header from the shared memory",
        )
        group.add_argument(
            "--checksum",
            choices=tuple(CHECKSUMS),
            default="sum64",
            help="payload checksum the producer uses (default sum64)",
        )
        group.add_argument(
            "--partner",
            type=int,
            default=None,
            metavar="ID",
            help="the peer to pair with, by id, on this host or on another host of a "
            "federation (instead of a partner found through the host-local shared-memory "
            "directory): the lower id produces, the ring is at offset 0 of the shared memory, "
            "and the indices are handed over with doorbells (no event suppression)",
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
        if options.corrupt_every < 0:
            return f"--corrupt-every must not be negative, got {options.corrupt_every}"
        if options.partner is not None and not 0 <= options.partner <= MAX_PEER_ID:
            return f"--partner must be a peer id 0..{MAX_PEER_ID}, got {options.partner}"
        return None

    @classmethod
    def pairs(cls, options: argparse.Namespace) -> bool:
        return options.partner is None

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
        # ``--partner``: the partner may be on another host, whose copy of our writes is
        # only sure at our doorbells: indices are handed over with doorbells (see the module
        # docstring), never polled
        self.handshake = options.partner is not None
        self.partner_ready = False  # producer, with --partner: the consumer rang, it is set up
        self.acknowledged = False  # consumer, handshake: it handed everything back; it waits

    @staticmethod
    def ring_size_for(options: argparse.Namespace, shm_size: int) -> int:
        """The data area asked for: ``--ring-size``, else the default, or as much as one
        pair can have in a smaller shared memory (never less than one record's worth)."""
        if options.ring_size is not None:
            return int(options.ring_size)
        record = record_size(min(options.message_size, options.ring_bytes))
        room = (shm_size - DIRECTORY_SIZE - HEADER_SIZE) // PAGE_SIZE * PAGE_SIZE
        return max(min(DEFAULT_RING, room), -(-record // PAGE_SIZE) * PAGE_SIZE)

    def start(self, guest: Guest) -> None:
        super().start(guest)
        guest.enable_msix()
        self.me = guest.peer_id
        region_size = HEADER_SIZE + self.ring_size_for(self.options, guest.shm_size)
        partner = self.options.partner
        if partner is None:
            guest.find_partner(size=region_size)
            return
        if partner == self.me:
            self._fail(f"ring: peer {self.me} cannot pair with itself")
            return
        room = guest.shm_size - DIRECTORY_SIZE
        if region_size > room:
            self._fail(
                f"ring: a {region_size}-byte ring region does not fit in the {room} bytes of "
                "the shared memory below its directory page; use a larger shared memory "
                "(ivshmemd -l) or a smaller --ring-size"
            )
            return
        # The pair is agreed by the ids alone, with the region at offset 0 (the directory
        # is host-local: a partner on another host is not in it). The consumer sets up now
        # and tells the producer it is ready with a doorbell, once it knows the producer.
        leader = self.me < partner
        region = Region("ring", 0, region_size, min(self.me, partner))
        self.paired(Pair("ring", partner, leader, region))
        if not leader and partner in guest.peers():
            guest.ring(partner, READY_VECTOR)

    def peer_joined(self, peer_id: int) -> None:
        """With ``--partner``: the consumer says it is ready once the producer is known; the
        producer begins once the consumer has said so and is known (its join notice and its
        doorbell arrive by different ways)."""
        guest = self.guest
        if guest is None or self.done or not self.handshake or peer_id != self.partner:
            return
        if not self.producing:
            guest.ring(peer_id, READY_VECTOR)
        elif self.partner_ready and not self.started:
            self._begin()

    def paired(self, pair: Pair) -> None:
        guest = self.guest
        assert guest is not None and pair.region is not None
        self.partner, self.producing, self.region = pair.partner, pair.leader, pair.region
        base = self.base = guest.shm_gpa + pair.region.offset
        self.head_gpa, self.tail_gpa = base + OFF_HEAD, base + OFF_TAIL
        self.head_event_gpa, self.tail_event_gpa = base + OFF_HEAD_EVENT, base + OFF_TAIL_EVENT
        self.data_gpa = base + HEADER_SIZE
        # Fault the pair's region into our stage-2 table and TLB now, in one batch, as a
        # driver sets up its ring memory before use: the transfer then runs on TLB hits.
        # A read touch: it maps pages writable but leaves the partner's data alone.
        guest.vcpu.touch(base, pair.region.size, write=False)
        if self.producing:
            self._setup_producer(guest)
            if not self.done:
                guest.waiting(f"peer {self.partner} to release the ring")
                if not self.handshake:  # a partner found in the directory is set up
                    self._begin()
        else:
            guest.log(f"ring: consuming from peer {self.partner}")
            guest.waiting(f"peer {self.partner}'s first records")

    def _setup_producer(self, guest: Guest) -> None:
        opts = self.options
        ring = self.region.size - HEADER_SIZE
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
        self.doorbell_vector = PRODUCER_VECTOR if guest.vectors > PRODUCER_VECTOR else 0
        self.checksum_kind = CHECKSUM_NAMES.index(opts.checksum)
        self.total = opts.ring_bytes
        self.seq = 0
        # The staging area: ``slots`` records laid out as in the ring, random payloads. A
        # batch of records is built there (:meth:`_stage`) and stored with one guest write.
        full = record_size(self.message_size)
        self.slots = records_per_window(full, ring)
        stage = bytearray(self.slots * full)
        stage[:] = np.random.default_rng(self.me).bytes(len(stage))
        self.stage = memoryview(stage)
        self.stage_words: Words = np.frombuffer(stage, np.uint64)
        guest.log(
            f"ring: producing {self.total} bytes for peer {self.partner} in "
            f"{self.message_size}-byte messages through a {ring}-byte ring"
        )

    def _begin(self) -> None:
        """The consumer is ready: initialise the ring header and start producing."""
        assert self.guest is not None
        self.started = True
        vcpu, base = self.guest.vcpu, self.base
        vcpu.write64(base + OFF_MAGIC, 0)
        for offset in INDEX_OFFSETS:
            vcpu.write64(base + offset, 0)  # head event 0: the consumer waits for record 1
        self.start_ns = time.monotonic_ns()
        header = RingHeader(
            VERSION, self.checksum_kind, self.doorbell_vector, HEADER_SIZE, self.ring_size,
            int.from_bytes(os.urandom(8), "little"), self.total, self.start_ns,
            self.message_size,
        )  # fmt: skip
        vcpu.write(base + OFF_CONFIG, header.pack())
        vcpu.write64(base + OFF_MAGIC, MAGIC)  # publishes the header
        self._produce()

    def _partner_vector(self) -> int:
        """The producer's vector for our doorbells: the one it put in the ring header, if the
        device says the producer has it connected; vector 0 before we have read the header."""
        assert self.guest is not None
        wanted = self.doorbell_vector
        return wanted if wanted < self.guest.peers().get(self.partner, 0) else 0

    # -- the indices, through the vCPU ----------------------------------------------------

    def _read_index(self, gpa: int) -> int:
        assert self.guest is not None
        return int.from_bytes(self.guest.vcpu.read(gpa, 8), "little")

    def _write_index(self, gpa: int, value: int) -> None:
        assert self.guest is not None
        self.guest.vcpu.write(gpa, value.to_bytes(8, "little"))

    def _yield(self) -> None:
        """Let the event loop run; our own doorbell brings us back here."""
        assert self.guest is not None
        self.guest.ring(self.me, SELF_VECTOR)

    # -- producer -------------------------------------------------------------------------

    def _produce(self) -> None:
        """Write as many messages as fit, in batches of up to ``slots`` records (one guest
        write each), publishing ``head`` every ``publish`` bytes (and before sleeping or
        yielding) and ringing the consumer when a publication crosses its head event; sleep
        (return) when the ring is full, after asking for a doorbell once a batch of it is
        free. At most a ring's worth per call, then yield."""
        budget = self.ring_size
        while self.moved < self.total:
            left = self.total - self.moved
            length = min(self.message_size, left)  # the last message may be shorter
            count = left // length
            rec = record_size(length)
            free = self._room(rec)
            if free is None:
                break  # the release that reaches the wake tail rings us
            if budget < rec:
                self._yield()
                break
            k = min(count, self.slots, free // rec, budget // rec)
            budget -= k * rec
            flipped = self._stage(k, length, rec)
            self._store(k * rec, flipped)
            self.moved += k * length
            if self.head - self.checked >= self.publish or self.moved >= self.total:
                self._publish(last=self.moved >= self.total)
        if self.head != self.checked:
            self._publish(last=self.moved >= self.total)
        if self.moved >= self.total:
            self._check_released()

    def _room(self, rec: int) -> int | None:
        """Free ring bytes for a record of ``rec`` bytes (reading the consumer's ``tail``
        again if need be), or None when the ring stays full: then ``head`` is published, the
        tail event asks for a doorbell once a batch is free, and the fence and a last look
        make sure that release cannot have been missed."""
        ring = self.ring_size
        free = ring - used(self.head, self.tail)
        if free >= rec:
            return free
        self.tail = self._read_index(self.tail_gpa)
        free = ring - used(self.head, self.tail)
        if free >= rec:
            return free
        if self.head != self.checked:
            self._publish(last=False)
        if self.handshake:
            return None  # the consumer hands the ring back with a doorbell
        want = producer_wake_tail(self.head, ring, self.batch, rec)
        self._write_index(self.tail_event_gpa, want)
        full_fence()
        self.tail = self._read_index(self.tail_gpa)
        if self.tail < want:
            return None
        return ring - used(self.head, self.tail)

    #: the staging slots' unstamped payload sums (see ringformat.unstamped_sums), for
    #: records of ``_unstamped_length`` bytes; made by the first batch of that length
    _unstamped: Words | None = None
    _unstamped_length = -1

    def _stage(self, k: int, length: int, rec: int) -> list[int]:
        """Build the next ``k`` records in the staging area (the format's
        :func:`~peers.plugins.ringformat.build_records`, O(1) per record for ``sum64``
        once the slots' unstamped sums are known). Returns the payload bytes
        ``--corrupt-every`` flipped."""
        first_seq = self.seq + 1
        kind = self.options.checksum
        if kind == "sum64" and length != self._unstamped_length and not length & 7 and length >= 16:
            self._unstamped = unstamped_sums(self.stage_words, self.slots, length)
            self._unstamped_length = length
        unstamped = self._unstamped if length == self._unstamped_length else None
        build_records(self.stage, self.stage_words, k, length, first_seq, kind, unstamped)
        self.seq += k
        self.messages += k
        self.guest.count("messages", k)  # type: ignore[union-attr]
        self.guest.count("bytes", k * length)  # type: ignore[union-attr]
        return self._corrupt(first_seq, k, length, rec)

    def _corrupt(self, first_seq: int, k: int, length: int, rec: int) -> list[int]:
        """Test aid (``--corrupt-every N``): damage every Nth payload after its checksum."""
        every = self.options.corrupt_every
        flipped = []
        if every:
            for j in range(k):
                if (first_seq + j) % every == 0:
                    where = j * rec + RECORD_HEADER_SIZE + length // 2
                    self.stage[where] ^= CORRUPTION
                    flipped.append(where)
        return flipped

    def _store(self, size: int, flipped: list[int]) -> None:
        """Write the staged ``size`` bytes at ``head`` (two writes where the ring wraps),
        undo the test aid's damage in the staging area, advance ``head``."""
        assert self.guest is not None
        write, stage = self.guest.vcpu.write, self.stage
        for ring_offset, start, n in spans(self.head, size, self.ring_size):
            write(self.data_gpa + ring_offset, stage[start : start + n])
        for where in flipped:
            stage[where] ^= CORRUPTION
        self.head += size

    def _publish(self, *, last: bool) -> None:
        """Publish ``head`` (the records before it are complete), fence, and ring the
        consumer if this publication moved head past the value it waits on, or if it is
        the ``last`` one. In the handshake, only once the consumer has handed back all that
        was published before (see the module docstring); else its release rings us, and we
        publish then."""
        assert self.guest is not None
        if self.handshake:
            self.tail = self._read_index(self.tail_gpa)
            if self.tail != self.checked:
                return
            self._write_index(self.head_gpa, self.head)
            self.guest.ring(self.partner, CONSUMER_VECTOR)
            self.checked = self.head
            return
        self._write_index(self.head_gpa, self.head)
        full_fence()
        event = self._read_index(self.head_event_gpa)
        if head_event_passed(self.checked, event, self.head) or last:
            self.guest.ring(self.partner, CONSUMER_VECTOR)
        self.checked = self.head

    def _producer_event(self) -> None:
        if self.moved < self.total:
            self._produce()
        else:
            self._check_released()

    def _check_released(self) -> None:
        """Everything is written: finish once the consumer has released it all (asking for
        a doorbell when it has, and looking again after the fence, before sleeping)."""
        assert self.guest is not None
        if self.done:
            return
        if self.head != self.checked:  # the handshake had to wait to publish the last records
            self._publish(last=True)
        tail = self._read_index(self.tail_gpa)
        if tail != self.head and not self.handshake:
            self._write_index(self.tail_event_gpa, self.head)
            full_fence()
            tail = self._read_index(self.tail_gpa)
        if tail == self.head:
            self.done = True
            self.guest.finish(self._summary("released by the consumer"))

    # -- consumer -------------------------------------------------------------------------

    def _attach(self) -> bool:
        """Read the producer's header; False (after failing) if it is not a valid ring."""
        guest = self.guest
        assert guest is not None
        raw = guest.vcpu.read(self.base, HEADER_READ)  # the header, through the vCPU
        magic = int.from_bytes(raw[:8], "little")
        if magic != MAGIC:
            self._fail(
                f"ring: peer {self.partner} rang but there is no ring header in the shared "
                f"memory (magic {magic:#x}): is it running the ring plugin as the producer?"
            )
            return False
        header = RingHeader.unpack(raw)
        problem = header.problem(self.region.size)
        if problem is not None:
            self._fail(f"ring: {problem}")
            return False
        ring, max_message = header.ring_size, header.max_message
        self.ring_size = ring
        self.checksum_name = CHECKSUM_NAMES[header.checksum]
        self.total = header.total
        self.max_message = max_message
        self.start_ns = header.start_ns
        self.doorbell_vector = header.doorbell_vector
        self.tail = self.checked = self._read_index(self.tail_gpa)
        self.head = self.tail
        # The window: as many whole maximal records as fit in WINDOW (at least one), and
        # never more than the ring; a buffer reused for every read.
        largest = record_size(max_message)
        self.window = largest * records_per_window(largest, ring)
        self.batch = batch_bytes(ring, largest)
        self.buf = memoryview(bytearray(self.window))
        self.words: Words = np.frombuffer(self.buf, np.uint64)
        self.started = True
        return True

    def _consume(self) -> None:
        """Verify and release everything the producer has published: read a window of
        whole records per guest access, verify each, release the window (``tail``), and
        ring the producer if that release reached its tail event. With nothing left, ask
        for a doorbell on the next batch, fence, look again, and sleep (return). At most a
        ring's worth per call, then yield."""
        assert self.guest is not None
        budget = self.ring_size
        while self.moved < self.total:
            if not self._published():
                break  # the publication that passes the head event (or the last) rings us
            if not 0 < used(self.head, self.tail) <= self.ring_size:
                self._fail(
                    f"ring: impossible head {self.head} with tail {self.tail} in a "
                    f"{self.ring_size}-byte ring"
                )
                return
            if budget <= 0:
                self._yield()
                break
            n = min(used(self.head, self.tail), self.window)
            self._read_window(n)
            window = parse_records(self.buf, n, self.messages + 1, self.max_message,
                                   self.total - self.moved, used(self.head, self.tail),
                                   self.words)  # fmt: skip
            self._verify(window)
            if window.problem is not None:
                where = (self.tail + window.problem_at) % self.ring_size
                self._fail(f"ring: {window.problem} at ring offset {where}")
                return
            budget -= window.size
            self._release(window.size)
        if self.moved >= self.total:
            self.done = True
            summary = self._summary("verified")
            if self.errors:
                self.guest.fail(f"{summary}; FAILED: {self.errors} checksum errors, "
                                f"{self.first_error}")  # fmt: skip
            else:
                self.guest.finish(summary)

    def _published(self) -> bool:
        """Whether there is something to read; with nothing, ask for a doorbell once a
        batch is published (head past the wake value), fence, and look again. In the
        handshake, ``head`` is read only at the first look after a doorbell of the
        producer's (what it wrote later may reach this host torn)."""
        if self.head != self.tail:
            return True
        if self.handshake:  # head is read once per doorbell of the producer's
            if self.acknowledged:
                return False
            self.head = self._read_index(self.head_gpa)
            return self.head != self.tail
        self.head = self._read_index(self.head_gpa)
        if self.head != self.tail:
            return True
        want = self.tail + self.batch
        self._write_index(self.head_event_gpa, want)
        full_fence()
        self.head = self._read_index(self.head_gpa)
        return self.head > want

    def _read_window(self, n: int) -> None:
        """``n`` ring bytes from ``tail`` into the window buffer (two reads where it wraps)."""
        assert self.guest is not None
        read_into, buf = self.guest.vcpu.read_into, self.buf
        for ring_offset, start, length in spans(self.tail, n, self.ring_size):
            read_into(self.data_gpa + ring_offset, buf[start : start + length])

    def _verify(self, window: Window) -> None:
        """Count the window's records, and those whose checksum is wrong (remembering the
        first)."""
        bad = bad_records(self.buf, self.words, window, self.checksum_name, self.max_message)
        if bad:
            self.errors += len(bad)
            if not self.first_error:
                j, got = bad[0]
                self.first_error = (
                    f"first in message {self.messages + 1 + j} at ring offset "
                    f"{(self.tail + window.offsets[j]) % self.ring_size} (checksum {got:#x}, "
                    f"header says {window.checksums[j]:#x})"
                )
        self.messages += window.count
        self.moved += window.payload
        self.guest.count("messages", window.count)  # type: ignore[union-attr]
        self.guest.count("bytes", window.payload)  # type: ignore[union-attr]

    def _release(self, size: int) -> None:
        """Release ``size`` bytes (publish ``tail``), fence, and ring the producer if it
        waits for this much (in the handshake: once all it published is released)."""
        assert self.guest is not None
        self.tail += size
        self._write_index(self.tail_gpa, self.tail)
        if self.handshake:
            if self.tail == self.head:  # all it published: hand the ring back
                self.acknowledged = True
                self.guest.ring(self.partner, self._partner_vector())
            self.checked = self.tail
            return
        full_fence()
        event = self._read_index(self.tail_event_gpa)
        if tail_event_reached(self.checked, event, self.tail):
            self.guest.ring(self.partner, self._partner_vector())
        self.checked = self.tail

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
            elif not self.handshake or self.partner in self.guest.peers():
                self._begin()  # the consumer is ready
            else:  # ready, but its join notice is still on its way: peer_joined begins
                self.partner_ready = True
            return
        if not self.started and not self._attach():
            return
        self.acknowledged = False  # the producer's doorbell: head may be read again
        self._consume()
        self.guest.progress(self.moved, self.total, "bytes")

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
        released = (
            self._read_index(self.tail_gpa) if self.producing and self.started else self.moved
        )
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
            offset=self.region.offset, ring_size=self.ring_size, bytes=self.moved,
            messages=self.messages, checksum_errors=self.errors,
            seconds=elapsed, mb_per_s=self.moved / elapsed / 1e6,
            messages_per_s=self.messages / elapsed,
        )  # fmt: skip
        role = "producer" if self.producing else "consumer"
        return (
            f"ring: {self.moved} bytes in {self.messages} messages, {self.errors} checksum "
            f"errors, {self.moved / elapsed / 1e6:.1f} MB/s, {self.messages / elapsed:.0f} "
            f"messages/s ({role}, {how})"
        )
