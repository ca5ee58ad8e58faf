#!/usr/bin/env python3
"""Region commit benchmark: `handover.pmem.commit` of the `max` blob vs write+fsync.

    python benchmarks/bench_pmem_commit.py [--json] [--runs N] [--dir DIR] [--tmpfs DIR]
                                           [--random-mb N]

For a region file on DIR (default: a temporary directory under /var/tmp, a disk
filesystem) and one on a tmpfs (default /dev/shm), the same run measures:

- ``commit_ms``: ``handover.pmem.commit(region, blob)`` as `handover save` calls it (open,
  permission check, flock, header read, CRC check of the newest slot, retire, slot write +
  fdatasync, two header copies each made durable), median of --runs;
- ``write_fsync_ms``: open an already allocated file of the same size, ``write`` the same
  bytes, ``fsync``, close, median of --runs;
- ``commit_ratio`` = commit / write+fsync (target <= 1.5), medians; ``commit_min_ratio``
  the same with the fastest run of each (less sensitive to other load on the machine;
  ``load_avg_1m`` is recorded next to it).

Where the extra time goes: the commit reads and CRCs the newest slot before choosing where
to write (the rule "never overwrite the slot holding the newest valid state" needs it), and
CRCs the new blob (on a second thread, overlapped with that check and the write), then makes
two header copies durable one after the other (two more fdatasyncs).

The blob is the encoded ``max`` synthetic state when handover.synth and the codec are
available, else --random-mb of random bytes.  Figures go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import handover.pmem as pmem  # noqa: E402
from handover.formats.crc import IMPLEMENTATION  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def max_blob(random_mb: int) -> tuple[bytes, str]:
    try:
        from handover.formats.codec import encode
        from handover.synth import synth_state
        blob = encode(synth_state("max"))
        return blob, "synth max (encoded)"
    except Exception as e:  # noqa: BLE001 - any failure: fall back to random bytes
        log(f"synth/encode unavailable ({e}); using {random_mb} MiB of random bytes")
        return os.urandom(random_mb << 20), f"random {random_mb} MiB"


def write_fsync(path: str, blob: bytes) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        mv = memoryview(blob)
        done = 0
        while done < len(mv):
            done += os.write(fd, mv[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def bench_dir(d: str, blob: bytes, runs: int) -> dict:
    region = os.path.join(d, "bench-region")
    plain = os.path.join(d, "bench-plain")
    for p in (region, plain):
        if os.path.exists(p):
            os.unlink(p)
    size = 2 * len(blob) + (4 << 20)
    pmem.init(region, size=size)
    fd = os.open(plain, os.O_RDWR | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 0, len(blob))
    os.close(fd)
    # warm up: both slots and the plain file written once
    pmem.commit(region, blob)
    pmem.commit(region, blob)
    write_fsync(plain, blob)
    c, w = [], []
    for i in range(runs):
        b = os.urandom(16) + blob[16:]       # a different state each time, same size
        w.append(write_fsync(plain, b))
        t0 = time.perf_counter()
        pmem.commit(region, b)
        c.append(time.perf_counter() - t0)
        log(f"  {d}: run {i + 1}/{runs}: commit {c[-1] * 1e3:.1f} ms, write+fsync {w[-1] * 1e3:.1f} ms")
    st = pmem.status(region)
    os.unlink(region)
    os.unlink(plain)
    cm, wm = statistics.median(c), statistics.median(w)
    return {"dir": d, "fs_type": st.get("fs_type"), "commit_ms": round(cm * 1e3, 2),
            "write_fsync_ms": round(wm * 1e3, 2), "commit_ratio": round(cm / wm, 3),
            "commit_min_ms": round(min(c) * 1e3, 2), "write_fsync_min_ms": round(min(w) * 1e3, 2),
            "commit_min_ratio": round(min(c) / min(w), 3), "load_avg_1m": os.getloadavg()[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--dir", default=None, help="disk directory (default: a temp dir in /var/tmp)")
    ap.add_argument("--tmpfs", default="/dev/shm")
    ap.add_argument("--random-mb", type=int, default=32)
    args = ap.parse_args()
    blob, what = max_blob(args.random_mb)
    log(f"blob: {what}, {len(blob)} bytes; crc32c: {IMPLEMENTATION}")
    out = {"blob": what, "blob_bytes": len(blob), "runs": args.runs, "crc_implementation": IMPLEMENTATION}
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp", prefix="hov-bench-") as d:
        log(f"[file] {d}")
        out["file"] = bench_dir(d, blob, args.runs)
    if args.tmpfs and os.path.isdir(args.tmpfs):
        with tempfile.TemporaryDirectory(dir=args.tmpfs, prefix="hov-bench-") as d:
            log(f"[tmpfs] {d}")
            out["tmpfs"] = bench_dir(d, blob, args.runs)
    out["file_commit_vs_write_fsync_ratio"] = out["file"]["commit_ratio"]
    if "tmpfs" in out:
        out["tmpfs_commit_vs_write_fsync_ratio"] = out["tmpfs"]["commit_ratio"]
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(f"blob: {out['blob']} ({out['blob_bytes']} bytes), median of {args.runs}")
        for k in ("file", "tmpfs"):
            if k in out:
                r = out[k]
                print(f"[{k}] {r['dir']} ({r['fs_type']}): commit {r['commit_ms']} ms, "
                      f"write+fsync {r['write_fsync_ms']} ms, ratio {r['commit_ratio']}")


if __name__ == "__main__":
    main()
