"""A passthrough device kept alive across kexec (issue 7), proven in the QEMU lab.

Own command: ``make test-keepalive`` (= ``pytest -m kernel tests/system/test_keepalive.py``;
also part of ``make test-kernel``). It needs the patched kernel (``make kernel``).

Scenario, on the patched kernel both sides:
  phase 1  Debian's stock kernel: nothing; kexec into the patched kernel.
  phase 2  the old kernel. A second legacy pmem range becomes a device-dax namespace (its
           memory survives a kexec, as a VMM's guest RAM does). edu is bound to vfio-pci;
           vfio_edu.py maps 2 MiB of the dax device at IOVA 0x100000, runs a DMA round trip
           and an MSI, and stays open. ``handover arm --token`` saves the state, loads the
           next kernel with handover= and names edu in /sys/kernel/handover/keepalive; edu
           is given a DMA to the old IOVA as the last command before ``handover arm --exec``,
           and the kexec leaves translation, IR and edu's bus mastering on.
  phase 3  the new kernel, booted with handover=. It must adopt the root table in place,
           edu's context entry (same domain ID) and IRTE, leave edu's BARs, MSI and bus
           mastering alone, and give every other device fresh IOMMU state (the virtio disks
           keep working: the results of this phase are written through one). The DMA in
           flight across the kexec landed in the dax buffer. Then, with no driver, edu DMAs with the OLD IOVA into the dax buffer and raises its MSI through
           the old IRTE; ``handover load`` accepts. A non-owner attaches edu's group to a
           container and leaves: nothing changes. The new owner opens edu through vfio-pci
           only with the token and only once it mapped the old IOVA again onto the same dax
           buffer; its domain then takes the translation over: edu DMAs with the old IOVA,
           gets its MSI on an eventfd, reaches memory the owner maps at a new IOVA, and no
           longer reaches what the owner unmaps.
The fallback runs end differently. ``handover load`` with a wrong token rejects the state in
the initramfs: the kernel releases edu (bus mastering and MSI off, its adopted context entry
dropped, reset if it had a method) and the boot goes on. Or the kernel rejects it itself,
before anything is adopted: a state whose inside is corrupt (refused by the parser), or one
whose device identity or BAR differs from the device found at enumeration, or whose IRTA
differs from the live one (the IR table is not kept, so edu's interrupts would be lost); edu,
left bus-mastering by the armed kexec, is stopped during enumeration and translation is
disabled as on a stock kernel.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.system import lab
from tests.system.keepalive_scenario import (DAX_RANGE, EDU, NEW_KERNEL_COMMON,
                                             NEW_KERNEL_KEEP, OLD_KERNEL, TOKEN, WRONG, boot)
from tests.system.keepalive_scenario import rewrite as _rewrite
from tests.system.patched import status as _status

pytestmark = [pytest.mark.system, pytest.mark.kernel]

# after the save in the old kernel: replace the state with a damaged one (new generation)
SPOIL = {
    "corrupt": r"""
python3 - <<'EOF'
from handover.pmem import commit, read_latest
blob = bytearray(read_latest("/dev/pmem0").blob)
blob[600] ^= 0x40          # inside a section: its CRC no longer matches
commit("/dev/pmem0", bytes(blob))
EOF
""",
    "identity": _rewrite("devices", "r._replace(device=0x11e9)"),
    "bar": _rewrite("bars", "r._replace(start=r.start + 0x100000)"),
    "irta": _rewrite("units", "r._replace(irta=r.irta + 0x100000)"),
    # edu's BAR0 (1 MiB) recorded with a size no BAR has: the kernel would believe it
    "bar-size": _rewrite("bars", "r._replace(size=0x180000) if (r.sbdf, r.index) == (0x18, 0) else r"),
    # edu's BAR0 not recorded at all: the kernel would size it, writing it under a running device
    "no-bar": r"""
