"""Guest helper (lab guest = the host of a nested VM): read the progress record of
edu_dma (tests/system/guest/edu_dma/edu_dma.c) from the VM's RAM file, a device-dax node
(read() is refused there: mmap, MAP_SHARED, 2 MiB aligned), every INTERVAL seconds.

    python3 edu_progress.py /dev/dax0.0 OUT.json SECONDS [MIN_ROUNDS [resume]]

Prints one line per sample, ``@@LAB VM-FIRST-ROUND`` when rounds first go above 0 (with
``resume``: ``@@LAB VM-RESUMED-ROUND`` when they go above the rounds of the first sample, i.e.
the first round of a VM that resumed),
and writes all samples to OUT.json; stops early once the rounds grew by MIN_ROUNDS (default 3)
after that round. Exit 0 if the rounds grew while it watched, 1 if not. A sample every
INTERVAL seconds ($EDU_PROGRESS_INTERVAL, default 2)."""

import json
import mmap
import os
import struct
import sys
import time

PROGRESS_ADDR = 0x300000
FIELDS = ("state", "rounds", "irqs", "polled", "errors", "ticks", "bdf", "bar0", "irq_line",
          "edu_id", "last_pattern", "msi_cap", "alive_bad", "poked", "spurious", "rtc", "max_gap",
          "gap_round", "nvme_state", "nvme_bdf", "nvme_rounds", "nvme_errors", "nvme_status_errors",
          "nvme_irqs_admin", "nvme_irqs_io", "nvme_stray", "nvme_hung")
MAP = 4 << 20
INTERVAL = float(os.environ.get("EDU_PROGRESS_INTERVAL", 2.0))


def read(m) -> dict:
    raw = m[PROGRESS_ADDR:PROGRESS_ADDR + 8 + 4 * len(FIELDS)]
    rec = dict(zip(FIELDS, struct.unpack_from(f"<{len(FIELDS)}I", raw, 8)))
    rec["magic"] = raw[:8].decode(errors="replace")
    return rec


def up() -> str:
    with open("/proc/uptime") as f:
        return f.read().split()[0]


def main(path: str, out: str, seconds: str, min_rounds: str = "3", mode: str = "") -> int:
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, MAP, mmap.MAP_SHARED, mmap.PROT_READ)
    t0, samples, first, base = time.monotonic(), [], None, None
    while time.monotonic() - t0 < float(seconds):
        rec = read(m)
        rec["t"] = round(time.monotonic() - t0, 2)
        samples.append(rec)
        print(json.dumps(rec), flush=True)
        if base is None:
            base = rec["rounds"] if mode == "resume" else 0
        if rec["magic"] == "EDUPROG1" and rec["rounds"] > base:
            if first is None:
                first = rec
                mark = "VM-RESUMED-ROUND" if mode == "resume" else "VM-FIRST-ROUND"
                print(f"@@LAB {mark} phase={os.environ.get('LAB_PHASE', 0)} "
                      f"rounds={rec['rounds']} uptime={up()}", flush=True)
            elif rec["rounds"] - first["rounds"] >= int(min_rounds):
                break
        time.sleep(INTERVAL)
    with open(out, "w") as f:
        json.dump(samples, f, indent=1)
    grew = first is not None and samples[-1]["rounds"] > (base if mode == "resume" else first["rounds"])
    return 0 if grew else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
