"""The keepalive scenario in the lab (tests/system/test_keepalive.py describes it), shared by
test_keepalive, test_keepalive_safety and benchmarks/bench_keepalive_kexec.py: the old
kernel's script that binds edu to vfio-pci, arms it and leaves a DMA in flight across
``handover arm --exec``, and the new kernel's script that proves edu kept running.
"""

from __future__ import annotations

from pathlib import Path

from tests.system import lab
from tests.system.patched import REGION, ROOT, on_patched

TOKEN = "8c1f3a52-6b0e-4d7a-9e21-5f4c2b9d7a10"
WRONG = "00000000-1111-2222-3333-444444444444"
EDU = "0000:00:03.0"
DAX_RANGE = "memmap=32M!0x38000000"

#: the DMA buffer: a device-dax namespace on the second legacy pmem range (DAX_RANGE), its
#: node in $dax (and in $LAB_OUT/dax.txt); the script runs with set -e
DAX_SETUP = r"""
set -e
for r in /sys/bus/nd/devices/region*; do
  [ "$(cat $r/resource)" = "0x38000000" ] && ns=namespace${r##*region}.0
done
ndctl create-namespace -f -e "$ns" -m devdax -a 4K | tee "$LAB_OUT/ndctl.json" >&2
dax=$(ls /dev/dax* | head -1)
echo "$dax" > "$LAB_OUT/dax.txt"
"""

OLD_KERNEL = DAX_SETUP + r"""
echo vfio-pci > /sys/bus/pci/devices/0000:00:03.0/driver_override
echo 0000:00:03.0 > /sys/bus/pci/drivers_probe
python3 vfio_edu.py 0000:00:03.0 /tmp/vfio-ready /tmp/vfio-stop "$dax" > /tmp/vfio-holder.log 2>&1 &
i=0; while [ ! -f /tmp/vfio-ready ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
cat /tmp/vfio-holder.log >&2
cat /tmp/vfio-ready > "$LAB_OUT/vfio-ready.txt"
python3 -m handover region init /dev/pmem0 --force
# the real arming: save, kexec-load the next kernel with handover=, name edu keepalive
python3 -m handover arm --kernel /payload/lab/vmlinuz.3 --initrd /payload/lab/initrd.img \
    --command-line "$(cat /payload/lab/cmdline.3)" --append handover.lab.phase=3 \
    --region /dev/pmem0 --token TOKEN \
    --json > "$LAB_OUT/arm.json"
python3 -m handover inspect --json /dev/pmem0 > "$LAB_OUT/inspect.json"
cat /sys/kernel/handover/keepalive > "$LAB_OUT/keepalive.txt"
cat /sys/class/iommu/dmar0/intel-iommu/rtaddr > "$LAB_OUT/rtaddr.txt"
cat /sys/kernel/debug/iommu/intel/dmar_translation_struct > "$LAB_OUT/dmar_translation.txt" 2>&1 || true
cat /sys/kernel/debug/iommu/intel/ir_translation_struct > "$LAB_OUT/ir_translation.txt" 2>&1 || true
cat /sys/bus/pci/devices/0000:00:03.0/resource > "$LAB_OUT/edu-resource.txt"
# a DMA in flight across the kexec: edu holds a pattern; the last command before
# `handover arm --exec` starts edu -> RAM (old IOVA) and does not wait (edu takes 100 ms)
python3 edu_keepalive.py stage 0000:00:03.0 "$dax" "$LAB_OUT/inflight.json"
cat > /lab/exec <<'EOF'
python3 /payload/edu_keepalive.py kick 0000:00:03.0
echo "@@LAB ARM-EXEC phase=2"
exec python3 -m handover arm --exec
EOF
""".replace("TOKEN", TOKEN)

def rewrite(table: str, change: str) -> str:
    """Guest script: decode the newest state, apply ``change`` (an expression of ``r``) to
    every record of ``table``, commit the result as a new generation."""
    return f"""
python3 - <<'EOF'
from handover.formats.codec import decode, encode
from handover.formats.model import Table
from handover.pmem import commit, read_latest
st = decode(read_latest("/dev/pmem0").blob)
st.{table} = Table.from_rows(st.{table}.spec, [{change} for r in st.{table}])
commit("/dev/pmem0", encode(st))
EOF
"""


# hstatus: /sys/kernel/handover/ as "key: value" lines (lab.HSTATUS)
NEW_KERNEL_COMMON = lab.HSTATUS + r"""
hstatus > "$LAB_OUT/status.txt" 2>&1
cat /sys/class/iommu/dmar0/intel-iommu/rtaddr > "$LAB_OUT/rtaddr.txt"
cat /sys/class/iommu/dmar0/intel-iommu/gsts > "$LAB_OUT/gsts.txt"
cat /sys/kernel/debug/iommu/intel/dmar_translation_struct > "$LAB_OUT/dmar_translation.txt" 2>&1 || true
cat /sys/kernel/debug/iommu/intel/ir_translation_struct > "$LAB_OUT/ir_translation.txt" 2>&1 || true
cat /sys/bus/pci/devices/0000:00:03.0/resource > "$LAB_OUT/edu-resource.txt"
dax=$(ls /dev/dax* | head -1)
"""

NEW_KERNEL_KEEP = NEW_KERNEL_COMMON + r"""
python3 edu_keepalive.py probe 0000:00:03.0 "$dax" "$LAB_OUT/probe.json"
python3 -m handover load --region /dev/pmem0 --token TOKEN --json > "$LAB_OUT/load.json" 2>"$LAB_OUT/load.err" || echo "load rc=$?" >> "$LAB_OUT/load.err"
echo vfio-pci > /sys/bus/pci/devices/0000:00:03.0/driver_override
echo 0000:00:03.0 > /sys/bus/pci/drivers_probe
python3 edu_keepalive.py intruder 0000:00:03.0 "$LAB_OUT/intruder.json"
python3 edu_keepalive.py owner 0000:00:03.0 "$dax" "$LAB_OUT/owner.json" TOKEN WRONG
hstatus > "$LAB_OUT/status-end.txt" 2>&1
dmesg > "$LAB_OUT/dmesg.txt"
""".replace("TOKEN", TOKEN).replace("WRONG", WRONG)


GUEST_HELPERS = ("vfio_edu.py", "edu_keepalive.py", "vfio_nvme.py")


def boot(patched, scripts: list[str], timeout: float = 900, topology: str = "root", **run_kw):
    """Run ``scripts`` in the lab: phase 1 on the stock kernel, every later phase on
    ``patched``'s kernel with handover= and the dax range on its command line, the guest
    helpers in the payload; check that every phase ran, each later one on the patched
    kernel. ``topology``: where edu sits (lab.TOPOLOGIES); the scripts name edu by its
    root-bus address, replaced by its address there. ``run_kw``: more RunOptions (nvme=True;
    ``files``: more payload files). Returns the lab's GuestResult."""
    scripts = [s.replace(EDU, lab.EDU_BDF[topology]) for s in scripts]
    bz = Path(patched["bzImage"])
    files = {f"lab/vmlinuz.{n}": bz for n in range(2, len(scripts) + 1)}
    files.update({name: ROOT / "tests" / "system" / "guest" / name for name in GUEST_HELPERS})
    files.update(run_kw.pop("files", None) or {})
    res = lab.run_guest(scripts, pmem="legacy", kexec_append=f"handover={REGION} {DAX_RANGE}",
                        files=files, timeout=timeout, topology=topology,
                        **{**patched["run_guest"], **run_kw})
    res.check()
    on_patched(patched, res, *range(2, len(scripts) + 1))
    return res
