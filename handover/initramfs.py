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
- ``/usr/sbin/handover``, a two-line wrapper;
- ``/usr/lib/handover/udev-probe``, the program of the udev rule that makes the region
  device root:root 0600 (``initramfs/udev/60-handover-region.rules``; the hooks copy the
  rule).

``python -m handover.initramfs udev-probe ROOT`` writes that probe alone, for the
interpreter running it (``initramfs/install.sh`` does so for the host).

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

#: the program of the udev rule (the same path on the host and in the initramfs, each with
#: its own interpreter); a Python script rather than ``handover region udev-probe``: it
#: starts without click and the command modules: 18-20 ms against 70-85 ms in the initramfs
#: runtime (2-core machine)
UDEV_PROBE = "/usr/lib/handover/udev-probe"
UDEV_RULES = "60-handover-region.rules"


def udev_probe_script(python: str = PYTHON) -> str:
    """The text of UDEV_PROBE for the interpreter PYTHON (an absolute path, no blanks)."""
    if not python.startswith("/") or any(c.isspace() for c in python):
        raise RuntimeError(f"{python!r}: a #! line needs an absolute interpreter path without blanks")
    return (f"#!{python} -I\n"
            "# handover: what udev imports for a pmem/dax device (60-handover-region.rules):\n"
            "# HANDOVER_REGION=1 ... when the device holds a handover region; always exits 0\n"
            "import sys\n"
            "try:\n"
            "    from handover.pmem.udev import main\n"
            "except ImportError as e:  # handover removed, rule left: say so, change nothing\n"
            "    sys.stderr.write(f\"handover udev-probe: {e}\\n\")\n"
            "    sys.exit(0)\n"
            "sys.exit(main())\n")


def install_udev_probe(root: str | Path, python: str = PYTHON) -> Path:
    """Write UDEV_PROBE (mode 0755) for PYTHON under ROOT."""
    p = Path(root) / UDEV_PROBE.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(udev_probe_script(python))
    p.chmod(0o755)
    return p


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


#: Run by the target interpreter: import every module that handover and its dependencies
#: name anywhere (module level or inside functions; found by an AST scan), then print the
#: stdlib files that ended up loaded.  Imports that fail (optional, other platforms) are skipped.
_TRACE = r"""
import ast, json, os, sys
roots, stdlib = json.loads(sys.argv[1]), sys.argv[2]
names = set()
for r in roots:
    files = [r] if r.endswith(".py") else [os.path.join(d, f) for d, _, fs in os.walk(r)
                                           for f in fs if f.endswith(".py")]
    for f in files:
        try:
            tree = ast.parse(open(f, "rb").read())
        except (SyntaxError, ValueError):
            continue
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                names.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
                names.add(n.module)
                names.update(f"{n.module}.{a.name}" for a in n.names)
import importlib
for name in sorted(names):
    try:
        importlib.import_module(name)
    except BaseException:
        pass
out = set()
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None)
    if f and os.path.realpath(f).startswith(stdlib + os.sep):
        out.add(os.path.relpath(os.path.realpath(f), stdlib))
print(json.dumps(sorted(out)))
"""

#: Stdlib packages always copied whole in the minimal stdlib (codecs are looked up by name).
MINIMAL_WHOLE = {"encodings"}
#: Left out of the minimal stdlib although a dependency names them: test runners, doc tools,
#: browsers, and OpenSSL (_hashlib pulls in the 4.6 MB libcrypto; hashlib then uses the
#: interpreter's built-in sha256).  Prefixes of paths relative to the stdlib.
MINIMAL_EXCLUDE = ("unittest/", "webbrowser.py", "doctest.py", "pydoc.py",
                   "ssl.py", "lib-dynload/_hashlib.", "lib-dynload/_ssl.")
#: Packages handover does not need at boot (only check-kernel / inspect --vmcore use elftools).
BOOT_SKIP_PACKAGES = {"elftools"}


def minimal_stdlib_files(python: str = PYTHON, stdlib: str = STDLIB) -> set[str]:
    """Stdlib files (relative to ``stdlib``) that handover and its dependencies can import:
    every module they name, whole packages for packages, plus MINIMAL_WHOLE."""
    roots = [str(p) for p in py_packages().values() if p.suffix in ("", ".py") and not p.name.endswith(".libs")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sorted({str(Path(r).parent) for r in roots})),
               PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([python, "-S", "-c", "import site; site.main()\n" + _TRACE, json.dumps(roots), stdlib],
                       capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"tracing the stdlib imports failed: {r.stderr[-500:]}")
    files = set(json.loads(r.stdout.strip().splitlines()[-1]))
    top = {f.split(os.sep)[0] for f in files if os.sep in f} | MINIMAL_WHOLE
    for pkg in top:
        base = Path(stdlib) / pkg
        if pkg in ("lib-dynload",) or not base.is_dir():
            continue
        for p in base.rglob("*.py"):
            files.add(str(p.relative_to(stdlib)))
    return files


