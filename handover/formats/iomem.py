"""The text of /proc/iomem: the one parser (the host readers and the region discovery use
it). Pure: the caller reads the file."""

from __future__ import annotations

import re

_IOMEM_LINE = re.compile(r"^( *)([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.*)$")


def parse_iomem(text: str) -> list[tuple[int, int, str, int]]:
    """/proc/iomem text -> [(start, end, name, depth)] in file order (depth = indentation
    / 2). Raises ValueError naming the first line that is not a range."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _IOMEM_LINE.match(line)
        if not m:
            raise ValueError(f"/proc/iomem: line {n}: unexpected text {line[:80]!r}")
        out.append((int(m.group(2), 16), int(m.group(3), 16), m.group(4).strip(),
                    len(m.group(1)) // 2))
    return out
