"""Every code block of the README and of docs/ runs as written (issue 11, item 6).

The fenced blocks of each document are taken in order and run in one temporary directory
per document (which has ``.venv`` pointing at the running environment, so ``source
.venv/bin/activate`` works), with this environment's commands first on PATH. What a block
is and how it runs is said by an HTML comment right above it,
``<!-- doc-test: DIRECTIVE; DIRECTIVE -->``, else by its language:

``sh``/``bash``/``console`` (default: ``run``)
    run as one bash script (``set -e -o pipefail``); it must exit 0 within the timeout.
``python`` (default: run as a script) with ``plugin NAME``
    a plugin module: registered as plugin NAME (an entry point on the document's
    PYTHONPATH) for the blocks that follow, one of which must run it (``--plugin NAME``).
``python`` with ``pytest``
    a test file, run by pytest (trio mode on) in a project of its own; it must pass.
``toml`` (default: must parse)
    with ``file NAME``: written as NAME for the blocks that follow (any language can be).
``same-as PATH`` / ``in PATH``
    the block is exactly the file PATH of this repository / appears in it verbatim.
``ci``
    every command of the block is a line of ``.ci/run`` (which runs it).
``skip: REASON``
    not run; the reason is required.
``text`` or no language
    output or a diagram: not run.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*/README.md")]
)
#: Seconds one block may take.
BLOCK_TIMEOUT = 240
MARKER = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(```|~~~)\s*([\w+-]*)\s*$")
SHELLS = ("sh", "bash", "console", "shell")
TEXT = ("", "text")


@dataclass
class Block:
    """One fenced block: where it is, its language and text, its directives."""

    doc: Path
    line: int
    lang: str
    text: str
    directives: list[str] = field(default_factory=list)

    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    found: list[Block] = []
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence.group(1):
            body.append(lines[i])
            i += 1
        prior = next((x.strip() for x in reversed(lines[:start]) if x.strip()), "")
        marker = MARKER.match(prior)
        text = marker.group(1) if marker else ""
        # a skip's reason is free text (it may hold ';'): it takes the whole marker
        directives = [text] if text.startswith("skip") else [d.strip() for d in text.split(";")]
        directives = [d for d in directives if d]
        found.append(Block(doc, start + 1, fence.group(2), "\n".join(body) + "\n", directives))
        i += 1
    return found


class DocRun:
    """Runs one document's blocks in order, in one directory."""

    def __init__(self, doc: Path, work: Path) -> None:
        self.doc = doc
        self.work = work
        self.plugins = work / "doc-plugins"
        self.plugins.mkdir()
        self.dist = self.plugins / "doc_test_plugins-0.1.dist-info"
        self.dist.mkdir()
        (self.dist / "METADATA").write_text("Metadata-Version: 2.1\nName: doc-test-plugins\n")
        self.entry_points: dict[str, str] = {}
        self.ran: list[str] = []
        (work / ".venv").symlink_to(Path(sys.prefix))
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(self.plugins),
                                                        os.environ.get("PYTHONPATH")])),
        }  # fmt: skip

    def run(self, block: Block) -> None:
        directives = block.directives
        for directive in directives:
            self.directive(block, directive)
        kinds = {d.split()[0].rstrip(":") for d in directives if d}
        if kinds & {"skip", "plugin", "pytest", "file", "ci"} or block.lang in TEXT:
            return
        if block.lang in SHELLS:
            self.shell(block)
        elif block.lang == "python":
            self.process(block, [sys.executable, "-c", block.text])
        elif block.lang == "toml":
            tomllib.loads(block.text)
        else:
            pytest.fail(f"{block.where()}: a {block.lang!r} block: mark it (doc-test: ...)")

    def directive(self, block: Block, directive: str) -> None:
        verb, _, rest = directive.partition(" ")
        if verb == "skip:" or verb == "skip":
            assert rest.strip(), f"{block.where()}: 'skip' needs a reason"
        elif verb == "run":
            assert block.lang in SHELLS, f"{block.where()}: 'run' is for shell blocks"
        elif verb == "same-as":
            assert block.text == (ROOT / rest).read_text(), f"{block.where()} differs from {rest}"
        elif verb == "in":
            assert block.text.strip() in (ROOT / rest).read_text(), (
                f"{block.where()} is not in {rest}"
            )
        elif verb == "file":
            (self.work / rest).write_text(block.text)
        elif verb == "plugin":
            self.register(block, rest)
        elif verb == "pytest":
            self.pytest(block)
        elif verb == "ci":
            ci = (ROOT / ".ci" / "run").read_text().splitlines()
            for command in commands(block.text):
                assert command in ci, f"{block.where()}: .ci/run does not run {command!r}"
        else:
            pytest.fail(f"{block.where()}: unknown doc-test directive {directive!r}")

    def register(self, block: Block, name: str) -> None:
        tree = ast.parse(block.text)
        classes = [
            node.name
            for node in tree.body
            if isinstance(node, ast.ClassDef)
            and any(isinstance(b, ast.Name) and b.id == "Plugin" for b in node.bases)
        ]
        assert len(classes) == 1, f"{block.where()}: one Plugin subclass expected: {classes}"
        module = "doc_plugin_" + re.sub(r"\W", "_", name)
        (self.plugins / f"{module}.py").write_text(block.text)
        self.entry_points[name] = f"{module}:{classes[0]}"
        (self.dist / "entry_points.txt").write_text(
            "[ivshmem.peers]\n" + "".join(f"{k} = {v}\n" for k, v in self.entry_points.items())
        )

    def pytest(self, block: Block) -> None:
        project = self.work / f"pytest-{block.line}"
        project.mkdir()
        (project / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
        (project / "test_doc.py").write_text(block.text)
        self.process(
            block, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=project
        )

    def shell(self, block: Block) -> None:
        self.ran.append(block.text)
        self.process(block, ["bash", "-c", "set -e -o pipefail\n" + block.text])

    def process(self, block: Block, argv: list[str], cwd: Path | None = None) -> None:
        child = subprocess.Popen(
            argv, cwd=cwd or self.work, env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = child.communicate(timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, _ = child.communicate()
            pytest.fail(f"{block.where()}: still running after {BLOCK_TIMEOUT} s:\n{out.decode()}")
        assert child.returncode == 0, (
            f"{block.where()}: exit status {child.returncode}:\n{block.text}\n"
            f"--- output ---\n{out.decode()}"
        )

    def check_plugins_ran(self) -> None:
        for name in self.entry_points:
            assert any(f"--plugin {name}" in text for text in self.ran), (
                f"{self.doc.relative_to(ROOT)}: plugin {name!r} is never run by a block"
            )


def commands(text: str) -> list[str]:
    """The commands of a shell block (continuations joined, comments and blanks dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_block_runs_as_written(doc: Path, tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    run = DocRun(doc, tmp_path)
    for block in blocks(doc):
        run.run(block)
    run.check_plugins_ran()


def test_the_markers_are_understood_and_the_readme_starts_with_its_commands() -> None:
    """A marker the runner does not know would silently skip a block."""
    known = {"skip:", "skip", "run", "same-as", "in", "file", "plugin", "pytest", "ci"}
    for doc in DOCUMENTS:
        for block in blocks(doc):
            for directive in block.directives:
                assert directive.split(" ")[0] in known, (block.where(), directive)
    first = blocks(ROOT / "README.md")[:2]
    assert [b.directives for b in first] == [["ci"], ["ci"]]
    assert ".venv/bin/ivshmemctl up --peers 2 --plugin ping --count 20000" in first[0].text
    ci = (ROOT / ".ci" / "run").read_text().rstrip().splitlines()
    assert ci[-1] == first[1].text.strip()  # .ci/run ends with exactly the test command
