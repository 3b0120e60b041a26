"""The shared memory the daemon hands to every peer.

Two kinds, as in QEMU's ivshmem-server:

* ``-M NAME``: a POSIX shared-memory object (``/dev/shm/NAME``, where glibc's ``shm_open``
  puts it). An existing object is reused; its contents survive when its size is already
  right. The object stays until shutdown, when it is unlinked unless ``keep`` is set, and
  only while the name still refers to the object this daemon served.
* ``-m DIR``: a file created in DIR (hugetlbfs works this way) and unlinked at once, so only
  the fd keeps it alive and nothing is left behind.

**One daemon per object.** A daemon holds an exclusive ``flock`` on its ``-M`` object for as
long as it runs, taken on a second, private open of the object *before* anything is resized:
a second daemon (on another socket) given the same name is refused with a clear message and
leaves the object as it was. The lock lives on that private open file description, never on
the one handed to peers, so peers still holding the memory after the daemon died do not keep
a restarted daemon out. An existing object must be a regular file owned by our effective uid
and is never opened through a symlink (``/dev/shm`` is world-writable).

**Reserved memory.** By default the memory is reserved up front (``posix_fallocate``): on a
full tmpfs or hugetlbfs the daemon refuses to start with a clear message, instead of peers
dying of SIGBUS the first time they touch a page that cannot be had. ``sparse=True``
(``--sparse``) skips the reservation for huge, mostly untouched regions, at that risk.

Sizes are 64-bit throughout (no 32-bit truncation, unlike the C server), up to
:data:`MAX_SHM_SIZE` (a file offset is a signed 64-bit number). The daemon keeps only fds:
nothing is mapped. ``multiprocessing.shared_memory`` is used only by
:func:`attach_posix_shm`, for tools and tests, kept out of ``multiprocessing``'s resource
tracker, which would otherwise unlink the segment when that process exits although others
still use it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any

from .lockfile import LockError, identity, open_regular_nofollow, still_names

__all__ = [
    "MAX_HUGEPAGE_SIZE",
    "MAX_SHM_SIZE",
    "MIN_SHM_SIZE",
    "SHM_DIR",
    "SharedMemoryError",
    "SharedMemoryRegion",
    "adopt_shm_fd",
    "attach_posix_shm",
    "open_posix_shm",
    "open_shm_in_dir",
    "unlink_posix_shm",
    "validate_shm_name",
]

MIN_SHM_SIZE = 4096
#: the largest power of two a file offset (off_t, signed 64-bit) can hold
MAX_SHM_SIZE = 1 << 62
MAX_HUGEPAGE_SIZE = 1 << 30
#: where glibc's shm_open keeps POSIX shared-memory objects
SHM_DIR = "/dev/shm"
_MAX_NAME = 255


class SharedMemoryError(Exception):
    """The shared memory cannot be created, opened or sized (the message says why)."""


@dataclass
class SharedMemoryRegion:
    """The daemon's shared memory: an fd, its size and where it came from."""

    fd: int
    size: int
    name: str | None = None  # the POSIX name (without the leading slash), for -M
    directory: str | None = None  # the directory, for -m
    created: bool = False
    #: a private open of the -M object holding the daemon's flock (-1 when none)
    lock_fd: int = -1
    #: (device, inode) of the -M object, so that only ours is ever unlinked
    ident: tuple[int, int] | None = None

    @property
    def path(self) -> str:
        """A human-readable location (``/dev/shm/NAME`` or ``DIR/<unlinked>``)."""
        if self.name is not None:
            return f"{SHM_DIR}/{self.name}"
        return f"{self.directory}/<unlinked file>"

    def unlink_if_ours(self) -> bool:
        """Unlink the -M name if it still refers to the object we served."""
        if self.name is None or self.ident is None:
            return False
        path = f"{SHM_DIR}/{self.name}"
        if not still_names(path, self.ident):
            return False
        with suppress(FileNotFoundError):
            os.unlink(path)
            return True
        return False

    def close(self) -> None:
        """Close the daemon's fds (peers keep their own copies) and drop the lock."""
        for attr in ("fd", "lock_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)


def validate_shm_name(name: str) -> str:
    """Check a POSIX shm name and return it without a leading slash."""
    bare = name[1:] if name.startswith("/") else name
    if not bare:
        raise SharedMemoryError("invalid shm name: it is empty")
    if "/" in bare:
        raise SharedMemoryError(f"invalid shm name {name!r}: it may not contain '/'")
    if "\0" in bare:
        raise SharedMemoryError(f"invalid shm name {name!r}: it contains a NUL byte")
    if bare in (".", ".."):
        raise SharedMemoryError(f"invalid shm name {name!r}")
    if len(bare.encode()) > _MAX_NAME:
        raise SharedMemoryError(f"invalid shm name: longer than {_MAX_NAME} bytes")
    return bare


def check_size(size: int) -> None:
    """Refuse sizes no file can have (before anything is created)."""
    if not 0 < size <= MAX_SHM_SIZE:
        raise SharedMemoryError(
            f"shm size {size} is out of range: at most {MAX_SHM_SIZE} bytes (4E, "
            "the largest power of two a file offset can hold)"
        )


@contextmanager
def _untracked() -> Iterator[dict[str, Any]]:
    """Keyword arguments for ``SharedMemory`` that keep the segment out of the tracker."""
    if sys.version_info >= (3, 13):
        yield {"track": False}
        return
    register, unregister = resource_tracker.register, resource_tracker.unregister

    def _skip(name: str, rtype: str) -> None:
        return None

    resource_tracker.register = _skip  # type: ignore[assignment]
    resource_tracker.unregister = _skip  # type: ignore[assignment]
    try:
        yield {}
    finally:
        resource_tracker.register, resource_tracker.unregister = register, unregister


def attach_posix_shm(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment without registering it with the resource tracker."""
    with _untracked() as kwargs:
        return shared_memory.SharedMemory(validate_shm_name(name), create=False, **kwargs)


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _human(size: int) -> str:
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):g} {unit}"
    return f"{size} bytes"


def _truncate(fd: int, size: int, label: str, allow_growth: bool) -> int:
    """ftruncate to ``size``; on hugetlbfs-like refusals try larger powers of two (QEMU)."""
    attempt = size
    while True:
        try:
            os.ftruncate(fd, attempt)
            return attempt
        except OSError as exc:
            if not allow_growth or exc.errno != errno.EINVAL or attempt >= MAX_HUGEPAGE_SIZE:
                raise SharedMemoryError(
                    f"cannot size {label} to {size} bytes: {_describe(exc)}"
                ) from None
            attempt *= 2


_NO_ROOM_HINT = (
    "; free some memory there, ask for less (-l), or start with --sparse to reserve "
    "nothing (peers then die of SIGBUS when the memory runs out)"
)


def _reserve(fd: int, size: int, label: str) -> None:
    """Allocate every page now (posix_fallocate), or refuse clearly.

    What the filesystem says it has free is checked first, so that an impossible request
    is refused at once instead of allocating (and then freeing) all the memory there is.
    """
    st = os.fstat(fd)
    needed = max(0, size - st.st_blocks * 512)
    try:
        fs = os.fstatvfs(fd)
        free = fs.f_bavail * fs.f_frsize
    except OSError:
        free = None
    if free is not None and fs.f_blocks and needed > free:
        raise SharedMemoryError(
            f"cannot reserve {_human(size)} for {label}: only {_human(free)} free there"
            + _NO_ROOM_HINT
        )
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        hint = _NO_ROOM_HINT if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG) else ""
        raise SharedMemoryError(
            f"cannot reserve {_human(size)} for {label}: {_describe(exc)}{hint}"
        ) from None


def _lock(path: str, fd: int, bare: str) -> int:
    """A private open of the object, flock'ed; refuses if a live daemon holds it."""
    try:
        lock_fd, _ = open_regular_nofollow(path, os.O_RDONLY, 0, "shm")
    except LockError as exc:
        raise SharedMemoryError(str(exc)) from None
    if identity(os.fstat(lock_fd)) != identity(os.fstat(fd)):
        os.close(lock_fd)
        raise SharedMemoryError(f"shm {bare!r} was replaced while opening it; try again")
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if isinstance(exc, BlockingIOError):
            raise SharedMemoryError(
                f"shm {bare!r} is in use by another running ivshmemd (it holds {path} "
                "locked); refusing to resize or share it"
            ) from None
        raise SharedMemoryError(f"cannot lock shm {bare!r}: {_describe(exc)}") from None
    return lock_fd


def open_posix_shm(name: str, size: int, *, sparse: bool = False) -> SharedMemoryRegion:
    """Create or reuse the POSIX shm object ``name`` with ``size`` bytes (see the module
    docstring for the lock, the ownership checks and the reservation)."""
    bare = validate_shm_name(name)
    check_size(size)
    path = f"{SHM_DIR}/{bare}"
    try:
        fd, created = open_regular_nofollow(path, os.O_RDWR | os.O_CREAT, 0o600, "shm")
    except LockError as exc:
        raise SharedMemoryError(str(exc)) from None
    lock_fd = -1
    try:
        lock_fd = _lock(path, fd, bare)
        label = f"shm {bare!r}"
        if os.fstat(fd).st_size != size:
            _truncate(fd, size, label, allow_growth=False)
        if not sparse:
            _reserve(fd, size, label)
    except BaseException:
        if created and lock_fd >= 0:  # ours, and nobody else took it: leave nothing behind
            with suppress(OSError):
                if still_names(path, identity(os.fstat(fd))):
                    os.unlink(path)
        os.close(fd)
        if lock_fd >= 0:
            os.close(lock_fd)
        raise
    return SharedMemoryRegion(
        fd=fd,
        size=size,
        name=bare,
        created=created,
        lock_fd=lock_fd,
        ident=identity(os.fstat(fd)),
    )


def adopt_shm_fd(kind: str, where: str, fd: int, size: int) -> SharedMemoryRegion:
    """The shm an earlier daemon served, from its fd (kept by systemd's fd store):
    ``kind`` "posix" (``-M where``: the name must still be that object, which is locked
    again) or "dir" (``-m where``). Its size must be ``size``. Raises
    :class:`SharedMemoryError` (the fd is then the caller's to close)."""
    actual = os.fstat(fd).st_size
    if actual != size:
        raise SharedMemoryError(
            f"the kept shm has {actual} bytes; the command line asks for {size}"
        )
    if kind == "dir":
        return SharedMemoryRegion(fd=fd, size=size, directory=where, created=True)
    bare = validate_shm_name(where)
    path = f"{SHM_DIR}/{bare}"
    lock_fd = _lock(path, fd, bare)
    return SharedMemoryRegion(
        fd=fd, size=size, name=bare, created=False, lock_fd=lock_fd, ident=identity(os.fstat(fd))
    )


def unlink_posix_shm(name: str) -> bool:
    """Unlink the POSIX shm object ``name``; False if it was already gone (for tools and
    test clean-up; the daemon itself uses :meth:`SharedMemoryRegion.unlink_if_ours`)."""
    try:
        os.unlink(f"{SHM_DIR}/{validate_shm_name(name)}")
    except (FileNotFoundError, SharedMemoryError):
        return False
    return True


def open_shm_in_dir(directory: str, size: int, *, sparse: bool = False) -> SharedMemoryRegion:
    """Create an unlinked file of ``size`` bytes in ``directory`` (e.g. a hugetlbfs mount)."""
    check_size(size)
    if not os.path.isdir(directory):
        raise SharedMemoryError(f"shm directory {directory!r} does not exist or is not a directory")
    try:
        fd, path = tempfile.mkstemp(prefix="ivshmem.", dir=directory)
    except OSError as exc:
        raise SharedMemoryError(
            f"cannot create a file in shm directory {directory!r}: {_describe(exc)}"
        ) from None
    os.unlink(path)
    try:
        label = f"a file in {directory!r}"
        actual = _truncate(fd, size, label, allow_growth=True)
        if not sparse:
            _reserve(fd, actual, label)
    except BaseException:
        os.close(fd)
        raise
    return SharedMemoryRegion(fd=fd, size=actual, directory=directory, created=True)
