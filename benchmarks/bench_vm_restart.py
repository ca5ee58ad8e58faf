#!/usr/bin/env python3
"""VM fast restart across a host kexec (issue 15, Stage-2): how long the VM is paused, and
where the time goes, against a cold start of the same VM in the same run.

    python benchmarks/bench_vm_restart.py [--json] [--runs N] [--config lab|debian] [--svg FILE]

Needs the patched kernel (``make kernel``) and the patched QEMU (``make qemu``). Each run is
the scenario of tests/system/test_vm_keepalive.py (tests/system/vm_keepalive.py): the lab's
Debian host runs the VM (edu passed through, RAM on device-dax) as a systemd unit; ``handover
vm save``, ``handover arm --exec`` (systemctl kexec into the patched kernel), ``handover vm
restore``.

Figures (host wall clock of the lab's serial-console markers, TCG, 1 vCPU; medians):

- ``pause_outside_s``: the last moment the VM ran (``handover vm save`` starts) -> its first
  DMA round after the resume;
- ``pause_guest_s``: the same pause as the guest saw it: the longest gap of its CMOS clock
  (the host's wall clock, 1 s resolution) between two rounds;
- each step of the pause (vm save, handover save + arm, systemctl kexec to /init, initramfs
  and systemd, QEMU start + vm restore, first round), and ``handover_s``, handover's own
  share (vm save + save/arm);
- ``cold_start_s``, the baseline: the same VM started fresh in the same run (QEMU start ->
  first round; what a restart without keepalive costs before the guest even begins its own
  recovery), and ``pause_vs_cold_start``.

``--svg FILE`` draws the median run as a timeline (benchmarks/timeline.py). Figures go to
stdout, progress to stderr.
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

from benchmarks.timeline import Step, svg  # noqa: E402


def one_run(config: str) -> dict:
    from tests.system import lab, vm_keepalive as vk
    from tests.system.keepalive_scenario import boot
    from tests.system.patched import patched_kernel

    patched = patched_kernel(config)
    res = boot(patched, ["true\n", vk.OLD, vk.new_script()], rootfs="debian", timeout=2400,
               files=vk.files())
    after = json.loads(res.phases[2].files["progress-after.json"])
    last = after[-1]
    if last["rounds"] < after[0]["rounds"] + 5 or last["errors"] or last["polled"]:
        raise SystemExit(f"bench_vm_restart: the VM did not go on after the restart: {last}")
    figs = vk.pause_figures(res)
    t = {k: v[0] for k, v in lab.index_markers(res.markers).items()}
    figs["pause_guest_s"] = last["max_gap"]
    figs["cold_start_s"] = round(t[("VM-FIRST-ROUND", 2)] - t[("VM-START", 2)], 1)
    figs["timeline"] = vk.timeline(res)
    figs["handover_s"] = round(sum(e - s for _w, s, e, who in figs["timeline"] if who == "handover"), 1)
    return figs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--config", choices=["lab", "debian"], default="lab")
    ap.add_argument("--svg", metavar="FILE", help="draw the median run's timeline here")
    a = ap.parse_args()
    runs = []
    for i in range(a.runs):
        print(f"bench_vm_restart: run {i + 1}/{a.runs}", file=sys.stderr, flush=True)
        runs.append(one_run(a.config))
    keys = [k for k in runs[0] if k != "timeline"]
    med = {k: round(statistics.median(r[k] for r in runs if r.get(k) is not None), 2) for k in keys}
    if med.get("cold_start_s"):
        med["pause_vs_cold_start"] = round(med["pause_outside_s"] / med["cold_start_s"], 2)
    mid = sorted(runs, key=lambda r: r["pause_outside_s"])[len(runs) // 2]
    if a.svg:
        steps = [Step(*step) for step in mid["timeline"]]
        Path(a.svg).write_text(svg(f"VM restart across a host kexec ({a.config} kernel, TCG)", steps,
                                   note=f"pause {mid['pause_outside_s']} s"))
        print(f"bench_vm_restart: timeline in {a.svg}", file=sys.stderr)
    out = {"config": a.config, "runs": runs, "median": med, "load_avg_1m": os.getloadavg()[0]}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in med.items():
            print(f"{k:55s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
