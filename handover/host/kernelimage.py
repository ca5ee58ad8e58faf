"""What a kernel declares about the handover format, and states inside crash dumps.

- ``read_declaration(path)``: the ``Handover`` ELF note (type 1, desc = major << 16 | minor:
  "reads major.0 .. major.minor") of a vmlinux, of a bzImage (the embedded vmlinux is
  decompressed the way the kernel's scripts/extract-vmlinux does: look for each compression
  magic, decompress from there, keep the first result that is an ELF with that note), or of
  the running kernel (``/sys/kernel/notes``).
- ``state_from_vmcore(path)``: the RAM copy of the state in an ELF crash dump, located by
  the ``HANDOVER_STATE=<len>@<phys>`` VMCOREINFO line and the PT_LOAD segments.

pyelftools names notes by their type alone (ecosystem.md section 6), so notes are matched on
``n_name`` and the raw type is read back from the file.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass

from ..errors import HandoverError, IntegrityError, NoStateError

NOTE_NAME = "Handover"
NOTE_TYPE = 1
MAX_IMAGE = 512 << 20
MAX_DECOMPRESSED = 1 << 30


class KernelImageError(HandoverError):
    kind = "kernel"


@dataclass
class Declaration:
    major: int
    max_minor: int
    source: str  # where the note was found

    def reads(self, major: int, minor: int) -> bool:
        return major == self.major and minor <= self.max_minor

    def best_minor(self, major: int, writable: tuple[int, ...]) -> int | None:
        ok = [m for m in writable if self.reads(major, m)]
        return max(ok) if ok else None

    def text(self) -> str:
        return f"{self.major}.0-{self.major}.{self.max_minor}"


def parse_notes(data: bytes, little: bool = True) -> list[tuple[str, int, bytes]]:
    """Parse a raw .notes blob (as /sys/kernel/notes shows it): (name, type, desc)."""
    out, off, e = [], 0, "<" if little else ">"
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from(e + "III", data, off)
        off += 12
        name_end = off + ((namesz + 3) & ~3)
        desc_end = name_end + ((descsz + 3) & ~3)
        if namesz > 4096 or descsz > 1 << 20 or desc_end > len(data):
            break
        name = data[off:off + namesz].rstrip(b"\0").decode("ascii", "replace")
        out.append((name, ntype, data[name_end:name_end + descsz]))
        off = desc_end
    return out


def _declaration_from_notes(notes, source: str) -> Declaration | None:
    for name, ntype, desc in notes:
        if name == NOTE_NAME and ntype == NOTE_TYPE and len(desc) >= 4:
            v = struct.unpack_from("<I", desc)[0]
            return Declaration(v >> 16, v & 0xFFFF, source)
    return None


def _elf_notes(data: bytes) -> list[tuple[str, int, bytes]] | None:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(data))
        little = elf.little_endian
        notes = []
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_NOTE":
                notes += parse_notes(seg.data(), little)
        if not notes:
            for sec in elf.iter_sections():
                if sec["sh_type"] == "SHT_NOTE":
                    notes += parse_notes(sec.data(), little)
        return notes
    except (ELFError, ValueError, struct.error):
        return None


_MAGICS = [  # (name, magic) as in scripts/extract-vmlinux
    ("gzip", b"\x1f\x8b\x08"), ("xz", b"\xfd7zXZ\x00"), ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00\x00"), ("zstd", b"\x28\xb5\x2f\xfd"), ("lz4", b"\x02\x21\x4c\x18"),
]


def _decompress(kind: str, data: bytes) -> bytes | None:
    import bz2
    import lzma
    import shutil
    import subprocess
    import zlib

    try:
        if kind == "gzip":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            return d.decompress(data, MAX_DECOMPRESSED)
        if kind in ("xz", "lzma"):
            d = lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
            return d.decompress(data, MAX_DECOMPRESSED)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(data, MAX_DECOMPRESSED)
        tool = {"zstd": "zstd", "lz4": "lz4"}[kind]
        if shutil.which(tool):
            r = subprocess.run([tool, "-dc"], input=data, capture_output=True, timeout=120)
            return r.stdout or None
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError, subprocess.SubprocessError):
        pass
    return None


def running_declaration(sr) -> Declaration | None:
    """The running kernel's declaration, from /sys/kernel/notes under the Sysroot ``sr``."""
    try:
        data = sr.read_bytes("/sys/kernel/notes", limit=1 << 20)
    except OSError as e:
        raise KernelImageError(f"/sys/kernel/notes: {e.strerror}") from None
    return _declaration_from_notes(parse_notes(data), "running kernel (/sys/kernel/notes)")


