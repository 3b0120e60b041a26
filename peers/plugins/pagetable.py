"""``pagetable``: the kvm_page_table_test workload, run inside a peer.

The peer runs :func:`vmm.bench.pagetable.run_page_table_test` (the model's version of KVM's
selftest) on a VM it builds with its own memslot of ``--size`` bytes on a ``--backing``
memory, with ``--vcpus`` vCPUs and the ``--mode`` stage-2 format: the three timed stages
KVM_CREATE_MAPPINGS, KVM_UPDATE_MAPPINGS (dirty logging on) and KVM_ADJUST_MAPPINGS (logging
off, split blocks coalesce back). It prints the stage times in the selftest's format,
reports them as a ``pagetable`` JSON event (with ``--report json``) and finishes; a TLB
conflict abort, or memory the host cannot give, fails the peer with the reason.

The workload runs once, from the ``start`` hook: it needs no partner, so any number of
``pagetable`` peers can share a daemon (``ivshmemctl up --peers N --plugin pagetable``).
"""

from __future__ import annotations

import argparse
import time
from typing import Final

from ivshmemd.argtypes import size
from ivshmemd.wording import plural

from ..plugin import Guest, Plugin

__all__ = ["PagetablePlugin", "format_result"]

DEFAULT_SIZE: Final = 64 << 20
MAX_VCPUS: Final = 512


def format_result(result: object) -> list[str]:
    """The selftest's lines for a :class:`vmm.bench.pagetable.PageTableTestResult`."""
    from vmm.bench.pagetable import STAGES, PageTableTestResult

    assert isinstance(result, PageTableTestResult)
    lines = [
        f"Testing guest mode: {result.mode}",
        f"Testing memory backing src type: {result.backing}",
        f"Testing memory size(aligned): {result.size:#x}",
        f"Guest physical test memory offset: {result.gpa:#x}",
        f"Number of testing vCPUs: {result.vcpus}",
        f"Number of testing stages: {len(STAGES)}",
    ]
    lines += [
        f"{stage}: total execution time: {result.times[stage]:.9f}s"
        for stage in STAGES
        if stage in result.times
    ]
    if result.tlb_conflict:
        lines.append(f"TLB conflict: {result.tlb_conflict}")
    return lines


class PagetablePlugin(Plugin):
    """Runs the kvm_page_table_test stages on its own VM and reports the stage times."""

    name = "pagetable"
    description = "kvm_page_table_test in a peer: CREATE/UPDATE/ADJUST_MAPPINGS stage times"

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        from vmm.bench.pagetable import BACKINGS
        from vmm.pte import MODES

        group.add_argument(
            "--size",
            dest="pt_size",
            type=size,
            default=DEFAULT_SIZE,
            metavar="SIZE",
            help="test memslot size (default 64M)",
        )
        group.add_argument(
            "--backing",
            choices=BACKINGS,
            default="anonymous",
            help="host memory behind the memslot (default anonymous)",
        )
        group.add_argument(
            "--vcpus",
            type=int,
            default=1,
            metavar="N",
            help="vCPUs walking the memslot (default 1)",
        )
        group.add_argument("--mode", dest="pt_mode", choices=sorted(MODES), default="sv39x4",
                           help="stage-2 page-table format (default sv39x4)")  # fmt: skip

    @classmethod
    def check_options(cls, options: argparse.Namespace) -> str | None:
        if options.pt_size < 1:
            return f"--size must be at least 1 byte, got {options.pt_size}"
        if not 1 <= options.vcpus <= MAX_VCPUS:
            return f"--vcpus must be 1..{MAX_VCPUS}, got {options.vcpus}"
        return None

    def start(self, guest: Guest) -> None:
        super().start(guest)
        from vmm.bench.pagetable import STAGES, run_page_table_test
        from vmm.errors import VmmError

        opts = self.options
        t0 = time.perf_counter()
        try:
            result = run_page_table_test(
                opts.pt_size, opts.vcpus, opts.backing, opts.pt_mode, record_levels=False
            )
        except MemoryError:
            guest.fail(f"pagetable: the host cannot give {opts.pt_size} bytes of memory")
            return
        except (VmmError, ValueError, OSError) as exc:
            guest.fail(f"pagetable: {type(exc).__name__}: {exc}")
            return
        elapsed = time.perf_counter() - t0
        lines = format_result(result)
        for line in lines:
            guest.log(line)
        guest.report(
            event="pagetable", mode=result.mode, backing=result.backing, size=result.size,
            vcpus=result.vcpus, times=dict(result.times), total=result.total,
            table_pages=result.table_pages, tlb_conflict=result.tlb_conflict,
        )  # fmt: skip
        if result.tlb_conflict:
            guest.fail(f"pagetable: TLB conflict abort: {result.tlb_conflict}")
            return
        missing = [stage for stage in STAGES if stage not in result.times]
        if missing:
            guest.fail(f"pagetable: stages did not run: {', '.join(missing)}")
            return
        guest.finish(
            f"pagetable: {len(result.times)} stages on {result.size:#x} bytes "
            f"({result.backing}, {plural(result.vcpus, 'vCPU')}, {result.mode}): "
            + ", ".join(f"{stage} {seconds:.6f}s" for stage, seconds in result.times.items())
            + f"; {result.table_pages} table pages; run {elapsed:.3f}s"
        )
