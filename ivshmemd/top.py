"""``ivshmemctl top`` and ``ivshmemctl snapshot``: see the fabric.

    ivshmemctl [-S SOCK] top [--interval S] [--once] [--json]
    ivshmemctl [-S SOCK] snapshot --svg FILE

``top`` asks the daemon's telemetry socket (``SOCK.telemetry``, or ``--telemetry``) for a
snapshot every interval: each request is also a lease that keeps our peers reporting
(:mod:`ivshmemd.telemetryserve`). It draws the snapshot (:mod:`ivshmemd.topview`) on the
terminal's alternate screen, redrawn every interval and at once when the terminal is
resized; ``q`` or Ctrl-C quits and gives the terminal back as it was. ``--once`` prints one
snapshot after the peers have reported twice (so rates are there), ``--json`` that snapshot
as JSON. ``snapshot --svg FILE`` records the same picture in an SVG file for a bug report
(rich's own SVG export), with the snapshot's data in the file's ``<metadata>``.

The commands are registered in the ``ivshmemctl.commands`` group (:mod:`ivshmemd.ctl`);
:class:`TopLoop` is also what ``ivshmemctl up --top`` runs over the peers it launched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

from .argtypes import seconds
from .control.client import ControlClient, NoDaemonError
from .ctl import _curve, _jsonable
from .exitcodes import EXIT_OK, EXIT_USAGE
from .protocol import DEFAULT_SOCKET
from .sockpath import ipc_path
from .telemetry import MAX_INTERVAL, MIN_INTERVAL, default_telemetry_endpoints

__all__ = ["DEFAULT_INTERVAL", "TopLoop", "register_top_commands", "take_snapshot"]

DEFAULT_INTERVAL: Final = 0.5
#: ``--once``: the peers' reports wanted before printing, and the longest wait for them
ONCE_ROUNDS: Final = 3


Fetch = Callable[[], dict[str, Any]]


def _telemetry_endpoint(args: argparse.Namespace) -> str:
    explicit = getattr(args, "telemetry", None)
    if explicit:
        return str(explicit)
    return default_telemetry_endpoints(getattr(args, "socket", None) or DEFAULT_SOCKET).reports


def fetcher(client: ControlClient, interval: float) -> Fetch:
    """A snapshot per call, each one a lease on the peers' reports."""

    def fetch() -> dict[str, Any]:
        result = client.request("watch", {"interval": interval})
        if not isinstance(result, dict):
            raise NoDaemonError("the telemetry socket answered something that is not a snapshot")
        return result

    return fetch


def take_snapshot(fetch: Fetch, interval: float) -> dict[str, Any]:
    """A snapshot with rates in it: ask (the lease starts the ticks), let the peers report
    a few times, ask again. Returns early once no peer waits for its first report and every
    reporting one has reported twice since."""
    snap = fetch()
    deadline = time.monotonic() + ONCE_ROUNDS * interval + 1.0
    started = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(interval)  # the ticks' own pace: there is nothing to wait on here
        snap = fetch()
        ready = all(p.get("telemetry") or p.get("silent") != "waiting for its first report"
                    for p in snap.get("peers", []))  # fmt: skip
        if ready and time.monotonic() - started >= 2 * interval:
            break
    return snap


@contextlib.contextmanager
def _keys(fd: int | None) -> Iterator[None]:
    """The terminal in cbreak mode (keys arrive one by one, Ctrl-C still interrupts), put
    back as it was on the way out, whatever happens."""
    if fd is None:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class TopLoop:
    """The live view: fetch, draw, wait for the interval, a key, a resize or ``stop``."""

    def __init__(
        self,
        fetch: Fetch,
        interval: float,
        *,
        console: Any = None,
        footer: Callable[[], Sequence[str]] = lambda: (),
        stop: threading.Event | None = None,
    ) -> None:
        from rich.console import Console

        self.fetch = fetch
        self.interval = interval
        self.console = console or Console()
        self.footer = footer
        self.stop = stop or threading.Event()
        self.frames = 0
        #: the user quit (q or Ctrl-C), rather than ``stop``
        self.quit = False

    def _view(self, snap: Mapping[str, Any] | None, problem: str | None) -> Any:
        from rich.text import Text

        from .topview import render

        width, height = self.console.size
        footer = [*self.footer(), "q: quit"]
        if problem is not None:
            footer.insert(0, problem)
        if snap is None:
            return Text("\n".join(footer))
        return render(snap, width, height - 1, footer)

    def run(self) -> int:
        """Until ``q``, Ctrl-C or ``stop``; the terminal is restored in every case."""
        from rich.live import Live

        stdin = sys.stdin.fileno() if sys.stdin.isatty() else None
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        main = threading.current_thread() is threading.main_thread()
        previous = None
        if main:
            previous = signal.signal(signal.SIGWINCH, lambda *_: _poke(wake_w))
        snap: dict[str, Any] | None = None
        try:
            live_view = Live(
                console=self.console, screen=True, auto_refresh=False,
                redirect_stdout=False, redirect_stderr=False,
            )  # fmt: skip
            with _keys(stdin), live_view as live:
                next_fetch = 0.0
                while not self.stop.is_set():
                    problem = None
                    if time.monotonic() >= next_fetch:
                        next_fetch = time.monotonic() + self.interval
                        try:
                            snap = self.fetch()
                        except NoDaemonError as exc:
                            problem = f"no answer: {exc}"
                    live.update(self._view(snap, problem), refresh=True)
                    self.frames += 1
                    watched = [wake_r] + ([stdin] if stdin is not None else [])
                    wait = max(0.0, next_fetch - time.monotonic())
                    ready, _, _ = select.select(watched, [], [], min(wait, 0.25))
                    if wake_r in ready:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 64)
                    if stdin is not None and stdin in ready:
                        keys = os.read(stdin, 64)
                        if not keys or b"q" in keys.lower():
                            self.quit = True
                            break
        except KeyboardInterrupt:
            self.quit = True
        finally:
            if main and previous is not None:
                signal.signal(signal.SIGWINCH, previous)
            os.close(wake_r)
            os.close(wake_w)
        return EXIT_OK


