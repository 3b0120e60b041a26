"""The qtest transport: one QEMU process under ``-qtest stdio``, spoken to line by line.

:class:`QtestConnection` starts QEMU (``-accel qtest`` when it has it, else TCG with the vCPU
stopped), sends qtest commands and reads their replies with a deadline, records the
asynchronous IRQ lines, and kills and reaps QEMU on ``close()`` (also on a failed start).
Arguments are checked before they are sent: QEMU answers a malformed command by aborting.
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
from pathlib import Path
from typing import IO, TypedDict

from ivshmemd.closing import Closing

__all__ = [
    "DEFAULT_TIMEOUT",
    "QEMU_BINARY",
    "U32",
    "QemuOptions",
    "QtestConnection",
    "QtestError",
    "check_unsigned",
    "qemu_available",
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
#: The mask of a 32-bit register or port value.
U32 = 0xFFFF_FFFF


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


def check_unsigned(name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ValueError(f"{name} must be an integer in 0..{(1 << bits) - 1}, got {value!r}")


class QemuOptions(TypedDict, total=False):
    """How :class:`QtestConnection` starts QEMU: the binary (default
    :data:`QEMU_BINARY`), the machine (``pc``), the guest RAM (``16M``), the accelerator
    (None: ``qtest`` when QEMU has it, else stopped TCG) and the reply timeout."""

    binary: str
    machine: str
    memory: str
    accel: str | None
    timeout: float


class QtestConnection(Closing):
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
        check_unsigned("port", port, 16)
        check_unsigned("value", value, 8)
        self.command(f"outb {port:#x} {value:#x}")

    def outw(self, port: int, value: int) -> None:
        """Write 16 bits to an I/O port."""
        check_unsigned("port", port, 16)
        check_unsigned("value", value, 16)
        self.command(f"outw {port:#x} {value:#x}")

    def outl(self, port: int, value: int) -> None:
        """Write 32 bits to an I/O port."""
        check_unsigned("port", port, 16)
        check_unsigned("value", value, 32)
        self.command(f"outl {port:#x} {value:#x}")

    def inb(self, port: int) -> int:
        """Read one byte from an I/O port."""
        check_unsigned("port", port, 16)
        return self._int_reply(f"inb {port:#x}") & 0xFF

    def inw(self, port: int) -> int:
        """Read 16 bits from an I/O port."""
        check_unsigned("port", port, 16)
        return self._int_reply(f"inw {port:#x}") & 0xFFFF

    def inl(self, port: int) -> int:
        """Read 32 bits from an I/O port."""
        check_unsigned("port", port, 16)
        return self._int_reply(f"inl {port:#x}") & U32

    def _write_n(self, width: str, bits: int, gpa: int, value: int) -> None:
        check_unsigned("gpa", gpa, 64)
        check_unsigned("value", value, bits)
        self.command(f"write{width} {gpa:#x} {value:#x}")

    def _read_n(self, width: str, gpa: int) -> int:
        check_unsigned("gpa", gpa, 64)
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
        check_unsigned("gpa", gpa, 64)
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
        check_unsigned("gpa", gpa, 64)
        view = memoryview(data).cast("B")
        if gpa + len(view) > 1 << 64:
            raise ValueError(f"bad write range: {len(view)} bytes at {gpa:#x}")
        for start in range(0, len(view), WRITE_CHUNK):
            chunk = view[start : start + WRITE_CHUNK]
            encoded = base64.b64encode(chunk).decode("ascii")
            self.command(f"b64write {gpa + start:#x} {len(chunk):#x} {encoded}")

    def memset(self, gpa: int, size: int, value: int) -> None:
        """Fill ``size`` bytes at ``gpa`` with the byte ``value``."""
        check_unsigned("gpa", gpa, 64)
        check_unsigned("size", size, 64)
        check_unsigned("value", value, 8)
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
        check_unsigned("num", num, 31)
        if not isinstance(level, int) or not -(1 << 31) <= level < 1 << 31:
            raise ValueError(f"level must be a 32-bit integer, got {level!r}")
        self.command(f"set_irq_in {qom_path} {name or 'unnamed-gpio-in'} {num} {level}")
