#!/usr/bin/env python3
"""`make demo`: show what handover does.

Stage 1 (always): the forensic commands on the committed golden vectors: verify, inspect,
an older-minor conversion, a diff, and what a damaged blob looks like.
Stage 2 (when the QEMU lab is available, tests/system/lab/): the save / kexec / check
cycle on an emulated host; see README "Demo".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VEC = os.path.join(ROOT, "tests", "vectors")


def sh(*args: str, check_rc: int | None = 0) -> int:
    print(f"\n$ handover {' '.join(args)}", flush=True)
    r = subprocess.run([sys.executable, "-m", "handover", *args], cwd=ROOT)
    print(f"(exit {r.returncode})", flush=True)
    if check_rc is not None and r.returncode != check_rc:
        raise SystemExit(f"demo: unexpected exit {r.returncode}")
    return r.returncode


def forensic() -> None:
    tiny = os.path.join(VEC, "tiny-1.1.bin")
    typical = os.path.join(VEC, "typical-1.1.bin")
    sh("--version")
    sh("verify", typical)
    sh("inspect", "--limit", "4", tiny)
    tmp = tempfile.mkdtemp()
    try:
        old = os.path.join(tmp, "tiny-1.0.bin")
        sh("convert", tiny, old, "--format-version", "1.0")
        sh("diff", tiny, old)
        bad = os.path.join(tmp, "damaged.bin")
        data = bytearray(open(tiny, "rb").read())
        data[1000] ^= 0x10
        open(bad, "wb").write(data)
        sh("verify", bad, check_rc=4)
    finally:
        shutil.rmtree(tmp)


def main() -> int:
    forensic()
    lab_demo = os.path.join(ROOT, "tests", "system", "demo_cycle.py")
    if os.path.exists(lab_demo):
        return subprocess.call([sys.executable, "-m", "tests.system.demo_cycle"], cwd=ROOT)
    print("\ndemo: the QEMU save/kexec/load cycle is not in this tree yet", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
