"""The command-line grammar of ``ivshmem-peer`` and ``ivshmemctl up``: whose option is whose.

    COMMAND [COMMAND OPTIONS] --plugin NAME [PLUGIN OPTIONS]

Everything after ``--plugin NAME`` (or ``--plugin=NAME``) belongs to the plugin, everything
before it to the command. A plugin option and a command option may then have the same name
(``pagetable --size`` is the test memslot, ``ivshmemctl up --size`` the daemon's shm) and
never collide: where it stands says whose it is. A command option written after
``--plugin NAME`` that the plugin does not have is an error that names it and says where it
goes, never silently given to the wrong one. A ``--`` right after the plugin's name is
accepted and ignored (everything after the name is the plugin's anyway).

``-h``/``--help`` anywhere shows the command's options and, when ``--plugin NAME`` is given,
the plugin's options too (the plugin is loaded for that).

Abbreviations of long options are off (``allow_abbrev=False``) in both parts: an
abbreviation would be one more way for an option to reach the wrong parser.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from .plugin import Plugin

__all__ = [
    "HELP",
    "PluginCommandLine",
    "UsageError",
    "format_help",
    "parse_plugin_options",
    "plugin_parser",
    "split_at_plugin",
]

HELP = ("-h", "--help")
_PLUGIN = "--plugin"


class UsageError(Exception):
    """Bad command-line input (exit 2, one clear line)."""


@dataclass
class PluginCommandLine:
    """An argv cut at ``--plugin NAME``."""

    own: list[str]
    plugin: str | None = None
    plugin_args: list[str] = field(default_factory=list)

    @property
    def help(self) -> bool:
        """Help was asked for, in either part."""
        return any(arg in HELP for arg in (*self.own, *self.plugin_args))


def _takes_value(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings of ``parser`` that take a separate value (``-S PATH``)."""
    return {
        option
        for action in parser._actions
        if action.option_strings and action.nargs != 0
        for option in action.option_strings
    }


def split_at_plugin(argv: Sequence[str], parser: argparse.ArgumentParser) -> PluginCommandLine:
    """Cut ``argv`` at ``--plugin NAME``; ``parser`` (the command's) says which of its
    options take a value, so that a value is never mistaken for ``--plugin``."""
    with_value = _takes_value(parser) - {_PLUGIN}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == _PLUGIN:
            if i + 1 >= len(args) or args[i + 1].startswith("-"):
                raise UsageError("--plugin needs a plugin name (--list-plugins lists them)")
            name, rest = args[i + 1], args[i + 2 :]
            break
        if arg.startswith(_PLUGIN + "="):
            name, rest = arg.split("=", 1)[1], args[i + 1 :]
            if not name:
                raise UsageError("--plugin needs a plugin name (--list-plugins lists them)")
            break
        if arg == "--":
            raise UsageError("'--' may only follow --plugin NAME")
        i += 2 if arg in with_value else 1
    else:
        return PluginCommandLine(args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return PluginCommandLine(args[:i], name, rest)


class _PluginParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def plugin_parser(prog: str, name: str, plugin_cls: type[Plugin]) -> argparse.ArgumentParser:
    """The parser of what follows ``--plugin NAME``: the plugin's options only."""
    parser = _PluginParser(prog=f"{prog} --plugin {name}", add_help=False, allow_abbrev=False)
    group = parser.add_argument_group(f"options of the {name} plugin (after --plugin {name})")
    plugin_cls.add_arguments(group)
    return parser


def parse_plugin_options(
    prog: str,
    line: PluginCommandLine,
    plugin_cls: type[Plugin],
    command: argparse.ArgumentParser | None,
) -> argparse.Namespace:
    """The plugin's options (``line.plugin_args``), checked by the plugin; an option of
    ``command`` among them is named and sent back before ``--plugin``. Raises
    :class:`UsageError`."""
    assert line.plugin is not None
    name = line.plugin
    options, extra = plugin_parser(prog, name, plugin_cls).parse_known_args(line.plugin_args)
    if extra:
        ours = (
            {option for action in command._actions for option in action.option_strings}
            if command is not None
            else set()
        )
        for arg in extra:
            option = arg.split("=", 1)[0]
            if option in ours:
                raise UsageError(
                    f"{option} is an option of {prog}, not of the {name} plugin: put it "
                    f"before --plugin {name}"
                )
        raise UsageError(f"plugin {name}: unrecognized arguments: {' '.join(extra)}")
    problem = plugin_cls.check_options(options)
    if problem:
        raise UsageError(f"plugin {name}: {problem}")
    return options


def format_help(
    prog: str,
    command: argparse.ArgumentParser,
    name: str | None,
    plugin_cls: type[Plugin] | None,
) -> str:
    """The command's help, then the plugin's options when a plugin is named."""
    text = command.format_help()
    if name is not None and plugin_cls is not None:
        plugin = plugin_parser(prog, name, plugin_cls)
        description = plugin_cls.description or ""
        text += f"\nplugin {name}: {description}\n" if description else "\n"
        if plugin._actions:
            plugin.usage = argparse.SUPPRESS  # the command's usage line says it all
            text += plugin.format_help().lstrip("\n")
        else:
            text += f"the {name} plugin has no options\n"
    return text
