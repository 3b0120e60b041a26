"""What ``ivshmemctl up`` runs: regions (one daemon each) and their groups of peers.

The command line describes one region (``up --peers N [--size S] --plugin NAME ...``); a
topology file (``up -f topology.toml``) describes any number::

    [[region]]                     # one daemon and its shared memory
    name = "pingpong"              # optional (default region1, region2, ...)
    size = "4M"                    # optional: the shm size (default: the daemon's, 4M)
    vectors = 1                    # optional: interrupt vectors per peer (default 1)
    # shm_name = "vmshm"           # optional: a POSIX shm name (default: a unique one)
    # socket = "/run/pp.sock"      # optional (default: in a private temporary directory)

    [[region.peers]]               # a group of peers running one plugin
    plugin = "ping"
    count = 2                      # optional (default 1)
    options = ["--count", "5000"]  # or a table: options = { count = 5000 }

Everything is checked before anything starts, and every mistake is reported, each in one
line that names the file, the line and the key: unknown keys, values of the wrong type or
out of range, an unknown plugin, plugin options the plugin refuses, an odd number of peers
of a plugin that works in pairs. The file format leaves room for what a federation of
daemons will add: a top-level ``[hosts.NAME]`` table and ``hosts``/``host`` keys in regions
and groups (refused, with that explanation, until then).

TOML is read with the standard library's :mod:`tomllib`; it gives no line numbers, so
:class:`_Lines` finds each key's line in the text (tables, arrays of tables, ``key =``).
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ivshmemd.protocol import MAX_VECTORS
from ivshmemd.sizes import SizeError, parse_size
from ivshmemd.wording import plural

from .cmdline import PluginCommandLine, UsageError, parse_plugin_options
from .plugin import Plugin, PluginError, load_plugin

__all__ = [
    "MAX_PEERS",
    "PeerGroup",
    "RegionSpec",
    "Topology",
    "TopologyError",
    "check_plugins",
    "load_topology",
    "parse_topology",
]

MAX_PEERS: Final = 4096
_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_REGION_KEYS: Final = ("name", "size", "vectors", "shm_name", "socket", "peers")
_GROUP_KEYS: Final = ("plugin", "count", "options")
_FUTURE: Final = "reserved for daemons federated across hosts (not supported yet)"


class TopologyError(Exception):
    """A topology that cannot run; ``problems`` holds one line per mistake."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class PeerGroup:
    """``count`` peers running ``plugin`` with ``args`` (what follows ``--plugin NAME``)."""

    plugin: str
    count: int = 1
    args: tuple[str, ...] = ()
    line: int | None = None  # where the group is in a topology file


@dataclass(frozen=True)
class RegionSpec:
    """One daemon (its shared memory and vectors) and its groups of peers."""

    name: str
    groups: tuple[PeerGroup, ...]
    size: int | None = None
    vectors: int = 1
    shm_name: str | None = None
    socket: str | None = None
    line: int | None = None

    @property
    def peers(self) -> int:
        return sum(group.count for group in self.groups)


@dataclass(frozen=True)
class Topology:
    """Everything ``up`` starts."""

    regions: tuple[RegionSpec, ...]
    source: str | None = None  # the file it came from

    @property
    def peers(self) -> int:
        return sum(region.peers for region in self.regions)

    @property
    def plugins(self) -> list[str]:
        """The plugins it runs, each once (what the fork server imports up front)."""
        return sorted({g.plugin for r in self.regions for g in r.groups})


# ---------------------------------------------------------------------------------------------
# Where each key is in the text
# ---------------------------------------------------------------------------------------------

_HEADER: Final = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_BARE_OR_QUOTED: Final = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY: Final = re.compile(rf"^\s*({_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*)\s*=")


def _key_parts(text: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in text.split("."))


class _Lines:
    """The line of each table and key of a TOML text, by path: ``("region", 0, "size")``."""

    def __init__(self, text: str) -> None:
        self.at: dict[tuple[Any, ...], int] = {}
        counts: dict[tuple[Any, ...], int] = {}
        table: tuple[Any, ...] = ()
        in_string = False
        for number, line in enumerate(text.splitlines(), 1):
            if line.count('"""') % 2 or line.count("'''") % 2:
                in_string = not in_string
                if in_string:
                    self._key(table, line, number)
                continue
            if in_string:
                continue
            header = _HEADER.match(line)
            if header:
                table = self._table(header.group(1) == "[[", _key_parts(header.group(2)), counts)
                for depth in range(1, len(table) + 1):  # [hosts.b] also places "hosts"
                    self.at.setdefault(table[:depth], number)
                continue
            self._key(table, line, number)

    def _key(self, table: tuple[Any, ...], line: str, number: int) -> None:
        key = _KEY.match(line)
        if key:
            self.at.setdefault(table + _key_parts(key.group(1)), number)

    def _table(
        self, array: bool, names: tuple[str, ...], counts: dict[tuple[Any, ...], int]
    ) -> tuple[Any, ...]:
        """The path of a ``[a.b]`` or ``[[a.b]]`` header: arrays of tables get the index of
        their latest element at each level."""
        path: tuple[Any, ...] = ()
        for depth, name in enumerate(names):
            path += (name,)
            last = depth == len(names) - 1
            if last and array:
                index = counts.get(path, -1) + 1
                counts[path] = index
                # a new element restarts the counts of the arrays nested in it
                for key in [k for k in counts if k[: len(path)] == path and len(k) > len(path)]:
                    del counts[key]
                path += (index,)
            elif path in counts:
                path += (counts[path],)
        return path

    def line(self, path: tuple[Any, ...]) -> int | None:
        """The line of ``path``, or of its nearest enclosing table or key."""
        while path:
            if path in self.at:
                return self.at[path]
            path = path[:-1]
        return None


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------


