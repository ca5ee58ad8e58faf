"""Kernel safety in the lab: what the series guarantees when something goes wrong.

Own command with the kernel tests (``make test-kernel``, marker ``kernel``). Each scenario
arms edu exactly as tests/system/test_keepalive.py does (edu bound to vfio-pci in the old
kernel, a DMA buffer on device-dax, ``handover arm --token``, a DMA in flight across
``handover arm --exec``) and then looks at one guarantee in the new kernel:

- a host driver cannot bind a held device (only vfio-pci, which manages its DMA);
- a refusal is safe: when the IOMMU driver turns translation off under a held device (the
  state's RTADDR is not the live one; ``intel_iommu=off``), the device is stopped first:
  its release is logged before the driver's "Translation was enabled" line, and its bus
  mastering is off afterwards;
- a state whose preserved ranges are not what the kernel can keep (an IOMMU table outside
  RAM, a range straddling the end of RAM, more than 1/16 of RAM) is refused at boot
  without a panic, and edu, left bus-mastering, is stopped during enumeration.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.system.keepalive_scenario import OLD_KERNEL, boot
from tests.system.keepalive_scenario import rewrite as _rewrite

pytestmark = [pytest.mark.system, pytest.mark.kernel]

# /sys/kernel/handover/ as "path:value" lines (one value per file), plus edu's COMMAND
KFILES = r"""
for f in /sys/kernel/handover/* /sys/kernel/handover/devices/*/*; do
  [ -f "$f" ] && [ "${f##*/}" != blob ] && echo "$f:$(cat "$f")"
done > "$LAB_OUT/kfiles.txt" 2>/dev/null
od -An -tx2 -j4 -N2 /sys/bus/pci/devices/0000:00:03.0/config > "$LAB_OUT/command-end.txt"
dmesg > "$LAB_OUT/dmesg.txt"
"""


def _kfiles(text: str) -> dict:
    """{"state": "valid", "devices/0000:00:03.0/state": "held", ...}"""
    out = {}
    for ln in text.splitlines():
        m = re.match(r"/sys/kernel/handover/((?:devices/[^/]+/)?[^/:]+):(.*)$", ln)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _run(patched, last, spoil: str = "", append: str = ""):  # noqa: F811
    """Boot the three phases; ``append`` goes on the NEW kernel's command line only (what
    ``handover arm`` loads), not on the old kernel's."""
    old = OLD_KERNEL
    if append:
        old = old.replace("--append handover.lab.phase=3", f"--append 'handover.lab.phase=3 {append}'")
        assert old != OLD_KERNEL
    new = boot(patched, ["true\n", old + spoil, last]).phases[2]
    return {name: new.files[name].decode(errors="replace") for name in new.files}


def _stopped(out: dict) -> bool:
    return not int(out["command-end.txt"].split()[0], 16) & 0x4


def test_host_driver_cannot_bind_a_held_device(patched):  # noqa: F811
    """e1000e claims edu's ID: its probe is refused, edu stays held and keeps working."""
    out = _run(patched, r"""
dax=$(ls /dev/dax* | head -1)
echo "1234 11e8" > /sys/bus/pci/drivers/e1000e/new_id 2> "$LAB_OUT/new_id.err" || true
basename "$(readlink /sys/bus/pci/devices/0000:00:03.0/driver 2>/dev/null)" > "$LAB_OUT/driver.txt"
python3 edu_keepalive.py probe 0000:00:03.0 "$dax" "$LAB_OUT/probe.json"
""" + KFILES)
    dmesg, k = out["dmesg.txt"], _kfiles(out["kfiles.txt"])
    assert "0000:00:03.0: handover: e1000e may not bind a held keepalive device" in dmesg, dmesg[-3000:]
    assert out["driver.txt"].strip() in ("", ".")
    assert k["devices/0000:00:03.0/state"] == "held"
    assert '"dma_old_iova": true' in out["probe.json"]
    assert not _stopped(out)


