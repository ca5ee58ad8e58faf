"""Build-time helper for the initramfs integrations (and the QEMU lab's guest image).

``python -m handover.initramfs install DESTDIR`` copies into DESTDIR (an initramfs staging
tree: ``$DESTDIR`` of an initramfs-tools hook, ``$initdir`` of a dracut module):

- Debian's interpreter (``/usr/bin/python3.11``) and every shared library ``ldd`` names for
  it and for the stdlib extension modules it keeps;
- a trimmed stdlib (``STDLIB_EXCLUDE``: tests, tkinter, idlelib, ... ; optimized ``.pyc``
  dropped), with the interpreter's own byte code;
- ``handover`` and its dependencies (``PY_PACKAGES``) from the interpreter that runs this
  module, into ``/usr/lib/python3/dist-packages`` (on Debian's ``sys.path``), byte-compiled
  with the target interpreter so that imports stay fast at boot;
- ``/usr/sbin/handover``, a two-line wrapper.

It prints a one-line summary (or ``--json``): files and bytes added. It never overwrites a
file that already exists in DESTDIR (like ``copy_exec``), so shared libraries the initramfs
already carries are left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PYTHON = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
SITE = "/usr/lib/python3/dist-packages"

#: Top-level stdlib entries left out (big and never needed by handover).
STDLIB_EXCLUDE = {
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "distutils", "site-packages", "dist-packages", "venv", "__phello__", "turtle.py",
    "config-3.11-x86_64-linux-gnu", "sqlite3", "dbm", "curses",
}
LIB_DYNLOAD_EXCLUDE_RE = re.compile(
    r"^(_test|_xx|xxlimited|_ctypes_test|_tkinter|_sqlite3|_dbm|_gdbm|_curses|nis|ossaudiodev|audioop)")

#: Python packages (import names) handover needs at run time; optional ones may be missing.
PY_PACKAGES = ["construct", "click", "msgpack", "crcmod", "google_crc32c", "elftools"]
PY_OPTIONAL = {"google_crc32c", "elftools"}
#: Libraries the base system of any initramfs already has (not copied next to extensions).
BASE_LIBS = {"libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2"}

WRAPPER = "#!/bin/sh\nexec /usr/bin/python3.11 -m handover \"$@\"\n"


def ldd(paths) -> set[str]:
    """Shared libraries (absolute host paths) that ``ldd`` lists for ``paths``."""
    libs: set[str] = set()
    for p in paths:
        r = subprocess.run(["ldd", str(p)], capture_output=True, text=True)
        for ln in r.stdout.splitlines():
            ln = ln.strip()
            m = re.match(r"\S+ => (/\S+)", ln) or re.match(r"(/\S+) \(0x", ln)
            if m:
                libs.add(m.group(1))
    return libs


def stdlib_ignore(dirpath: str, names, stdlib: str = STDLIB):
    """``shutil.copytree`` ignore function that trims the stdlib."""
    ignored = set()
    top = os.path.realpath(dirpath) == os.path.realpath(stdlib)
    for n in names:
        if top and n in STDLIB_EXCLUDE:
            ignored.add(n)
        elif ".opt-" in n and n.endswith(".pyc"):
            ignored.add(n)
        elif dirpath.endswith("lib-dynload") and LIB_DYNLOAD_EXCLUDE_RE.match(n):
            ignored.add(n)
    return ignored


def find_py_package(name: str) -> Path | None:
    """Directory (package) or file (module) ``name`` is imported from, or None."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin)


def py_packages(extra=()) -> dict[str, Path]:
    """{name: path} of handover, its dependencies and their ``<pkg>.libs`` directories."""
    pkgs: dict[str, Path] = {"handover": Path(__file__).resolve().parent}
    for n in PY_PACKAGES + list(extra):
        p = find_py_package(n)
        if p is None:
            if n in PY_OPTIONAL:
                continue
            raise RuntimeError(f"python package {n} is not importable by {sys.executable}")
        pkgs[n] = p
    for p in list(pkgs.values()):
        libs = p.parent / (p.name + ".libs")
        if libs.is_dir():
            pkgs[libs.name] = libs
    return pkgs


