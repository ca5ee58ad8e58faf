"""CRC32C (Castagnoli, reflected polynomial 0x82F63B78, init/xorout 0xFFFFFFFF).

The same CRC as the kernel's ``crc32c()`` (lib/crc32.c via crypto "crc32c"), so the C
reader can check what the Python writer produced. Several Python implementations exist and
their speed differs about 50x (ecosystem.md section 5); the fastest one available is picked
at import time and reported by ``handover --version``:

1. ``google_crc32c`` with its C extension (hardware SSE4.2 / PCLMUL),
2. ``crcmod``'s C extension,
3. ``crcmod``'s pure-Python fallback (crcmod installs silently without its extension),
4. a table-driven pure-Python implementation here (last resort, no third-party module).

``crc32c(data, crc=0)`` continues a running CRC, like zlib.crc32: ``crc32c(b, crc32c(a)) ==
crc32c(a + b)``.
"""

from __future__ import annotations

CRC32C_POLY_REFLECTED = 0x82F63B78
CRC32C_CHECK = 0xE3069283  # crc32c(b"123456789"), the catalogue check value
_CHUNK = 256 << 10


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ CRC32C_POLY_REFLECTED if c & 1 else c >> 1
        table.append(c)
    return table


def _py_crc32c(data, crc: int = 0) -> int:
    table = _TABLE
    c = crc ^ 0xFFFFFFFF
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


_TABLE = _make_table()


def _select():
    try:
        import google_crc32c  # type: ignore

        if google_crc32c.implementation == "c":
            ext = google_crc32c.extend

            def crc(data, crc: int = 0) -> int:
                if isinstance(data, bytes):
                    return ext(crc, data)
                # it takes bytes only: copy buffers (mmap, memoryview) in cache-sized pieces,
                # ~4x faster than one big copy (19 MB: 1.5 ms instead of 6 ms)
                mv = memoryview(data).cast("B")
                for i in range(0, len(mv), _CHUNK):
                    crc = ext(crc, bytes(mv[i:i + _CHUNK]))
                return crc

            return crc, "google-crc32c (C extension)"
    except ImportError:
        pass
    try:
        import crcmod  # type: ignore
        import crcmod.predefined  # type: ignore

        fn = crcmod.predefined.mkPredefinedCrcFun("crc-32c")
        try:
            from crcmod import _crcfunext  # type: ignore  # noqa: F401

            name = "crcmod (C extension)"
        except ImportError:
            name = "crcmod (pure Python fallback: slow)"

        def crc(data, crc: int = 0) -> int:
            return fn(data, crc)

        return crc, name
    except ImportError:
        pass
    return _py_crc32c, "built-in table (pure Python: slow)"


crc32c, IMPLEMENTATION = _select()

assert crc32c(b"123456789") == CRC32C_CHECK, IMPLEMENTATION