def test_refusal_stops_the_device_before_translation_goes_off(patched):  # noqa: F811
    """The state's RTADDR is not the live one: the IOMMU driver refuses to keep the root
    table and turns translation off; edu, held at enumeration, is stopped before."""
    out = _run(patched, KFILES, _rewrite("units", "r._replace(rtaddr=r.rtaddr + 0x1000)"))
    dmesg, k = out["dmesg.txt"], _kfiles(out["kfiles.txt"])
    released = dmesg.find("0000:00:03.0: handover: released (its DMA translation was not kept)")
    off = dmesg.find("Translation was enabled for dmar0 but we are not in kdump mode")
    assert "root table not kept: the register differs from the saved one" in dmesg, dmesg[-3000:]
    assert 0 <= released < off, dmesg[-3000:]
    assert k["devices/0000:00:03.0/state"] == "released"
    assert k["devices/0000:00:03.0/reason"] == "its DMA translation was not kept"
    assert _stopped(out)


def test_iommu_off_stops_the_device_first(patched):  # noqa: F811
    """intel_iommu=off on the new kernel's command line: every held device is stopped
    before the driver switches the units off."""
    out = _run(patched, KFILES + "cat /proc/cmdline > \"$LAB_OUT/cmdline.txt\"\n",
               append="intel_iommu=off")
    dmesg, k = out["dmesg.txt"], _kfiles(out["kfiles.txt"])
    assert "intel_iommu=off" in out["cmdline.txt"]
    assert "0000:00:03.0: handover: released (DMA remapping is disabled)" in dmesg, dmesg[-3000:]
    assert k["devices/0000:00:03.0/state"] == "released"
    assert _stopped(out)


def _reserved_rows(expr: str) -> str:
    """Guest script: the RESERVED records become ``expr`` (of ``st`` and ``rows``)."""
    return f"""
python3 - <<'EOF'
from handover.formats.codec import decode, encode
from handover.formats.model import Table
from handover.pmem import commit, read_latest
st = decode(read_latest("/dev/pmem0").blob)
rows = list(st.reserved)
st.reserved = Table.from_rows(st.reserved.spec, {expr})
commit("/dev/pmem0", encode(st))
EOF
"""


def _add_range(start: str, size: str, kind: int) -> str:
    """Guest script: one more RESERVED record; start and size are Python expressions
    (of the decoded state ``st``)."""
    return _reserved_rows(f"rows + [rows[0]._replace(start={start}, size={size}, kind={kind})]")


RANGES = {
    # a page-table range on the VT-d unit's registers (MMIO): tables must be RAM
    "table-mmio": (_add_range("0xfed90000", "0x1000", 5), "a preserved table is not in RAM"),
    # a DMA buffer straddling the end of RAM (the legacy pmem range starts at 0x30000000)
    "partly-ram": (_add_range("0x2fff0000", "0x20000", 10), "a preserved range is partly RAM"),
    # 512 MiB of the 1 GiB guest: more than 1/16 of RAM
    "huge": (_add_range("0x4000000", "0x20000000", 10),
             "the preserved RAM exceeds the limit (1/16 of RAM)"),
    # a DMA buffer on the interrupt-remapping table: the device could rewrite its IRTEs
    "buffer-over-ir": (_add_range("list(st.units)[0].irta & ~0xfff", "0x1000", 10),
                       "a preserved DMA buffer overlaps an IOMMU or interrupt table"),
}


@pytest.mark.parametrize("case", sorted(RANGES))
def test_ranges_the_kernel_cannot_keep_are_refused(patched, case):  # noqa: F811
    spoil, why = RANGES[case]
    out = _run(patched, KFILES, spoil)
    dmesg, k = out["dmesg.txt"], _kfiles(out["kfiles.txt"])
    assert k["state"] == "rejected", out["kfiles.txt"]
    assert k["reason"] == why
    assert f"refused: {why}" in dmesg
    assert ("0000:00:03.0: handover: left bus-mastering by the previous kernel but not adopted "
            "(no valid state): stopped") in dmesg
    assert k.get("reserved_ranges") == "0"
    assert _stopped(out)