def read_declaration(path: str | None) -> Declaration | None:
    """The declaration of IMAGE (vmlinux or bzImage), or of the running kernel if None."""
    if path is None:
        from .base import Sysroot

        return running_declaration(Sysroot("/"))
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):
            raise KernelImageError(f"{path}: a FIFO is not a kernel image")
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE + 1)
    except OSError as e:
        raise KernelImageError(f"{path}: {e.strerror}") from None
    if len(data) > MAX_IMAGE:
        raise KernelImageError(f"{path}: larger than {MAX_IMAGE} bytes: not a kernel image")
    notes = _elf_notes(data)
    if notes is not None:
        return _declaration_from_notes(notes, f"{path} (ELF)")
    if data[0x202:0x206] != b"HdrS":
        raise KernelImageError(f"{path}: neither an ELF vmlinux nor a bzImage (no HdrS at 0x202)")
    for kind, magic in _MAGICS:
        start = 0
        while True:
            i = data.find(magic, start)
            if i < 0:
                break
            start = i + 1
            out = _decompress(kind, data[i:])
            if out and out[:4] == b"\x7fELF":
                notes = _elf_notes(out)
                if notes is not None:
                    return _declaration_from_notes(notes, f"{path} (bzImage, {kind})")
    raise KernelImageError(f"{path}: bzImage whose embedded vmlinux could not be extracted")


# ---- vmcore ----------------------------------------------------------------------------
def state_from_vmcore(path: str) -> tuple[bytes, dict]:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):
            raise HandoverError(f"{path}: a FIFO is not read as a crash dump (it could block "
                                f"forever): give the dump file")
        f = open(path, "rb")
    except OSError as e:
        raise HandoverError(f"{path}: {e.strerror}") from None
    with f:
        head = f.read(16)
        if head.startswith(b"KDUMP   ") or head.startswith(b"makedumpfile"):
            raise HandoverError(f"{path}: kdump-compressed dump: write it as ELF "
                                f"(makedumpfile -E) to inspect the handover state")
        f.seek(0)
        try:
            elf = ELFFile(f)
            if elf["e_type"] != "ET_CORE":
                raise HandoverError(f"{path}: not an ELF core dump ({elf['e_type']})")
            info = None
            loads = []
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_NOTE":
                    for name, _t, desc in parse_notes(seg.data(), elf.little_endian):
                        if name == "VMCOREINFO":
                            info = desc.decode("ascii", "replace")
                elif seg["p_type"] == "PT_LOAD":
                    loads.append((seg["p_paddr"], seg["p_filesz"], seg["p_offset"]))
        except (ELFError, struct.error, ValueError) as e:
            raise IntegrityError(f"{path}: malformed ELF core: {e}") from None
        if info is None:
            raise NoStateError(f"{path}: no VMCOREINFO note")
        line = next((ln for ln in info.splitlines() if ln.startswith("HANDOVER_STATE=")), None)
        if line is None:
            raise NoStateError(f"{path}: VMCOREINFO has no HANDOVER_STATE line (the crashed "
                               f"kernel held no handover state, or lacks the patches)")
        try:
            ln_s, phys_s = line.split("=", 1)[1].split("@")
            length, phys = int(ln_s, 16), int(phys_s, 16)
        except ValueError:
            raise IntegrityError(f"{path}: malformed VMCOREINFO line {line!r}") from None
        from ..formats.structs import MAX_BLOB_SIZE

        if length > MAX_BLOB_SIZE:
            raise IntegrityError(f"{path}: HANDOVER_STATE length {length} exceeds the limit")
        for paddr, filesz, off in loads:
            if paddr <= phys and phys + length <= paddr + filesz:
                f.seek(off + phys - paddr)
                blob = f.read(length)
                return blob, {"kind": "vmcore", "path": os.path.abspath(path), "phys": hex(phys),
                              "length": length, "file_offset": hex(off + phys - paddr),
                              "fallback": False}
        raise NoStateError(f"{path}: state at {phys:#x}+{length:#x} is not in any PT_LOAD "
                           f"(excluded from the dump?)")
