"""Peer telemetry: what our peers report, and what the control process makes of it (sans-I/O).

Doorbells go from peer to peer through eventfds, so the daemon never sees them: our peers
count them themselves (:mod:`peers.telemetry`) and report the counts to the control process
when it asks. This module owns the format of those reports and the aggregation, with no
sockets in it (:mod:`ivshmemd.telemetryserve` is the zmq driver):

* :func:`validate_report` checks a peer's report (every field typed and bounded: a peer is
  a client like any other, never trusted further than the schema allows);
* :class:`Aggregator` keeps each peer's last two reports, turns cumulative counters into
  rates, keeps the *leases* (who watches, at what interval, until when: a tick is sent only
  while one is live), and builds the **snapshot**: one JSON-able map that ``ivshmemctl top``
  renders, ``--json`` prints, ``snapshot --svg`` draws and the Prometheus collector exports.

A report (``args`` of a ``report`` request, msgpack)::

    {"peer": id, "pid": pid, "plugin": name, "started": unix_s, "t": monotonic_s,
     "rung": [[dst, vector, total], ...], "interrupts": [total per vector],
     "counters": {name: total}, "dirty": {"bucket_bytes": b, "buckets": [total per bucket]}}

Every count is cumulative since the peer started (dirty pages: since it was first watched),
so a lost report loses no count, only resolution. ``t`` is CLOCK_MONOTONIC, which every
process of a host shares: rates come from the peers' own stamps.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from .control.schema import encode_request
from .protocol import MAX_PEER_ID, MAX_VECTORS

__all__ = [
    "HEATMAP_BUCKETS",
    "KNOCK_SIGNAL",
    "LEASE_SECONDS",
    "MAX_COUNTERS",
    "MAX_PAIRS",
    "MAX_REPORT_BYTES",
    "NO_TELEMETRY",
    "TICK_TOPIC",
    "Aggregator",
    "Lease",
    "ReportError",
    "TelemetryEndpoints",
    "default_telemetry_endpoints",
    "encode_report",
    "heatmap_bucket_bytes",
    "telemetry_endpoints_for",
    "validate_report",
    "watched_flag",
    "watched_now",
]

#: The shared memory is shown as this many equal regions.
HEATMAP_BUCKETS: Final = 64
#: Bounds on one report (a peer is a client: nothing it sends is unbounded).
MAX_PAIRS: Final = 4096
MAX_COUNTERS: Final = 64
MAX_COUNTER_NAME: Final = 48
MAX_PLUGIN_NAME: Final = 64
MAX_REPORT_BYTES: Final = 256 * 1024
#: A watcher's lease: ticks go out for this long after its last request.
LEASE_SECONDS: Final = 3.0
#: Tick intervals a watcher may ask for.
MIN_INTERVAL: Final = 0.1
MAX_INTERVAL: Final = 10.0
#: A peer that left stays in the snapshot (its last counts) this long.
LEFT_RETENTION: Final = 60.0
MAX_LEFT: Final = 256
#: A peer without a report this long (plus 3 tick intervals) after watching started has
#: none to give.
FIRST_REPORT_GRACE: Final = 0.5
#: Why a registry peer has no figures.
NO_TELEMETRY: Final = "no telemetry (not an ivshmem-emu peer?)"
WAITING: Final = "waiting for its first report"


#: The topic of the ticks the control process publishes while someone watches.
TICK_TOPIC: Final = b"tick"
#: The knock: the control process sends it to a registry peer that does not report yet,
#: while someone watches. Its default action is to ignore it, so a process that is not one
#: of our peers (a QEMU VM) is unaffected; ours connect their telemetry link then.
KNOCK_SIGNAL: Final = signal.SIGURG
#: While someone watches, the control process keeps ``SOCK.telemetry.watched`` touched
#: (its mtime at most this old): a peer starting then connects at once, without a knock.
WATCHED_FRESH: Final = 3.0


@dataclasses.dataclass(frozen=True)
class TelemetryEndpoints:
    """Where peers report (a ROUTER that also answers watchers) and where ticks come from."""

    reports: str
    ticks: str


def default_telemetry_endpoints(socket_path: str | os.PathLike[str]) -> TelemetryEndpoints:
    """``ipc://<socket_path>.telemetry`` and ``.ticks``: next to the daemon's unix socket,
    as ``.ctl`` and ``.events`` are, so that a peer given ``-S`` finds them."""
    base = os.path.abspath(os.fspath(socket_path))
    return TelemetryEndpoints(f"ipc://{base}.telemetry", f"ipc://{base}.ticks")


def telemetry_endpoints_for(reports: str) -> TelemetryEndpoints:
    """The ticks endpoint that goes with a reports endpoint by convention:
    ``ipc://X.telemetry`` -> ``ipc://X.ticks``, ``tcp://HOST:PORT`` -> ``tcp://HOST:PORT+1``."""
    if reports.startswith("ipc://") and reports.endswith(".telemetry"):
        return TelemetryEndpoints(reports, reports[: -len(".telemetry")] + ".ticks")
    if reports.startswith("tcp://"):
        host, sep, port = reports[len("tcp://") :].rpartition(":")
        if sep and port.isdigit() and 0 < int(port) < 65535:
            return TelemetryEndpoints(reports, f"tcp://{host}:{int(port) + 1}")
    raise ValueError(f"cannot derive a ticks endpoint from {reports!r}")


