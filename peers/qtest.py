"""Drive a real QEMU ivshmem device with no guest OS, through QEMU's qtest protocol.

A :class:`QemuIvshmemVm` starts ``qemu-system-x86_64 -qtest stdio`` with one ivshmem device
(``ivshmem-doorbell`` on an ivshmem server's socket, or ``ivshmem-plain`` on a file such as
``/dev/shm/NAME``) and plays the guest's PCI driver itself: it enumerates bus 0 through the
configuration ports 0xcf8/0xcfc, sizes and places BAR0 (registers), BAR1 (MSI-X) and BAR2 (the
shared memory, 64-bit) at chosen guest-physical addresses, enables memory decoding and bus
mastering, and enables MSI-X with every vector masked, so that an incoming doorbell sets the
vector's pending bit (as QEMU's own ``tests/qtest/ivshmem-test.c`` observes it). A vector can
also be routed to guest RAM (:meth:`QemuIvshmemVm.msix_route`): the device's MSI-X message is
then a real memory write of a chosen value, visible with :meth:`QtestConnection.readl`.

It is meant for users' own tests: real QEMU VMs sharing an ivshmem server (``ivshmemd`` or
QEMU's ``ivshmem-server``) with our peers.

Resources and errors: every QEMU process is started in :class:`QtestConnection` and is killed
and reaped by ``close()`` (also on every failed start and by the context managers). When the
creating thread is the main thread, QEMU additionally gets a parent-death signal (through
``setpriv --pdeathsig``) so that it cannot outlive a test runner that is killed outright. Every
reply is awaited with a deadline; QEMU dying, a ``FAIL``/``ERR`` reply or a timeout raise
:class:`QtestError` carrying QEMU's stderr. Arguments are checked here before they are sent,
because QEMU answers a malformed qtest command with an assertion failure (it aborts).

QEMU facts this driver relies on (QEMU 7.2): an ``ivshmem-doorbell`` device blocks QEMU's
start-up until the server has sent the version, the peer id and the shared-memory fd, so the
server must be listening before the VM starts; ``ivshmem-doorbell`` always uses MSI-X, and
while MSI-X is disabled it reads and drops incoming rings, so MSI-X is enabled right after the
BARs are placed; the pending-bit array is read-only and a pending bit is only cleared by
unmasking the vector (which delivers the message); a VM learns the other peers' eventfds
asynchronously after its start-up, and drops doorbells to peers it does not know yet (see
:func:`ring_until_pending`). Debian's QEMU is built without the ``qtest`` accelerator:
the driver then uses TCG with the vCPU stopped (``-S``), so no firmware ever runs and the PCI
devices stay unconfigured, exactly as under ``-accel qtest``.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self, TypedDict, Unpack

__all__ = [
    "DEFAULT_TIMEOUT",
    "IVSHMEM_DEVICE_ID",
    "IVSHMEM_VENDOR_ID",
    "QEMU_BINARY",
    "BarLayout",
    "PciFunction",
    "QemuIvshmemVm",
    "QtestConnection",
    "QtestError",
    "VmOptions",
    "find_pci_function",
    "qemu_available",
    "ring_until_pending",
]

logger = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
#: Seconds to wait for one qtest reply (and for QEMU's start-up).
DEFAULT_TIMEOUT = 10.0
#: Seconds between SIGTERM and SIGKILL when a QEMU process is stopped.
TERMINATE_GRACE = 2.0
#: Largest payload of one ``b64write`` line. QEMU rescans its whole input buffer after every
#: 1 KiB it receives, so very long lines cost quadratic time on QEMU's side.
WRITE_CHUNK = 64 * 1024
#: Largest payload of one ``b64read`` reply.
READ_CHUNK = 256 * 1024
_READ_SIZE = 256 * 1024

IVSHMEM_VENDOR_ID = 0x1AF4
IVSHMEM_DEVICE_ID = 0x1110

# PCI configuration mechanism #1 (the PC's 0xcf8/0xcfc ports).
PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
PCI_SLOTS = 32
PCI_FUNCTIONS = 8

# Configuration-space offsets and bits (PCI Local Bus spec).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_STATUS_CAP_LIST = 0x10
PCI_HEADER_MULTI_FUNCTION = 0x80
PCI_BAR_SPACE_IO = 0x1
PCI_BAR_MEM_TYPE_MASK = 0x6
PCI_BAR_MEM_TYPE_64 = 0x4
PCI_BAR_MEM_FLAGS = 0xF
PCI_BAR_IO_FLAGS = 0x3
PCI_CAP_ID_MSIX = 0x11

# MSI-X capability and table layout.
MSIX_FLAGS = 2  # message control, 16 bits
MSIX_TABLE = 4  # table offset | BIR
MSIX_PBA = 8  # PBA offset | BIR
MSIX_FLAGS_ENABLE = 0x8000
MSIX_FLAGS_MASKALL = 0x4000
MSIX_FLAGS_QSIZE = 0x07FF
MSIX_BIR_MASK = 0x7
MSIX_ENTRY_SIZE = 16
MSIX_ENTRY_ADDR_LO = 0
MSIX_ENTRY_ADDR_HI = 4
MSIX_ENTRY_DATA = 8
MSIX_ENTRY_VECTOR_CTRL = 12
MSIX_ENTRY_CTRL_MASKBIT = 0x1

# ivshmem BAR0 registers (docs/ivshmem-protocol.md).
REG_INTR_MASK = 0
REG_INTR_STATUS = 4
REG_IV_POSITION = 8
REG_DOORBELL = 12
IVSHMEM_REG_BAR_SIZE = 256
MAX_PEER_ID = 0xFFFF
MAX_DOORBELL_VECTOR = 0xFFFF
#: The largest MSI-X table a PCI function can have.
MAX_MSIX_VECTORS = 2048

#: Pending-bit polls between two rings in :func:`ring_until_pending`.
POLLS_PER_RING = 64

_U32 = 0xFFFF_FFFF
_FOUR_GIB = 1 << 32


class QtestError(RuntimeError):
    """QEMU failed, died, refused a command or did not answer in time.

    ``stderr`` holds what QEMU wrote on its standard error so far (also in the message).
    """

    def __init__(self, message: str, stderr: str = "") -> None:
        self.stderr = stderr
        text = message
        if stderr.strip():
            text = f"{message}\nQEMU stderr:\n{stderr.rstrip()}"
        super().__init__(text)


def qemu_available(binary: str = QEMU_BINARY) -> bool:
    """Whether ``binary`` is on PATH (tests use this to skip when QEMU is absent)."""
    return shutil.which(binary) is not None


@functools.cache
def _accelerators(binary: str) -> frozenset[str]:
    """The accelerators ``binary`` was built with (``-accel help``)."""
    try:
        out = subprocess.run(
            [binary, "-accel", "help"],
            capture_output=True,
            text=True,
            timeout=DEFAULT_TIMEOUT,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(line.strip() for line in out.splitlines()[1:] if line.strip())


def _accel_args(binary: str, accel: str | None) -> list[str]:
    """``-accel qtest`` when QEMU has it, else TCG with the vCPU stopped (``-S``)."""
    if accel is None:
        accel = "qtest" if "qtest" in _accelerators(binary) else "tcg"
    if accel == "qtest":
        return ["-accel", "qtest"]
    # A stopped vCPU never runs the firmware, so nothing but us touches the PCI devices.
    return ["-accel", accel, "-S"]


def _death_signal_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --`` when it is safe and available, else nothing.

    The parent-death signal fires when the *thread* that forked exits, so it is only used from
    the main thread (a QEMU started from a worker thread would die with that thread).
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _check_u(name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ValueError(f"{name} must be an integer in 0..{(1 << bits) - 1}, got {value!r}")


class QtestConnection:
    """One QEMU process under ``-qtest stdio``, spoken to line by line, synchronously.

    Each request gets exactly one reply line (``OK ...``, ``FAIL ...`` or ``ERR ...``); QEMU may
    interleave asynchronous ``IRQ raise N`` / ``IRQ lower N`` lines (after
    :meth:`irq_intercept_in`), which are recorded in :attr:`irq_events` and skipped. QEMU's
    stderr goes to an unnamed temporary file, so it can never block QEMU and is at hand for
    error messages.
    """

    def __init__(
        self,
        qemu_args: Sequence[str],
        *,
        binary: str = QEMU_BINARY,
        machine: str = "pc",
        memory: str = "16M",
        accel: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Start QEMU with ``qemu_args`` (devices, objects) and wait until qtest answers.

        ``accel=None`` picks ``qtest`` when QEMU was built with it, else stopped TCG.
        """
        if shutil.which(binary) is None:
            raise QtestError(f"{binary} not found on PATH")
        self.timeout = timeout
        #: ``("raise" | "lower", irq number)`` for every async IRQ line seen, in order.
        self.irq_events: list[tuple[str, int]] = []
        self._buffer = bytearray()
        # Lives as long as the connection; closed by close().
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.argv: list[str] = [
            *_death_signal_prefix(),
            binary,
            *("-machine", machine, "-m", memory),
            *_accel_args(binary, accel),
            *["-display", "none", "-nodefaults", "-qtest", "stdio", "-qtest-log", "/dev/null"],
            *qemu_args,
        ]
        logger.debug("starting %s", " ".join(self.argv))
        try:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                close_fds=True,
            )
        except OSError as exc:
            self._stderr.close()
            raise QtestError(f"cannot start {binary}: {exc}") from exc
        assert self._process.stdin is not None and self._process.stdout is not None
        self._stdin = self._process.stdin
        self._stdout = self._process.stdout
        os.set_blocking(self._stdin.fileno(), False)
        os.set_blocking(self._stdout.fileno(), False)
        self._selector = selectors.DefaultSelector()
        self._closed = False
        # Set when a reply went missing (timeout, EOF): later replies could not be matched.
        self._broken: str | None = None
        try:
            reply = self.command("endianness")
            if reply != "little":
                raise QtestError(f"unsupported target endianness {reply!r}", self.stderr_text())
        except BaseException:
            self.close()
            raise

    # -- process -------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it has exited (negative: killed by that signal)."""
        return self._process.poll()

    def stderr_text(self) -> str:
        """Everything QEMU wrote on stderr so far."""
        if self._stderr.closed:
            return ""
        self._stderr.flush()
        return (
            Path(f"/proc/self/fd/{self._stderr.fileno()}").read_bytes().decode("utf-8", "replace")
        )

    def close(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL after a grace period) and reap it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._selector.close()
        process = self._process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(TERMINATE_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pipe in (self._stdin, self._stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self._stderr.close()
        logger.debug("QEMU %d exited with %s", process.pid, process.returncode)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the line protocol ---------------------------------------------------------------------

    def _fail(self, message: str) -> QtestError:
        status = self._process.poll()
        if status is not None:
            message = f"{message} (QEMU exited with status {status})"
        return QtestError(message, self.stderr_text())

    def _reap_briefly(self, deadline: float) -> None:
        """QEMU closed its end: give it until ``deadline`` to exit, so its status and its
        last words on stderr make it into the error."""
        try:
            self._process.wait(max(0.0, min(deadline - time.monotonic(), TERMINATE_GRACE)))
        except subprocess.TimeoutExpired:
            pass

    def _send(self, line: str, deadline: float) -> None:
        """Write one command line; while QEMU's stdin is full, keep reading its stdout (so that
        QEMU, blocked on a full stdout pipe of async IRQ lines, can go on reading)."""
        data = memoryview((line + "\n").encode("ascii"))
        stdin = self._stdin.fileno()
        while data:
            try:
                written = os.write(stdin, data)
            except BlockingIOError:
                written = 0
            except BrokenPipeError:
                self._reap_briefly(deadline)
                raise self._fail(f"QEMU stopped reading commands (sending {line[:60]!r})") from None
            data = data[written:]
            if data and self._wait(stdin, deadline, line) and not self._fill_buffer():
                self._reap_briefly(deadline)
                raise self._fail(f"QEMU closed the qtest channel (sending {line[:60]!r})")

    def _wait(self, stdin: int | None, deadline: float, line: str) -> bool:
        """Wait until stdout is readable or, if ``stdin`` is given, stdin is writable.

        Returns whether stdout is readable.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._fail(f"QEMU did not answer {line[:60]!r} within {self.timeout:g} s")
        stdout = self._stdout.fileno()
        self._selector.register(stdout, selectors.EVENT_READ)
        if stdin is not None:
            self._selector.register(stdin, selectors.EVENT_WRITE)
        try:
            ready = self._selector.select(remaining)
        finally:
            self._selector.unregister(stdout)
            if stdin is not None:
                self._selector.unregister(stdin)
        return any(key.fd == stdout for key, _ in ready)

    def _fill_buffer(self) -> bool:
        """Append what QEMU has written to the reply buffer; False at EOF."""
        try:
            chunk = os.read(self._stdout.fileno(), _READ_SIZE)
        except BlockingIOError:
            return True
        self._buffer += chunk
        return bool(chunk)

    def _read_line(self, deadline: float, line: str) -> str:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                reply = self._buffer[:end].decode("ascii", "replace")
                del self._buffer[: end + 1]
                return reply
            if not self._fill_buffer():
                self._reap_briefly(deadline)
                raise self._fail(f"QEMU closed the qtest channel (waiting for {line[:60]!r})")
            if self._buffer.find(b"\n") < 0:
                self._wait(None, deadline, line)

    def command(self, line: str, timeout: float | None = None) -> str:
        """Send one qtest request and return the text after ``OK`` (stripped).

        Async ``IRQ`` lines before the reply are recorded in :attr:`irq_events`.
        """
        if self._closed:
            raise QtestError("the QEMU process was already closed")
        if self._broken is not None:
            raise QtestError(f"the qtest channel is unusable: {self._broken}", self.stderr_text())
        if "\n" in line:
            raise ValueError("a qtest command is one line")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            self._send(line, deadline)
            reply = self._read_line(deadline, line)
            while self._is_irq_line(reply):
                reply = self._read_line(deadline, line)
        except QtestError as exc:
            self._broken = str(exc).splitlines()[0]
            raise
        if reply.split(maxsplit=1)[:1] == ["OK"]:
            return reply[2:].strip()
        raise self._fail(f"QEMU refused {line[:60]!r}: {reply}")

    def _is_irq_line(self, reply: str) -> bool:
        words = reply.split()
        if (
            len(words) == 3
            and words[0] == "IRQ"
            and words[1] in ("raise", "lower")
            and words[2].isdigit()
        ):
            self.irq_events.append((words[1], int(words[2])))
            return True
        return False

    def _int_reply(self, line: str) -> int:
        reply = self.command(line)
        try:
            return int(reply, 0)
        except ValueError:
            raise self._fail(f"unexpected reply to {line!r}: {reply!r}") from None

    # -- port and memory access ----------------------------------------------------------------

    def outb(self, port: int, value: int) -> None:
        """Write one byte to an I/O port."""
        _check_u("port", port, 16)
        _check_u("value", value, 8)
        self.command(f"outb {port:#x} {value:#x}")

    def outw(self, port: int, value: int) -> None:
        """Write 16 bits to an I/O port."""
        _check_u("port", port, 16)
        _check_u("value", value, 16)
        self.command(f"outw {port:#x} {value:#x}")

    def outl(self, port: int, value: int) -> None:
        """Write 32 bits to an I/O port."""
        _check_u("port", port, 16)
        _check_u("value", value, 32)
        self.command(f"outl {port:#x} {value:#x}")

    def inb(self, port: int) -> int:
        """Read one byte from an I/O port."""
        _check_u("port", port, 16)
        return self._int_reply(f"inb {port:#x}") & 0xFF

    def inw(self, port: int) -> int:
        """Read 16 bits from an I/O port."""
        _check_u("port", port, 16)
        return self._int_reply(f"inw {port:#x}") & 0xFFFF

    def inl(self, port: int) -> int:
        """Read 32 bits from an I/O port."""
        _check_u("port", port, 16)
        return self._int_reply(f"inl {port:#x}") & _U32

    def _write_n(self, width: str, bits: int, gpa: int, value: int) -> None:
        _check_u("gpa", gpa, 64)
        _check_u("value", value, bits)
        self.command(f"write{width} {gpa:#x} {value:#x}")

    def _read_n(self, width: str, gpa: int) -> int:
        _check_u("gpa", gpa, 64)
        return self._int_reply(f"read{width} {gpa:#x}")

    def writeb(self, gpa: int, value: int) -> None:
        """Store one byte at guest-physical address ``gpa``."""
        self._write_n("b", 8, gpa, value)

    def writew(self, gpa: int, value: int) -> None:
        """Store 16 bits (little-endian) at ``gpa``."""
        self._write_n("w", 16, gpa, value)

    def writel(self, gpa: int, value: int) -> None:
        """Store 32 bits (little-endian) at ``gpa``."""
        self._write_n("l", 32, gpa, value)

    def writeq(self, gpa: int, value: int) -> None:
        """Store 64 bits (little-endian) at ``gpa``."""
        self._write_n("q", 64, gpa, value)

    def readb(self, gpa: int) -> int:
        """Load one byte from ``gpa``."""
        return self._read_n("b", gpa)

    def readw(self, gpa: int) -> int:
        """Load 16 bits from ``gpa``."""
        return self._read_n("w", gpa)

    def readl(self, gpa: int) -> int:
        """Load 32 bits from ``gpa``."""
        return self._read_n("l", gpa)

    def readq(self, gpa: int) -> int:
        """Load 64 bits from ``gpa``."""
        return self._read_n("q", gpa)

    def read(self, gpa: int, size: int) -> bytes:
        """Read ``size`` bytes of guest-physical memory (``b64read``, in chunks)."""
        _check_u("gpa", gpa, 64)
        if size < 0 or gpa + size > 1 << 64:
            raise ValueError(f"bad read range: {size} bytes at {gpa:#x}")
        out = bytearray()
        while len(out) < size:
            n = min(READ_CHUNK, size - len(out))
            reply = self.command(f"b64read {gpa + len(out):#x} {n:#x}")
            chunk = base64.b64decode(reply)
            if len(chunk) != n:
                raise self._fail(f"b64read returned {len(chunk)} bytes, asked for {n}")
            out += chunk
        return bytes(out)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` to guest-physical memory (``b64write``, in chunks)."""
        _check_u("gpa", gpa, 64)
        view = memoryview(data).cast("B")
        if gpa + len(view) > 1 << 64:
            raise ValueError(f"bad write range: {len(view)} bytes at {gpa:#x}")
        for start in range(0, len(view), WRITE_CHUNK):
            chunk = view[start : start + WRITE_CHUNK]
            encoded = base64.b64encode(chunk).decode("ascii")
            self.command(f"b64write {gpa + start:#x} {len(chunk):#x} {encoded}")

    def memset(self, gpa: int, size: int, value: int) -> None:
        """Fill ``size`` bytes at ``gpa`` with the byte ``value``."""
        _check_u("gpa", gpa, 64)
        _check_u("size", size, 64)
        _check_u("value", value, 8)
        self.command(f"memset {gpa:#x} {size:#x} {value:#x}")

    def irq_intercept_in(self, qom_path: str) -> None:
        """Report the GPIO inputs of ``qom_path`` (e.g. ``ioapic``) as async IRQ lines."""
        if not qom_path or any(c.isspace() for c in qom_path):
            raise ValueError(f"bad QOM path {qom_path!r}")
        self.command(f"irq_intercept_in {qom_path}")

    def set_irq_in(self, qom_path: str, num: int, level: int, name: str | None = None) -> None:
        """Force GPIO input ``num`` (of the list ``name``, default unnamed) of ``qom_path``."""
        for word in (qom_path, name or "unnamed-gpio-in"):
            if not word or any(c.isspace() for c in word):
                raise ValueError(f"bad qtest word {word!r}")
        _check_u("num", num, 31)
        if not isinstance(level, int) or not -(1 << 31) <= level < 1 << 31:
            raise ValueError(f"level must be a 32-bit integer, got {level!r}")
        self.command(f"set_irq_in {qom_path} {name or 'unnamed-gpio-in'} {num} {level}")


@dataclass(frozen=True)
class PciFunction:
    """One function on PCI bus 0, with 32/16/8-bit configuration access through 0xcf8/0xcfc."""

    qtest: QtestConnection
    devfn: int

    @property
    def slot(self) -> int:
        return self.devfn >> 3

    @property
    def function(self) -> int:
        return self.devfn & 7

    def _select(self, offset: int, size: int) -> int:
        if not 0 <= offset <= 0x100 - size or offset % size:
            raise ValueError(f"bad {size}-byte config offset {offset:#x}")
        self.qtest.outl(PCI_CONFIG_ADDRESS, 0x8000_0000 | self.devfn << 8 | (offset & 0xFC))
        return PCI_CONFIG_DATA + (offset & 3)

    def read8(self, offset: int) -> int:
        return self.qtest.inb(self._select(offset, 1))

    def read16(self, offset: int) -> int:
        return self.qtest.inw(self._select(offset, 2))

    def read32(self, offset: int) -> int:
        return self.qtest.inl(self._select(offset, 4))

    def write8(self, offset: int, value: int) -> None:
        self.qtest.outb(self._select(offset, 1), value)

    def write16(self, offset: int, value: int) -> None:
        self.qtest.outw(self._select(offset, 2), value)

    def write32(self, offset: int, value: int) -> None:
        self.qtest.outl(self._select(offset, 4), value)

    def find_capability(self, cap_id: int) -> int:
        """Offset of the first capability ``cap_id`` in the capability list, or 0."""
        if not self.read16(PCI_STATUS) & PCI_STATUS_CAP_LIST:
            return 0
        offset = self.read8(PCI_CAPABILITY_LIST) & 0xFC
        seen: set[int] = set()
        while offset and offset not in seen:
            seen.add(offset)
            if self.read8(offset) == cap_id:
                return offset
            offset = self.read8(offset + 1) & 0xFC
        return 0

    def bar_info(self, index: int) -> tuple[int, bool, bool]:
        """Size BAR ``index``: ``(size, is_io, is_64bit)``; size 0 means not implemented.

        Writes all-ones to the BAR (and its upper half for a 64-bit BAR) and reads back the
        size mask; the BAR is left unprogrammed, so call this with decoding disabled.
        """
        if not 0 <= index <= 5:
            raise ValueError(f"BAR index must be 0..5, got {index}")
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        self.write32(reg, _U32)
        low = self.read32(reg)
        if low == 0:
            return 0, False, False
        if low & PCI_BAR_SPACE_IO:
            mask = low & ~PCI_BAR_IO_FLAGS & 0xFFFF
            return (mask & -mask), True, False
        is_64 = (low & PCI_BAR_MEM_TYPE_MASK) == PCI_BAR_MEM_TYPE_64
        mask = low & ~PCI_BAR_MEM_FLAGS & _U32
        if is_64:
            self.write32(reg + 4, _U32)
            mask |= self.read32(reg + 4) << 32
        if mask == 0:
            return 0, False, is_64
        return (mask & -mask), False, is_64

    def map_bar(self, index: int, gpa: int) -> tuple[int, bool]:
        """Size memory BAR ``index`` and place it at ``gpa``: returns ``(size, is_64bit)``."""
        size, is_io, is_64 = self.bar_info(index)
        if size == 0:
            raise QtestError(f"PCI {self.slot:02x}.{self.function} has no BAR{index}")
        if is_io:
            raise QtestError(f"BAR{index} of PCI {self.slot:02x}.{self.function} is an I/O BAR")
        if gpa % size:
            raise ValueError(f"BAR{index} at {gpa:#x} is not aligned to its size {size:#x}")
        if not is_64 and gpa + size > _FOUR_GIB:
            raise ValueError(f"32-bit BAR{index} cannot be placed at {gpa:#x}")
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        self.write32(reg, gpa & _U32)
        if is_64:
            self.write32(reg + 4, gpa >> 32)
        return size, is_64


def find_pci_function(qtest: QtestConnection, vendor_id: int, device_id: int) -> PciFunction:
    """The first function on bus 0 with these ids (slot by slot, function by function)."""
    for slot in range(PCI_SLOTS):
        for function in range(PCI_FUNCTIONS):
            candidate = PciFunction(qtest, slot << 3 | function)
            ids = candidate.read32(PCI_VENDOR_ID)
            if ids & 0xFFFF == 0xFFFF:
                if function == 0:
                    break
                continue
            if ids == device_id << 16 | vendor_id:
                return candidate
            if function == 0 and not candidate.read8(PCI_HEADER_TYPE) & PCI_HEADER_MULTI_FUNCTION:
                break
    raise QtestError(f"no PCI device {vendor_id:04x}:{device_id:04x} on bus 0", qtest.stderr_text())


@dataclass(frozen=True)
class BarLayout:
    """Where the driver places the ivshmem BARs (guest-physical addresses).

    ``bar2=None`` places the shared memory at the lowest multiple of its size at or above
    4 GiB, which never collides with RAM, the registers or the PC's 32-bit PCI hole.
    """

    bar0: int = 0xE000_0000
    bar1: int = 0xE000_1000
    bar2: int | None = None


class VmOptions(TypedDict, total=False):
    """Keyword options of :class:`QemuIvshmemVm` and its :meth:`~QemuIvshmemVm.doorbell` and
    :meth:`~QemuIvshmemVm.plain` constructors."""

    binary: str
    machine: str
    memory: str
    accel: str | None
    layout: BarLayout | None
    timeout: float


class QemuIvshmemVm:
    """A real QEMU VM with one ivshmem device, driven as its guest driver would.

    Build one with :meth:`doorbell` (``ivshmem-doorbell`` on an ivshmem server's socket) or
    :meth:`plain` (``ivshmem-plain`` on a shared file). The constructor runs the whole driver
    probe (find 1af4:1110, place the BARs, enable memory + bus master, enable MSI-X with all
    vectors masked); use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        device_args: Sequence[str],
        *,
        binary: str = QEMU_BINARY,
        machine: str = "pc",
        memory: str = "16M",
        accel: str | None = None,
        layout: BarLayout | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Start QEMU with ``device_args`` (which must create one ivshmem device) and probe it."""
        layout = layout or BarLayout()
        self.qtest = QtestConnection(
            device_args,
            binary=binary,
            machine=machine,
            memory=memory,
            accel=accel,
            timeout=timeout,
        )
        try:
            self._probe(layout)
        except BaseException:
            self.qtest.close()
            raise

    @classmethod
    def doorbell(
        cls,
        socket_path: str | os.PathLike[str],
        *,
        vectors: int = 1,
        **options: Unpack[VmOptions],
    ) -> QemuIvshmemVm:
        """A VM with ``ivshmem-doorbell,vectors=N`` on the server listening at ``socket_path``.

        The server must already be listening: QEMU blocks at start-up until it has received the
        version, its peer id and the shared memory. QEMU's doorbell device always has MSI-X
        (BAR1, one vector per ``vectors``). ``options`` go to the constructor.
        """
        path = os.fspath(socket_path)
        if "," in path:
            raise ValueError(f"QEMU cannot take a socket path with a comma: {path!r}")
        if not isinstance(vectors, int) or not 1 <= vectors <= MAX_MSIX_VECTORS:
            raise ValueError(f"vectors must be 1..{MAX_MSIX_VECTORS}, got {vectors!r}")
        args = [
            "-chardev",
            f"socket,id=ivshmem-server,path={path}",
            "-device",
            f"ivshmem-doorbell,chardev=ivshmem-server,vectors={vectors}",
        ]
        return cls(args, **options)

    @classmethod
    def plain(
        cls,
        mem_path: str | os.PathLike[str],
        size: int,
        **options: Unpack[VmOptions],
    ) -> QemuIvshmemVm:
        """A VM with ``ivshmem-plain`` on the file ``mem_path`` (shared, ``size`` bytes).

        For a POSIX shared-memory object NAME use ``/dev/shm/NAME``. QEMU creates the file if it
        does not exist.
        """
        path = os.fspath(mem_path)
        if "," in path:
            raise ValueError(f"QEMU cannot take a path with a comma: {path!r}")
        if not isinstance(size, int) or size < 4096 or size & (size - 1):
            raise ValueError(f"size must be a power of two >= 4096, got {size!r}")
        args = [
            "-object",
            f"memory-backend-file,id=ivshmem-mem,size={size},share=on,mem-path={path}",
            "-device",
            "ivshmem-plain,memdev=ivshmem-mem",
        ]
        return cls(args, **options)

    # -- probe ---------------------------------------------------------------------------------

    def _probe(self, layout: BarLayout) -> None:
        pci = find_pci_function(self.qtest, IVSHMEM_VENDOR_ID, IVSHMEM_DEVICE_ID)
        self.pci = pci
        pci.write16(PCI_COMMAND, pci.read16(PCI_COMMAND) & ~(PCI_COMMAND_MEMORY | PCI_COMMAND_IO))

        size, _ = pci.map_bar(0, layout.bar0)
        if size != IVSHMEM_REG_BAR_SIZE:
            raise QtestError(f"BAR0 is {size} bytes, expected {IVSHMEM_REG_BAR_SIZE}")
        self.bar0 = layout.bar0

        bar2_size, _, bar2_64 = pci.bar_info(2)
        if bar2_size == 0:
            raise QtestError("the ivshmem device has no BAR2 (shared memory)")
        bar2 = layout.bar2
        if bar2 is None:
            bar2 = _align_up(_FOUR_GIB, bar2_size) if bar2_64 else 0xC000_0000
        pci.map_bar(2, bar2)
        #: Guest-physical address and size of BAR2 (the shared memory).
        self.bar2 = bar2
        self.bar2_size = bar2_size

        self._msix_cap = pci.find_capability(PCI_CAP_ID_MSIX)
        self._msix_size = 0
        self.bar1: int | None = None
        if self._msix_cap:
            flags = pci.read16(self._msix_cap + MSIX_FLAGS)
            self._msix_size = (flags & MSIX_FLAGS_QSIZE) + 1
            table = pci.read32(self._msix_cap + MSIX_TABLE)
            pba = pci.read32(self._msix_cap + MSIX_PBA)
            if table & MSIX_BIR_MASK != 1 or pba & MSIX_BIR_MASK != 1:
                raise QtestError(f"MSI-X structures outside BAR1 (table {table:#x}, pba {pba:#x})")
            pci.map_bar(1, layout.bar1)
            self.bar1 = layout.bar1
            self._msix_table = layout.bar1 + (table & ~MSIX_BIR_MASK)
            self._msix_pba = layout.bar1 + (pba & ~MSIX_BIR_MASK)

        command = pci.read16(PCI_COMMAND) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        pci.write16(PCI_COMMAND, command)
        if pci.read16(PCI_COMMAND) & command != command:
            raise QtestError("the device refused memory decoding / bus mastering")

        if self._msix_cap:
            flags = pci.read16(self._msix_cap + MSIX_FLAGS)
            pci.write16(
                self._msix_cap + MSIX_FLAGS, (flags | MSIX_FLAGS_ENABLE) & ~MSIX_FLAGS_MASKALL
            )
            for vector in range(self._msix_size):
                self.msix_mask(vector)
        logger.debug(
            "QEMU %d: ivshmem at %02x.%d, BAR0 %#x, BAR1 %s, BAR2 %#x (+%#x)",
            self.qtest.pid,
            pci.slot,
            pci.function,
            self.bar0,
            None if self.bar1 is None else hex(self.bar1),
            self.bar2,
            self.bar2_size,
        )

    # -- lifetime ------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self.qtest.pid

    def close(self) -> None:
        """Kill QEMU and reap it (idempotent)."""
        self.qtest.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- BAR0 registers ------------------------------------------------------------------------

    def iv_position(self) -> int:
        """The IVPosition register: this VM's peer id (as the server assigned it)."""
        return self.qtest.readl(self.bar0 + REG_IV_POSITION)

    def read_intr_mask(self) -> int:
        """The IntrMask register."""
        return self.qtest.readl(self.bar0 + REG_INTR_MASK)

    def write_intr_mask(self, value: int) -> None:
        """Set the IntrMask register."""
        self.qtest.writel(self.bar0 + REG_INTR_MASK, value)

    def read_intr_status(self) -> int:
        """The IntrStatus register; the read clears it (device semantics)."""
        return self.qtest.readl(self.bar0 + REG_INTR_STATUS)

    def write_intr_status(self, value: int) -> None:
        """Set the IntrStatus register."""
        self.qtest.writel(self.bar0 + REG_INTR_STATUS, value)

    def ring(self, dest_peer: int, vector: int = 0) -> None:
        """Write the Doorbell register: ring ``vector`` of peer ``dest_peer``.

        QEMU's device only looks at the low 8 bits of the vector and ignores rings to unknown
        peers or unconnected vectors.
        """
        _check_u("dest_peer", dest_peer, 16)
        _check_u("vector", vector, 16)
        self.write_doorbell(dest_peer << 16 | vector)

    def write_doorbell(self, value: int) -> None:
        """Write a raw 32-bit value to the Doorbell register."""
        self.qtest.writel(self.bar0 + REG_DOORBELL, value)

    # -- BAR2: the shared memory ---------------------------------------------------------------

    def _check_bar2(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.bar2_size:
            raise ValueError(
                f"range {offset:#x}+{size:#x} is outside BAR2 (size {self.bar2_size:#x})"
            )

    def read_bar2(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of the shared memory at ``offset``, through the guest's BAR2."""
        self._check_bar2(offset, size)
        return self.qtest.read(self.bar2 + offset, size)

    def write_bar2(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` into the shared memory at ``offset``, through the guest's BAR2."""
        self._check_bar2(offset, memoryview(data).nbytes)
        self.qtest.write(self.bar2 + offset, data)

    # -- MSI-X ---------------------------------------------------------------------------------

    def _msix_entry(self, vector: int) -> int:
        if not self._msix_cap:
            raise QtestError("this ivshmem device has no MSI-X (ivshmem-plain)")
        if not isinstance(vector, int) or not 0 <= vector < self._msix_size:
            raise ValueError(f"vector must be 0..{self._msix_size - 1}, got {vector!r}")
        return self._msix_table + vector * MSIX_ENTRY_SIZE

    def msix_table_size(self) -> int:
        """The number of MSI-X vectors (0 without MSI-X), read from the capability."""
        if not self._msix_cap:
            return 0
        return (self.pci.read16(self._msix_cap + MSIX_FLAGS) & MSIX_FLAGS_QSIZE) + 1

    def msix_pending(self, vector: int) -> bool:
        """Whether ``vector``'s bit is set in the pending-bit array.

        A masked vector that is signalled becomes pending; the bit stays set until the vector
        is unmasked (QEMU then delivers the message and clears it).
        """
        self._msix_entry(vector)
        word = self.qtest.readl(self._msix_pba + (vector // 32) * 4)
        return bool(word >> (vector % 32) & 1)

    def wait_msix_pending(self, vector: int, timeout: float | None = None) -> None:
        """Poll the pending-bit array until ``vector`` is pending, or raise :class:`QtestError`.

        Every poll is a qtest round trip, during which QEMU's main loop reads the device's
        eventfds; no sleeping is involved.
        """
        deadline = time.monotonic() + (self.qtest.timeout if timeout is None else timeout)
        while not self.msix_pending(vector):
            if time.monotonic() > deadline:
                raise QtestError(
                    f"MSI-X vector {vector} of QEMU {self.pid} did not become pending",
                    self.qtest.stderr_text(),
                )

    def msix_mask(self, vector: int) -> None:
        """Mask ``vector``: signals set its pending bit instead of sending a message."""
        entry = self._msix_entry(vector)
        ctrl = self.qtest.readl(entry + MSIX_ENTRY_VECTOR_CTRL)
        self.qtest.writel(entry + MSIX_ENTRY_VECTOR_CTRL, ctrl | MSIX_ENTRY_CTRL_MASKBIT)

    def msix_route(self, vector: int, gpa: int, data: int) -> None:
        """Send ``vector`` as a memory write of the 32-bit ``data`` to guest RAM at ``gpa``.

        Programs the table entry and unmasks it; a vector already pending is delivered at once.
        ``gpa`` must be in guest RAM (not in the 0xfee00000 interrupt window) to be observable
        with ``qtest.readl(gpa)``.
        """
        entry = self._msix_entry(vector)
        _check_u("gpa", gpa, 64)
        _check_u("data", data, 32)
        if gpa % 4:
            raise ValueError(f"an MSI-X address is 4-byte aligned, got {gpa:#x}")
        self.msix_mask(vector)
        self.qtest.writel(entry + MSIX_ENTRY_ADDR_LO, gpa & _U32)
        self.qtest.writel(entry + MSIX_ENTRY_ADDR_HI, gpa >> 32)
        self.qtest.writel(entry + MSIX_ENTRY_DATA, data)
        ctrl = self.qtest.readl(entry + MSIX_ENTRY_VECTOR_CTRL)
        self.qtest.writel(entry + MSIX_ENTRY_VECTOR_CTRL, ctrl & ~MSIX_ENTRY_CTRL_MASKBIT)

    def wait_msix_message(self, gpa: int, data: int, timeout: float | None = None) -> None:
        """Poll guest RAM at ``gpa`` until it holds ``data`` (a routed vector fired)."""
        deadline = time.monotonic() + (self.qtest.timeout if timeout is None else timeout)
        while self.qtest.readl(gpa) != data:
            if time.monotonic() > deadline:
                raise QtestError(
                    f"no MSI-X message {data:#x} at {gpa:#x} in QEMU {self.pid}",
                    self.qtest.stderr_text(),
                )


def ring_until_pending(
    sender: QemuIvshmemVm, receiver: QemuIvshmemVm, vector: int, timeout: float | None = None
) -> int:
    """Ring ``vector`` of ``receiver`` from ``sender`` until the receiver sees it pending.

    Returns the number of rings it took. A VM learns the other peers' eventfds asynchronously:
    its start-up only waits for the version, its id and the shared memory, and join notices
    reach the VMs already running whenever their main loop gets to them. Until the sender's
    QEMU has processed them, its device drops doorbells to that peer, as for an unknown peer.
    Ringing again is harmless: eventfd counts add up and a pending bit is a level, so the
    receiver sees the same state as after one ring. The vector must be masked (the default).
    """
    dest = receiver.iv_position()
    deadline = time.monotonic() + (receiver.qtest.timeout if timeout is None else timeout)
    rings = 0
    while True:
        sender.ring(dest, vector)
        rings += 1
        for _ in range(POLLS_PER_RING):
            if receiver.msix_pending(vector):
                return rings
        if time.monotonic() > deadline:
            raise QtestError(
                f"vector {vector} of peer {dest} (QEMU {receiver.pid}) never became pending "
                f"after {rings} rings from QEMU {sender.pid}",
                receiver.qtest.stderr_text(),
            )
