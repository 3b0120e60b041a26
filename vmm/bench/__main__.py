"""``python -m vmm.bench {pagetable,dirty-log,access} ...``: see :mod:`vmm.bench`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Final

from ..errors import VmmError
from ..pte import MODES
from ..sizes import positive_size_argument as size_type
from . import check_host_memory
from .access import ACCESS_ROWS, ROW_TITLES, run_access_bench
from .dirtylog import compare_with_per_page, run_dirty_log_perf
from .pagetable import BACKINGS, STAGES, run_page_table_test

#: The project's exit statuses (``ivshmemd.exitcodes`` owns them; vmm imports nothing of
#: ours, so it names the three it uses: a test checks they agree).
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vmm.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    pt = sub.add_parser("pagetable", help="kvm_page_table_test: CREATE/UPDATE/ADJUST stages")
    pt.add_argument("-b", dest="size", type=size_type, default=1 << 30, help="memory size (1G)")
    pt.add_argument("-v", dest="vcpus", type=_positive, default=1, help="vCPUs (1)")
    pt.add_argument("-s", dest="backing", choices=BACKINGS, default="anonymous")
    pt.add_argument("-m", dest="mode", choices=sorted(MODES), default="sv39x4")
    pt.add_argument(
        "--debug-skip-tlbi",
        action="store_true",
        help="skip the TLB invalidation before a coalesce (expect a TLB conflict)",
    )
    pt.add_argument("--json", action="store_true", help="print one JSON object")
    dl = sub.add_parser("dirty-log", help="dirty_log_perf_test and the per-page comparison")
    dl.add_argument("-b", dest="size", type=size_type, default=1 << 30, help="memory per vCPU (1G)")
    dl.add_argument("-v", dest="vcpus", type=_positive, default=1, help="vCPUs (1)")
    dl.add_argument("-i", dest="iterations", type=_positive, default=2, help="iterations (2)")
    dl.add_argument(
        "-g",
        dest="no_manual",
        action="store_true",
        help="no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET clears and re-protects",
    )
    dl.add_argument("-m", dest="mode", choices=sorted(MODES), default="sv39x4")
    dl.add_argument("--no-compare", action="store_true", help="skip the per-page comparison")
    dl.add_argument("--json", action="store_true", help="print one JSON object")
    ac = sub.add_parser("access", help="the per-access path against struct.pack_into")
    ac.add_argument(
        "-b",
        dest="size",
        type=size_type,
        default=256 << 20,
        help="memslot size (256M)",
    )
    ac.add_argument("-n", dest="count", type=_positive, default=20_000, help="accesses per batch")
    ac.add_argument("-r", dest="repeats", type=_positive, default=5, help="batches (median)")
    ac.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _pagetable(args: argparse.Namespace) -> int:
    result = run_page_table_test(
        args.size,
        args.vcpus,
        args.backing,
        args.mode,
        debug_skip_coalesce_tlbi=args.debug_skip_tlbi,
        record_levels=False,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "bench": "pagetable",
                    "mode": result.mode,
                    "backing": result.backing,
                    "size": result.size,
                    "vcpus": result.vcpus,
                    "times": result.times,
                    "total": result.total,
                    "table_pages": result.table_pages,
                    "tlb_conflict": result.tlb_conflict,
                }
            )
        )
    else:
        print(f"Testing guest mode: {result.mode}")
        print(f"Testing memory backing src type: {result.backing}")
        print(f"Testing memory size(aligned): {result.size:#x}")
        print(f"Guest physical test memory offset: {result.gpa:#x}")
        print(f"Number of testing vCPUs: {result.vcpus}")
        for stage in STAGES:
            if stage in result.times:
                print(f"{stage}: total execution time: {result.times[stage]:.9f}s")
        print(f"All stages: {result.total:.9f}s; table pages at the end: {result.table_pages}")
        if result.tlb_conflict:
            print(f"TLB conflict: {result.tlb_conflict}")
    return EXIT_FAILED if result.tlb_conflict and not args.debug_skip_tlbi else EXIT_OK


def _dirty_log(args: argparse.Namespace) -> int:
    res = run_dirty_log_perf(args.size, args.vcpus, args.iterations, not args.no_manual, args.mode)
    comparison = None if args.no_compare else compare_with_per_page(args.size, args.mode)
    if args.json:
        out: dict[str, object] = {
            "bench": "dirty-log",
            "size": res.size,
            "vcpus": res.vcpus,
            "manual_protect": res.manual_protect,
            "populate": res.populate,
            "enable": res.enable,
            "dirty": res.dirty,
            "get": res.get,
            "clear": res.clear,
            "disable": res.disable,
            "dirty_pages": res.dirty_pages,
        }
        if comparison is not None:
            out["compare"] = {
                "size": comparison.size,
                "bulk": comparison.bulk,
                "per_page": comparison.per_page,
                "speedup": {op: comparison.ratio(op) for op in comparison.bulk},
                "table_bytes": comparison.table_bytes,
                "hardware_bytes": comparison.hardware_bytes,
                "memory_ratio": comparison.memory_ratio,
            }
        print(json.dumps(out))
        return EXIT_OK
    # The lines of tools/testing/selftests/kvm/dirty_log_perf_test.c, same wording.
    print(f"Test iterations: {res.iterations}")
    print(f"Populate memory time: {res.populate:.9f}s")
    print(f"Enabling dirty logging time: {res.enable:.9f}s")
    print()
    for i, dirty in enumerate(res.dirty, 1):
        print(f"Iteration {i} dirty memory time: {dirty:.9f}s")
        print(f"Iteration {i} get dirty log time: {res.get[i - 1]:.9f}s")
        if res.clear:
            print(f"Iteration {i} clear dirty log time: {res.clear[i - 1]:.9f}s")
    print(f"Disabling dirty logging time: {res.disable:.9f}s")
    n = len(res.get)
    print(
        f"Get dirty log over {n} iterations took {sum(res.get):.9f}s. "
        f"(Avg {sum(res.get) / n:.9f}s/iteration)"
    )
    if res.clear:
        print(
            f"Clear dirty log over {n} iterations took {sum(res.clear):.9f}s. "
            f"(Avg {sum(res.clear) / n:.9f}s/iteration)"
        )
    print(f"Dirty pages per iteration: {', '.join(str(p) for p in res.dirty_pages)}")
    if comparison is not None:
        print(f"Bulk walker vs per-page walker on {comparison.size:#x} bytes of 4K pages:")
        for op in comparison.bulk:
            print(
                f"  {op:10s} bulk {comparison.bulk[op] * 1e3:10.3f} ms   per-page "
                f"{comparison.per_page[op] * 1e3:10.1f} ms   speed-up "
                f"{comparison.ratio(op):8.1f}x"
            )
        print(
            f"Page-table memory: {comparison.table_bytes} bytes for "
            f"{comparison.hardware_bytes} bytes of hardware layout "
            f"({comparison.memory_ratio:.4f}x)"
        )
    return EXIT_OK


def _access(args: argparse.Namespace) -> int:
    res = run_access_bench(args.size, args.count, args.repeats)
    if args.json:
        rows = {
            row: {"ours_ns": res.ours_ns[row], "raw_ns": res.raw_ns[row], "ratio": res.ratio(row)}
            for row in ACCESS_ROWS
        }
        print(json.dumps({"bench": "access", "size": res.span, "count": res.count, "rows": rows}))
        return EXIT_OK
    print(
        f"per-access figures over a {res.span >> 20} MiB memslot (median of {res.repeats} "
        f"batches of {res.count}; raw = struct.pack_into on a bytearray, same offsets):"
    )
    for row in ACCESS_ROWS:
        print(
            f"  {ROW_TITLES[row]:40s} {res.ours_ns[row] / 1000:8.3f} us   raw "
            f"{res.raw_ns[row] / 1000:6.3f} us   {res.ratio(row):6.1f}x raw"
        )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        vcpus = args.vcpus if args.bench == "dirty-log" else 1
        check_host_memory(args.size * vcpus * (2 if args.bench == "access" else 1))
        if args.bench == "pagetable":
            return _pagetable(args)
        if args.bench == "access":
            return _access(args)
        return _dirty_log(args)
    except (VmmError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("error: not enough host memory for this size", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
