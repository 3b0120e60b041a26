"""vmm.sizes: the project's one size grammar, a superset of QEMU's qemu_strtosz."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmm.sizes import SIZE_LIMIT, SizeError, parse_size

K, M, G, E = 1 << 10, 1 << 20, 1 << 30, 1 << 60


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # accepted by QEMU 7.2 (-object memory-backend-ram,size=...), same bytes
        ("4096", 4096),
        ("4096B", 4096),
        ("64k", 64 * K),
        ("64K", 64 * K),
        ("1.5M", 3 * M // 2),
        ("1.k", K),
        ("1.", 1),
        ("1.0", 1),
        ("0.5k", 512),
        ("00012k", 12 * K),
        ("12.345M", int(12.345 * M)),  # truncated to whole bytes
        (" 64K", 64 * K),
        ("0x1000", 4096),
        ("0x10K", 16 * K),  # deprecated in QEMU 7.2, still accepted
        ("0x1E", 30),  # E is a hex digit after 0x
        ("1E", E),
        ("15.5E", 31 * E // 2),
        ("0xffffffffffffffff", SIZE_LIMIT),
        # beyond QEMU
        ("64KiB", 64 * K),
        ("2gib", 2 * G),
        ("64K ", 64 * K),
    ],
)
def test_accepted_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty size"),
        ("   ", "empty size"),
        ("lots", "invalid size 'lots'"),
        ("-1", "invalid size"),
        ("1e3", "invalid size"),
        ("64kb", "invalid size"),
        ("1.5", "a fraction needs a suffix"),
        ("1.5B", "a fraction needs a suffix"),
        ("1Q", "unknown suffix 'Q'"),
        ("1BiB", "'iB' belongs after"),
        ("0x1.5", "invalid size"),
        ("16E", "too large"),
        ("0x10000000000000000", "too large"),
    ],
)
def test_refused_sizes_say_why(text: str, message: str) -> None:
    with pytest.raises(SizeError, match=message):
        parse_size(text)
    assert issubclass(SizeError, ValueError)


def test_importing_the_grammar_loads_neither_numpy_nor_the_model() -> None:
    code = (
        "import sys, vmm.sizes; "
        "print(sorted(m for m in sys.modules if m == 'numpy' or m.startswith('vmm.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['vmm.sizes']"


def test_lazy_package_keeps_every_public_name() -> None:
    import vmm

    for name in vmm.__all__:
        assert getattr(vmm, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = vmm.nothing  # type: ignore[attr-defined]