class _Checker:
    """Collects one problem per bad key or value."""

    def __init__(self, source: str, lines: _Lines | None) -> None:
        self.source = source
        self.lines = lines
        self.problems: list[str] = []

    def where(self, path: tuple[Any, ...]) -> int | None:
        return self.lines.line(path) if self.lines else None

    def problem(self, path: tuple[Any, ...], message: str) -> None:
        line = self.where(path)
        self.problems.append(
            f"{self.source}:{line}: {message}" if line else f"{self.source}: {message}"
        )

    def unknown(
        self, path: tuple[Any, ...], table: dict[str, Any], known: Sequence[str], what: str
    ) -> None:
        for key in table:
            if key in known:
                continue
            if key in ("hosts", "host"):
                self.problem((*path, key), f"{what}: {key!r} is {_FUTURE}")
            else:
                self.problem(
                    (*path, key), f"{what}: unknown key {key!r} (known keys: {', '.join(known)})"
                )


def _label(index: int, table: dict[str, Any]) -> str:
    name = table.get("name")
    return f"region {name!r}" if isinstance(name, str) else f"region #{index + 1}"


def _options_argv(value: Any) -> list[str] | str:
    """A group's ``options``: an argv list, or a table turned into ``--key value``;
    returns the argv or why it cannot be one."""
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            return 'options: a list must hold strings, e.g. ["--count", "5000"]'
        return list(value)
    if isinstance(value, dict):
        argv: list[str] = []
        for key, item in value.items():
            option = key if key.startswith("-") else f"--{key}"
            if item is True:
                argv.append(option)
            elif item is False:
                continue
            elif isinstance(item, str | int | float):
                argv += [option, str(item)]
            else:
                return f"options: {key!r} must be a string, a number or a boolean"
        return argv
    return "options: must be a list of arguments or a table of options"


def _group(check: _Checker, path: tuple[Any, ...], what: str, table: Any) -> PeerGroup | None:
    if not isinstance(table, dict):
        check.problem(path, f"{what}: must be a table ([[region.peers]])")
        return None
    check.unknown(path, table, _GROUP_KEYS, what)
    plugin = table.get("plugin")
    ok = True
    if not isinstance(plugin, str) or not plugin:
        check.problem((*path, "plugin"), f"{what}: 'plugin' (a plugin name) is required")
        ok = False
    count = table.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_PEERS:
        check.problem(
            (*path, "count"), f"{what}: 'count' must be an integer 1..{MAX_PEERS}, got {count!r}"
        )
        ok = False
    argv = _options_argv(table.get("options", []))
    if isinstance(argv, str):
        check.problem((*path, "options"), f"{what}: {argv}")
        ok = False
    if not ok:
        return None
    assert isinstance(plugin, str) and isinstance(argv, list)
    return PeerGroup(plugin, count, tuple(argv), check.where(path))


