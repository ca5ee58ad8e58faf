"""Stage-2 of the VMM fast restart in the lab (issue 15): a VM keeps its passthrough device
while the host kernel is replaced under it.

The lab guest is the host: the lab's Debian root file system (systemd), the patched kernel.
Its VMM is the patched QEMU (qemu-patches/, ``tests/system/nested.py``) as the systemd unit
``vm-edu.service``: guest RAM on device-dax (shared, so a restart maps the same memory), edu
passed through with vfio-pci, and the freestanding workload ``guest/edu_dma`` doing DMA rounds
with edu's MSI and counting them in its RAM.

Old kernel (``OLD``): the VM runs; ``handover vm save`` sets keepalive with the token, stops
the VM and saves its state (x-ignore-shared: RAM stays on the dax device) to a file on the
root file system; ``handover arm`` saves the host state and starts the holder of the VFIO
files; then edu's interrupt is raised from outside (``edu_keepalive.py poke``: what the
device does while no VMM owns it) and ``handover arm --exec`` runs ``systemctl kexec``,
which stops ``vm-edu.service`` (QEMU quits) while the holder keeps the device open.

New kernel (``NEW``): the initramfs checked the state; edu is held. QEMU starts again as
``vm-edu.service``, with ``keepalive_token`` and ``-incoming defer``; ``handover vm restore``
loads the state, turns keepalive off and resumes the VM. The workload must go on: more rounds,
none wrong, no completion lost (``polled``), the register it wrote once still set
(``alive_bad``), the interrupt raised while no VMM owned edu seen (``poked``).

Markers (``@@LAB NAME phase=N ... wall=SECONDS``, wall clock, which survives the kexec within
a second: the new kernel reads the RTC): VM-START, VM-RUNNING, VM-SAVE, VM-SAVED, HOST-ARMED,
ARM-EXEC (old); VM-RESTART, VM-RESTORED, VM-PROGRESS (new).
"""

from __future__ import annotations

from tests.system import lab, nested
from tests.system.keepalive_scenario import DAX_SETUP, TOKEN, WRONG

#: the VM's RAM: on the 32 MiB dax namespace of DAX_SETUP (4 KiB aligned, ~31 MiB usable)
VM_MEM = "16M"
QMP = "/run/vm-edu.qmp"
STATE = "/var/lib/handover-lab/vm-edu.state"
TOKEN_FILE = "/run/vm-edu.token"


def vm_qemu(token: str | None = None, mem: str = VM_MEM, nvme: bool = False) -> str:
    """The VMM's command line; with ``token``: the restart (keepalive_token, -incoming defer);
    ``nvme``: the lab's NVMe controller (RunOptions(nvme=True), 08.0) passed through too."""
    tok = f",keepalive_token={token}" if token else ""
    dev = f"vfio-pci,host=0000:00:03.0,id=edu0{tok}"
    if nvme:
        dev += f" -device vfio-pci,host={lab.NVME_BDF},id=nvme0{tok}"
    return (
        "/payload/qemu-system-x86_64 -machine pc,memory-backend=ram -accel tcg,tb-size=16 "
        f"-m {mem} -object memory-backend-file,id=ram,mem-path=$dax,size={mem},share=on,align=2M "
        f"-kernel /payload/edu_dma.elf -device {dev} "
        "-nodefaults -display none -serial none -monitor none -no-reboot "
        f"-qmp unix:{QMP},server=on,wait=off "
        "-trace 'vfio_pci_keepalive_*' -trace 'vfio_take*' -L /usr/share/qemu -L /usr/share/seabios"
        + (" -S -incoming defer" if token else "")
    )


#: shell helpers: a marker with the wall clock; the VMM as a unit; wait for its QMP socket
COMMON = r"""
up() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "@@LAB $1 phase=$LAB_PHASE uptime=$(up) wall=$(date +%s.%N)"; }
start_vm() {
  rm -f QMP
  systemd-run --unit=vm-edu --property=StandardOutput=file:/tmp/vm-edu.log \
      --property=StandardError=file:/tmp/vm-edu.log "$@"
  i=0; while [ ! -S QMP ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
  test -S QMP
}
bind_vfio() {
  if [ -e /sys/bus/pci/devices/$1/driver ]; then echo $1 > /sys/bus/pci/devices/$1/driver/unbind; fi
  echo vfio-pci > /sys/bus/pci/devices/$1/driver_override
  echo $1 > /sys/bus/pci/drivers_probe
}
chmod 755 /payload/qemu-system-x86_64
""".replace("QMP", QMP)

