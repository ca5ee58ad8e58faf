"""Helpers for tests that read a host tree: copies of captured fixtures, with overlays."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CAPTURED = FIXTURES / "captured" / "debian-6.12-legacy-pmem"
DEBUGFS = FIXTURES / "constructed" / "intel-iommu-debugfs"
TOKEN = "8c1f3a52-6b0e-4d7a-9e21-5f4c2b9d7a10"
EDU, E1000E = "0000:00:03.0", "0000:00:04.0"


def copy_host(dst: Path, debugfs: bool = False) -> Path:
    shutil.copytree(CAPTURED, dst, symlinks=True, ignore=shutil.ignore_patterns("_capture"))
    if debugfs:
        shutil.copytree(DEBUGFS / "sys", dst / "sys", symlinks=True, dirs_exist_ok=True)
    return dst


def dev_dir(root: Path, bdf: str) -> Path:
    return root / "sys" / "devices" / "pci0000:00" / bdf


def set_resource(root: Path, bdf: str, index: int, start: int, end: int, flags: int) -> None:
    p = dev_dir(root, bdf) / "resource"
    lines = p.read_text().splitlines()
    lines[index] = f"0x{start:016x} 0x{end:016x} 0x{flags:016x}"
    p.write_text("\n".join(lines) + "\n")


def patch_config(root: Path, bdf: str, offset: int, data: bytes) -> None:
    p = dev_dir(root, bdf) / "config"
    b = bytearray(p.read_bytes())
    b[offset:offset + len(data)] = data
    p.write_bytes(bytes(b))


def remove_device(root: Path, bdf: str) -> None:
    os.unlink(root / "sys" / "bus" / "pci" / "devices" / bdf)
    shutil.rmtree(dev_dir(root, bdf))
