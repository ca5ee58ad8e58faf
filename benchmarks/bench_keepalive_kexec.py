#!/usr/bin/env python3
"""Keepalive kexec benchmark (issue 7): how soon the kept device works again, and what the
patches cost at boot, against the stock kernel in the same lab run.

    python benchmarks/bench_keepalive_kexec.py [--json] [--runs N] [--config lab|debian]

Needs the patched kernel (``make kernel``; ``--config debian``: ``make kernel-debian``, Debian's
own config with modules, which the lab's initrd then carries) and the QEMU lab (set up on first use). Each run
boots one guest through four kernels, the scenario of tests/system/test_keepalive.py plus
a last kexec into the stock kernel:

  1 stock Debian 6.12         (cold boot)             -> kexec
  2 patched, no state         edu under VFIO, saved, armed -> kexec (keepalive)
  3 patched, handover=        adopts edu; edu DMAs with the old IOVA, new owner + MSI -> kexec
  4 stock Debian 6.12         (the baseline boot)

Figures (host wall clock from the serial console markers, TCG, 1 vCPU; medians over runs):

- ``kexec_to_dma_s``: ``handover arm --exec`` in phase 2 -> edu's first DMA with the old
  IOVA done in phase 3 (no driver; includes the boot to /init and python's start);
- ``kexec_to_owner_s``: ``handover arm --exec`` -> the new owner opened edu through vfio
  with its token, DMAed with the old IOVA and got the MSI;
- ``boot_patched_handover_s`` / ``boot_stock_s``: ``handover arm --exec`` (phase 2, which
  also starts python) or the lab's ``kexec -e`` (phase 3) -> /init, for phase 3 (patched
  kernel adopting a state) and phase 4 (stock kernel), and their ratio; ``boot_patched_s``
  for phase 2 (patched kernel, no state); the kernels' own uptime at /init (time from the
  kernel's start, without the kexec path) next to them, the fairer comparison.

Figures go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run as a script: the repository's tests.* and tools.*


def one_run(config: str = "lab") -> dict:
    from tests.system import lab
    from tests.system.keepalive_scenario import DAX_RANGE, NEW_KERNEL_KEEP, OLD_KERNEL
    from tests.system.patched import REGION
    from tools import kernel

    b = kernel.built(config)
    if b is None:
        raise SystemExit(f"bench_keepalive_kexec: the patched kernel ({config} configuration) is "
                         f"not built: python tools/kernel.py build --config {config}")
    extra = [lab.Kernel(b["release"], Path(b["mod_root"]))] if config == "debian" else []
    bz = Path(b["bzImage"])
    files = {"lab/vmlinuz.2": bz, "lab/vmlinuz.3": bz,
             "vfio_edu.py": ROOT / "tests" / "system" / "guest" / "vfio_edu.py",
             "edu_keepalive.py": ROOT / "tests" / "system" / "guest" / "edu_keepalive.py"}
    res = lab.run_guest(["true\n", OLD_KERNEL, NEW_KERNEL_KEEP, "true\n"], pmem="legacy",
                        kexec_append=f"handover={REGION} {DAX_RANGE}", files=files, timeout=900,
                        extra_kernels=extra)
    res.check()   # with extra kernels: phases 2 and 3 also loaded the build's modules
    m = lab.index_markers(res.markers)
    owner = json.loads(res.phases[2].files["owner.json"])
    probe = json.loads(res.phases[2].files["probe.json"])
    if not (probe.get("dma_old_iova") and owner.get("dma_old_iova") and owner.get("msi_eventfd") == "ok"):
        raise SystemExit(f"bench_keepalive_kexec: the device did not work after kexec: {probe} {owner}")

    def since(a, b):
        return round(m[b][0] - m[a][0], 3) if a in m and b in m else None

    return {
        "kexec_to_dma_s": since(("ARM-EXEC", 2), ("EDU-DMA-OK", 3)),
        "kexec_to_owner_s": since(("ARM-EXEC", 2), ("EDU-OWNER-OK", 3)),
        "boot_patched_s": since(("KEXEC-EXEC", 1), ("INIT", 2)),
        "boot_patched_handover_s": since(("ARM-EXEC", 2), ("INIT", 3)),
        "boot_stock_s": since(("KEXEC-EXEC", 3), ("INIT", 4)),
        "uptime_at_init_patched_s": m.get(("INIT", 2), (0, None))[1],
        "uptime_at_init_patched_handover_s": m.get(("INIT", 3), (0, None))[1],
        "uptime_at_init_stock_s": m.get(("INIT", 4), (0, None))[1],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--config", choices=["lab", "debian"], default="lab",
                    help="build configuration of the patched kernel (tools/kernel.py)")
    a = ap.parse_args()
    runs = []
    for i in range(a.runs):
        print(f"bench_keepalive_kexec: run {i + 1}/{a.runs}", file=sys.stderr, flush=True)
        runs.append(one_run(a.config))
    med = {k: round(statistics.median(r[k] for r in runs if r[k] is not None), 3)
           for k in runs[0] if any(r[k] is not None for r in runs)}
    if med.get("boot_stock_s"):
        med["boot_ratio_handover_vs_stock"] = round(med["boot_patched_handover_s"] / med["boot_stock_s"], 3)
        med["boot_ratio_patched_vs_stock"] = round(med["boot_patched_s"] / med["boot_stock_s"], 3)
    if med.get("uptime_at_init_stock_s"):
        med["uptime_ratio_handover_vs_stock"] = round(
            med["uptime_at_init_patched_handover_s"] / med["uptime_at_init_stock_s"], 3)
    out = {"config": a.config, "runs": runs, "median": med, "load_avg_1m": os.getloadavg()[0]}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in med.items():
            print(f"{k:40s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
