"""The layering of docs/ARCHITECTURE.md, enforced: no forbidden import appears, not even by
string.

Every module of ``vmm``, ``ivshmemd`` and ``peers`` is parsed (never imported) and each
import it makes is collected: ``import``/``from`` statements (relative ones resolved, those
inside functions and ``TYPE_CHECKING`` blocks included), ``importlib.import_module(...)`` and
``__import__(...)`` calls with a constant name, and any other string constant that names a
module of ours (``"peers.launcher"``, ``"peers.launcher:register"``): the hidden imports an
entry-point string or a plugin list would make. Docstrings are prose and are skipped.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vmm", "ivshmemd", "peers")
OURS = (*PACKAGES, "tests")

#: What each package may not import (a top-level name, or a dotted prefix).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # pure and synchronous: nothing of ours, no event loop, no sockets, no processes
    "vmm": (
        "ivshmemd",
        "peers",
        "tests",
        "trio",
        "zmq",
        "socket",
        "selectors",
        "select",
        "asyncio",
        "subprocess",
        "multiprocessing",
    ),
    # the daemon side never depends on the peers built on it
    "ivshmemd": ("peers", "tests"),
    "peers": ("tests",),
}
#: The sans-I/O modules: they may import only these (and their own package's pure modules).
PURE: dict[str, tuple[str, ...]] = {
    "ivshmemd/protocol.py": ("__future__", "collections", "dataclasses", "typing", "enum"),
    # the control plane's schema: bytes in, bytes out; its server and client move them
    "ivshmemd/control/schema.py": (
        "__future__",
        "collections",
        "dataclasses",
        "typing",
        "logging",
        "os",
        "msgpack",
        "ivshmemd.protocol",
    ),
}
#: In ivshmemd/wire.py only these functions may touch a socket; the rest encodes and decodes.
WIRE_IO_FUNCTIONS = {"send_message", "recv_message"}
IO_METHODS = {"sendmsg", "recvmsg", "send", "recv", "sendall", "recv_into", "read", "write",
              "accept", "connect", "bind", "listen", "close"}  # fmt: skip
#: A string naming a module of ours (``"peers.launcher"``, ``"peers:main"``); a bare word
#: such as ``"peers"`` is a field name, not an import.
_OUR_MODULE = re.compile(rf"^({'|'.join(OURS)})(\.[A-Za-z_]\w*)*(:[\w.]+)?$")


@dataclass(frozen=True)
class Import:
    module: str  # dotted, absolute
    line: int
    how: str  # "import", "string", "import_module"

    def top(self) -> str:
        return self.module.split(".")[0]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the string constants that are docstrings."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def imports_of(source: str, name: str, is_package: bool) -> Iterator[Import]:
    """Every import the module ``name`` makes (see the module docstring)."""
    tree = ast.parse(source)
    package = name if is_package else name.rpartition(".")[0]
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno, "import")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield Import(module, node.lineno, "import")
            for alias in node.names:  # ``from . import wire`` imports a module too
                yield Import(f"{module}.{alias.name}".lstrip("."), node.lineno, "import")
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield Import(arg.value, node.lineno, "import_module")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docstrings and _OUR_MODULE.match(node.value)
              and ("." in node.value or ":" in node.value)):  # fmt: skip
            yield Import(node.value.partition(":")[0], node.lineno, "string")


def forbidden_imports(root: Path) -> list[str]:
    """Every import that breaks :data:`FORBIDDEN` under ``root``, one line each."""
    problems: dict[str, str] = {}  # one per line
    for package, banned in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            name = module_name(path, root)
            for found in imports_of(path.read_text(), name, path.name == "__init__.py"):
                if any(found.module == b or found.module.startswith(b + ".") for b in banned):
                    where = f"{path.relative_to(root)}:{found.line}"
                    problems.setdefault(where, f"{where}: {found.how} of {found.module}")
    return sorted(problems.values())


def test_no_package_imports_what_it_must_not() -> None:
    assert forbidden_imports(ROOT) == []


@pytest.mark.parametrize(
    "offence",
    [
        "import peers.launcher",
        "from peers import launcher",
        "import importlib\nimportlib.import_module('peers.launcher')",
        "__import__('peers')",
        "PROVIDERS = ['peers.launcher:register_up_command']",
        "def later():\n    from peers.launcher import main",
    ],
)
def test_the_check_catches_every_way_to_import(tmp_path: Path, offence: str) -> None:
    (tmp_path / "ivshmemd").mkdir()
    (tmp_path / "ivshmemd" / "__init__.py").write_text('"""peers.launcher in prose is fine."""\n')
    (tmp_path / "ivshmemd" / "sneaky.py").write_text(offence + "\n")
    (problem,) = forbidden_imports(tmp_path)
    assert problem.startswith("ivshmemd/sneaky.py:") and "of peers" in problem


def test_relative_imports_are_resolved() -> None:
    source = "from ..protocol import MAX_PEER_ID\nfrom . import record\n"
    modules = {i.module for i in imports_of(source, "ivshmemd.supervise.daemon", False)}
    assert {"ivshmemd.protocol", "ivshmemd.supervise.record"} <= modules
    package = {i.module for i in imports_of("from .spawn import x\n", "ivshmemd.supervise", True)}
    assert "ivshmemd.supervise.spawn" in package


@pytest.mark.parametrize("path", sorted(PURE))
def test_the_protocol_is_sans_io(path: str) -> None:
    name = module_name(ROOT / path, ROOT)
    allowed = PURE[path]
    for found in imports_of((ROOT / path).read_text(), name, False):
        allowed_here = any(found.module == a or found.module.startswith(a + ".") for a in allowed)
        assert allowed_here or found.module.startswith(name), found
    tree = ast.parse((ROOT / path).read_text())
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name)}  # fmt: skip
    assert not calls & {"open", "print", "input"}


def test_the_wire_format_does_io_only_in_its_two_helpers() -> None:
    tree = ast.parse((ROOT / "ivshmemd" / "wire.py").read_text())
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert {f.name for f in functions} >= WIRE_IO_FUNCTIONS
    for function in functions:
        if function.name in WIRE_IO_FUNCTIONS:
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert node.func.attr not in IO_METHODS, (function.name, node.func.attr)
                owner = node.func.value
                assert not (isinstance(owner, ast.Name) and owner.id in ("os", "socket")), (
                    function.name,
                    ast.unparse(node),
                )


def test_the_architecture_page_names_every_package() -> None:
    """docs/ARCHITECTURE.md says where each concept lives: every package and subpackage of
    ours is on it (a new one gets its line there)."""
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    packages = sorted(
        str(init.parent.relative_to(ROOT)) + "/"
        for package in PACKAGES
        for init in (ROOT / package).rglob("__init__.py")
    )
    assert [p for p in packages if p not in page] == []