def _copy_minimal_stdlib(dst: Path, python: str, stdlib: str) -> None:
    for rel in sorted(minimal_stdlib_files(python, stdlib)):
        if rel.startswith(MINIMAL_EXCLUDE):
            continue
        src = Path(stdlib) / rel
        copy_into(dst, src, rel)
        if rel.endswith(".py"):  # and its byte code, when the distribution has it
            pyc = src.parent / "__pycache__" / f"{src.stem}.{sys.implementation.cache_tag}.pyc"
            deb = src.parent / "__pycache__" / f"{src.stem}.cpython-311.pyc"
            for c in (pyc, deb):
                if c.exists():
                    copy_into(dst, c, str(Path(rel).parent / "__pycache__" / c.name))
                    break
    for p in Path(stdlib).glob("*.py"):
        if p.name in ("site.py", "sitecustomize.py", "_sitebuiltins.py", "os.py", "stat.py",
                      "posixpath.py", "genericpath.py", "_collections_abc.py", "codecs.py",
                      "io.py", "abc.py"):
            copy_into(dst, p, p.name, overwrite=False)


def install_python(root: Path, python: str = PYTHON, stdlib: str = STDLIB,
                   minimal: bool = False) -> None:
    """The interpreter, the stdlib (trimmed by STDLIB_EXCLUDE, or with ``minimal`` only what
    handover and its dependencies import) and the libraries both need."""
    root = Path(root)
    p = root / python.lstrip("/")
    if p.is_symlink():
        p.unlink()
    copy_into(root, python)
    link = root / "usr/bin/python3"
    if not link.exists() and not link.is_symlink():
        os.symlink(os.path.basename(python), link)
    dst = root / stdlib.lstrip("/")
    if minimal:
        _copy_minimal_stdlib(dst, python, stdlib)
    else:
        shutil.copytree(stdlib, dst, ignore=lambda d, n: stdlib_ignore(d, n, stdlib),
                        symlinks=False, dirs_exist_ok=True)
    elves = [python] + [str(x) for x in (dst / "lib-dynload").glob("*.so")]
    for lib in ldd(elves):
        copy_into(root, lib, overwrite=False)


def install_packages(root: Path, python: str = PYTHON, extra=(), skip=()) -> None:
    """handover + dependencies (but ``skip``) into SITE, their non-base libraries, byte code."""
    root = Path(root)
    site = root / SITE.lstrip("/")
    site.mkdir(parents=True, exist_ok=True)
    ign = shutil.ignore_patterns("__pycache__", "*.pyc", "tests")
    for name, p in py_packages(extra).items():
        if name in skip:
            continue
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


def install(destdir: str | Path, python: str = PYTHON, stdlib: str = STDLIB,
            minimal: bool = True) -> dict:
    """Everything ``handover load`` needs at boot, into DESTDIR.  Returns a size report."""
    root = Path(destdir)
    n0, s0 = _tree_size(root)
    install_python(root, python, stdlib, minimal=minimal)
    install_packages(root, python, skip=BOOT_SKIP_PACKAGES if minimal else ())
    w = root / "usr/sbin/handover"
    w.parent.mkdir(parents=True, exist_ok=True)
    w.write_text(WRAPPER)
    w.chmod(0o755)
    install_udev_probe(root, python)
    n1, s1 = _tree_size(root)
    return {"destdir": str(root), "files_added": n1 - n0, "bytes_added": s1 - s0,
            "python": python,
            "packages": sorted(set(py_packages()) - (BOOT_SKIP_PACKAGES if minimal else set())),
            "stdlib": "minimal" if minimal else "trimmed"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m handover.initramfs",
                                 description="Install handover's boot-time runtime into an initramfs tree.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install", help="copy python3.11, a trimmed stdlib and handover into DESTDIR")
    i.add_argument("destdir")
    i.add_argument("--python", default=PYTHON)
    i.add_argument("--json", action="store_true")
    i.add_argument("--stdlib", choices=["minimal", "trimmed"], default="minimal",
                   help="minimal: only what handover and its dependencies import (default); "
                        "trimmed: the whole stdlib minus STDLIB_EXCLUDE")
    u = sub.add_parser("udev-probe", help=f"write {UDEV_PROBE} (the udev rule's program) into ROOT")
    u.add_argument("destdir", metavar="ROOT")
    u.add_argument("--python", default=sys.executable,
                   help="the interpreter that runs it (default: this one)")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.destdir):
        print(f"handover: {a.destdir}: not a directory", file=sys.stderr)
        return 1
    if a.cmd == "udev-probe":
        try:
            p = install_udev_probe(a.destdir, a.python)
        except (OSError, RuntimeError) as e:
            print(f"handover: udev probe not written: {e}", file=sys.stderr)
            return 1
        print(f"handover: wrote {p} (python {a.python})", file=sys.stderr)
        return 0
    try:
        rep = install(a.destdir, a.python, minimal=a.stdlib == "minimal")
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
