"""Where a CUDA kernel's warps wait, instruction by instruction, from Nsight Compute's sampling.

Kernel-level ncu metrics say "latency-bound"; the per-instruction stall samples say which
latency. On the GPU machine:

    ncu --section SourceCounters -k regex:grads_kernel --launch-count 1 -o /tmp/rep \\
        python3 my_run.py
    ncu -i /tmp/rep.ncu-rep --page source --csv --print-source sass | gzip > sass.csv.gz

then anywhere:

    python3 bench/ncu_stalls.py sass.csv.gz [--kernel grads] [--top 25] [--region 250]

prints, per kernel: the samples by stall reason and by opcode, the instructions holding the
most samples with their main reasons, and the samples per region of consecutive instructions
(inlined helpers show up as regions). A share of the samples is a share of warp-time, so a
barrier where 15 of 16 warps wait for one shows up on the instruction after the barrier.
(Session 10 found this way a sunk register prefetch, reloads at an item's end, and warp-0 side
jobs in front of barriers: bench/NOTES.md.)
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import sys
from dataclasses import dataclass, field

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


@dataclass
class Kernel:
    name: str
    reasons: list[str] = field(default_factory=list)  # "stall_*" columns, all samples
    rows: list[dict[str, str]] = field(default_factory=list)

    def samples(self, row: dict[str, str]) -> int:
        return _int(row.get(SAMPLES))

    def total(self) -> int:
        return sum(self.samples(r) for r in self.rows)

    def by_reason(self, rows: list[dict[str, str]]) -> collections.Counter:
        """The samples of `rows` by stall reason ("stall_" dropped)."""
        return collections.Counter(
            {r[len("stall_"):]: sum(_int(row.get(r)) for row in rows) for r in self.reasons})


def _int(text: str | None) -> int:
    try:
        return int(float(text)) if text not in (None, "", "-") else 0
    except ValueError:
        return 0


def _open_text(path: str):
    if path == "-":
        return sys.stdin
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_kernels(path: str) -> list[Kernel]:
    """The kernels of an `ncu --page source --csv --print-source sass` export, in file order."""
    kernels: list[Kernel] = []
    header: list[str] | None = None
    with _open_text(path) as f:
        for record in csv.reader(f):
            if not record:
                continue
            if record[0] == "Kernel Name":
                kernels.append(Kernel(record[1] if len(record) > 1 else "?"))
                header = None
            elif record[0] == "Address":
                header = record
                if kernels:
                    kernels[-1].reasons = [h for h in record
                                           if h.startswith("stall_") and "Not Issued" not in h]
            elif header is not None and kernels:
                kernels[-1].rows.append(dict(zip(header, record)))
    return kernels


def opcode(source: str) -> str:
    """The instruction's opcode, predicate dropped: '@!P0 LDG.E.128 R4, ...' -> 'LDG.E.128'."""
    words = source.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else "?"


def _shares(counter: collections.Counter, total: int, n: int) -> str:
    return ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in counter.most_common(n) if v)


def summary(kernel: Kernel, top: int = 20, region: int = 250) -> str:
    """The report for one kernel (see the module's docstring)."""
    total = kernel.total()
    lines = [f"{kernel.name[:150]}", f"  instructions {len(kernel.rows)}, samples {total}"]
    if total == 0:
        return "\n".join(lines + ["  (no samples: was SourceCounters collected?)"])
    by_opcode: collections.Counter = collections.Counter()
    for row in kernel.rows:
        by_opcode[opcode(row.get("Source", ""))] += kernel.samples(row)
    lines.append("  by reason: " + _shares(kernel.by_reason(kernel.rows), total, 9))
    lines.append("  by opcode: " + _shares(by_opcode, total, 12))
    lines.append(f"  top {top} instructions (index, share, executed, source, main reasons):")
    ranked = sorted(enumerate(kernel.rows), key=lambda ir: -kernel.samples(ir[1]))[:top]
    for index, row in ranked:
        main = sorted(((_int(row.get(r)), r[len("stall_"):]) for r in kernel.reasons),
                      reverse=True)[:3]
        why = " ".join(f"{name}:{count}" for count, name in main if count)
        lines.append(f"  {index:6d} {100 * kernel.samples(row) / total:5.2f}% "
                     f"{_int(row.get(EXECUTED)):>11d}  {row.get('Source', '').strip()[:58]:58s} "
                     f"{why}")
    lines.append(f"  by region of {region} instructions (share, main reasons):")
    for start in range(0, len(kernel.rows), region):
        part = kernel.rows[start:start + region]
        share = sum(kernel.samples(r) for r in part)
        if share == 0:
            continue
        lines.append(f"  {start:6d}-{start + len(part) - 1:<6d} {100 * share / total:5.1f}%  "
                     + _shares(kernel.by_reason(part), total, 4))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", help="ncu source-page CSV (SASS), plain or gzipped; - for stdin")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this")
    parser.add_argument("--top", type=int, default=20, help="instructions to list")
    parser.add_argument("--region", type=int, default=250, help="instructions per region")
    args = parser.parse_args(argv)
    kernels = [k for k in read_kernels(args.csv) if args.kernel in k.name]
    if not kernels:
        print(f"no kernel matching {args.kernel!r} in {args.csv}", file=sys.stderr)
        return 1
    print("\n\n".join(summary(k, args.top, args.region) for k in kernels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
