#!/usr/bin/env python3
"""Prints docs/distributed.md's table of the ring's scaling model:
`lookback cost --ranks P --context N --format json` for P = 2..1024 and
n = 128k..4M, at a fixed kernel rate so that the table does not depend on
the machine that prints it.

    scripts/ring_model_table.py build/bin/lookback [RATE_GFLOPS] [LINK_GBPS]
"""
import json
import subprocess
import sys


def seconds(s):
    if s >= 3600:
        return f"{s / 3600:.3g} h"
    if s >= 100:
        return f"{s:.0f} s"
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def size(b):
    return f"{b / 1e9:.3g} GB" if b >= 1e9 else f"{b / 1e6:.3g} MB"


def main():
    lookback = sys.argv[1]
    rate = sys.argv[2] if len(sys.argv) > 2 else "100"
    link = sys.argv[3] if len(sys.argv) > 3 else "100"
    print("| P | n | zigzag time | plain-ring time | zigzag eff. | plain eff. "
          "| compute / step (busiest rank) | K/V sent / step | link that hides it |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in (131072, 524288, 1048576, 4194304):
        for ranks in (2, 8, 32, 128, 512, 1024):
            model = json.loads(subprocess.run(
                [lookback, "cost", "--ranks", str(ranks), "--context", str(n), "--rate", rate,
                 "--link-gbps", link, "--format", "json"],
                capture_output=True, text=True, check=True).stdout)
            zigzag, plain = model["zigzag"], model["plain"]
            step = zigzag["compute_s"] / zigzag["steps"]
            needed = zigzag["largest_step_bytes"] * 8 / step / 1e9
            print(f"| {ranks} | {n // 1024}k | {seconds(zigzag['time_s'])} "
                  f"| {seconds(plain['time_s'])} | {100 * zigzag['efficiency']:.1f}% "
                  f"| {100 * plain['efficiency']:.1f}% | {seconds(step)} "
                  f"| {size(zigzag['largest_step_bytes'])} | {needed:.3g} Gbit/s |")


if __name__ == "__main__":
    main()