def watched_flag(endpoints: TelemetryEndpoints) -> str | None:
    """The file whose fresh mtime says someone watches (None: the endpoint is not ipc)."""
    if not endpoints.reports.startswith("ipc://") or endpoints.reports.startswith("ipc://@"):
        return None
    return endpoints.reports[len("ipc://") :] + ".watched"


def watched_now(endpoints: TelemetryEndpoints) -> bool:
    """Whether someone watches the daemon of ``endpoints`` now (its flag file is fresh)."""
    path = watched_flag(endpoints)
    if path is None:
        return False
    try:
        return time.time() - os.stat(path).st_mtime < WATCHED_FRESH
    except OSError:
        return False


def encode_report(args: Mapping[str, Any]) -> bytes:
    """A peer's report as a control-schema request (``cmd`` ``report``)."""
    return encode_request("report", args)


class ReportError(ValueError):
    """A report that does not follow the schema (the message says where)."""


def heatmap_bucket_bytes(shm_size: int) -> int:
    """Bytes of shared memory per heatmap region (at least one 4 KiB page)."""
    return max(4096, shm_size // HEATMAP_BUCKETS)


def _int(value: Any, where: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ReportError(f"{where} must be an integer in {lo}..{hi}")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ReportError(f"{where} must be a number")
    return float(value)


def _str(value: Any, where: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ReportError(f"{where} must be a string of at most {limit} characters")
    return value


def _list(value: Any, where: str, limit: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise ReportError(f"{where} must be a list of at most {limit} items")
    return value


@dataclasses.dataclass(frozen=True)
class Report:
    """One validated report."""

    peer: int
    pid: int
    plugin: str
    started: float
    t: float
    rung: dict[tuple[int, int], int]
    interrupts: tuple[int, ...]
    counters: dict[str, int]
    bucket_bytes: int
    buckets: tuple[int, ...]
    received: float = 0.0


def validate_report(args: Any, max_peer_id: int = MAX_PEER_ID) -> Report:
    """The :class:`Report` in a request's ``args``; :class:`ReportError` if it is malformed."""
    if not isinstance(args, dict):
        raise ReportError("a report is a map")
    known = {"peer", "pid", "plugin", "started", "t", "rung", "interrupts", "counters", "dirty"}
    unknown = set(args) - known
    if unknown:
        raise ReportError(f"unknown report fields: {sorted(map(str, unknown))[:5]}")
    rung: dict[tuple[int, int], int] = {}
    for item in _list(args.get("rung", []), "rung", MAX_PAIRS):
        if not isinstance(item, list) or len(item) != 3:
            raise ReportError("rung entries are [dst, vector, total]")
        dst = _int(item[0], "rung dst", 0, max_peer_id)
        vector = _int(item[1], "rung vector", 0, MAX_VECTORS - 1)
        rung[(dst, vector)] = _int(item[2], "rung total")
    interrupts = tuple(
        _int(v, "interrupts") for v in _list(args.get("interrupts", []), "interrupts",
                                             MAX_VECTORS)
    )  # fmt: skip
    raw_counters = args.get("counters", {})
    if not isinstance(raw_counters, dict) or len(raw_counters) > MAX_COUNTERS:
        raise ReportError(f"counters must be a map of at most {MAX_COUNTERS} names")
    counters = {
        _str(name, "counter name", MAX_COUNTER_NAME): _int(value, "counter value")
        for name, value in raw_counters.items()
    }
    dirty = args.get("dirty", {})
    if not isinstance(dirty, dict):
        raise ReportError("dirty must be a map")
    buckets = tuple(
        _int(v, "dirty bucket") for v in _list(dirty.get("buckets", []), "dirty buckets",
                                               HEATMAP_BUCKETS)
    )  # fmt: skip
    return Report(
        peer=_int(args.get("peer"), "peer", 0, max_peer_id),
        pid=_int(args.get("pid"), "pid", 1, 1 << 22),
        plugin=_str(args.get("plugin", ""), "plugin", MAX_PLUGIN_NAME),
        started=_float(args.get("started", 0.0), "started"),
        t=_float(args.get("t"), "t"),
        rung=rung,
        interrupts=interrupts,
        counters=counters,
        bucket_bytes=_int(dirty.get("bucket_bytes", 0), "dirty bucket_bytes"),
        buckets=buckets,
    )


@dataclasses.dataclass
class Lease:
    """Someone watches: ticks every ``interval`` seconds until ``until`` (monotonic)."""

    interval: float
    until: float


@dataclasses.dataclass
class _PeerTrack:
    last: Report
    previous: Report | None = None
    left_at: float | None = None


def _rate(now: int, before: int, seconds: float) -> float:
    return max(0, now - before) / seconds if seconds > 0 else 0.0


class Aggregator:
    """Reports in, snapshots out (see the module docstring). ``clock`` is monotonic."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tracks: dict[int, _PeerTrack] = {}
        self.leases: dict[str, Lease] = {}
        #: when the current watching period began (None: nobody watches)
        self.watching_since: float | None = None
        self.reports = 0
        self.rejected = 0
        self._daemon_prev: tuple[float, dict[str, int]] | None = None
        self._daemon_last: tuple[float, dict[str, int]] | None = None

    # -- leases ---------------------------------------------------------------------------

    def watch(self, who: str, interval: float, seconds: float = LEASE_SECONDS) -> Lease:
        """``who`` watches for ``seconds`` more, wanting figures every ``interval``."""
        now = self._clock()
        if self.interval() is None:
            self.watching_since = now
        interval = min(MAX_INTERVAL, max(MIN_INTERVAL, interval))
        lease = Lease(interval, now + max(seconds, 2 * interval))
        self.leases[who] = lease
        return lease

    def interval(self) -> float | None:
        """The tick interval now: the shortest any live lease asks for (None: no watcher)."""
        now = self._clock()
        for who in [w for w, lease in self.leases.items() if lease.until <= now]:
            del self.leases[who]
        if not self.leases:
            self.watching_since = None
            return None
        return min(lease.interval for lease in self.leases.values())

    # -- input ----------------------------------------------------------------------------

    def add_report(self, report: Report) -> None:
        """Keep a validated report (a report older than the last one is ignored)."""
        report = dataclasses.replace(report, received=self._clock())
        track = self._tracks.get(report.peer)
        if track is None or track.last.pid != report.pid:
            self._tracks[report.peer] = _PeerTrack(report)
        elif report.t > track.last.t:
            track.previous, track.last = track.last, report
            track.left_at = None
        self.reports += 1

    def reporting_pids(self) -> set[int]:
        """The pids of the peers that report (and have not left)."""
        return {t.last.pid for t in self._tracks.values() if t.left_at is None}

    def add_daemon_stats(self, stats: Mapping[str, int]) -> None:
        """The daemon's counters as of now (rates come from two of them)."""
        self._daemon_prev = self._daemon_last
        self._daemon_last = (self._clock(), dict(stats))

    # -- output ---------------------------------------------------------------------------

    def _daemon(self, status: Mapping[str, Any]) -> dict[str, Any]:
        stats = dict(self._daemon_last[1]) if self._daemon_last else {}
        rates: dict[str, float] = {}
        if self._daemon_last and self._daemon_prev:
            (t1, now), (t0, before) = self._daemon_last, self._daemon_prev
            rates = {f"{k}_per_s": _rate(v, before.get(k, v), t1 - t0) for k, v in now.items()}
        return {"status": dict(status), "stats": stats, "rates": rates}

    def snapshot(
        self, registry: Iterable[Mapping[str, Any]], status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The fabric as of now: ``registry`` is the daemon's ``peers`` list, ``status`` its
        ``status`` map (both as the control plane returns them)."""
        now = self._clock()
        wall = time.time()
        interval = self.interval()
        live = {int(p["id"]): p for p in registry}
        for peer_id, track in self._tracks.items():
            gone = peer_id not in live or live[peer_id].get("pid") != track.last.pid
            if gone and track.left_at is None:
                track.left_at = now
        expired = [
            peer_id for peer_id, track in self._tracks.items()
            if track.left_at is not None and (now - track.left_at > LEFT_RETENTION)
        ]  # fmt: skip
        for peer_id in expired:
            del self._tracks[peer_id]
        left = sorted(
            (t for t in self._tracks.values() if t.left_at is not None),
            key=lambda t: t.left_at or 0.0,
        )
        for track in left[:-MAX_LEFT] if len(left) > MAX_LEFT else []:
            del self._tracks[track.last.peer]
        stale_after = 3 * (interval or 1.0)
        peers: list[dict[str, Any]] = []
        doorbells: list[dict[str, Any]] = []
        shm_size = int(status.get("shm", {}).get("size", 0) or 0)
        bucket_bytes = heatmap_bucket_bytes(shm_size) if shm_size else 0
        heat_rate = [0.0] * HEATMAP_BUCKETS
        heat_total = [0] * HEATMAP_BUCKETS
        shown: set[int] = set()
        for peer_id, entry in sorted(live.items()):
            found = self._tracks.get(peer_id)
            if found is not None and found.left_at is None:
                row = self._peer_row(found, now, wall, stale_after, doorbells, heat_rate,
                                     heat_total, bucket_bytes)  # fmt: skip
                shown.add(peer_id)
            else:
                waiting = (
                    self.watching_since is not None
                    and now - self.watching_since < FIRST_REPORT_GRACE + 3 * (interval or 0.0)
                )
                row = {"telemetry": False, "silent": WAITING if waiting else NO_TELEMETRY}
            connected = entry.get("connected_at")
            row.update(
                id=peer_id, pid=entry.get("pid"), host=entry.get("member"), state="connected",
                vectors=entry.get("vectors"),
                uptime=(wall - float(connected)) if isinstance(connected, int | float) else None,
            )  # fmt: skip
            row.setdefault("plugin", None)
            peers.append(row)
        for peer_id, track in sorted(self._tracks.items()):
            if peer_id in shown or track.left_at is None:
                continue
            row = self._peer_row(track, now, wall, 0.0, doorbells, heat_rate, heat_total,
                                 bucket_bytes)  # fmt: skip
            row.update(id=peer_id, pid=track.last.pid, host=None, state="left", vectors=None,
                       uptime=None)  # fmt: skip
            peers.append(row)
        doorbells.sort(key=lambda d: (d["src"], d["dst"], d["vector"]))
        return {
            "time": wall,
            "interval": interval,
            "watching": interval is not None,
            "daemon": self._daemon(status),
            "peers": peers,
            "doorbells": doorbells,
            "heatmap": {
                "shm_size": shm_size,
                "bucket_bytes": bucket_bytes,
                "pages_per_s": heat_rate,
                "pages_total": heat_total,
            },
            "telemetry": {"reports": self.reports, "rejected": self.rejected},
        }

    def _peer_row(
        self,
        track: _PeerTrack,
        now: float,
        wall: float,
        stale_after: float,
        doorbells: list[dict[str, Any]],
        heat_rate: list[float],
        heat_total: list[int],
        bucket_bytes: int,
    ) -> dict[str, Any]:
        last, prev = track.last, track.previous
        fresh = prev is not None and now - last.received <= stale_after
        seconds = (last.t - prev.t) if fresh and prev is not None else 0.0

        def rate(value: int, before: int | None) -> float:
            return _rate(value, before if before is not None else value, seconds)

        rung_rate = 0.0
        for (dst, vector), total in last.rung.items():
            r = rate(total, prev.rung.get((dst, vector), 0) if prev else None)
            rung_rate += r
            doorbells.append(
                {"src": last.peer, "dst": dst, "vector": vector, "total": total, "rate": r}
            )
        irq_total = sum(last.interrupts)
        irq_rate = rate(irq_total, sum(prev.interrupts) if prev else None)
        counters = {
            name: {
                "total": total,
                "rate": rate(total, prev.counters.get(name, 0) if prev else None),
            }
            for name, total in sorted(last.counters.items())
        }
        dirty_total = sum(last.buckets)
        dirty_rate = rate(dirty_total, sum(prev.buckets) if prev else None)
        if bucket_bytes and last.bucket_bytes == bucket_bytes:
            for index, total in enumerate(last.buckets):
                heat_total[index] += total
                if prev is not None and index < len(prev.buckets):
                    heat_rate[index] += rate(total, prev.buckets[index])
        return {
            "telemetry": True,
            "silent": None,
            "plugin": last.plugin,
            "started": last.started,
            "doorbells_total": sum(last.rung.values()),
            "doorbells_per_s": rung_rate,
            "interrupts": list(last.interrupts),
            "interrupts_total": irq_total,
            "interrupts_per_s": irq_rate,
            "counters": counters,
            "dirty_pages_total": dirty_total,
            "dirty_pages_per_s": dirty_rate,
            "report_age": now - last.received,
        }