def _poke(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, b"w")


def _must_exist(endpoint: str) -> None:
    path = ipc_path(endpoint)
    if path is not None and not os.path.exists(path):
        raise NoDaemonError(
            f"no daemon: {path} does not exist (is ivshmemd running, with this -S, and with "
            "its control plane?)"
        )


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(_telemetry_endpoint(args), args.timeout, _curve(args))


def _interval(text: str) -> float:
    """``--interval``: seconds, within what a watcher may ask for."""
    value = seconds()(text)
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"must be in {MIN_INTERVAL:g}..{MAX_INTERVAL:g} seconds, not {text!r}"
        )
    return value


def _run_top(args: argparse.Namespace) -> int:
    interval = args.interval
    client = _client(args)
    try:
        fetch = fetcher(client, interval)
        if args.once or args.json:
            snap = take_snapshot(fetch, interval)
            if args.json:
                print(json.dumps(_jsonable(snap), indent=2, sort_keys=True))
            else:
                from rich.console import Console

                from .topview import render

                console = Console()
                console.print(render(snap, console.size.width, 10_000))
            return EXIT_OK
        _must_exist(client.endpoint)  # no daemon at all: say so now (a slow one: in the view)
        return TopLoop(fetch, interval).run()
    finally:
        client.close()


def svg_of(snap: Mapping[str, Any], width: int = 110, title: str = "ivshmem fabric") -> str:
    """The snapshot drawn as an SVG (rich's export), its data in ``<metadata>``."""
    from xml.sax.saxutils import escape

    from rich.console import Console

    from .topview import render

    console = Console(record=True, width=width, file=open(os.devnull, "w"))  # noqa: SIM115
    try:
        console.print(render(snap, width, 10_000))
        svg = console.export_svg(title=title)
    finally:
        console.file.close()
    data = escape(json.dumps(_jsonable(snap), sort_keys=True))
    metadata = f'<metadata id="ivshmem-snapshot">{data}</metadata>'
    head, sep, tail = svg.partition(">")  # after the opening <svg ...> tag
    return head + sep + "\n" + metadata + tail


def snapshot_data(svg: str) -> dict[str, Any]:
    """The snapshot an SVG from :func:`svg_of` carries."""
    from xml.sax.saxutils import unescape

    start = svg.index('<metadata id="ivshmem-snapshot">') + len('<metadata id="ivshmem-snapshot">')
    end = svg.index("</metadata>", start)
    data: dict[str, Any] = json.loads(unescape(svg[start:end]))
    return data


def _run_snapshot(args: argparse.Namespace) -> int:
    interval = args.interval
    client = _client(args)
    try:
        snap = take_snapshot(fetcher(client, interval), interval)
    finally:
        client.close()
    svg = svg_of(snap, args.width)
    try:
        with open(args.svg, "x" if not args.force else "w", encoding="utf-8") as out:
            out.write(svg)
    except FileExistsError:
        print(f"ivshmemctl snapshot: {args.svg} exists (--force to replace it)", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"ivshmemctl snapshot: cannot write {args.svg}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(_jsonable(snap), indent=2, sort_keys=True))
    else:
        peers = len(snap.get("peers", []))
        print(f"snapshot of {peers} peers written to {args.svg}")
    return EXIT_OK


def _view_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--telemetry",
        metavar="ENDPOINT",
        default=None,
        help="the daemon's telemetry endpoint (default ipc://SOCK.telemetry)",
    )
    p.add_argument(
        "--interval",
        type=_interval,
        metavar="SECONDS",
        default=DEFAULT_INTERVAL,
        help=f"how often to ask for figures (default {DEFAULT_INTERVAL:g})",
    )


def register_top_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """``ivshmemctl.commands`` provider: ``top`` and ``snapshot``."""
    p = subparsers.add_parser(
        "top", parents=[common],
        help="live view: peers, the doorbell matrix, the shared-memory heatmap (q quits)",
    )  # fmt: skip
    _view_options(p)
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.set_defaults(run=_run_top)
    p = subparsers.add_parser(
        "snapshot", parents=[common],
        help="draw the doorbell matrix and the memory heatmap to an SVG file",
    )  # fmt: skip
    _view_options(p)
    p.add_argument("--svg", metavar="FILE", required=True, help="the SVG file to write")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--width", type=int, default=110, help="columns to draw (default 110)")
    p.set_defaults(run=_run_snapshot)