PAGE_TABLE, DMA_BUFFER = 5, 10
WALK = {
    # the page-table ranges shrink to the root page: the lower levels are not reserved
    "page-table": (_reserved_rows(
        f"[r for r in rows if r.kind != {PAGE_TABLE}] + "
        f"[next(r for r in rows if r.kind == {PAGE_TABLE})._replace("
        f"start=list(st.domains)[0].pgd, size=0x1000)]"),
        "one of its page-table pages is not among the reserved ranges"),
    # no DMA buffer listed: the leaves (the dax buffer) are memory the state does not name
    "no-buffer": (_reserved_rows(f"[r for r in rows if r.kind != {DMA_BUFFER}]"),
                  "it maps memory the state lists as no DMA buffer"),
}


@pytest.mark.parametrize("case", sorted(WALK))
def test_adoption_walks_the_page_tables(patched, case):  # noqa: F811
    """The state itself is valid, but the tables it hands over are not what it lists:
    the kernel walks them before adopting edu's entry, refuses it, and stops edu."""
    spoil, why = WALK[case]
    out = _run(patched, KFILES, spoil)
    dmesg, k = out["dmesg.txt"], _kfiles(out["kfiles.txt"])
    assert k["state"] == "valid", out["kfiles.txt"]
    assert f"0000:00:03.0: context entry not adopted: {why}" in dmesg, "\n".join(
        ln for ln in dmesg.splitlines() if re.search("handover|DMAR|00:03.0", ln))
    assert k["devices/0000:00:03.0/state"] == "released"
    assert _stopped(out)


# after `handover arm`: load the next kernel again, its initrd placed (top-down, below
# --mem-max) over the highest IOMMU table page edu's translation uses
RELOAD_OVER_TABLES = r"""
P=$(python3 - <<'EOF'
from handover.formats.codec import decode
from handover.pmem import read_latest
st = decode(read_latest("/dev/pmem0").blob)
print(max(r.start for r in st.reserved if r.kind in (1, 2, 5)))   # root, context, page table
EOF
)
CMD=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["cmdline"])' "$LAB_OUT/arm.json")
rc=0
kexec -l /payload/lab/vmlinuz.3 --initrd=/payload/lab/initrd.img --command-line="$CMD" \
    --mem-max=$(printf '%#x' $((P + 4095))) > "$LAB_OUT/reload.log" 2>&1 || rc=$?
echo "rc=$rc page=$(printf '%#x' $P)" > "$LAB_OUT/reload.txt"
"""


def test_kexec_never_lands_on_kept_memory(patched):  # noqa: F811
    """The kernel loaded for the kexec has a segment over a page-table page edu's
    translation walks: at the kexec the old kernel disarms (edu stopped, translation
    off) instead of letting the relocation overwrite it under a running device."""
    last = KFILES + 'cat /sys/class/iommu/dmar0/intel-iommu/gsts > "$LAB_OUT/gsts.txt"\n'
    res = boot(patched, ["true\n", OLD_KERNEL + RELOAD_OVER_TABLES, last])
    old, new = res.phases[1], res.phases[2]
    reload = old.files["reload.txt"].decode()
    print(reload, old.files["reload.log"].decode()[-2000:])
    assert reload.startswith("rc=0 "), reload
    page = reload.split("page=")[1].strip()
    # the old kernel saw the overlap and disarmed before its shutdown
    assert re.search(r"handover: 0000:00:03\.0: its (root|context|page) table 0x[0-9a-f]+"
                     r"\+0x[0-9a-f]+ is in a kexec segment", res.console), res.console[-4000:]
    assert re.search(r"handover: kexec segment \d+: 0x[0-9a-f]+\+0x[0-9a-f]+", res.console)
    print("the page-table page under the reloaded initrd:", page)
    assert "handover: disarmed: a kexec segment overlaps memory a kept device uses" in res.console
    # so the new kernel found translation off and edu stopped; nothing was adopted
    out = {name: new.files[name].decode(errors="replace") for name in new.files}
    dmesg, k = out["dmesg.txt"], _kfiles(out["kfiles.txt"])
    assert "Translation already enabled" not in dmesg
    assert k.get("devices/0000:00:03.0/state") != "held", out["kfiles.txt"]
    assert _stopped(out)


