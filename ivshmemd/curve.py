"""CURVE certificates, for every zmq link that leaves the host: make a pair, load ours, load
the allowed ones.

tcp carries no credentials, so the daemon's control plane serves tcp only to CURVE clients
(``--curve-secret-key``, ``--curve-clients``; ``ivshmemctl --curve-key``,
``--curve-server-key``), and federation links between daemons are CURVE-encrypted and
authenticated (``--federation-key``, ``--federation-allow``). Both load their files here,
and the ZAP handler of :mod:`ivshmemd.zap` admits the allowed keys.

The files are zmq.auth's (czmq's) certificate format, so keys made here work with any zmq
tool and the other way round: ``NAME.key`` holds the public key, ``NAME.key_secret`` the
public and the secret key. :func:`keygen` (behind ``ivshmemctl keygen DIR NAME``) writes the
secret file 0600 and the public one 0644, never over an existing file and never through a
symlink: zmq.auth writes them into a private staging directory, then they are hard-linked
into place (``link`` fails on any existing name, dangling symlinks included).

Loading opens each file with ``O_NOFOLLOW`` and parses it through its open descriptor, so a
symlink is refused and the file checked is the file read. A secret key file that group or
others may read or write is refused, as ssh refuses such a private key.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

__all__ = [
    "ClientCurve",
    "CurveKeyPair",
    "CurveKeys",
    "KeyFileError",
    "client_keys",
    "keygen",
    "load_allowed_keys",
    "load_public_key",
    "load_secret_key",
    "server_keys",
]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_Z85_KEY_LEN = 40


class KeyFileError(Exception):
    """A key file or directory that cannot be used (the message says which and why)."""


@dataclass(frozen=True)
class CurveKeyPair:
    """A CURVE key pair as z85 text."""

    public: str
    secret: str


def keygen(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0644) and ``NAME.key_secret`` (0600) in ``directory`` (created if
    missing); return their paths. Refuses to replace any existing file."""
    if not _NAME_RE.fullmatch(name):
        raise KeyFileError(
            f"invalid key name {name!r}: use letters, digits, '.', '_' and "
            "'-' (at most 64, not starting with '.' or '-')"
        )
    folder = Path(directory)
    try:
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create {folder}: {exc.strerror}") from None
    if not folder.is_dir():
        raise KeyFileError(f"{folder} is not a directory")
    public = folder / f"{name}.key"
    secret = folder / f"{name}.key_secret"
    for path in (public, secret):
        if os.path.lexists(path):
            raise KeyFileError(f"{path} already exists; not replacing a key")
    try:
        staging = tempfile.mkdtemp(prefix=".keygen-", dir=folder)  # 0700, ours alone
    except OSError as exc:
        raise KeyFileError(f"cannot write in {folder}: {exc.strerror}") from None
    made: list[str] = []
    try:
        staged_public, staged_secret = zmq.auth.create_certificates(staging, name)
        made += [staged_public, staged_secret]
        os.chmod(staged_public, 0o644)
        os.chmod(staged_secret, 0o600)
        _link_new(staged_secret, secret)
        try:
            _link_new(staged_public, public)
        except KeyFileError:
            os.unlink(secret)  # we made it a moment ago
            raise
    except OSError as exc:
        raise KeyFileError(f"cannot write keys in {folder}: {exc.strerror}") from None
    finally:
        for staged in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
        os.rmdir(staging)
    return public, secret


def _link_new(source: str, target: Path) -> None:
    try:
        os.link(source, target)
    except FileExistsError:
        raise KeyFileError(f"{target} already exists; not replacing a key") from None


@contextlib.contextmanager
def _open_regular(path: str | os.PathLike[str], dir_fd: int | None = None) -> Iterator[int]:
    """An fd on ``path`` opened without following a symlink, checked to be a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(f"{path} is a symlink; give the file itself") from None
        raise KeyFileError(f"cannot open {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise KeyFileError(f"{path} is not a regular file")
        yield fd
    finally:
        os.close(fd)


def _load(fd: int, path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """Parse a certificate through its open fd (zmq.auth's parser)."""
    try:
        public, secret = zmq.auth.load_certificate(f"/proc/self/fd/{fd}")
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path} is not a zmq certificate: {exc}") from None
    if len(public) != _Z85_KEY_LEN or (secret is not None and len(secret) != _Z85_KEY_LEN):
        raise KeyFileError(f"{path} does not hold {_Z85_KEY_LEN}-character z85 keys")
    return public.decode("ascii"), None if secret is None else secret.decode("ascii")


