#!/usr/bin/env python3
"""Format benchmark: encode, decode+verify and CRC of synthetic hosts, against msgpack.

    python benchmarks/bench_format.py [--json] [--runs N] [--profiles typical,max]

For each profile, the same records are also packed/unpacked with msgpack (one list of
tuples per table, plus meta) in the same run; ``*_ratio`` keys are ours / msgpack (lower is
better; the target at ``max`` is <= 1.0). Times are medians of --runs, in ms. Peak memory of
decode+verify is measured with tracemalloc (Python allocations made by the decode, the
input blob excluded) and given as a multiple of the blob size. ``inspect_json_wall_ms`` is
the wall time of a whole ``python -m handover inspect --json`` process on the ``typical``
blob, next to a bare ``python -c pass`` measured in the same run.
Figures go to stdout; progress to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgpack  # noqa: E402

from handover.formats.codec import decode, encode  # noqa: E402
from handover.formats.crc import IMPLEMENTATION, crc32c  # noqa: E402
from handover.formats.model import TABLE_ATTRS, Table  # noqa: E402
from handover.synth import synth_state  # noqa: E402


def timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_profile(profile: str, runs: int) -> dict:
    log(f"[{profile}] building synthetic host")
    st = synth_state(profile)
    rows = {a: list(getattr(st, a).rows()) for a in TABLE_ATTRS}
    records = {"meta": st.meta, "config": st.config, **rows}
    n_records = sum(len(r) for r in rows.values())

    log(f"[{profile}] encode")
    enc_ms, blob = timed(lambda: encode(st), runs)

    def build_and_encode():
        tables = {a: Table.from_rows(getattr(st, a).spec, rows[a], presorted=True) for a in TABLE_ATTRS}
        s2 = type(st)(meta=st.meta, config=st.config, provenance=st.provenance, **tables)
        return encode(s2)

    build_ms, blob2 = timed(build_and_encode, max(1, runs // 2))
    assert blob2 == blob
    mp_pack_ms, packed = timed(lambda: msgpack.packb(records, use_bin_type=True), runs)

    log(f"[{profile}] decode+verify")
    dec_ms, _ = timed(lambda: decode(blob), runs)
    mp_unpack_ms, _ = timed(lambda: msgpack.unpackb(packed, raw=False), runs)

    crc_ms, _ = timed(lambda: crc32c(blob), max(runs, 5))
    crc_gbps = len(blob) / (crc_ms / 1e3) / 1e9

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    decode(blob)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()

    return {
        "records": n_records,
        "blob_bytes": len(blob),
        "msgpack_bytes": len(packed),
        "size_ratio": round(len(blob) / len(packed), 3),
        "encode_ms": round(enc_ms, 2),
        "msgpack_pack_ms": round(mp_pack_ms, 2),
        "encode_ratio": round(enc_ms / mp_pack_ms, 3),
        "build_and_encode_ms": round(build_ms, 2),
        "build_and_encode_ratio": round(build_ms / mp_pack_ms, 3),
        "decode_verify_ms": round(dec_ms, 2),
        "msgpack_unpack_ms": round(mp_unpack_ms, 2),
        "decode_verify_ratio": round(dec_ms / mp_unpack_ms, 3),
        "crc_ms": round(crc_ms, 3),
        "crc_gb_per_s": round(crc_gbps, 2),
        "decode_peak_bytes": peak,
        "decode_peak_over_blob_ratio": round(peak / len(blob), 3),
    }


def bench_inspect(runs: int) -> dict:
    st = synth_state("typical")
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
        f.write(encode(st))
        path = f.name
    try:
        def proc(args):
            t = time.perf_counter()
            subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)
            return time.perf_counter() - t

        env_args = ["-m", "handover", "inspect", "--json", path]
        proc(env_args)  # warm the page cache
        walls = [proc(env_args) for _ in range(runs)]
        bare = [proc(["-c", "pass"]) for _ in range(runs)]
    finally:
        os.unlink(path)
    w, b = statistics.median(walls) * 1e3, statistics.median(bare) * 1e3
    return {"inspect_json_wall_ms": round(w, 1), "python_bare_wall_ms": round(b, 1),
            "inspect_over_bare_ratio": round(w / b, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profiles", default="typical,max")
    args = ap.parse_args()
    out = {"crc_implementation": IMPLEMENTATION, "python": sys.version.split()[0], "profiles": {}}
    for p in args.profiles.split(","):
        out["profiles"][p] = bench_profile(p, args.runs)
    log("[typical] inspect --json process wall time")
    out["inspect"] = bench_inspect(max(args.runs, 5))
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(f"crc32c: {out['crc_implementation']}")
        for p, d in out["profiles"].items():
            print(f"[{p}]")
            for k, v in d.items():
                print(f"  {k:30} {v}")
        for k, v in out["inspect"].items():
            print(f"  {k:30} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