OLD_TEMPLATE = DAX_SETUP + COMMON + r"""
bind_vfio 0000:00:03.0
@BIND_NVME@
mark VM-START
start_vm VM_QEMU
python3 edu_progress.py "$dax" "$LAB_OUT/progress-before.json" 300 3
mark VM-RUNNING
# udev gives block devices group "disk" (0660); the region's rule makes it 0600 once written
python3 -m handover region init /dev/pmem0 --force
udevadm settle
( umask 077; printf '%s\n' TOKEN > TOKEN_FILE )
mkdir -p $(dirname STATE)
mark VM-SAVE
python3 -m handover vm save --qmp QMP --state STATE --token-file TOKEN_FILE --json \
    > "$LAB_OUT/vm-save.json"
mark VM-SAVED
python3 edu_progress.py "$dax" "$LAB_OUT/progress-saved.json" 1 || true
python3 -m handover arm --kernel /payload/lab/vmlinuz.3 --initrd /payload/lab/initrd.img \
    --command-line "$(cat /payload/lab/cmdline.3)" \
    --append 'handover.lab.phase=3 handover.lab.rootfs=SLOT' \
    --region /dev/pmem0 --token-file TOKEN_FILE --json > "$LAB_OUT/arm.json"
mark HOST-ARMED
python3 -m handover inspect --json /dev/pmem0 > "$LAB_OUT/inspect.json"
# edu raises its interrupt now: the saved VM cannot have seen it
python3 edu_keepalive.py poke "$(systemctl show -p MainPID --value vm-edu)" 0x10000 "$LAB_OUT/poke.json"
cp /tmp/vm-edu.log "$LAB_OUT/vm-edu-old.log" || true
sync
cat > /lab/exec <<'EOF'
echo "@@LAB ARM-EXEC phase=2 uptime=$(cut -d' ' -f1 /proc/uptime) wall=$(date +%s.%N)"
exec python3 -m handover arm --exec
EOF
""".replace("TOKEN_FILE", TOKEN_FILE).replace(
    "TOKEN", TOKEN).replace("STATE", STATE).replace("QMP", QMP).replace("SLOT", lab.ROOTFS_SLOT)


def _nvme(script: str, nvme: bool) -> str:
    return script.replace("@BIND_NVME@", f"bind_vfio {lab.NVME_BDF}" if nvme else "")


def old_script(nvme: bool = False) -> str:
    """The old kernel's phase; ``nvme``: the VM has the lab's NVMe controller too."""
    return _nvme(OLD_TEMPLATE.replace("VM_QEMU", vm_qemu(nvme=nvme)), nvme)


OLD = old_script()

#: the new kernel: ``@RESTART@`` is the VMM's command line (the owner's token, or another)
NEW = lab.HSTATUS + COMMON + r"""
set -e
hstatus > "$LAB_OUT/status.txt" 2>&1
dax=$(ls /dev/dax* | head -1)
journalctl -b -1 --no-pager -o short-monotonic > "$LAB_OUT/journal-prev.txt" 2>&1 || true
@DECIDE@
bind_vfio 0000:00:03.0
@BIND_NVME@
@FIRST@
mark VM-RESTART
start_vm @RESTART@
rc=0
python3 -m handover vm restore --qmp QMP --state STATE --json > "$LAB_OUT/vm-restore.json" \
    2> "$LAB_OUT/vm-restore.err" || rc=$?
echo "restore rc=$rc" >> "$LAB_OUT/vm-restore.err"
mark VM-RESTORED
EDU_PROGRESS_INTERVAL=0.2 python3 edu_progress.py "$dax" "$LAB_OUT/progress-after.json" 240 5 resume || true
mark VM-PROGRESS
hstatus > "$LAB_OUT/status-end.txt" 2>&1
systemctl show -p ActiveState,SubState vm-edu.service > "$LAB_OUT/vm-unit.txt"
cp /tmp/vm-edu.log "$LAB_OUT/vm-edu.log" || true
dmesg > "$LAB_OUT/dmesg.txt"
systemctl stop vm-edu.service || true
""".replace("STATE", STATE).replace("QMP", QMP)


#: what the new kernel's phase decides: accept the state (handover load), or abort it (the
#: kernel releases the device: stopped, no longer held)
DECIDE = {
    "load": "python3 -m handover load --region /dev/pmem0 --token-file " + TOKEN_FILE + " --json \\\n"
            '    > "$LAB_OUT/load.json" 2> "$LAB_OUT/load.err" || echo "load rc=$?" >> "$LAB_OUT/load.err"',
    "abort": 'echo abort > /sys/kernel/handover/decision\nhstatus > "$LAB_OUT/status-abort.txt" 2>&1',
}

