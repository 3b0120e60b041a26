"""The fabric as a picture: a telemetry snapshot rendered with ``rich`` (pure: no I/O).

:func:`render` turns one snapshot (:meth:`ivshmemd.telemetry.Aggregator.snapshot`) into a
renderable that fits ``width`` x ``height`` cells: the daemon's figures, the peers (id, pid,
host, plugin, uptime, rates, or why a peer is silent), the doorbell matrix (who rings whom,
per second, coloured by rate) and the shared-memory heatmap (pages written per second per
region). ``ivshmemctl top`` draws it live, ``--once`` prints it, ``snapshot --svg`` records
it. The matrix and the heatmap are built as lines of styled text, not as tables: a 64-peer
fabric redraws in about a millisecond, so a live view costs little CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from rich.console import Group, RenderableType
from rich.text import Text

__all__ = ["format_rate", "rate_style", "render"]

_RATE_STYLES: Final = (
    (0.0, "grey37"),
    (10.0, "blue"),
    (100.0, "cyan"),
    (1_000.0, "green"),
    (10_000.0, "yellow"),
    (100_000.0, "red"),
)
_HOT: Final = "bold magenta"
CELL: Final = 6  # characters per matrix column


def format_rate(value: float) -> str:
    """A rate in at most 5 characters: ``·`` for none, ``950``, ``12.3k``, ``1.2M``."""
    if value <= 0:
        return "·"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            scaled = value / scale
            return f"{scaled:.1f}{unit}" if scaled < 100 else f"{scaled:.0f}{unit}"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def rate_style(value: float) -> str:
    """The colour of a rate: grey for none, then blue, cyan, green, yellow, red by decade
    (below 10, 100, 1k, 10k, 100k per second), magenta beyond."""
    if value <= 0:
        return _RATE_STYLES[0][1]
    for limit, name in _RATE_STYLES[1:]:
        if value < limit:
            return name
    return _HOT


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _size(size: Any) -> str:
    if not isinstance(size, int):
        return "?"
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):g}{unit}"
    return str(size)


def _header(snapshot: Mapping[str, Any]) -> Text:
    daemon = snapshot.get("daemon", {})
    status, stats, rates = daemon.get("status", {}), daemon.get("stats", {}), daemon.get("rates")
    rates = rates or {}
    text = Text(no_wrap=True, overflow="crop")
    text.append("ivshmemd", style="bold")
    text.append(f" pid {status.get('pid', '?')}  up {_duration(status.get('uptime'))}  ")
    text.append(f"shm {_size(status.get('shm', {}).get('size'))}  ")
    text.append(f"vectors {status.get('vectors', '?')}  peers {status.get('peers', '?')}\n")
    for key, label in (("joins", "joins"), ("leaves", "leaves"), ("refusals", "refusals"),
                       ("slow_disconnects", "drops")):  # fmt: skip
        text.append(f"{label} ")
        text.append(str(stats.get(key, 0)), style="bold")
        text.append("  ")
    text.append("messages/s ")
    text.append(format_rate(float(rates.get("messages_sent_per_s", 0.0))), style="bold")
    watching = snapshot.get("interval")
    text.append(f"  every {watching:g}s" if isinstance(watching, int | float) else "")
    return text


def _peer_rows(peers: Sequence[Mapping[str, Any]], width: int, limit: int) -> Text:
    text = Text(no_wrap=True, overflow="crop")
    head = f"{'id':>5} {'pid':>7} {'host':<8} {'plugin':<10} {'up':>7} {'rings/s':>8} "
    head += f"{'irq/s':>8} {'dirty/s':>8}  counters"
    text.append(head[:width] + "\n", style="bold reverse")
    shown = peers[:limit]
    for peer in shown:
        host = str(peer.get("host") or "-")[:8]
        plugin = str(peer.get("plugin") or "-")[:10]
        line = Text(f"{peer['id']:>5} {peer.get('pid') or '-':>7} {host:<8} {plugin:<10} "
                    f"{_duration(peer.get('uptime')):>7} ")  # fmt: skip
        if peer.get("state") == "left":
            line.stylize("dim")
        if peer.get("telemetry"):
            for key in ("doorbells_per_s", "interrupts_per_s", "dirty_pages_per_s"):
                value = float(peer.get(key, 0.0))
                line.append(f"{format_rate(value):>8} ", style=rate_style(value))
            counters = peer.get("counters") or {}
            extra = "  ".join(
                f"{name} {format_rate(float(c.get('rate', 0)))}/s" for name, c in counters.items()
            )
            if peer.get("state") == "left":
                extra = ("left  " + extra).strip()
            line.append(" " + extra)
        else:
            line.append(f" {peer.get('silent') or 'silent'}", style="yellow")
        line.truncate(width)
        text.append_text(line)
        text.append("\n")
    if len(peers) > len(shown):
        text.append(f"  ... {len(peers) - len(shown)} more peers\n", style="dim")
    return text


def _matrix(snapshot: Mapping[str, Any], width: int, limit: int) -> Text:
    """Rows: who rings; columns: who is rung; cells: rings per second (all vectors)."""
    rates: dict[tuple[int, int], float] = {}
    for d in snapshot.get("doorbells", []):
        key = (int(d["src"]), int(d["dst"]))
        rates[key] = rates.get(key, 0.0) + float(d.get("rate", 0.0))
    ids = sorted({int(p["id"]) for p in snapshot.get("peers", []) if p.get("state") != "left"})
    ids = sorted(set(ids) | {s for s, _ in rates} | {d for _, d in rates})
    columns = max(1, (width - 8) // CELL)
    cols, rows = ids[:columns], ids[:limit]
    text = Text(no_wrap=True, overflow="crop")
    text.append("doorbells/s  ", style="bold")
    text.append("(row rings column)\n", style="dim")
    text.append(f"{'':>6} ", style="bold")
    for dst in cols:
        text.append(f"{dst:>{CELL}}", style="bold")
    text.append("\n")
    for src in rows:
        text.append(f"{src:>6} ", style="bold")
        _append_runs(text, ((f"{format_rate(v):>{CELL}}", rate_style(v))
                            for v in (rates.get((src, dst), 0.0) for dst in cols)))  # fmt: skip
        text.append("\n")
    hidden_rows, hidden_cols = len(ids) - len(rows), len(ids) - len(cols)
    if hidden_rows > 0 or hidden_cols > 0:
        text.append(f"  ({len(ids)} peers: {len(cols)} columns and {len(rows)} rows shown; "
                    "enlarge the terminal for more)\n", style="dim")  # fmt: skip
    return text


def _append_runs(text: Text, cells: Iterable[tuple[str, str]]) -> None:
    """Append styled cells, one span per run of equal style (what makes a redraw cheap:
    rich's cost is per span, and most cells of a big fabric are idle and alike)."""
    run: list[str] = []
    style = None
    for cell, cell_style in cells:
        if cell_style != style and run:
            text.append("".join(run), style=style)
            run = []
        style = cell_style
        run.append(cell)
    if run:
        text.append("".join(run), style=style)


def _heatmap(snapshot: Mapping[str, Any], width: int) -> Text:
    heat = snapshot.get("heatmap", {})
    rates = [float(v) for v in heat.get("pages_per_s", [])]
    bucket = int(heat.get("bucket_bytes", 0) or 0)
    size = int(heat.get("shm_size", 0) or 0)
    used = max(1, min(len(rates), -(-size // bucket) if bucket else len(rates)))
    rates = rates[:used]
    text = Text(no_wrap=True, overflow="crop")
    text.append("shared memory written, pages/s per region  ", style="bold")
    text.append(f"({used} regions of {_size(bucket)})\n", style="dim")
    room = max(8, (width - 12) // 2)
    per_line = next((n for n in (64, 32, 16, 8) if n <= room), 8)
    for start in range(0, used, per_line):
        text.append(f"{_size(start * bucket):>9}  ", style="dim")
        _append_runs(text, (("██", rate_style(v)) for v in rates[start : start + per_line]))
        text.append("\n")
    peak = max(rates, default=0.0)
    total = sum(rates)
    text.append(f"{'':>9}  total {format_rate(total)} pages/s, busiest region "
                f"{format_rate(peak)}\n", style="dim")  # fmt: skip
    legend = Text(f"{'':>9}  ")
    for limit, name in _RATE_STYLES:
        legend.append("██", style=name)
        legend.append(f" {'0' if limit == 0 else '<' + format_rate(limit)} ")
    legend.append("██", style=_HOT)
    legend.append(" more")
    text.append_text(legend)
    return text


def render(
    snapshot: Mapping[str, Any],
    width: int = 100,
    height: int = 40,
    footer: Sequence[str] = (),
) -> RenderableType:
    """The whole view of ``snapshot``, fitted to ``width`` x ``height`` cells."""
    peers = list(snapshot.get("peers", []))
    # room: header 2, peers head 1, matrix head 2, heatmap ~5, footer, blank separators
    spare = max(4, height - 14 - len(footer) - math.ceil(64 * 2 / max(16, width - 12)))
    peer_limit = max(2, spare // 2)
    matrix_limit = max(2, spare - min(len(peers), peer_limit))
    parts: list[RenderableType] = [
        _header(snapshot),
        Text(""),
        _peer_rows(peers, width, peer_limit),
        _matrix(snapshot, width, matrix_limit),
        _heatmap(snapshot, width),
    ]
    if footer:
        parts.append(Text("\n".join(footer), style="dim"))
    return Group(*parts)
