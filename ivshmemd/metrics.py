"""Prometheus metrics from a telemetry snapshot, served by the control process.

:func:`metric_families` is pure: one snapshot (:meth:`ivshmemd.telemetry.Aggregator.snapshot`)
in, ``prometheus_client`` metric families out, named as Prometheus wants them (``ivshmem_``
prefix, units in the name, ``_total`` on counters)::

    ivshmem_doorbells_total{src="3",dst="5",vector="0"}       rings, per pair and vector
    ivshmem_interrupts_total{peer="5",vector="0"}             interrupts a peer received
    ivshmem_peer_dirty_pages_total{peer="5"}                  shm pages it dirtied
    ivshmem_plugin_events_total{peer="5",name="messages"}     guest.count() counters
    ivshmem_peer_up{peer="5",plugin="ping"}, ivshmem_peer_uptime_seconds{peer="5"},
    ivshmem_peer_telemetry{peer="5"} (0: a QEMU VM or any peer that does not report)
    ivshmem_<counter>_total                                    the daemon's counters
    ivshmem_peers, ivshmem_shm_size_bytes, ivshmem_telemetry_reports_total, ...
    ivshmem_federation_memory_<counter>_total, ivshmem_federation_memory_holder
                                                              replicated memory (issue 13)

Label sets are bounded: only the first ``max_peers`` peer ids (in id order) get their own
label value; the others are summed under ``"other"``. Plugin counter names are bounded by
the report schema (64 per peer).

:class:`MetricsServer` is the HTTP side: ``prometheus_client``'s own server in a thread of
the control process (the daemon process never grows an HTTP server), bound to localhost
unless told otherwise; each scrape takes a fresh snapshot from the trio thread, which is
also a lease: peers keep reporting while Prometheus scrapes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

__all__ = ["DEFAULT_MAX_LABELLED_PEERS", "MetricsServer", "metric_families", "render"]

log = logging.getLogger("ivshmemd")

DEFAULT_MAX_LABELLED_PEERS: Final = 64
OTHER: Final = "other"
#: a scrape keeps peers reporting this long, at this interval
SCRAPE_LEASE: Final = 60.0
SCRAPE_INTERVAL: Final = 1.0


def _labeller(peers: list[Mapping[str, Any]], max_peers: int) -> Callable[[int], str]:
    kept = {int(p["id"]) for p in sorted(peers, key=lambda p: int(p["id"]))[:max_peers]}

    def label(peer_id: int) -> str:
        return str(peer_id) if peer_id in kept else OTHER

    return label


def metric_families(snapshot: Mapping[str, Any], max_peers: int) -> Iterator[Any]:
    """The metric families of one snapshot (see the module docstring)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    peers = list(snapshot.get("peers", []))
    label = _labeller(peers, max_peers)
    daemon = snapshot.get("daemon", {})
    status = daemon.get("status", {})
    for name, value in sorted(daemon.get("stats", {}).items()):
        if isinstance(value, int) and not isinstance(value, bool):
            base = name[: -len("_total")] if name.endswith("_total") else name
            yield CounterMetricFamily(f"ivshmem_{base}", f"ivshmemd counter {name}", value=value)
    yield GaugeMetricFamily(
        "ivshmem_peers",
        "peers connected to the daemon",
        value=sum(1 for p in peers if p.get("state") == "connected"),
    )
    shm = status.get("shm", {}) if isinstance(status, Mapping) else {}
    if isinstance(shm.get("size"), int):
        yield GaugeMetricFamily("ivshmem_shm_size_bytes", "size of the shared memory",
                                value=shm["size"])  # fmt: skip
    if isinstance(status.get("uptime"), int | float):
        yield GaugeMetricFamily("ivshmem_daemon_uptime_seconds", "time since the daemon started",
                                value=status["uptime"])  # fmt: skip
    members = status.get("federation", {}).get("members") if isinstance(
        status.get("federation"), Mapping) else None  # fmt: skip
    if isinstance(members, list):
        fed = GaugeMetricFamily("ivshmem_federation_member_up", "federation members (1: alive)",
                                labels=["member"])  # fmt: skip
        for member in members[:max_peers]:
            if isinstance(member, Mapping):
                alive = member.get("state") in ("alive", "up", "connected")
                fed.add_metric([str(member.get("endpoint", "?"))], 1.0 if alive else 0.0)
        yield fed
    memory = status.get("federation", {}).get("memory") if isinstance(
        status.get("federation"), Mapping) else None  # fmt: skip
    if isinstance(memory, Mapping):
        yield from _memory_families(memory)

    up = GaugeMetricFamily("ivshmem_peer_up", "1 for each connected peer",
                           labels=["peer", "plugin"])  # fmt: skip
    uptime = GaugeMetricFamily("ivshmem_peer_uptime_seconds", "time since the peer connected",
                               labels=["peer"])  # fmt: skip
    reporting = GaugeMetricFamily(
        "ivshmem_peer_telemetry",
        "1 if the peer reports telemetry (0: QEMU or silent)",
        labels=["peer"],
    )
    irq: dict[tuple[str, ...], float] = defaultdict(float)
    dirty: dict[str, float] = defaultdict(float)
    plugin: dict[tuple[str, ...], float] = defaultdict(float)
    up_v: dict[tuple[str, str], float] = defaultdict(float)
    uptime_v: dict[str, float] = {}
    reporting_v: dict[str, float] = {}
    for peer in peers:
        who = label(int(peer["id"]))
        if peer.get("state") == "connected":
            up_v[(who, str(peer.get("plugin") or ""))] += 1
            if who != OTHER and isinstance(peer.get("uptime"), int | float):
                uptime_v[who] = float(peer["uptime"])
            if who != OTHER:
                reporting_v[who] = 1.0 if peer.get("telemetry") else 0.0
        for vector, total in enumerate(peer.get("interrupts") or []):
            irq[(who, str(vector))] += total
        if peer.get("telemetry"):
            dirty[who] += peer.get("dirty_pages_total", 0)
        for name, figures in (peer.get("counters") or {}).items():
            plugin[(who, str(name))] += figures.get("total", 0)
    for labels, value in sorted(up_v.items()):
        up.add_metric(list(labels), value)
    for who, value in sorted(uptime_v.items()):
        uptime.add_metric([who], value)
    for who, value in sorted(reporting_v.items()):
        reporting.add_metric([who], value)
    yield up
    yield uptime
    yield reporting
    doorbells = CounterMetricFamily(
        "ivshmem_doorbells",
        "doorbells rung, per source peer, destination peer and vector",
        labels=["src", "dst", "vector"],
    )
    rings: dict[tuple[str, str, str], float] = defaultdict(float)
    for d in snapshot.get("doorbells", []):
        rings[(label(int(d["src"])), label(int(d["dst"])), str(d["vector"]))] += d["total"]
    for pair, value in sorted(rings.items()):
        doorbells.add_metric(list(pair), value)
    yield doorbells
    yield _counters("ivshmem_interrupts", "interrupts a peer received", ["peer", "vector"], irq)
    yield _counters("ivshmem_peer_dirty_pages",
                    "shared-memory pages a peer dirtied (from its dirty log)", ["peer"],
                    {(who,): value for who, value in dirty.items()})  # fmt: skip
    yield _counters("ivshmem_plugin_events", "a plugin's own counters", ["peer", "name"],
                    plugin)  # fmt: skip
    tel = snapshot.get("telemetry", {})
    for key in ("reports", "rejected", "flooded"):
        if isinstance(tel.get(key), int):
            yield CounterMetricFamily(f"ivshmem_telemetry_{key}",
                                      f"telemetry reports {key}", value=tel[key])  # fmt: skip


