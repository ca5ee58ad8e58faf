"""``handover capture-sysroot``: archive exactly the files the sources read.

The sources run against the live root with a recording :class:`Sysroot`; the archive then
holds each file as read (sysfs attributes keep their real contents, not their 4096-byte
stat size), each symlink with its target as stored, each listed directory, and, for MSI-X
tables read through ``resourceN`` mmap, a file with the bytes read at their offsets. A
manifest, ``HANDOVER-CAPTURE.json``, says when, where, and what could not be read. The
archive extracts to a tree usable as ``--sysroot``. Standard library only (it runs in a
busybox + python3 guest).
"""

from __future__ import annotations

import datetime
import io
import json
import os
import tarfile
import time

from .. import __version__
from ..errors import HandoverError
from ..host import read_host
from ..host.base import Sysroot

MANIFEST = "HANDOVER-CAPTURE.json"
EXTRA_FILES = ("/proc/sys/kernel/osrelease", "/proc/sys/kernel/hostname",
               "/proc/sys/kernel/random/boot_id", "/proc/cmdline", "/proc/version")
MAX_MAPPED = 64 << 20


def record(sysroot: str = "/", progress=None) -> tuple[Sysroot, object]:
    sr = Sysroot(sysroot, record=True)
    host = read_host(sr, progress=progress)
    for p in EXTRA_FILES:
        sr.try_text(p)
    # what `save` itself reads beyond the sources (meta), with its default device choice
    from .build import SaveOptions, build_state, select_devices
    try:
        kept, _w = select_devices(host, None, force=True)
        build_state(host, kept, SaveOptions())
    except HandoverError:
        pass
    return sr, host


def capture(sysroot: str, output: str, note: str = "", progress=None) -> dict:
    sr, host = record(sysroot, progress)
    now = time.time()
    manifest = {
        "tool": "handover", "tool_version": __version__,
        "created": datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        .strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sysroot": sr.root, "uname": list(os.uname()), "euid": os.geteuid(), "note": note,
        "sources": host.sources_run, "provenance": {k: n.as_dict() for k, n in host.notes.items()},
        "errors": dict(sorted(sr.errors.items())),
        "mapped": {p: sorted(offs) for p, offs in sr.mapped.items()},
        "counts": {"files": len(sr.files), "links": len(sr.links), "dirs": len(sr.dirs)},
    }
    tmp = output + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        def add(name: str, kind, data: bytes = b"", target: str = "", mode: int = 0o644):
            ti = tarfile.TarInfo(name.lstrip("/"))
            ti.mtime = int(now)
            ti.type = kind
            ti.mode = mode
            if kind == tarfile.SYMTYPE:
                ti.linkname = target
                tar.addfile(ti)
            elif kind == tarfile.DIRTYPE:
                ti.mode = 0o755
                tar.addfile(ti)
            else:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))

        dirs = set(sr.dirs)
        for p in list(sr.files) + list(sr.links) + list(sr.mapped):
            d = os.path.dirname(p)
            while d and d != "/":
                dirs.add(d)
                d = os.path.dirname(d)
        for d in sorted(dirs):
            if d in sr.links:
                continue
            add(d, tarfile.DIRTYPE)
        for p, t in sorted(sr.links.items()):
            add(p, tarfile.SYMTYPE, target=t)
        for p, data in sorted(sr.files.items()):
            if p in sr.links:
                continue
            add(p, tarfile.REGTYPE, data)
        for p, offs in sorted(sr.mapped.items()):
            end = max(o + len(b) for o, b in offs.items())
            if end > MAX_MAPPED:
                manifest["errors"][p] = f"mapped range ends at {end:#x}: not archived"
                continue
            buf = bytearray(end)
            for o, b in offs.items():
                buf[o:o + len(b)] = b
            add(p, tarfile.REGTYPE, bytes(buf))
        add(MANIFEST, tarfile.REGTYPE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            .encode())
    os.replace(tmp, output)
    return manifest
