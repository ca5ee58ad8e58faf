"""Build small ELF64 little-endian files for tests: PT_NOTE and PT_LOAD segments.

Only what pyelftools needs to read program headers; no sections.
"""

from __future__ import annotations

import struct


def note(name: str, ntype: int, desc: bytes) -> bytes:
    n = name.encode() + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(n), len(desc), ntype) + pad(n) + pad(desc)


def elf(segments: list[tuple[str, bytes, int]], e_type: int = 4) -> bytes:
    """segments: (kind "note"|"load", data, paddr). e_type 4 = ET_CORE, 2 = ET_EXEC."""
    ehsize, phentsize = 64, 56
    phoff = ehsize
    data_off = phoff + phentsize * len(segments)
    phdrs, body = [], b""
    for kind, data, paddr in segments:
        off = data_off + len(body)
        p_type = 4 if kind == "note" else 1
        phdrs.append(struct.pack("<IIQQQQQQ", p_type, 4, off, 0xFFFFFFFF80000000 + paddr, paddr,
                                 len(data), len(data), 4 if kind == "note" else 4096))
        body += data + b"\0" * (-len(data) % 8)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    hdr = ident + struct.pack("<HHIQQQIHHHHHH", e_type, 62, 1, 0, phoff, 0, 0, ehsize, phentsize,
                              len(segments), 64, 0, 0)
    return hdr + b"".join(phdrs) + body
