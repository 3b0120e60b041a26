"""The shared memory the daemon hands to every peer.

Two kinds, as in QEMU's ivshmem-server:

* ``-M NAME``: a POSIX shared-memory object, through :mod:`multiprocessing.shared_memory`.
  An existing object is reused; its contents survive when its size is already right.
  The object stays until shutdown, when it is unlinked unless ``keep`` is set.
* ``-m DIR``: a file created in DIR (hugetlbfs works this way) and unlinked at once, so only
  the fd keeps it alive and nothing is left behind.

Sizes are 64-bit throughout (no 32-bit truncation, unlike the C server). The daemon keeps
only an fd: the mapping made by ``SharedMemory`` is dropped at once. The segment is kept out
of ``multiprocessing``'s resource tracker, which would otherwise unlink it when this process
exits although other processes still use it, and whose helper process would inherit (and
hold open) the daemon's stdio: ``track=False`` on Python 3.13+, and on 3.11/3.12 the tracker's
register/unregister are bypassed for the duration of the call, so no tracker ever starts.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any

__all__ = [
    "MAX_HUGEPAGE_SIZE",
    "MIN_SHM_SIZE",
    "SharedMemoryError",
    "SharedMemoryRegion",
    "attach_posix_shm",
    "open_posix_shm",
    "open_shm_in_dir",
    "unlink_posix_shm",
    "validate_shm_name",
]

MIN_SHM_SIZE = 4096
MAX_HUGEPAGE_SIZE = 1 << 30
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

    @property
    def path(self) -> str:
        """A human-readable location (``/dev/shm/NAME`` or ``DIR/<unlinked>``)."""
        if self.name is not None:
            return f"/dev/shm/{self.name}"
        return f"{self.directory}/<unlinked file>"

    def close(self) -> None:
        """Close the daemon's fd (peers keep their own copies)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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


def open_posix_shm(name: str, size: int) -> SharedMemoryRegion:
    """Create or reuse the POSIX shm object ``name`` with ``size`` bytes."""
    bare = validate_shm_name(name)
    created = True
    try:
        with _untracked() as kwargs:
            try:
                segment = shared_memory.SharedMemory(bare, create=True, size=size, **kwargs)
            except FileExistsError:
                created = False
                segment = shared_memory.SharedMemory(bare, create=False, **kwargs)
    except OSError as exc:
        raise SharedMemoryError(f"cannot open shm {bare!r}: {_describe(exc)}") from None
    except ValueError as exc:  # e.g. an existing object of size 0 cannot be mapped
        raise SharedMemoryError(f"cannot open shm {bare!r}: {exc}") from None
    try:
        fd = os.dup(segment._fd)  # type: ignore[attr-defined]
    finally:
        segment.close()
    try:
        if os.fstat(fd).st_size != size:
            _truncate(fd, size, f"shm {bare!r}", allow_growth=False)
    except BaseException:
        os.close(fd)
        if created:
            unlink_posix_shm(bare)
        raise
    return SharedMemoryRegion(fd=fd, size=size, name=bare, created=created)


def unlink_posix_shm(name: str) -> bool:
    """Unlink the POSIX shm object ``name``; False if it was already gone."""
    try:
        segment = attach_posix_shm(name)
    except (FileNotFoundError, ValueError, SharedMemoryError):
        return False
    try:
        with _untracked():
            segment.unlink()
    except FileNotFoundError:
        return False
    finally:
        segment.close()
    return True


def open_shm_in_dir(directory: str, size: int) -> SharedMemoryRegion:
    """Create an unlinked file of ``size`` bytes in ``directory`` (e.g. a hugetlbfs mount)."""
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
        actual = _truncate(fd, size, f"a file in {directory!r}", allow_growth=True)
    except BaseException:
        os.close(fd)
        raise
    return SharedMemoryRegion(fd=fd, size=actual, directory=directory, created=True)
