#!/usr/bin/env python3
"""Kill-test stress run for the region commit protocol (ISSUE 3).

    python -m tests.stress.pmem_kill_stress --kills 5000 [--dir /var/tmp]   # from the repository's root
        [--seed N] [--sizes 1,2,4] [--region-mb 16] [--power-cuts 200]

A child process saves large random states (sizes in MiB) into a file region in a loop and
is SIGKILLed at a random instant KILLS times; after every kill the region must load either
the state before the interrupted save or the state it was writing, exactly (sha256), never
a fallback.  With --power-cuts N it also runs N simulated power cuts per commit operation
(handover.pmem.simulate: unflushed 64-byte lines lost or torn at 8 bytes).  Progress goes to
stderr; a JSON summary to stdout.  Exit 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import handover.pmem as pmem
from handover.pmem import protocol as P
from handover.pmem.simulate import PowerCut, SimAccess
from tests.pmem_kills import run_kills


def power_cuts(trials: int, seed: int) -> int:
    rng = random.Random(seed)
    checked = 0
    for persist_all in (False, True):
        acc = SimAccess(8 << 20, persist_all=persist_all)
        r = P.Region("sim", acc, -1, None)
        r.init(force=True)
        blobs = [rng.randbytes(rng.randrange(1, 3 << 20)) for _ in range(2)]
        for b in blobs:
            r.commit(b)
        base = bytes(acc.vol)
        new = rng.randbytes(rng.randrange(1, 3 << 20))
        probe = SimAccess(base, persist_all=persist_all)
        P.Region("sim", probe, -1, None).commit(new)
        for k in range(1, probe.ops + 2):
            for _ in range(trials):
                sim = SimAccess(base, persist_all=persist_all, fail_at=k)
                done = True
                try:
                    P.Region("sim", sim, -1, None).commit(new)
                except PowerCut:
                    done = False
                got = P.Region("sim", SimAccess(sim.power_cut(rng)), -1, None).read_latest()
                assert got.blob in (blobs[1], new), f"power cut at op {k}: neither old nor new"
                assert not done or got.blob == new
                checked += 1
    return checked


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=5000)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--sizes", default="1,2,4,8", help="blob sizes in MiB")
    ap.add_argument("--region-mb", type=int, default=24)
    ap.add_argument("--power-cuts", type=int, default=0, help="trials per commit operation")
    args = ap.parse_args()
    sizes = tuple(int(float(x) * (1 << 20)) for x in args.sizes.split(","))
    out = {"seed": args.seed}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="hov-kill-") as d:
        p = os.path.join(d, "region")
        pmem.init(p, size=args.region_mb << 20)
        pmem.commit(p, b"initial")
        t0 = time.monotonic()
        stats = run_kills(p, args.kills, sizes=sizes, seed=args.seed, progress=100)
        out.update(stats, elapsed_s=round(time.monotonic() - t0, 1), fs_type=pmem.status(p).get("fs_type"))
    if args.power_cuts:
        t0 = time.monotonic()
        out["power_cut_checks"] = power_cuts(args.power_cuts, args.seed)
        out["power_cut_elapsed_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