# after `handover arm`: the owner maps fresh memory of its own at a new IOVA, so edu's
# translation now uses a leaf (and page tables) the saved state does not preserve
MAP_AFTER_SAVE = r"""
python3 edu_keepalive.py map 0000:00:03.0 0x800000 0x200000 > "$LAB_OUT/map.txt" 2>&1
"""


def test_a_mapping_after_the_save_disarms(patched):  # noqa: F811
    """Between the save and the kexec the owner maps more memory: the saved state no
    longer describes edu's translation (the next kernel would neither reserve that memory
    nor find the new leaf in a preserved buffer). At the kexec the old kernel compares its
    live tables with the newest state in the region, disarms (edu stopped, translation
    off as for any kexec), and the new kernel keeps nothing."""
    res = boot(patched, ["true\n", OLD_KERNEL + MAP_AFTER_SAVE, KFILES])
    old, new = res.phases[1], res.phases[2]
    assert old.files["map.txt"].decode().strip() == "map 0x800000+0x200000: ok"
    assert re.search(r"handover: 0000:00:03\.0: its (mapped memory|page table) 0x[0-9a-f]+"
                     r"\+0x[0-9a-f]+ is not preserved by the saved state", res.console), \
        res.console[-4000:]
    assert ("handover: disarmed: the translation of a kept device changed after the save"
            ) in res.console
    out = {name: new.files[name].decode(errors="replace") for name in new.files}
    dmesg, k = out["dmesg.txt"], _kfiles(out["kfiles.txt"])
    assert "Translation already enabled" not in dmesg
    assert k.get("devices/0000:00:03.0/state") != "held", out["kfiles.txt"]
    assert _stopped(out)


def test_preserved_memory_survives_memory_pressure(patched):  # noqa: F811
    """The new kernel gives most of its RAM to huge pages at boot, every page zeroed as it
    is allocated (init_on_alloc=1): had any page edu's translation or interrupts use not
    been reserved before the allocator started, it would be handed out and zeroed. edu's
    root, context and page tables and its IRTE are found intact: its DMA with the old IOVA
    lands in the dax buffer and its MSI comes through the old IRTE."""
    out = _run(patched, r"""
dax=$(ls /dev/dax* | head -1)
grep -E '^(MemTotal|MemFree|HugePages_Total|Hugepagesize):' /proc/meminfo > "$LAB_OUT/meminfo.txt"
cat /proc/cmdline > "$LAB_OUT/cmdline.txt"
python3 edu_keepalive.py probe 0000:00:03.0 "$dax" "$LAB_OUT/probe.json"
""" + KFILES, append="init_on_alloc=1 hugepages=300")
    mem = {ln.split(":")[0]: int(ln.split()[1]) for ln in out["meminfo.txt"].splitlines()}
    print(out["meminfo.txt"])
    assert "init_on_alloc=1" in out["cmdline.txt"] and "hugepages=300" in out["cmdline.txt"]
    # most of the guest's RAM went to huge pages at boot (2 MiB each)
    assert mem["HugePages_Total"] * mem["Hugepagesize"] >= 0.6 * mem["MemTotal"], mem
    k = _kfiles(out["kfiles.txt"])
    assert k["state"] == "valid" and k["devices/0000:00:03.0/state"] == "held"
    assert k["devices/0000:00:03.0/translation"] == "adopted"
    probe = json.loads(out["probe.json"])
    assert probe["dma_old_iova"] is True and probe["irq_status_after_raise"] & 1
    assert "No irq handler for 0." in out["dmesg.txt"]   # the MSI came through the old IRTE
