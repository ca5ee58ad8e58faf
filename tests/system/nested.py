"""A nested VM in the lab (``RunOptions(rootfs="debian")``): the lab guest plays the host,
binds edu to vfio-pci and runs the patched QEMU (the VMM side of the project, built by
``tools/qemu.py build`` into ``$HANDOVER_QEMU_CACHE``, default ~/.cache/handover-qemu) as a
systemd unit, with a small VM: guest RAM on device-dax (memory-backend-file share=on), edu
passed through, and a freestanding workload (``guest/edu_dma/``, multiboot, booted with
``-kernel``) that does DMA rounds with edu's interrupts and counts them in a progress record
in its RAM, which the lab guest reads from the dax device (``guest/edu_progress.py``).

``edu_dma_elf()`` assembles the workload (gcc/ld on the host; cached by its sources'
hash under ``$CACHE/nested/``, never committed); ``qemu_binary()`` finds the patched QEMU;
``files()`` is what the payload needs; ``VM_SCRIPT`` the phase that starts the VM and
watches its progress.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from tests.system import lab

SRC = lab.SYSTEM_DIR / "guest" / "edu_dma"
PROGRESS = lab.SYSTEM_DIR / "guest" / "edu_progress.py"
QEMU_CACHE = Path(os.environ.get("HANDOVER_QEMU_CACHE") or Path.home() / ".cache" / "handover-qemu")
CFLAGS = ["-m32", "-ffreestanding", "-fno-pic", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
          "-nostdlib", "-O2", "-Wall", "-Wextra", "-Werror"]


def qemu_binary() -> Path | None:
    """The patched qemu-system-x86_64 (tools/qemu.py paths()["binary"]), or None."""
    p = QEMU_CACHE / "build" / "qemu-system-x86_64"
    return p if os.access(p, os.X_OK) else None


def edu_dma_elf() -> Path:
    """The workload as a 32-bit multiboot ELF (built once per change of its sources)."""
    srcs = sorted(SRC.glob("*.[cShl]*"))
    h = hashlib.sha256(repr(CFLAGS).encode())
    for s in srcs:
        h.update(s.name.encode() + b"\0" + s.read_bytes())
    out = lab.cache_dir() / "nested" / f"edu_dma-{h.hexdigest()[:16]}.elf"
    if out.exists():
        return out
    out.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        objs = []
        for src in (SRC / "start.S", SRC / "edu_dma.c", SRC / "nvme.c"):
            o = Path(td) / (src.stem + ".o")
            _cc(["gcc", *CFLAGS, "-c", str(src), "-o", str(o)])
            objs.append(str(o))
        tmp = Path(td) / "edu_dma.elf"
        _cc(["ld", "-m", "elf_i386", "-z", "noexecstack", "--no-warn-rwx-segments",
             "-T", str(SRC / "link.ld"), "-o", str(tmp), *objs])
        tmp.replace(out)
    return out


def _cc(cmd: list[str]) -> None:
    r = subprocess.run(["nice", "-n", "19", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise lab.LabError(f"{cmd[0]} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")


def files() -> dict:
    """The payload: the patched QEMU, the workload, the progress reader."""
    q = qemu_binary()
    if q is None:
        raise lab.LabUnavailable(f"no patched QEMU at {QEMU_CACHE}/build (python tools/qemu.py build)")
    return {"qemu-system-x86_64": q, "edu_dma.elf": edu_dma_elf(), "edu_progress.py": PROGRESS}


#: the nested VM's RAM (on /dev/dax0.0) and the QEMU command line (the VMM as a unit)
VM_MEM = "32M"
VM_QEMU = (
    "/payload/qemu-system-x86_64 -machine pc,memory-backend=ram -accel tcg,tb-size=16 "
    f"-m {VM_MEM} -object memory-backend-file,id=ram,mem-path=/dev/dax0.0,size={VM_MEM},share=on,align=2M "
    "-kernel /payload/edu_dma.elf -device vfio-pci,host=0000:00:03.0 "
    "-nodefaults -display none -serial none -monitor none -no-reboot "
    "-L /usr/share/qemu -L /usr/share/seabios"
)

#: phase script (rootfs guest, pmem="legacy"): devdax on the pmem, edu to vfio-pci, the VM
#: as the systemd unit vm-edu.service, its progress watched for up to @WATCH@ seconds
#: (vm_script); markers VM-START, VM-FIRST-ROUND (edu_progress.py), VM-WATCHED
VM_SCRIPT = r"""
set -e
up() { cut -d' ' -f1 /proc/uptime; }
ndctl create-namespace -f -e namespace0.0 -m devdax -a 2M > "$LAB_OUT/ndctl.json"
test -c /dev/dax0.0
echo vfio-pci > /sys/bus/pci/devices/0000:00:03.0/driver_override
echo 0000:00:03.0 > /sys/bus/pci/drivers_probe
readlink /sys/bus/pci/devices/0000:00:03.0/driver
chmod 755 qemu-system-x86_64
./qemu-system-x86_64 --version | head -1
echo "@@LAB VM-START phase=$LAB_PHASE uptime=$(up)"
systemd-run --unit=vm-edu --property=StandardOutput=file:/tmp/vm-edu.log \
    --property=StandardError=file:/tmp/vm-edu.log VM_QEMU
rc=0
python3 edu_progress.py /dev/dax0.0 "$LAB_OUT/progress.json" @WATCH@ || rc=$?
echo "@@LAB VM-WATCHED phase=$LAB_PHASE uptime=$(up)"
systemctl show -p ActiveState,SubState,ExecMainStatus vm-edu.service
cp /tmp/vm-edu.log "$LAB_OUT/vm-edu.log" 2>/dev/null || true
cat "$LAB_OUT/vm-edu.log" >&2 || true
systemctl stop vm-edu.service || true
exit $rc
""".replace("VM_QEMU", VM_QEMU)


def vm_script(watch: float = 240) -> str:
    return VM_SCRIPT.replace("@WATCH@", str(int(watch)))
