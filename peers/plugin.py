"""The plugin API: a plugin is the guest software a peer runs.

A plugin subclasses :class:`Plugin` and overrides the hooks it needs. The runtime calls them
synchronously from its event loop, one at a time:

* :meth:`Plugin.start` once the VM is built and the peer has its id, with a :class:`Guest`
  (the vCPU, the ivshmem device, and helpers that reach the device only through guest
  accesses: ``guest.ring`` writes the Doorbell register through ``vcpu.write``);
* :meth:`Plugin.interrupt` for every interrupt the device delivers (an MSI-X vector, or
  ``vmm.ivshmem.INTX_VECTOR`` in legacy INTx mode);
* :meth:`Plugin.peer_joined` / :meth:`Plugin.peer_left` as the daemon announces peers;
* :meth:`Plugin.paired` once a partner is found, after ``guest.find_partner()``;
* :meth:`Plugin.stop` once, when the peer shuts down (finished, signalled, or the daemon
  went away).

A plugin ends the peer with ``guest.finish(summary)`` (or ``guest.fail(reason)``). Options
come from the command line: :meth:`Plugin.add_arguments` declares them on an argparse group.
Shared memory is shared with other plugins: take it from the directory
(``guest.shm.allocate``, :mod:`peers.shmdir`), never at a fixed offset. The whole API, the
order of events and what is guaranteed: ``docs/plugins.md``.

Plugins are found through the entry-point group ``ivshmem.peers``; the built-ins are
registered the same way, so a plugin in any installed package works with no change here::

    [project.entry-points."ivshmem.peers"]
    hello = "my_package.hello:HelloPlugin"
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Final

from .shmdir import Pair, Region, ShmDirectory, ShmDirectoryError

if TYPE_CHECKING:
    from vmm import Vcpu, Vm
    from vmm.ivshmem import IvshmemDevice

__all__ = [
    "ENTRY_POINT_GROUP",
    "Guest",
    "Pair",
    "Plugin",
    "PluginError",
    "Region",
    "ShmDirectory",
    "ShmDirectoryError",
    "available_plugins",
    "load_plugin",
]

ENTRY_POINT_GROUP = "ivshmem.peers"
#: The Doorbell register holds the destination peer id in bits 31..16, the vector below.
DOORBELL_PEER_SHIFT = 16
#: MSI-X: the message control register's offset in the capability, and the vector control
#: word's in a table entry (PCI spec); what a driver writes to enable and unmask.
MSIX_MESSAGE_CONTROL = 2
MSIX_VECTOR_CONTROL = 12
#: ``guest.progress`` reports at most this often (seconds), and always the last step.
PROGRESS_INTERVAL: Final = 0.25


class PluginError(Exception):
    """A plugin cannot be found or loaded, or its options are wrong."""


class Guest:
    """What a plugin sees: the VM, its vCPU, the ivshmem device and where things are.

    Guest-physical layout: RAM at :attr:`ram_gpa`; the device's BAR0 registers at
    :attr:`bar0_gpa`, BAR1 (MSI-X) at :attr:`bar1_gpa`, BAR2 (the shared memory) at
    :attr:`shm_gpa`. Everything here goes through the vCPU, as a guest driver would. The
    register offsets are the device model's (:mod:`vmm.ivshmem`).
    """

    def __init__(
        self,
        vm: Vm,
        vcpu: Vcpu,
        device: IvshmemDevice,
        *,
        ram_gpa: int,
        ram_size: int,
        bar0_gpa: int,
        bar1_gpa: int,
        shm_gpa: int,
        finish: Callable[[str | None, bool], None],
        report: Callable[..., None],
        log: Callable[[str], None],
        directory: ShmDirectory | None = None,
        find_partner: Callable[[str | None, int], None] | None = None,
        count: Callable[[str, int], None] | None = None,
    ) -> None:
        from vmm.ivshmem import REG_DOORBELL, REG_IVPOSITION  # loaded with the VM already

        self.vm = vm
        self.vcpu = vcpu
        self.device = device
        self.ram_gpa = ram_gpa
        self.ram_size = ram_size
        self.bar0_gpa = bar0_gpa
        self.bar1_gpa = bar1_gpa
        self.shm_gpa = shm_gpa
        self.shm_size = device.shm_size
        self.vectors = device.vectors
        self._doorbell_gpa = bar0_gpa + REG_DOORBELL
        self._ivposition_gpa = bar0_gpa + REG_IVPOSITION
        self._finish = finish
        self.report = report
        self.log = log
        self._directory = directory
        self._find_partner = find_partner
        self._progress_at = 0.0
        self._count = count

    # -- the device, through guest accesses -----------------------------------------------

    @property
    def peer_id(self) -> int:
        """Our own id, read from the IVPosition register."""
        return self.vcpu.read32(self._ivposition_gpa)

    def peers(self) -> dict[int, int]:
        """The device's peer table: peer id -> connected vectors (ourselves included)."""
        return self.device.peers

    def ring(self, peer_id: int, vector: int = 0) -> None:
        """Ring ``peer_id``'s ``vector``: a write to the Doorbell register."""
        self.vcpu.write32(self._doorbell_gpa, (peer_id << DOORBELL_PEER_SHIFT) | vector)

    def enable_msix(self, unmask: bool = True) -> None:
        """What a guest driver does at probe time: enable MSI-X, unmask every vector."""
        from vmm.pci import MSIX_CONTROL_ENABLE, MSIX_ENTRY_SIZE

        control_offset = self.device.msix.cap_offset + MSIX_MESSAGE_CONTROL
        control = self.device.config_read(control_offset, 2)
        self.device.config_write(control_offset, 2, control | MSIX_CONTROL_ENABLE)
        if unmask:
            for vector in range(self.vectors):
                self.vcpu.write32(self.bar1_gpa + vector * MSIX_ENTRY_SIZE + MSIX_VECTOR_CONTROL, 0)

    def read_shm(self, offset: int, size: int) -> bytes:
        """Read the shared memory (BAR2) through the vCPU."""
        return self.vcpu.read(self.shm_gpa + offset, size)

    def write_shm(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write the shared memory (BAR2) through the vCPU."""
        self.vcpu.write(self.shm_gpa + offset, data)

    # -- shared memory and partners -------------------------------------------------------

    @property
    def shm(self) -> ShmDirectory:
        """The shared memory's directory: ``guest.shm.allocate(name, size)`` gives a
        :class:`Region` no other live peer holds (see :mod:`peers.shmdir`)."""
        if self._directory is None:
            raise ShmDirectoryError("this guest has no shared-memory directory")
        return self._directory

    def find_partner(self, size: int = 0, key: str | None = None) -> None:
        """Pair with another peer running this plugin (or seeking under ``key``), with a
        region of ``size`` bytes for the two of them.

        Returns at once. :meth:`Plugin.paired` is called once the partner is found and
        known to the device (now, if one was waiting; else when one claims us). Until then
        the peer reports that it waits for a partner, and the interrupts it gets go to the
        pairing, not to :meth:`Plugin.interrupt`. The peer that waited *leads*: it speaks
        first; the other one only answers (so no doorbell of the plugin's is ever merged
        with the pairing's). Call :meth:`enable_msix` first. A shared memory too small for
        ``size`` raises :class:`ShmDirectoryError` (the peer fails with its message).
        """
        if self._find_partner is None:
            raise ShmDirectoryError("this guest cannot look for a partner")
        self._find_partner(key, size)

    def waiting(self, what: str) -> None:
        """Say what the plugin waits for now (``ivshmemctl up`` names it should it stop the
        peer while it still waits)."""
        self.report(event="waiting", what=what)

    def progress(self, done: int, total: int, unit: str) -> None:
        """Report how far the work is (``ivshmemctl up`` shows it on its live line). Cheap
        to call often: it reports at most every quarter of a second, and the last step."""
        now = time.monotonic()
        if now - self._progress_at < PROGRESS_INTERVAL and done < total:
            return
        self._progress_at = now
        self.report(event="progress", done=done, total=total, unit=unit)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the plugin's counter ``name`` (``messages``, ``bytes``...): the
        peer reports its counters with its telemetry (``ivshmemctl top``, Prometheus).
        As cheap as a dict update; at most 64 names of up to 48 characters are kept."""
        if self._count is not None:
            self._count(name, n)

    # -- ending ---------------------------------------------------------------------------

    def finish(self, summary: str | None = None) -> None:
        """The plugin is done: print ``summary`` (if any) and stop the peer (exit 0)."""
        self._finish(summary, True)

    def fail(self, reason: str) -> None:
        """The plugin failed: print ``reason`` and stop the peer (non-zero exit)."""
        self._finish(reason, False)


class Plugin:
    """Base class of the guest software a peer runs (see the module docstring)."""

    #: The name it is registered under (informational; discovery uses the entry point).
    name: ClassVar[str] = ""
    #: One line for ``ivshmem-peer --list-plugins``.
    description: ClassVar[str] = ""
    #: Prefer the blocking fast-path event loop (lowest doorbell latency) over trio.
    prefers_fast_path: ClassVar[bool] = False
    #: On the fast path, how long to poll for the next ring before sleeping (microseconds).
    default_spin_us: ClassVar[float] = 0.0
    #: Its peers work in pairs (it calls ``guest.find_partner``): ``ivshmemctl up`` refuses
    #: an odd number of them, which would leave one waiting for ever.
    pairing: ClassVar[bool] = False

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.guest: Guest | None = None

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Declare the plugin's command-line options (none by default)."""

    @classmethod
    def check_options(cls, options: argparse.Namespace) -> str | None:
        """Validate the parsed options; return an error message, or None if they are fine."""
        return None

    @classmethod
    def pairs(cls, options: argparse.Namespace) -> bool:
        """Whether peers with these options work in pairs (default: :attr:`pairing`)."""
        return cls.pairing

    def start(self, guest: Guest) -> None:
        """The VM is ready: keep ``guest`` and start working."""
        self.guest = guest

    def interrupt(self, vector: int) -> None:
        """The device delivered an interrupt on ``vector``."""

    def peer_joined(self, peer_id: int) -> None:
        """``peer_id`` joined (all its vectors are connected)."""

    def peer_left(self, peer_id: int) -> None:
        """``peer_id`` left; its vectors are gone."""

    def paired(self, pair: Pair) -> None:
        """The partner asked for with ``guest.find_partner`` is found: ``pair.partner`` (its
        id, already in the device's peer table), ``pair.leader`` (we speak first) and
        ``pair.region`` (the pair's own memory)."""

    def stop(self) -> None:
        """The peer is shutting down."""


def available_plugins() -> dict[str, Any]:
    """Entry points of the ``ivshmem.peers`` group, by name. Where two installed packages
    register one name, the first on ``sys.path`` wins (as an import would: a directory on
    PYTHONPATH comes before site-packages)."""
    found: dict[str, Any] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def load_plugin(name: str) -> type[Plugin]:
    """The plugin class registered as ``name``; :class:`PluginError` if there is none."""
    found = available_plugins()
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise PluginError(f"unknown plugin {name!r} (available: {known})")
    try:
        cls = found[name].load()
    except Exception as exc:
        raise PluginError(f"plugin {name!r} failed to load: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise PluginError(f"plugin {name!r} ({found[name].value}) is not a peers.plugin.Plugin")
    return cls
