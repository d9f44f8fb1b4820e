"""The prefix cache's host and disk tiers on case study 1 with a second turn.

64 conversations share a 500-token system prompt; each has a 50-200-token first user
turn and an 8-token reply, then comes back with a second turn (first prompt + reply +
a new 50-200-token turn). The KV cache (320 blocks of 16 tokens) holds the system
prompt and about a third of the conversations, so most first turns are evicted before
their second turn. Engines without tiers, with a host tier and with a disk tier run both
turns (stepped in turns); then fresh engines run the second turns alone, without and
with the disk tier's directory (a cold restart). The demo model (programs/demo.py),
compiled, float32, one thread. The numbers are the second turns'.

    python -m benchmarks.bench_tiers [--write-results]   (= pagedkv demo --tiers)
"""
from __future__ import annotations

import os
import sys
import time

from torch_pagedkv.programs import demo

from . import machine
from .results_file import write_section

COMMAND = "python -m benchmarks.bench_tiers --write-results"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    write = "--write-results" in argv
    if write:
        argv.remove("--write-results")
    print(machine.line(1), flush=True)  # the demo runs on one thread
    json_path = f"/tmp/bench_tiers_{os.getpid()}.json"
    t0 = time.perf_counter()
    rc = demo.main(["--tiers", "--quiet", "--json", json_path, *argv])
    if write:
        import json
        with open(json_path) as f:
            res = json.load(f)
        body = _section(res, time.perf_counter() - t0, os.getloadavg()[0])
        write_section("Prefix cache tiers (host, disk, restart)", body)
        print("wrote benchmarks/RESULTS.md")
    return rc


def _section(res: dict, seconds: float, load: float) -> str:
    from torch_pagedkv.programs.demo_tiers import tier_rows
    same = res.pop("outputs_identical")
    base, host, disk, cold, warm = res.values()
    io = max(r["tier_io_s"] / r["prefill_time_s"] for r in (host, disk, warm))
    lines = [machine.line(1) + ".", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             *tier_rows(res), "",
             f"Greedy outputs identical in all five runs: {'yes' if same else 'NO'}. "
             f"({seconds:.0f} s in all, load average {load:.1f} at the end.)", "",
             f"The host tier computes {host['prefill_tokens']:,} instead of "
             f"{base['prefill_tokens']:,} prompt tokens and prefills "
             f"{base['prefill_time_s'] / host['prefill_time_s']:.1f}x faster, the disk tier "
             f"{base['prefill_time_s'] / disk['prefill_time_s']:.1f}x; after a restart the disk "
             f"tier computes {warm['prefill_tokens']:,} instead of {cold['prefill_tokens']:,} "
             f"({cold['prefill_time_s'] / warm['prefill_time_s']:.1f}x faster prefill). The "
             f"tiers' own copies and file I/O (write-through of every cached block included) "
             f"take at most {io:.0%} of a tiered run's prefill time, so overlapping them with "
             "compute (async copies) would gain at most that: not done.",
             "", f"Command: `{COMMAND}` (or `pagedkv demo --tiers`)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