#: a first restart with another token: refused (QEMU exits, vm restore says why), the device
#: stays kept for its owner, whose restart then works
FIRST_WRONG = (
    "start_vm @WRONG@\n"
    "rc=0; python3 -m handover vm restore --qmp QMP --state STATE --json > \"$LAB_OUT/vm-restore-wrong.json\" "
    "2> \"$LAB_OUT/vm-restore-wrong.err\" || rc=$?\n"
    "echo \"restore rc=$rc\" >> \"$LAB_OUT/vm-restore-wrong.err\"\n"
    "sleep 1; systemctl stop vm-edu.service 2>/dev/null || true; systemctl reset-failed vm-edu.service 2>/dev/null || true\n"
    "cp /tmp/vm-edu.log \"$LAB_OUT/vm-edu-wrong.log\" || true\n"
    "hstatus > \"$LAB_OUT/status-wrong.txt\" 2>&1\n"
).replace("QMP", QMP).replace("STATE", STATE)


def new_script(token: str = TOKEN, decide: str = "load", first_token: str | None = None,
               nvme: bool = False) -> str:
    """The new kernel's phase: ``decide`` the state ("load" accepts it, "abort" releases the
    device), optionally a first restart with ``first_token`` (refused), then the VMM
    restarted with ``token``."""
    first = FIRST_WRONG.replace("@WRONG@", vm_qemu(first_token, nvme=nvme)) if first_token else ""
    return _nvme("( umask 077; printf '%s\\n' " + TOKEN + " > " + TOKEN_FILE + " )\n"
                 + NEW.replace("@DECIDE@", DECIDE[decide]).replace("@FIRST@", first)
                 .replace("@RESTART@", vm_qemu(token, nvme=nvme)), nvme)


#: the steps of the pause, in order: (from marker, phase, to marker, phase, what, who spends
#: the time: a colour of benchmarks/timeline.py)
STEPS = [("VM-SAVE", 2, "VM-SAVED", 2, "vm save: keepalive, stop, state file", "handover"),
         ("VM-SAVED", 2, "HOST-ARMED", 2, "handover save + arm: state, kexec load, holder", "handover"),
         ("HOST-ARMED", 2, "ARM-EXEC", 2, "lab: inspect, poke, sync", "lab"),
         ("ARM-EXEC", 2, "INIT", 3, "systemctl kexec: shutdown, kexec, boot to /init", "kernel"),
         ("INIT", 3, "UNIT", 3, "initramfs (handover check) + systemd boot", "kernel"),
         ("UNIT", 3, "VM-RESTART", 3, "lab: phase start, handover load, vfio-pci bind", "lab"),
         ("VM-RESTART", 3, "VM-RESTORED", 3, "QEMU start + vm restore", "vmm"),
         ("VM-RESTORED", 3, "VM-RESUMED-ROUND", 3, "first round after the resume", "guest")]


def _times(res) -> dict:
    return {k: v[0] for k, v in lab.index_markers(res.markers).items()}


def timeline(res) -> list[tuple[str, float, float, str]]:
    """The steps of a Stage-2 run's pause that its markers show: (what, start, end, who),
    seconds from the save's start (benchmarks/timeline.py draws them)."""
    t = _times(res)
    origin = t.get(("VM-SAVE", 2))
    if origin is None:
        return []
    return [(what, round(t[(a, pa)] - origin, 2), round(t[(b, pb)] - origin, 2), who)
            for a, pa, b, pb, what, who in STEPS if (a, pa) in t and (b, pb) in t]


def pause_figures(res) -> dict:
    """The VM-visible pause, from outside (host clock of the lab's console markers) and as
    the guest saw it (its CMOS clock's longest gap between two rounds), with where it went."""
    t = _times(res)
    f = {}
    if ("VM-SAVE", 2) in t and ("VM-RESUMED-ROUND", 3) in t:
        f["pause_outside_s"] = round(t[("VM-RESUMED-ROUND", 3)] - t[("VM-SAVE", 2)], 1)
    for a, pa, b, pb, what, _who in STEPS:
        if (a, pa) in t and (b, pb) in t:
            f[what] = round(t[(b, pb)] - t[(a, pa)], 1)
    return f