def copy_into(root: Path, src: str | Path, dst: str | None = None, overwrite: bool = True) -> Path:
    """Copy host file ``src`` (following links) to ``root/dst`` (default: the same path)."""
    dst_p = Path(root) / (dst or str(src)).lstrip("/")
    if dst_p.exists() and not overwrite:
        return dst_p
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(src), dst_p)
    return dst_p


def install_python(root: Path, python: str = PYTHON, stdlib: str = STDLIB) -> None:
    """The interpreter, the trimmed stdlib and the libraries both need."""
    root = Path(root)
    p = root / python.lstrip("/")
    if p.is_symlink():
        p.unlink()
    copy_into(root, python)
    link = root / "usr/bin/python3"
    if not link.exists() and not link.is_symlink():
        os.symlink(os.path.basename(python), link)
    dst = root / stdlib.lstrip("/")
    shutil.copytree(stdlib, dst, ignore=lambda d, n: stdlib_ignore(d, n, stdlib), symlinks=False,
                    dirs_exist_ok=True)
    elves = [python] + [str(x) for x in (dst / "lib-dynload").glob("*.so")]
    for lib in ldd(elves):
        copy_into(root, lib, overwrite=False)


def install_packages(root: Path, python: str = PYTHON, extra=()) -> None:
    """handover + dependencies into SITE, their non-base libraries, and byte code."""
    root = Path(root)
    site = root / SITE.lstrip("/")
    site.mkdir(parents=True, exist_ok=True)
    ign = shutil.ignore_patterns("__pycache__", "*.pyc", "tests")
    for p in py_packages(extra).values():
        if p.is_dir():
            shutil.copytree(p, site / p.name, ignore=ign, dirs_exist_ok=True)
        else:
            shutil.copy2(p, site / p.name)
    sos = [str(x) for x in site.rglob("*.so*") if x.is_file()]
    for lib in ldd(sos):
        if os.path.basename(lib) in BASE_LIBS or lib.startswith(str(root)) or "/site-packages/" in lib:
            continue
        copy_into(root, lib, overwrite=False)
    subprocess.run([python, "-m", "compileall", "-q", "-j0", str(site)], capture_output=True)


def _tree_size(root: Path) -> tuple[int, int]:
    n = size = 0
    for p in Path(root).rglob("*"):
        if p.is_file() and not p.is_symlink():
            n += 1
            size += p.stat().st_size
    return n, size


def install(destdir: str | Path, python: str = PYTHON, stdlib: str = STDLIB) -> dict:
    """Everything ``handover load`` needs at boot, into DESTDIR.  Returns a size report."""
    root = Path(destdir)
    n0, s0 = _tree_size(root)
    install_python(root, python, stdlib)
    install_packages(root, python)
    w = root / "usr/sbin/handover"
    w.parent.mkdir(parents=True, exist_ok=True)
    w.write_text(WRAPPER)
    w.chmod(0o755)
    n1, s1 = _tree_size(root)
    return {"destdir": str(root), "files_added": n1 - n0, "bytes_added": s1 - s0,
            "python": python, "packages": sorted(py_packages())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m handover.initramfs",
                                 description="Install handover's boot-time runtime into an initramfs tree.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install", help="copy python3.11, a trimmed stdlib and handover into DESTDIR")
    i.add_argument("destdir")
    i.add_argument("--python", default=PYTHON)
    i.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.destdir):
        print(f"handover: {a.destdir}: not a directory", file=sys.stderr)
        return 1
    try:
        rep = install(a.destdir, a.python)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"handover: initramfs install failed: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(rep, sort_keys=True))
    else:
        print(f"handover: added {rep['files_added']} files, {rep['bytes_added'] / 1e6:.1f} MB "
              f"(python {a.python}, {', '.join(rep['packages'])})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