def _region(check: _Checker, index: int, table: Any) -> RegionSpec | None:
    path: tuple[Any, ...] = ("region", index)
    if not isinstance(table, dict):
        check.problem(path, f"region #{index + 1}: must be a table ([[region]])")
        return None
    what = _label(index, table)
    check.unknown(path, table, _REGION_KEYS, what)
    ok = True
    name = table.get("name", f"region{index + 1}")
    if not isinstance(name, str) or not _NAME.match(name):
        check.problem(
            (*path, "name"),
            f"{what}: 'name' must be 1..64 letters, digits, '_', '.' or '-', got {name!r}",
        )
        ok = False
    size: int | None = None
    if "size" in table:
        raw = table["size"]
        try:
            if isinstance(raw, bool) or not isinstance(raw, str | int):
                raise SizeError(f'expected a size such as "16M" or 16777216, got {raw!r}')
            size = parse_size(str(raw))
        except SizeError as exc:
            check.problem((*path, "size"), f"{what}: 'size': {exc}")
            ok = False
    vectors = table.get("vectors", 1)
    if (
        not isinstance(vectors, int)
        or isinstance(vectors, bool)
        or not (0 <= vectors <= MAX_VECTORS)
    ):
        check.problem(
            (*path, "vectors"),
            f"{what}: 'vectors' must be an integer 0..{MAX_VECTORS}, got {vectors!r}",
        )
        ok = False
    texts: dict[str, str | None] = {}
    for key in ("shm_name", "socket"):
        value = table.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            check.problem((*path, key), f"{what}: {key!r} must be a non-empty string")
            ok = False
        texts[key] = value if isinstance(value, str) else None
    groups = table.get("peers")
    found: list[PeerGroup] = []
    if not isinstance(groups, list) or not groups:
        check.problem((*path, "peers"), f"{what}: needs at least one [[region.peers]] group")
        ok = False
    else:
        for number, group in enumerate(groups):
            made = _group(check, (*path, "peers", number), f"{what}, peers #{number + 1}", group)
            ok = ok and made is not None
            if made is not None:
                found.append(made)
    if not ok:
        return None
    assert isinstance(name, str) and isinstance(vectors, int)
    return RegionSpec(
        name, tuple(found), size, vectors, texts["shm_name"], texts["socket"], check.where(path)
    )


def parse_topology(text: str, source: str = "topology") -> Topology:
    """The topology a TOML text describes (syntax, keys and values checked; plugins are
    checked by :func:`check_plugins`). Raises :class:`TopologyError` listing every
    problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError([f"{source}: not valid TOML: {exc}"]) from None
    check = _Checker(source, _Lines(text))
    for key in data:
        if key == "hosts":
            check.problem((key,), f"{key!r} is {_FUTURE}")
        elif key != "region":
            check.problem((key,), f"unknown key {key!r} (a topology has [[region]] tables)")
    raw = data.get("region")
    regions: list[RegionSpec] = []
    if not isinstance(raw, list) or not raw:
        check.problem(("region",), "no region: describe at least one with [[region]]")
    else:
        for index, table in enumerate(raw):
            region = _region(check, index, table)
            if region is not None:
                regions.append(region)
    seen: set[str] = set()
    for region in regions:
        if region.name in seen:
            check.problems.append(
                f"{source}:{region.line}: region name {region.name!r} is used more than once"
            )
        seen.add(region.name)
    total = sum(r.peers for r in regions)
    if total > MAX_PEERS:
        check.problems.append(f"{source}: {total} peers in all; at most {MAX_PEERS}")
    if check.problems:
        raise TopologyError(check.problems)
    return Topology(tuple(regions), source)


def load_topology(path: str) -> Topology:
    """:func:`parse_topology` of a file, then :func:`check_plugins`."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError([f"{path}: cannot read it: {exc}"]) from None
    topology = parse_topology(text, path)
    check_plugins(topology, "ivshmemctl up")
    return topology


# ---------------------------------------------------------------------------------------------
# The plugins
# ---------------------------------------------------------------------------------------------


@dataclass
class _Pairing:
    count: int = 0
    lines: list[int | None] = field(default_factory=list)


def _groups(topology: Topology) -> Iterator[tuple[RegionSpec, PeerGroup]]:
    for region in topology.regions:
        for group in region.groups:
            yield region, group


def check_plugins(
    topology: Topology,
    prog: str,
    *,
    command: argparse.ArgumentParser | None = None,
    count_option: str = "count",
) -> None:
    """Every plugin exists and accepts its options (parsed as every peer will), and a
    plugin that pairs its peers gets an even number of them in each region. Raises
    :class:`TopologyError` with every problem. ``command`` is the parser whose options a
    plugin option must not be (``up``'s own, on the command line), ``count_option`` how the
    count is called (``--peers`` on the command line)."""
    source = topology.source
    problems: list[str] = []

    def say(line: int | None, message: str) -> None:
        where = f"{source}:{line}: " if source and line else (f"{source}: " if source else "")
        problems.append(where + message)

    for region in topology.regions:
        pairing: dict[str, _Pairing] = {}
        for group in region.groups:
            try:
                plugin_cls: type[Plugin] = load_plugin(group.plugin)
                line = PluginCommandLine([], group.plugin, list(group.args))
                options = parse_plugin_options(prog, line, plugin_cls, command)
            except (PluginError, UsageError) as exc:
                say(group.line, str(exc))
                continue
            if plugin_cls.pairs(options):
                entry = pairing.setdefault(group.plugin, _Pairing())
                entry.count += group.count
                entry.lines.append(group.line)
        for name, entry in pairing.items():
            if entry.count % 2:
                inside = f" in region {region.name!r}" if source else ""
                say(
                    entry.lines[-1],
                    f"{name} pairs its peers: {plural(entry.count, 'peer')} "
                    f"of it{inside} would leave one waiting for a partner for ever; give an "
                    f"even {count_option}",
                )
    if problems:
        raise TopologyError(problems)
