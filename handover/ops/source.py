"""Resolve a SOURCE argument: a blob file, or a pmem region holding saved generations."""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass, field

from ..errors import HandoverError, IntegrityError, NoStateError, VersionError
from ..formats.structs import MAGIC, MAX_BLOB_SIZE


@dataclass
class Loaded:
    state: object
    blob: bytes
    info: dict = field(default_factory=dict)   # kind, path, generation, slot, fallback, reason

    @property
    def fallback(self) -> bool:
        return bool(self.info.get("fallback"))


STDIN = "-"


def _stat(path: str) -> os.stat_result:
    """stat() of a SOURCE, its failures as one-line errors: only a path that is not there
    is "no saved state" (exit 3); permission, loops and the like are errors (exit 1)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise NoStateError(f"{path}: no saved state: no such file or device") from None
    except OSError as e:
        raise HandoverError(f"{path}: cannot read: {e.strerror or e}") from None


def read_blob(path: str, generation: int | None = None) -> tuple[bytes, dict]:
    """Return (blob, info) without decoding it.  ``-`` reads a blob from stdin."""
    if path == STDIN:
        if generation is not None:
            raise HandoverError("-: --generation needs a region, stdin carries one blob")
        return _read_stream(sys.stdin.buffer, "stdin"), {"kind": "stdin", "path": STDIN,
                                                          "fallback": False}
    st = _stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise HandoverError(f"{path}: is a directory, not a state or a region")
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        raise HandoverError(f"{path}: a FIFO or socket is not read as a SOURCE (it could block "
                            f"forever): give a file or a region, or - to read stdin")
    path = os.path.abspath(path)
    if _head(path) != MAGIC:  # a blob file needs no region layer (spares its import)
        from .. import pmem

        if pmem.probe(path):
            r = pmem.read_latest(path, generation=generation)
            info = {"kind": "region", "path": path, "generation": r.generation, "slot": r.slot,
                    "fallback": bool(r.fallback), "reason": r.reason}
            return r.blob, info
    return _read_file(path), {"kind": "file", "path": path, "fallback": False}


def _read_stream(f, name: str) -> bytes:
    data = f.read(MAX_BLOB_SIZE + 1)
    if len(data) > MAX_BLOB_SIZE:
        raise IntegrityError(f"{name}: more than {MAX_BLOB_SIZE} bytes: exceeds the limit "
                             f"for a state")
    return data


def _head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC))
    except OSError:  # e.g. device-dax: mmap only; the region layer knows how to read it
        return b""


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(0)
            if size > MAX_BLOB_SIZE:
                # a device or huge file with no region header: look at the head only
                blob = f.read(4096)
                if blob[:8] == MAGIC:
                    raise IntegrityError(f"{path}: {size} bytes exceeds the limit of "
                                         f"{MAX_BLOB_SIZE} bytes for a state")
            else:
                blob = f.read(size)
    except OSError as e:
        raise HandoverError(f"{path}: cannot read: {e.strerror or e}") from None
    return blob


def load(path: str, generation: int | None = None, *, check_refs: bool = True,
         vmcore: bool = False) -> Loaded:
    from ..formats.codec import decode, header_checksum_ok

    if vmcore:
        from ..host.kernelimage import state_from_vmcore

        blob, info = state_from_vmcore(path)
    else:
        blob, info = read_blob(path, generation)
    try:
        st = decode(blob, check_refs=check_refs)
    except VersionError as e:
        if e.code == "VERSION" and header_checksum_ok(blob) is False:
            raise IntegrityError(f"{path}: header at offset 0x0: checksum mismatch (the "
                                 f"version field is damaged, not another version: {e})",
                                 code="HEADER_CRC") from None
        e.args = (f"{path}: {e}",)
        raise
    except HandoverError as e:
        e.args = (f"{path}: {e}",)
        raise
    if info["kind"] == "file" and generation is not None and st.generation != generation:
        raise NoStateError(f"{path}: holds generation {st.generation}, not {generation}")
    info.setdefault("generation", st.generation)
    return Loaded(st, blob, info)