#: Stage-1 (no kexec, any kernel: the stock one): one phase. The VM runs; ``handover vm save
#: --hold`` saves it and a holder keeps QEMU's VFIO files; QEMU quits (its unit is stopped);
#: edu's interrupt is raised while no QEMU runs; ``handover vm exec`` starts the next QEMU with
#: the holder's files (QEMU 0009) as the unit vm-edu2; ``handover vm restore`` resumes the VM.
STAGE1_TEMPLATE = COMMON + r"""
set -e
ndctl create-namespace -f -e namespace0.0 -m devdax -a 2M > "$LAB_OUT/ndctl.json"
dax=/dev/dax0.0
bind_vfio 0000:00:03.0
@BIND_NVME@
mark VM-START
start_vm VM_QEMU
python3 edu_progress.py "$dax" "$LAB_OUT/progress-before.json" 300 3
( umask 077; printf '%s\n' TOKEN > TOKEN_FILE )
mkdir -p $(dirname STATE)
mark VM-SAVE
handover vm save --qmp QMP --state STATE --token-file TOKEN_FILE --hold --json \
    > "$LAB_OUT/vm-save.json"
mark VM-SAVED
holder=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["hold"]["holder"])' "$LAB_OUT/vm-save.json")
systemctl stop vm-edu.service
mark VM-QUIT
cp /tmp/vm-edu.log "$LAB_OUT/vm-edu-old.log" || true
cat /sys/bus/pci/devices/0000:00:03.0/enable > "$LAB_OUT/enable-after-quit.txt"
# edu raises its interrupt while no QEMU runs (through the holder's device file)
python3 edu_keepalive.py poke "$holder" 0x10000 "$LAB_OUT/poke.json"
mark VM-RESTART
rm -f QMP
systemd-run --unit=vm-edu2 --property=StandardOutput=file:/tmp/vm-edu2.log \
    --property=StandardError=file:/tmp/vm-edu2.log \
    handover vm exec --token-file TOKEN_FILE -- @RESTART@
i=0; while [ ! -S QMP ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
rc=0
handover vm restore --qmp QMP --state STATE --json > "$LAB_OUT/vm-restore.json" \
    2> "$LAB_OUT/vm-restore.err" || rc=$?
echo "restore rc=$rc" >> "$LAB_OUT/vm-restore.err"
mark VM-RESTORED
EDU_PROGRESS_INTERVAL=0.2 python3 edu_progress.py "$dax" "$LAB_OUT/progress-after.json" 240 5 resume || true
mark VM-PROGRESS
systemctl show -p ActiveState,SubState vm-edu2.service > "$LAB_OUT/vm-unit.txt"
cp /tmp/vm-edu2.log "$LAB_OUT/vm-edu.log" || true
ls -l /proc/$(systemctl show -p MainPID --value vm-edu2)/fd > "$LAB_OUT/qemu-fds.txt" 2>&1 || true
dmesg > "$LAB_OUT/dmesg.txt"
systemctl stop vm-edu2.service || true
""".replace("TOKEN_FILE", TOKEN_FILE).replace("TOKEN", TOKEN).replace("STATE", STATE).replace("QMP", QMP)


def stage1_script(nvme: bool = False) -> str:
    """Stage-1's phase; ``nvme``: the VM has the lab's NVMe controller too."""
    return _nvme(STAGE1_TEMPLATE.replace("VM_QEMU", vm_qemu(mem="32M", nvme=nvme)).replace(
        "@RESTART@", vm_qemu(TOKEN, mem="32M", nvme=nvme)), nvme)


STAGE1 = stage1_script()


def check_nvme(before: dict, first: dict, last: dict) -> None:
    """The VM's NVMe queues went on after the resume: more rounds, each on its interrupt,
    nothing wrong, no stray or lost completion, the queues' state carried on."""
    assert before["nvme_state"] == 1 and before["nvme_rounds"] > 0, before
    assert last["nvme_rounds"] >= first["nvme_rounds"] + 3, (first, last)
    assert last["nvme_irqs_io"] > first["nvme_irqs_io"], (first, last)
    for k in ("nvme_errors", "nvme_status_errors", "nvme_stray", "nvme_hung"):
        assert last[k] == 0, (k, last)


def files() -> dict:
    return nested.files()


__all__ = ["OLD", "NEW", "STAGE1", "check_nvme", "old_script", "stage1_script", "new_script", "files", "pause_figures", "timeline", "STEPS", "vm_qemu", "TOKEN", "WRONG", "QMP", "STATE"]