def load_secret_key(path: str | os.PathLike[str]) -> CurveKeyPair:
    """Our key pair from a ``.key_secret`` certificate (0600, not a symlink)."""
    with _open_regular(path) as fd:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"{path} may be read or written by others (mode {mode:04o}); "
                f"make it private: chmod 600 {path}"
            )
        public, secret = _load(fd, path)
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key (is it the public .key file?)")
    return CurveKeyPair(public, secret)


def load_public_key(path: str | os.PathLike[str]) -> str:
    """The public key (z85) of a certificate (``.key`` or ``.key_secret``; not a symlink)."""
    with _open_regular(path) as fd:
        public, _secret = _load(fd, path)
    return public


def load_allowed_keys(directory: str | os.PathLike[str]) -> dict[str, str]:
    """The public keys in ``directory``'s ``*.key`` files: ``{z85 key: name}``.

    Symlinked entries are skipped with a warning; an unreadable or malformed ``.key`` file
    is an error (a typo in the allow list should not go unnoticed)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileError(f"cannot open the allow directory {directory}: {exc.strerror}") from None
    allowed: dict[str, str] = {}
    try:
        for entry in sorted(os.listdir(dir_fd)):
            if entry.endswith(".key_secret"):
                log.warning(
                    "%s/%s is a secret key; an allow directory needs only public keys",
                    directory,
                    entry,
                )
                continue
            if not entry.endswith(".key") or entry.startswith("."):
                continue
            shown = os.path.join(directory, entry)
            try:
                with _open_regular(entry, dir_fd=dir_fd) as fd:
                    public, _secret = _load(fd, shown)
            except KeyFileError as exc:
                if os.path.islink(shown):
                    log.warning("skipped %s: a symlink", shown)
                    continue
                raise KeyFileError(str(exc).replace(entry, shown, 1)) from None
            allowed[public] = entry[: -len(".key")]
    finally:
        os.close(dir_fd)
    if not allowed:
        raise KeyFileError(f"no public keys (*.key files) in the allow directory {directory}")
    return allowed


# -- the control plane's keys (tcp endpoints) --------------------------------------------------


@dataclass(frozen=True)
class CurveKeys:
    """A CURVE server: its key pair and the authorised client public keys (all z85, as
    bytes: what zmq's socket options take)."""

    public: bytes
    secret: bytes
    clients: frozenset[bytes]


@dataclass(frozen=True)
class ClientCurve:
    """A CURVE client: its key pair and the server's public key (z85, as bytes)."""

    public: bytes
    secret: bytes
    server: bytes

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        """Make ``sock`` connect with CURVE (before ``connect``)."""
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)


def _need_curve() -> None:
    if not zmq.has("curve"):
        raise KeyFileError("this libzmq has no CURVE support")


def server_keys(secret_file: str, clients_dir: str) -> CurveKeys:
    """The daemon's key pair (``--curve-secret-key``) and the public keys of the control
    clients it accepts (``--curve-clients``)."""
    _need_curve()
    pair = load_secret_key(secret_file)
    clients = frozenset(key.encode("ascii") for key in load_allowed_keys(clients_dir))
    return CurveKeys(pair.public.encode("ascii"), pair.secret.encode("ascii"), clients)


def client_keys(secret_file: str, server_public_file: str) -> ClientCurve:
    """ivshmemctl's key pair (``--curve-key``) and the daemon's public key
    (``--curve-server-key``)."""
    _need_curve()
    pair = load_secret_key(secret_file)
    server = load_public_key(server_public_file)
    return ClientCurve(
        pair.public.encode("ascii"), pair.secret.encode("ascii"), server.encode("ascii")
    )
