#!/usr/bin/env python3
"""`make demo`, stage 2: the whole handover cycle on an emulated host (QEMU/TCG).
Run from the repository's root: ``python -m tests.system.demo_cycle [options]``.

Sets itself up on a fresh Debian 12 machine (as root): the lab installs its apt packages,
downloads Debian's stock linux-image-6.12 (cached in ~/.cache/handover-lab), and the real
initramfs-tools builds the second kernel's initramfs with our hook.  Then, twice:

1. a true state: first kernel `handover arm` (save + kexec -l) and `handover arm --exec`;
   the second kernel's initramfs runs `handover load` -> MATCH, the boot goes on;
2. a stale state (a saved BAR altered before the kexec, policy abort) -> MISMATCH reported,
   nothing to abort on a stock kernel, the boot goes on.

Prints what was saved (`handover inspect`), what the second kernel found (verdicts from
/run/handover/result.json) and the time of each phase.  Options: --only-match, --dracut,
--nvdimm, --echo (copy the guest console to stderr).
"""

from __future__ import annotations

import argparse
import sys

from tests.system import e2e, lab


def banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def show(c: e2e.Cycle) -> None:
    a = c.arm
    print(f"first kernel: handover arm --kernel {a['kernel']} --initrd {a['initrd']} ...")
    print(f"  kernel: {a['kernel_declaration']}")
    s = a["save"]
    print(f"  saved {', '.join(s['devices'])}: {s['size']} bytes, generation {s['generation']} "
          f"to {a['region']}" + (f" (TEST: altered {s['test_altered_bars']})"
                                 if s.get("test_altered_bars") else ""))
    print(f"  next command line: {a['cmdline']}")
    print("\n$ handover inspect --limit 3 (in the first kernel, after the save):")
    print("  " + "\n  ".join(c.inspect.rstrip().splitlines()[:40]))
    print(f"\nsecond kernel: initramfs ({c.kind}, {c.initrd_facts['bytes'] / 1e6:.1f} MB), "
          "boot script -> handover load:")
    for ln in c.console_lines:
        if not ln.startswith("handover: executing"):
            print(f"  console| {ln}")
    if c.result is None:
        print("  no result.json came back")
    else:
        print(f"  result.json: ok={c.result.get('ok')} summary={c.result.get('summary')}")
        for v in c.result.get("verdicts", []):
            extra = "" if v["status"] == "match" else f"  saved {v.get('saved')}, host {v.get('host')}"
            print(f"    {v['status']:<10} {v['item']}{extra}")
    if c.boot:
        print(f"  boot.json: rc={c.boot['rc']} policy={c.boot['policy']} action={c.boot['action']}")
    print(f"  boot continued to the root file system's /sbin/init: {'yes' if c.reached_root else 'NO'}")
    print("\ntimings (TCG emulation; a real host is 10-50x faster):")
    print(e2e.format_timings(c.timings))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only-match", action="store_true", help="skip the stale-state run")
    ap.add_argument("--dracut", action="store_true", help="dracut instead of initramfs-tools")
    ap.add_argument("--nvdimm", action="store_true", help="QEMU NVDIMM (devdax) instead of memmap=")
    ap.add_argument("--echo", action="store_true", help="copy the guest console to stderr")
    a = ap.parse_args(argv)
    kind = "dracut" if a.dracut else "initramfs-tools"
    pmem = "nvdimm" if a.nvdimm else "legacy"
    runs = [("a true state", dict(stale=False, policy="report"))]
    if not a.only_match:
        runs.append(("a stale state (saved BAR moved; policy abort)", dict(stale=True, policy="abort")))
    ok = True
    for title, kw in runs:
        banner(f"handover cycle on QEMU: {title} ({kind}, pmem {pmem})")
        try:
            c = e2e.run_cycle(kind=kind, pmem=pmem, echo=a.echo, **kw)
        except lab.LabUnavailable as e:
            print(f"demo: the QEMU lab is not available here: {e}", file=sys.stderr)
            return 1
        show(c)
        expect_rc = 6 if kw["stale"] else 0
        good = c.reached_root and c.boot is not None and c.boot["rc"] == expect_rc
        print(f"\n=> {'as expected' if good else 'UNEXPECTED'}: load exit {c.boot and c.boot['rc']} "
              f"(expected {expect_rc}), boot {'continued' if c.reached_root else 'STOPPED'}")
        ok &= good
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
