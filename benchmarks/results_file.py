"""benchmarks/RESULTS.md: one '## <title>' section per benchmark, replaced in place.

PAGEDKV_RESULTS names another file to write (a test's, a scratch run's)."""
from __future__ import annotations

import os
import re

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
HEADER = ("# Benchmark results\n\nEach section: what was measured, the numbers, and the command "
          "that produced them.\n")


def write_section(title: str, body: str, path: str | None = None) -> None:
    path = path or os.environ.get("PAGEDKV_RESULTS") or PATH
    text = open(path).read() if os.path.exists(path) else HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n")
