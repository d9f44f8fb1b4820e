"""Runs a build command and prints a short progress summary instead of its full output.

ninja echoes every compiler command line (hundreds of characters each); this prints
one line per compiled file instead, `[3/9] csrc/cpu/attention.cpp`, and passes every
other line through, so compiler warnings and errors still show. The whole output is
kept in build/build.log; a failed build prints its last lines and where the log is.
Standard library only.

    python scripts/quiet_build.py COMMAND...
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

PROGRESS = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")
SOURCE = re.compile(r"(?:^|\s)-c\s+(\S+\.(?:cpp|cu|cc|c))(?:\s|$)")
DROPPED = ("No CUDA runtime is found",)  # torch says it on any machine without a GPU
LOG = os.path.join("build", "build.log")
TAIL_LINES = 40


def summarize(line: str, root: str) -> str | None:
    """The line to print for one line of build output, or None to print nothing."""
    if any(d in line for d in DROPPED):
        return None
    m = PROGRESS.match(line)
    if m is None:
        return line
    done, total, command = m.groups()
    src = SOURCE.search(command)
    what = os.path.relpath(src.group(1), root) if src else command.split()[0]
    return f"[{done}/{total}] {what}"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    root = os.getcwd()
    os.makedirs(os.path.dirname(LOG), exist_ok=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    with open(LOG, "w") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        for raw in proc.stdout:
            log.write(raw)
            line = raw.rstrip("\n")
            lines.append(line)
            shown = summarize(line, root)
            if shown is not None:
                print(shown, flush=True)
        rc = proc.wait()
    if rc:
        print(f"build failed (exit {rc}); its last {TAIL_LINES} lines:", file=sys.stderr)
        print("\n".join(lines[-TAIL_LINES:]), file=sys.stderr)
        print(f"full output: {LOG}", file=sys.stderr)
        return rc
    print(f"built in {time.perf_counter() - t0:.0f} s (full output: {LOG})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
