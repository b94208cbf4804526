#!/usr/bin/env python3
"""Summarises a cubecl profiling log (`[profiling.logger] level = "basic"`), as written by
`.ci/gpu-check`'s part `profile`: cubecl prints one table per device sync, so each table is
one part of `sdw bench` (CLIP, a UNet step, the VAE, ...). Prints every table's total and
kernel count, then the largest kernels of the tables named by --show (default: the two
tables with the most kernels, i.e. the cold and the warm UNet step).

usage: profile-summary.py KERNELS_LOG [--top N] [--show I,J,...]"""
import re
import sys

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def seconds(text):
    m = re.fullmatch(r"([0-9.]+)\s*(ns|µs|us|ms|s)", text.strip())
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def tables(lines):
    """Yields each summary table as a list of (name, seconds, count)."""
    rows, inside = [], False
    for line in lines:
        # Kernel names hold " | " themselves: the last three cells are duration, count, ratio.
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4:
            continue
        name, duration, count = " | ".join(cells[:-3]), cells[-3], cells[-2]
        if name == "Name" and duration == "Duration":
            rows, inside = [], True
        elif inside and name == "Total":
            inside = False
            yield rows
        elif inside and seconds(duration) is not None and count.isdigit():
            rows.append((name, seconds(duration), int(count)))


def main():
    args = sys.argv[1:]
    top = int(args[args.index("--top") + 1]) if "--top" in args else 25
    found = list(tables(open(args[0], encoding="utf-8", errors="replace")))
    for i, t in enumerate(found):
        print(f"table {i}: {sum(r[1] for r in t) * 1e3:9.2f} ms in {sum(r[2] for r in t):6d} kernels")
    if "--show" in args:
        show = [int(i) for i in args[args.index("--show") + 1].split(",")]
    else:
        counts = sorted(range(len(found)), key=lambda i: -sum(r[2] for r in found[i]))
        show = sorted(counts[:2])
    for i in show:
        if i >= len(found):
            continue
        total = sum(r[1] for r in found[i])
        print(f"\n== table {i}: {total * 1e3:.2f} ms")
        for name, s, n in sorted(found[i], key=lambda r: -r[1])[:top]:
            print(f"{s * 1e3:9.3f} ms {100 * s / total:5.1f} % {n:6d}x  {name[:150]}")


if __name__ == "__main__":
    main()