def _counters(
    name: str, doc: str, labels: list[str], values: Mapping[tuple[str, ...], float]
) -> Any:
    """A counter family with one sample per label tuple, in label order."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def render(snapshot: Mapping[str, Any], max_peers: int = DEFAULT_MAX_LABELLED_PEERS) -> bytes:
    """The text exposition format of one snapshot (what a scrape returns)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(lambda: snapshot, max_peers))
    return bytes(generate_latest(registry))


class _Collector:
    def __init__(self, take: Callable[[], Mapping[str, Any]], max_peers: int) -> None:
        self._take = take
        self._max_peers = max_peers

    def collect(self) -> Iterator[Any]:
        try:
            snapshot = self._take()
        except Exception as exc:
            log.warning("metrics: no snapshot: %s", exc)
            return
        yield from metric_families(snapshot, self._max_peers)


class MetricsServer:
    """``prometheus_client``'s HTTP server in a thread, over ``take`` (a snapshot)."""

    def __init__(
        self, host: str, port: int, take: Callable[[], Mapping[str, Any]], max_peers: int
    ) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(take, max_peers))
        self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


#: the replicated memory's counters (``status.federation.memory``) exported as counters
_MEMORY_COUNTERS: Final = {
    "diffs_sent": "diffs this host sent to the others",
    "bytes_sent": "bytes of those diffs",
    "diffs_applied": "diffs from other hosts applied here",
    "bytes_applied": "bytes written here by other hosts' diffs and regions",
    "bytes_kept": "bytes of arriving diffs not applied (this host's later or unshipped writes)",
    "regions_sent": "whole-region transfers sent",
    "regions_applied": "whole-region transfers applied",
    "rings_held": "rings held until a third host's diffs were in",
    "reports": "memory-log reports from local peers",
}


def _memory_families(memory: Mapping[str, Any]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    for key, text in _MEMORY_COUNTERS.items():
        value = memory.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            base = key[: -len("_total")] if key.endswith("_total") else key
            yield CounterMetricFamily(f"ivshmem_federation_memory_{base}", text, value=value)
    yield GaugeMetricFamily(
        "ivshmem_federation_memory_holder",
        "1 once this daemon holds the replicated region",
        value=1.0 if memory.get("holder") else 0.0,
    )