python3 - <<'EOF'
from handover.formats.codec import decode, encode
from handover.formats.model import Table
from handover.pmem import commit, read_latest
st = decode(read_latest("/dev/pmem0").blob)
st.bars = Table.from_rows(st.bars.spec, [r for r in st.bars if (r.sbdf, r.index) != (0x18, 0)])
commit("/dev/pmem0", encode(st))
EOF
""",
}

NEW_KERNEL_REJECT = NEW_KERNEL_COMMON + r"""
python3 -m handover load --region /dev/pmem0 --token WRONG --json > "$LAB_OUT/load.json" 2>"$LAB_OUT/load.err" || echo "load rc=$?" >> "$LAB_OUT/load.err"
hstatus > "$LAB_OUT/status-end.txt" 2>&1
cat /sys/kernel/debug/iommu/intel/dmar_translation_struct > "$LAB_OUT/dmar_translation-end.txt" 2>&1 || true
od -An -tx2 -j4 -N2 /sys/bus/pci/devices/0000:00:03.0/config > "$LAB_OUT/command-end.txt"
dmesg > "$LAB_OUT/dmesg.txt"
""".replace("WRONG", WRONG)


NEW_KERNEL_KERNEL_REJECTS = lab.HSTATUS + r"""
hstatus > "$LAB_OUT/status.txt" 2>&1
cat /sys/class/iommu/dmar0/intel-iommu/gsts > "$LAB_OUT/gsts.txt"
od -An -tx2 -j4 -N2 /sys/bus/pci/devices/0000:00:03.0/config > "$LAB_OUT/command-end.txt"
dmesg > "$LAB_OUT/dmesg.txt"
"""


def _run(patched, last, spoil: str = "", **run_kw):  # noqa: F811
    return boot(patched, ["true\n", OLD_KERNEL + spoil, last], **run_kw)


def _text(phase, name):
    return phase.files[name].decode(errors="replace")


def _edu_context(dump: str) -> str:
    """edu's context entry ("hi:lo") from dmar_translation_struct; "" when absent. In
    scalable mode with its PASID and PASID-table entry ("hi:lo pasid val2:val1:val0")."""
    for ln in dump.splitlines():
        f = ln.split()
        if len(f) >= 3 and f[0] == "00:03.0":
            return " ".join(f[2:5])
    return ""


def _edu_irtes(dump: str) -> set:
    """The IRTEs whose source id is edu (index, vector, high, low) from ir_translation_struct."""
    return {" ".join(ln.split()) for ln in dump.splitlines()
            if len(ln.split()) >= 6 and ln.split()[1] == "00:03.0"}


IORESOURCE_PCI_FIXED = 0x10


def _resources(text: str) -> list:
    """(start, end, flags) per line of a sysfs `resource` file."""
    return [tuple(int(x, 16) for x in ln.split()) for ln in text.splitlines() if ln.strip()]


def _handle(addr: int) -> int:
    """The IRTE handle of a remappable-format MSI address (VT-d 5.1.5.2)."""
    assert addr & 0x10, f"MSI address {addr:#x} is not in remappable format"
    return (addr >> 5) & 0x7FFF | ((addr >> 2) & 1) << 15


def _kexec_to(res, marker):
    """Seconds from `handover arm --exec` (phase 2) to ``marker`` in phase 3."""
    m = lab.index_markers(res.markers)
    a, b = m.get(("ARM-EXEC", 2)), m.get((marker, 3))
    return round(b[0] - a[0], 2) if a and b else None


@pytest.mark.parametrize("iommu", ["legacy", "scalable"])
def test_keepalive_device_survives_kexec(patched, iommu):  # noqa: F811
    res = _run(patched, NEW_KERNEL_KEEP, iommu=iommu)
    old, new = res.phases[1], res.phases[2]
    print(_text(new, "status.txt"))
    print("\n".join(ln for ln in _text(new, "dmesg.txt").splitlines()
                    if re.search(r"handover|DMAR|DMA-?R|vector|edu|00:03.0", ln)))
    print(_text(new, "probe.json"), _text(new, "owner.json"), _text(new, "load.err"))
    print(_text(new, "intruder.json") if "intruder.json" in new.files else "no intruder.json")
    print("handover arm --exec -> /init:", _kexec_to(res, "INIT"), "s")
    print("handover arm --exec -> edu DMA with the old IOVA:", _kexec_to(res, "EDU-DMA-OK"), "s")
    print("handover arm --exec -> new owner's DMA + MSI:", _kexec_to(res, "EDU-OWNER-OK"), "s")
    assert "dma_roundtrip=ok" in _text(old, "vfio-ready.txt")
    status = _status(_text(new, "status.txt"))
    assert status["state"] == "valid"
    assert status["root_tables_kept"] == "1" and status["ir_tables_kept"] == "1"
    assert re.search(r"device: 0000:00:03.0 held adopted domain=\d+", _text(new, "status.txt"))
    # the root table, edu's context entry (domain ID, page tables) and IRTEs are the saved ones
    assert _text(new, "rtaddr.txt") == _text(old, "rtaddr.txt")
    assert int(_text(old, "rtaddr.txt"), 16) >> 10 & 1 == (iommu == "scalable")   # RTADDR.SMT
    ctx_old = _edu_context(_text(old, "dmar_translation.txt"))
    assert ctx_old and _edu_context(_text(new, "dmar_translation.txt")) == ctx_old
    # the saved entry: in scalable mode the RID_PASID's PASID entry, second level only
    saved_ctx = [c for c in json.loads(old.files["inspect.json"])["contexts"] if c["device"] == EDU]
    assert len(saved_ctx) == 1 and saved_ctx[0]["scalable"] == (iommu == "scalable")
    if iommu == "scalable":
        assert saved_ctx[0]["pasid"] == 0 and len(ctx_old.split()) == 3
        assert int(saved_ctx[0]["pasid_entry"][1], 16) & 0xFFFF == saved_ctx[0]["did"]
        assert int(saved_ctx[0]["pasid_entry"][2], 16) >> 6 & 7 == 2        # PGTT: second level
        kinds = {r["kind"] for r in json.loads(old.files["inspect.json"])["reserved"]}
        assert {"pasid-dir", "pasid-table"} <= kinds, kinds
    irte_old = _edu_irtes(_text(old, "ir_translation.txt"))
    assert irte_old and irte_old <= _edu_irtes(_text(new, "ir_translation.txt"))
    # BARs did not move; bus mastering and MSI stayed on; the buffer survived
    bars_old, bars_new = _resources(_text(old, "edu-resource.txt")), _resources(_text(new, "edu-resource.txt"))
    assert [b[:2] for b in bars_new] == [b[:2] for b in bars_old]
    # ... and the kernel marked them IORESOURCE_PCI_FIXED (never reassigned)
    assert bars_new[0][2] == bars_old[0][2] | IORESOURCE_PCI_FIXED
    probe = json.loads(new.files["probe.json"])
    assert probe["command"] & 0x4 and probe["msi"][0]
    pattern = re.search(r"pattern=([0-9a-f]+)", _text(old, "vfio-ready.txt")).group(1)
    assert probe["preserved"] == pattern
    # a DMA started just before `kexec -e` landed in the preserved buffer
    inflight = json.loads(old.files["inflight.json"])
    assert inflight["staged"] and probe["inflight"] == inflight["pattern"]
    arm = json.loads(old.files["arm.json"])
    assert arm["keepalive"] == {"armed": True, "devices": [EDU]}
    # edu's VFIO files are held for the kexec in case their owner (vfio_edu.py) exits
    assert arm["hold"]["holder"] and [o["comm"] for o in arm["hold"]["owners"]] == ["python3"]
    assert {"handover=0x4000000@0x30000000", DAX_RANGE, "nokaslr"} <= set(arm["cmdline"].split())
    # DMA with the old IOVA after kexec lands in the preserved buffer
    assert probe["dma_old_iova"] is True
    # `handover load` in the new kernel: the state matches the machine; the kernel says edu is held
    assert "load rc=" not in _text(new, "load.err"), _text(new, "load.err")
    load = json.loads(new.files["load.json"])
    assert load["ok"] and load["kernel_interface"]["written"] == "accept"
    assert load["kernel_interface"]["status"]["keepalive"] == [
        {"bdf": EDU, "state": "held", "adopted": True, "domain": saved_ctx[0]["did"], "why": None}]
    assert _status(_text(new, "status-end.txt"))["state"] == "accepted"
    # the new owner: token required, and the old IOVA mapped again onto the same memory;
    # then the old IOVA works through the owner's domain, MSI delivered
    owner = json.loads(new.files["owner.json"])
    assert owner["no_token"] == "EPERM" and owner["wrong_token"] == "EPERM"
    assert owner["owner_token_unmapped"] == "EADDRNOTAVAIL"
    assert owner["translation_before_map"] == "adopted" and owner["map_old"] == "ok"
    assert owner["owner_token"] == "opened" and owner["command_at_open"] & 0x4
    assert owner["dma_old_iova"] is True and owner["msi_eventfd"] == "ok"
    # a non-owner's attach and detach (its container, no token) left the adopted entry
    intruder = json.loads(new.files["intruder.json"])
    assert intruder["open"] == "EPERM"
    assert intruder["translation_before"] == intruder["translation_after"] == "adopted"
    # the owner really owns the translation: its map reaches edu, its unmap revokes
    dmesg = _text(new, "dmesg.txt")
    assert re.search(r"00:03.0: (DMAR: )?handover: the owner has not mapped IOVA 0x100000 as "
                     r"the previous kernel did", dmesg)
    assert owner["translation"] == "owner"
    assert re.search(r"00:03.0: (DMAR: )?handover: translation handed over to the owner's "
                     r"domain \d+ \(512 of its pages checked\)", dmesg), "no hand-over"
    assert owner["map_new"] == "ok" and owner["dma_new_iova"] is True
    assert "already set" not in dmesg
    assert owner["unmapped_old"] == 2 << 20 and owner["dma_old_iova_unmapped"] is False
    assert owner["dma_new_iova_still"] is True
    assert owner["unmapped_new"] == 2 << 20 and owner["dma_new_iova_unmapped"] is False
    # (scalable mode: the fault names the RID_PASID, PASID 0)
    assert re.search(r"DMAR: \[DMA (Read|Write) (NO_PASID|PASID 0x0)\] Request device \[00:03.0\]",
                     dmesg)
    # ... through the IRTE edu used before the kexec: the message keeps its handle
    saved = [v for v in json.loads(old.files["inspect.json"])["vectors"]
             if v["device"] == EDU and v["kind"] == "MSI"]
    assert saved and "IRTE_KNOWN" in saved[0]["flags"]
    assert _handle(probe["msi"][1]) == saved[0]["irte_index"]
    # before any owner, edu's MSI came in through that IRTE: its vector, which nothing in
    # this kernel has a handler for yet
    irte = [i for i in json.loads(old.files["inspect.json"])["irtes"]
            if i["index"] == saved[0]["irte_index"]]
    assert irte and f"No irq handler for 0.{irte[0]['decoded']['vector']}" in _text(new, "dmesg.txt")
    assert owner["msi_after_owner"][0] and _handle(owner["msi_after_owner"][1]) == saved[0]["irte_index"]
    new_irte = [ln for ln in _edu_irtes(owner["ir_translation"])
                if ln.split()[0] == str(saved[0]["irte_index"])]
    assert new_irte, "edu's IRTE index is not in use after the owner enabled MSI"


def test_rejected_state_releases_the_device(patched):  # noqa: F811
    res = _run(patched, NEW_KERNEL_REJECT)
    new = res.phases[2]
    print(_text(new, "status-end.txt"), _text(new, "load.err"))
    print("\n".join(ln for ln in _text(new, "dmesg.txt").splitlines() if "handover" in ln))
    assert "load rc=6" in _text(new, "load.err")
    end = _status(_text(new, "status-end.txt"))
    assert end["state"] == "aborted"
    assert re.search(r"device: 0000:00:03.0 released .*\(the handover was aborted\)",
                     _text(new, "status-end.txt"))
    assert not int(_text(new, "command-end.txt").split()[0], 16) & 0x4
    assert not _edu_context(_text(new, "dmar_translation-end.txt"))
    assert "handover: released (the handover was aborted)" in _text(new, "dmesg.txt")


@pytest.mark.parametrize("spoil", ["corrupt", "identity", "bar", "bar-size", "no-bar", "irta"])
def test_kernel_rejects_and_stops_the_device(patched, spoil):  # noqa: F811
    res = _run(patched, NEW_KERNEL_KERNEL_REJECTS, SPOIL[spoil])
    new = res.phases[2]
    text = _text(new, "status.txt")
    dmesg = _text(new, "dmesg.txt")
    print(text, "\n".join(ln for ln in dmesg.splitlines() if "handover" in ln or "DMAR" in ln))
    status = _status(text)
    if spoil == "corrupt":
        assert status["state"] == "rejected" and status["error"].startswith("SECTION_CRC")
        why = "no valid state"
    else:
        assert status["state"] == "valid"
        why = {"identity": "its identity differs from the saved one",
               "bar": "a BAR differs from the saved one",
               "bar-size": "a BAR's saved size is no BAR size",
               "no-bar": "a BAR the state does not record",
               "irta": "its interrupt-remapping table was not kept"}[spoil]
        if spoil == "irta":
            # the state's IRTA is not the live one: IR is reprogrammed as on a stock kernel
            assert status["ir_tables_kept"] == "0"
            assert "interrupt-remapping table not kept: the register differs from the saved one" in dmesg
        assert re.search(rf"device: 0000:00:03.0 released \({why}\)", text)
    if spoil == "corrupt":
        # the old kernel reads the newest state at the kexec itself (0011): it does not
        # parse, so the kexec is disarmed and the old kernel's shutdown stops edu
        assert "handover: disarmed: the saved state does not parse" in res.console
    else:
        # edu was left bus-mastering by the armed kexec: stopped during enumeration, said why
        assert (f"0000:00:03.0: handover: left bus-mastering by the previous kernel but not "
                f"adopted ({why}): stopped") in dmesg
    assert not int(_text(new, "command-end.txt").split()[0], 16) & 0x4
    # nothing adopted: no context entry kept, translation disabled as on a stock kernel
    assert "adopted the context entry" not in dmesg



# --------------------------------------------------------------------------------------
# Ten keepalive kexecs in a row: each new kernel adopts edu, its owner takes it over with
# the token (the same IOVA mapped again onto the same dax buffer), DMAs and gets its MSI,
# and arms the next kexec. Nothing may accumulate from one kernel to the next.
CHAIN_KEXECS = 10

# what each kernel of the chain measures: "key: value" lines in $LAB_OUT/metrics.txt
CHAIN_METRICS = r"""
{
echo "mem_total_kb: $(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
echo "reserved_bytes: $(cat /sys/kernel/handover/reserved_bytes)"
echo "reserved_ranges: $(cat /sys/kernel/handover/reserved_ranges)"
echo "domains_used: $(cat /sys/class/iommu/dmar0/intel-iommu/domains_used)"
echo "irtes_present: $(grep -cE '^ *[0-9]+ +[0-9a-f]{2}:' /sys/kernel/debug/iommu/intel/ir_translation_struct)"
echo "translation: $(cat /sys/kernel/handover/devices/0000:00:03.0/translation)"
echo "state: $(cat /sys/kernel/handover/state)"
} > "$LAB_OUT/metrics.txt" 2>&1
"""

# each kernel of the chain: accept, then the owner (vfio_edu.py with the token) maps the old
# IOVA again, takes edu over, DMAs and gets its MSI, and stays open; then the metrics
CHAIN_OWNER = (NEW_KERNEL_COMMON + r"""
python3 -m handover load --region /dev/pmem0 --token TOKEN --json > "$LAB_OUT/load.json" 2>"$LAB_OUT/load.err" || echo "load rc=$?" >> "$LAB_OUT/load.err"
echo vfio-pci > /sys/bus/pci/devices/0000:00:03.0/driver_override
echo 0000:00:03.0 > /sys/bus/pci/drivers_probe
python3 vfio_edu.py 0000:00:03.0 /tmp/vfio-ready /tmp/vfio-stop "$dax" TOKEN > /tmp/vfio-holder.log 2>&1 &
i=0; while [ ! -f /tmp/vfio-ready ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
cat /tmp/vfio-holder.log >&2
cat /tmp/vfio-ready > "$LAB_OUT/vfio-ready.txt"
""" + CHAIN_METRICS).replace("TOKEN", TOKEN)

# ... and arms the next kexec
CHAIN_KERNEL = CHAIN_OWNER + r"""
dmesg > "$LAB_OUT/dmesg.txt"
python3 -m handover arm --kernel /payload/lab/vmlinuz.NEXT --initrd /payload/lab/initrd.img \
    --command-line "$(cat /payload/lab/cmdline.NEXT)" --append handover.lab.phase=NEXT \
    --region /dev/pmem0 --token TOKEN --json > "$LAB_OUT/arm.json"
echo "exec python3 -m handover arm --exec" > /lab/exec
""".replace("TOKEN", TOKEN)

# ... or, the last one, lets the owner go
CHAIN_LAST = CHAIN_OWNER + r"""
touch /tmp/vfio-stop
dmesg > "$LAB_OUT/dmesg.txt"
"""


def _metrics(phase) -> dict:
    return dict(ln.split(": ", 1) for ln in _text(phase, "metrics.txt").splitlines()
                if ": " in ln)


def test_ten_keepalive_kexecs(patched):  # noqa: F811
    """Phase 2 arms edu (as above); phases 3..12 are ten kernels a keepalive kexec booted."""
    first, last = 3, 2 + CHAIN_KEXECS
    scripts = ["true\n", OLD_KERNEL]
    scripts += [CHAIN_KERNEL.replace("NEXT", str(n + 1)) for n in range(first, last)]
    scripts.append(CHAIN_LAST)
    res = boot(patched, scripts, timeout=600 + 150 * CHAIN_KEXECS)
    rows = []
    for n in range(first, last + 1):
        ph = res.phases[n - 1]
        m = _metrics(ph)
        rows.append(m)
        dmesg = _text(ph, "dmesg.txt")
        print(f"kernel {n - 2}: {m}")
        # adopted at boot, handed over to the owner, who DMAs and gets its MSI
        assert m["state"] == "accepted" and m["translation"] == "owner", (n, m)
        assert "dma_roundtrip=ok" in _text(ph, "vfio-ready.txt"), (n, _text(ph, "vfio-ready.txt"))
        assert "msi_eventfd=ok" in _text(ph, "vfio-ready.txt"), n
        assert "already set" not in dmesg, n
        assert re.search(r"00:03.0: (DMAR: )?handover: translation handed over to the owner's domain",
                         dmesg), n
        if n < last:
            assert json.loads(ph.files["arm.json"])["keepalive"]["armed"] is True, n
    # nothing accumulates: the last kernel looks like the first
    for key in ("mem_total_kb", "reserved_bytes", "domains_used", "irtes_present"):
        assert len({r[key] for r in rows}) == 1, (key, [r[key] for r in rows])
    # the same bytes in one range more or less: adjacent page-table pages are merged into one
    # range (live_ranges), and whether two are adjacent depends on where the kernel put them
    ranges = [int(r["reserved_ranges"]) for r in rows]
    assert max(ranges) - min(ranges) <= 1, ranges


# after `handover arm`: the VMM (vfio_edu.py) closes everything and exits; the kexec then
# runs with only the holder `handover arm` started keeping edu's VFIO files open
VMM_EXITS = r"""
touch /tmp/vfio-stop
i=0; while pgrep -f vfio_edu.py > /dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
pgrep -f vfio_edu.py > "$LAB_OUT/vmm-after-exit.txt" || echo gone > "$LAB_OUT/vmm-after-exit.txt"
cp /run/handover/hold.json "$LAB_OUT/hold.json"
h=$(python3 -c 'import json; print(json.load(open("/run/handover/hold.json"))["holder"])')
for f in /proc/$h/fd/*; do readlink "$f"; done > "$LAB_OUT/holder-fds.txt"
od -An -tx2 -j4 -N2 /sys/bus/pci/devices/0000:00:03.0/config > "$LAB_OUT/command-after-exit.txt"
echo 'exec python3 -m handover arm --exec' > /lab/exec
"""


def test_the_vmm_may_exit_before_the_kexec(patched):  # noqa: F811
    """The owner quits after `handover arm` (as a VMM does after set-keepalive and savevm):
    its VFIO files stay open in the holder, so the kernel neither resets edu nor drops its
    mappings, and the next kernel finds edu running as in the main scenario."""
    res = _run(patched, NEW_KERNEL_KEEP, VMM_EXITS)
    old, new = res.phases[1], res.phases[2]
    print(_text(old, "hold.json"), _text(old, "holder-fds.txt"))
    assert _text(old, "vmm-after-exit.txt").strip() == "gone"
    hold = json.loads(old.files["hold.json"])
    assert hold["holder"] and [o["comm"] for o in hold["owners"]] == ["python3"]
    fds = _text(old, "holder-fds.txt").split()
    assert "/dev/vfio/vfio" in fds and "anon_inode:[vfio-device]" in fds
    assert any(re.fullmatch(r"/dev/vfio/\d+", f) for f in fds)
    # with its owner gone, edu still bus-masters in the old kernel ...
    assert int(_text(old, "command-after-exit.txt").split()[0], 16) & 0x4
    # ... and in the new one: adopted, its old IOVA still reaches the dax buffer
    status = _status(_text(new, "status.txt"))
    assert status["state"] == "valid"
    assert re.search(r"device: 0000:00:03.0 held adopted domain=\d+", _text(new, "status.txt"))
    probe = json.loads(new.files["probe.json"])
    assert probe["command"] & 0x4 and probe["dma_old_iova"] is True
    owner = json.loads(new.files["owner.json"])
    assert owner["owner_token"] == "opened" and owner["dma_old_iova"] is True
    assert owner["msi_eventfd"] == "ok"
