"""The benchmark commands run, print what they promise and refuse bad input clearly."""

from __future__ import annotations

import json

import pytest

from vmm.bench import parse_size
from vmm.bench.__main__ import main


def test_parse_size() -> None:
    assert parse_size("1G") == 1 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("64KiB") == 64 << 10
    with pytest.raises(ValueError, match="invalid size 'lots'"):
        parse_size("lots")
    with pytest.raises(ValueError, match="positive"):
        parse_size("0")


def test_pagetable_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pagetable", "-b", "8M", "-v", "2", "-s", "thp", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["times"]) == {
        "KVM_CREATE_MAPPINGS",
        "KVM_UPDATE_MAPPINGS",
        "KVM_ADJUST_MAPPINGS",
    }
    assert out["tlb_conflict"] is None and out["vcpus"] == 2


def test_pagetable_text_and_conflict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pagetable", "-b", "4M", "-s", "hugetlb", "--debug-skip-tlbi"]) == 0
    text = capsys.readouterr().out
    assert "KVM_CREATE_MAPPINGS: total execution time:" in text
    assert "TLB conflict" in text


def test_dirty_log_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dirty-log", "-b", "4M", "-i", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dirty_pages"] == [1024, 1024]
    assert set(out["compare"]["speedup"]) == {"wp", "unmap", "get+clear"}
    assert out["compare"]["memory_ratio"] >= 1.0
    assert main(["dirty-log", "-b", "4M", "-g", "--no-compare"]) == 0
    assert "clear dirty log" not in capsys.readouterr().out


def test_too_much_memory_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pagetable", "-b", "64T"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_access_rows_beside_the_raw_store(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["access", "-b", "4M", "-n", "200", "-r", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["rows"]) == {"tlb_hit", "tlb_miss", "first_touch"}
    for row in out["rows"].values():
        assert row["ours_ns"] > 0 and row["raw_ns"] > 0
        assert row["ratio"] == pytest.approx(row["ours_ns"] / row["raw_ns"])
    assert main(["access", "-b", "4M", "-n", "100", "-r", "1"]) == 0
    text = capsys.readouterr().out
    assert "vcpu.write64, TLB hit" in text and "x raw" in text


def test_dirty_log_prints_the_selftests_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dirty-log", "-b", "4M", "-i", "3", "--no-compare"]) == 0
    text = capsys.readouterr().out
    for line in (
        "Iteration 1 dirty memory time: ",
        "Iteration 3 clear dirty log time: ",
        "Get dirty log over 3 iterations took ",
        "Clear dirty log over 3 iterations took ",
    ):
        assert line in text
