"""Use cases ``arm``, ``exec`` and ``shutdown-save``: save the state, then load the next
kernel with kexec-tools; execute it; save again on the way down.

``arm``:

1. checks IMAGE's ``Handover`` ELF note (host.kernelimage.read_declaration): no note = a
   stock kernel (user-space validation only, in the initramfs); a note that does not include
   a format this tool writes = refused (exit 5); otherwise the newest format it reads is
   written;
2. saves (:func:`handover.ops.save.save`) into the region;
3. builds the next command line: the current one (``/proc/cmdline`` without BOOT_IMAGE=,
   initrd= and old handover words) or ``command_line``, then ``append``, then
   ``handover.region=<spec>``, ``handover.policy=``, the legacy region's ``memmap=`` again
   (the next kernel does not inherit it) and, when IMAGE declares the note,
   ``handover=<size>@<phys>`` (read by the patched kernel itself);
4. ``kexec -l`` (``kexec_mode="s"``: ``kexec -s -l``) and writes the marker
   ``/run/handover/armed`` that gates the systemd save-on-kexec unit; names the keepalive
   devices to the kernel and, unless ``hold`` is off, keeps their VFIO files open in a
   holder process (host.vfio_hold), so that their owner may exit before the kexec;
5. ``exec``: ``systemctl kexec`` when systemd is PID 1, else ``kexec -e``.

The marker never holds the owner token: only its salt and salted hash, which is what the
state stores anyway (README "Ownership token"); the shutdown save writes that hash into the
new state as it is. A token passed on the next command line (``pass_token``) is readable by
every user of the next kernel in /proc/cmdline; it is not shown in reports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field

from ..errors import HandoverError, VersionError
from ..util import parse_size

MARKER = "armed"
MARKER_SCHEMA = "handover.armed/2"
#: Words of the current command line that are not carried to the next kernel.
DROP_WORDS = re.compile(r"^(BOOT_IMAGE|initrd|handover|handover\.[a-z_.]+|kexec_jump_back_entry)(=|$)")
MEMMAP_RE = re.compile(r"^memmap=(?P<size>(?:0x)?[0-9a-fA-F]+[KMGkmg]?)!(?P<start>(?:0x)?[0-9a-fA-F]+[KMGkmg]?)$")
TOKEN_WORD = re.compile(r"(handover\.token=)\S+")
HIDDEN = "<hidden>"


def hide_token(text: str) -> str:
    """``text`` with the value of any ``handover.token=`` word hidden (reports, logs)."""
    return TOKEN_WORD.sub(r"\g<1>" + HIDDEN, text)


def memmap_words_for(cmdline: str, phys: int | None) -> list[str]:
    """The ``memmap=size!start`` words of ``cmdline`` whose range holds ``phys``."""
    out = []
    if phys is None:
        return out
    for w in cmdline.split():
        m = MEMMAP_RE.match(w)
        if not m:
            continue
        start, size = parse_size(m.group("start")), parse_size(m.group("size"))
        if start <= phys < start + size:
            out.append(w)
    return out


def carried_cmdline(current: str) -> list[str]:
    """The current command line's words, without those that must not be carried."""
    return [w for w in current.split() if not DROP_WORDS.match(w)]


def next_cmdline(base_words: list[str], append: str, region_word: str, policy: str | None,
                 memmap: list[str], handover_param: str | None) -> str:
    """The next kernel's command line (words in this order, no duplicates of memmap=)."""
    words = list(base_words) + shlex.split(append or "")
    words.append(f"handover.region={region_word}")
    if policy:
        words.append(f"handover.policy={policy}")
    for m in memmap:
        if m not in words:
            words.append(m)
    if handover_param:
        words.append(handover_param)
        # the kernel runs where kexec placed it (a segment the old kernel checked against
        # what the kept devices use), not where the decompressor's KASLR would move it
        if "nokaslr" not in words:
            words.append("nokaslr")
    return " ".join(words)


def plan_cmdline(current: str, command_line: str | None, append: str, region: str, facts: dict,
                 *, next_region: str | None = None, policy: str | None = None,
                 declared: bool = False, token: str | None = None) -> tuple[str, str]:
    """(next command line, handover.region= value) from the current command line (or
    ``command_line``), the region's facts (``region_facts``) and the options of ``arm``.
    A region named by path is passed as an absolute path (the next kernel's initramfs has no
    notion of this shell's directory)."""
    base = carried_cmdline(current if command_line is None else command_line)
    memmap: list[str] = []
    if facts.get("legacy"):
        memmap = memmap_words_for(current, facts["phys_start"]) or [facts["memmap_option"]]
    phys = facts.get("phys_start")
    word = next_region or (f"phys:{phys:#x}" if phys is not None else os.path.abspath(region))
    spec = region_spec(facts)
    hparam = f"handover={spec}" if declared and spec else None
    cmd = next_cmdline(base, append, word, policy, memmap, hparam)
    return (cmd + f" handover.token={token}" if token else cmd), word


def region_spec(facts: dict) -> str | None:
    """``<size>@<phys>`` of a region at a known physical address (the patched kernel's
    ``handover=``, and the old kernel's ``next_region``), or None."""
    phys, size = facts.get("phys_start"), facts.get("size")
    return f"{size:#x}@{phys:#x}" if phys is not None and size else None


def kexec_command(kernel: str, initrd: str | None, cmdline: str, mode: str = "l",
                  kexec: str = "kexec", window: tuple[int, int] | None = None) -> list[str]:
    """The ``kexec`` load command; ``window`` ([start, end) of RAM, mode "l" only): every
    segment kexec-tools places goes there (``--mem-min``/``--mem-max``)."""
    cmd = [kexec] + (["-s", "-l"] if mode == "s" else ["-l"]) + [kernel]
    if initrd:
        cmd.append(f"--initrd={initrd}")
    cmd.append(f"--command-line={cmdline}")
    if window and mode == "l":
        cmd += [f"--mem-min={window[0]:#x}", f"--mem-max={window[1] - 1:#x}"]
    return cmd


#: the window's slack beyond twice the segments' size (purgatory, setup data, alignment)
WINDOW_SLACK = 16 << 20
WINDOW_ALIGN = 2 << 20


def segment_window(ram: list[tuple[int, int]], preserved: list[tuple[int, int]],
                   need: int) -> tuple[int, int] | None:
    """Where ``kexec -l`` may place the next kernel's segments: the highest stretch of RAM
    (``ram``: inclusive [start, end] ranges, /proc/iomem's System RAM) below 4 GiB and above
    16 MiB that none of the ``preserved`` (start, size) ranges touches, 2 MiB aligned, at
    least ``need`` bytes; None when there is none. kexec-tools places segments anywhere in
    RAM it sees as free, page tables of a kept device included: the old kernel's check
    (0010) then disarms the kexec; the window keeps it from coming to that."""
    lo_limit, hi_limit = 16 << 20, 4 << 30
    busy = sorted((s, s + n) for s, n in preserved if n > 0)
    best = None
    for r_start, r_end in ram:
        start, end = max(r_start, lo_limit), min(r_end + 1, hi_limit)
        cuts = [(max(start, s), min(end, e)) for s, e in busy if s < end and e > start]
        pos = start
        for s, e in cuts + [(end, end)]:
            a = -(-pos // WINDOW_ALIGN) * WINDOW_ALIGN
            b = s // WINDOW_ALIGN * WINDOW_ALIGN
            if b - a >= need and (best is None or b > best[1]):
                best = (a, b)
            pos = max(pos, e)
    return best


def arm_window(sr, save_report: dict, kernel: str, initrd: str | None) -> tuple[int, int] | None:
    """The segment window for this arm (segment_window() of the host's System RAM and the
    state's preserved ranges), or None when nothing is preserved or no RAM is readable."""
    from ..host.iomem import ranges_named, read_iomem

    preserved = [(r["start"], r["size"]) for r in save_report.get("reserved") or []]
    ram = ranges_named(read_iomem(sr), "System RAM")
    if not preserved or not ram:
        return None
    size = os.path.getsize(kernel) + (os.path.getsize(initrd) if initrd else 0)
    return segment_window(ram, preserved, 2 * size + WINDOW_SLACK)


def exec_command(systemd_running: bool, kexec: str = "kexec") -> list[str]:
    """``systemctl kexec`` when systemd is PID 1 (the unit saves on the way), else ``kexec -e``."""
    return ["systemctl", "kexec"] if systemd_running else [kexec, "-e"]


def systemd_running(root: str = "/") -> bool:
    """sd_booted(): /run/systemd/system exists."""
    from ..host import Sysroot

    return Sysroot(root).isdir("/run/systemd/system")


def kexec_loaded(sysroot: str) -> bool:
    from ..host import Sysroot

    return Sysroot(sysroot).try_text("/sys/kernel/kexec_loaded") == "1"


def region_facts(region: str, sysroot: str = "/") -> dict:
    """phys_start/size of REGION and whether it is a legacy (memmap=) range."""
    from .. import pmem
    from ..host import Sysroot
    from ..host.iomem import pmem_ranges, read_iomem
    from ..pmem.discover import memmap_option

    facts = {"phys_start": None, "size": None, "legacy": False, "memmap_option": None}
    try:
        st = pmem.status(region)
        facts["phys_start"], facts["size"] = st.get("phys_start"), st.get("size")
    except (HandoverError, OSError):
        pass
    p = facts["phys_start"]
    for start, end, name in pmem_ranges(read_iomem(Sysroot(sysroot))):
        if p is not None and start <= p <= end and name.endswith("(legacy)"):
            facts["legacy"] = True
            facts["memmap_option"] = memmap_option(start, end - start + 1)
    return facts


def kernel_declaration(image: str) -> tuple[int | None, str]:
    """(format minor to write or None for the default, a one-line note). Raises VersionError."""
    from ..formats.structs import FORMAT_MAJOR, WRITABLE_MINORS
    from ..host.kernelimage import read_declaration

    d = read_declaration(image)
    if d is None:
        return None, "stock kernel (no Handover note): user space validation only"
    best = d.best_minor(FORMAT_MAJOR, WRITABLE_MINORS)
    if best is None:
        raise VersionError(f"{image}: reads handover format {d.text()}, this tool writes "
                           + ", ".join(f"{FORMAT_MAJOR}.{m}" for m in WRITABLE_MINORS)
                           + ": refusing to arm")
    return best, f"kernel reads {d.text()}: writing {FORMAT_MAJOR}.{best}"


def default_region() -> str:
    from .. import pmem

    found = [e["device"] for e in pmem.list_regions()
             if e.get("device") and e.get("handover") in ("initialized", "state")]
    if len(found) != 1:
        raise HandoverError("give --region R: " + (f"{len(found)} handover regions found ("
                                                  + ", ".join(found) + ")" if found else
                                                  "no initialized handover region found "
                                                  "(handover region list; handover region init)"))
    return found[0]


def _run(cmd: list[str]) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise HandoverError(f"{cmd[0]}: not found (install kexec-tools)") from None
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise HandoverError(f"{cmd[0]}: {hide_token(shlex.join(cmd[:3]))}: exit {r.returncode}"
                            + (f": {msg[-1]}" if msg else ""))


def marker_path(result_dir: str) -> str:
    return os.path.join(result_dir, MARKER)


def write_marker(result_dir: str, doc: dict) -> str:
    os.makedirs(result_dir, exist_ok=True)
    path = marker_path(result_dir)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path


def read_marker(result_dir: str) -> dict | None:
    path = marker_path(result_dir)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise HandoverError(f"{path}: unreadable marker: {e}") from None
    if not isinstance(m, dict) or not isinstance(m.get("region"), str):
        raise HandoverError(f"{path}: not an armed marker (no region)")
    if "token" in m:
        raise HandoverError(f"{path}: a marker of an older handover holds the token in clear: "
                            f"refusing it; delete it and arm again")
    return m


@dataclass
class ArmRequest:
    image: str
    initrd: str | None = None
    append: str = ""
    command_line: str | None = None
    region: str | None = None
    next_region: str | None = None
    policy: str | None = None
    devices: tuple = ()
    token: str | None = None
    pass_token: bool = False
    force: bool = False
    kexec_mode: str = "l"
    dry_run: bool = False
    result_dir: str = "/run/handover"
    alter: list = field(default_factory=list)
    sysroot: str = "/"
    progress: object = None
    hold: bool = True
    vms: tuple = ()         # (qmp socket, state file): VMs saved first (ops.vm.save)


def arm(req: ArmRequest) -> dict:
    """:func:`arm_host`, after saving the VMs of ``req.vms`` (keepalive on with the token,
    stopped, state to their files); when anything fails before the kexec is loaded and the
    devices armed, the VMs saved so far are resumed (keepalive off, cont) and the error says
    so: before the point of no return, every VM goes on where it was."""
    if not req.vms or req.dry_run:
        return arm_host(req)
    from .vm import VmSaveRequest, resume_saved, save as save_vm

    if not req.token:
        raise HandoverError("arm --vm: keeping a VM's devices alive needs the owner's token "
                            "(--token-file)")
    saved = []

    def undo(why: str):
        notes = []
        for r in reversed(saved):
            try:
                notes.append(f"QMP {r['qmp']}: {', '.join(resume_saved(r)) or 'nothing to undo'}")
            except HandoverError as e:
                notes.append(f"QMP {r['qmp']}: NOT resumed: {e}")
        return HandoverError(f"{why}; the VMs saved before it: {'; '.join(notes) or 'none'}")

    for qmp, state in req.vms:
        try:
            saved.append(save_vm(VmSaveRequest(qmp=qmp, state=state, token=req.token,
                                               progress=req.progress)))
        except HandoverError as e:
            raise undo(f"arm --vm: {e}") from None
    try:
        doc = arm_host(req)
    except HandoverError as e:
        raise undo(f"arm: {e}") from None
    doc["vms"] = saved
    return doc


def arm_host(req: ArmRequest) -> dict:
    """Save, plan the command line, ``kexec -l``, write the marker, arm the keepalive
    devices. Returns the report (``warnings`` lists what the caller should say)."""
    from ..formats.token import hash_token
    from ..host import Sysroot
    from ..host.kernel_handover import KEEPALIVE, arm_keepalive
    from .save import SaveRequest, save

    t0 = time.monotonic()
    sr = Sysroot(req.sysroot).check()
    minor, kernel_note = kernel_declaration(req.image)
    declared = minor is not None
    if req.pass_token and not req.token:
        raise HandoverError("--pass-token needs a token (--token-file, --token)")
    region = req.region or default_region()
    warnings = []
    if req.initrd is None:
        warnings.append("no --initrd: the next kernel boots without an initramfs that runs "
                        "handover load, so nothing in user space checks the saved state")
    if req.pass_token:
        warnings.append("--pass-token: the token goes on the next kernel's command line, "
                        "readable by every user in /proc/cmdline")
    # the token is hashed once: the state and the marker carry the same (salt, hash)
    token_hash = hash_token(req.token) if req.token else None
    # devices are armed to stay running only when the running kernel can (its keepalive
    # file) and the next one reads the state: then a device the kernel cannot keep is
    # refused now, before anything is saved or loaded (else the kexec stops every device)
    keepalive = declared and sr.exists(KEEPALIVE)
    report = save(SaveRequest(region=region, devices=tuple(req.devices), token_hash=token_hash,
                              force=req.force, minor=minor, dry_run=req.dry_run,
                              alter=req.alter, sysroot=req.sysroot, progress=req.progress,
                              keepalive=keepalive))
    t_save = time.monotonic() - t0
    facts = region_facts(region, req.sysroot)
    current = sr.try_text("/proc/cmdline")
    if current is None and req.command_line is None:
        raise HandoverError(f"{sr.root}: /proc/cmdline not readable (give --command-line)")
    cmdline, word = plan_cmdline(current or "", req.command_line, req.append, region, facts,
                                 next_region=req.next_region, policy=req.policy,
                                 declared=declared, token=req.token if req.pass_token else None)
    window = arm_window(sr, report, req.image, req.initrd) if req.kexec_mode == "l" else None
    if window is None and report.get("reserved") and req.kexec_mode == "l":
        warnings.append("no stretch of RAM free of the preserved ranges is large enough for "
                        "the kexec segments: kexec-tools places them anywhere (the kexec "
                        "is disarmed if one lands on memory a kept device uses)")
    cmd = kexec_command(req.image, req.initrd, cmdline, req.kexec_mode, window=window)
    doc = {"ok": True, "kernel": os.path.abspath(req.image),
           "initrd": os.path.abspath(req.initrd) if req.initrd else None,
           "kernel_declaration": kernel_note, "region": os.path.abspath(region),
           "next_region": word, "legacy": facts["legacy"], "cmdline": hide_token(cmdline),
           "kexec_command": [hide_token(w) for w in cmd], "dry_run": req.dry_run,
           "segment_window": [f"{window[0]:#x}", f"{window[1]:#x}"] if window else None,
           "save": report, "timings": {"save": round(t_save, 3)}, "warnings": warnings}
    if not req.dry_run:
        t1 = time.monotonic()
        _run(cmd)
        doc["timings"]["kexec_load"] = round(time.monotonic() - t1, 3)
        marker = {"schema": MARKER_SCHEMA, "region": os.path.abspath(region),
                  "devices": list(req.devices), "force": req.force, "minor": minor,
                  "kernel": os.path.abspath(req.image), "cmdline": hide_token(cmdline),
                  "armed_at": time.time(), "generation": report.get("generation"),
                  "token_salt": token_hash[0].hex() if token_hash else None,
                  "token_hash": token_hash[1].hex() if token_hash else None}
        doc["marker"] = write_marker(req.result_dir, marker)
        doc["keepalive"] = arm_keepalive(sr, report.get("devices") or [], declared,
                                         region=region_spec(facts))
        if req.hold and doc["keepalive"].get("armed") and req.sysroot == "/":
            doc["hold"] = hold_devices(sr, doc["keepalive"]["devices"], req.result_dir)
    return doc


def hold_devices(sr, devices: list[str], result_dir: str) -> dict:
    """Keep the armed devices' VFIO files open in a holder process, so that their owner
    (a VMM) may exit before the kexec without the kernel resetting them."""
    from dataclasses import asdict

    from ..host.vfio_hold import hold

    return asdict(hold(sr, devices, result_dir))


def exec_plan(sysroot: str, result_dir: str) -> list[str]:
    """The command that executes an armed kernel; HandoverError when nothing is armed."""
    if not os.path.exists(marker_path(result_dir)) or not kexec_loaded(sysroot):
        raise HandoverError(f"{result_dir}: not armed: no marker or no kernel loaded "
                            f"(run handover arm --kernel IMAGE first)")
    return exec_command(systemd_running(sysroot))


def exec_armed(cmd: list[str]) -> None:
    """Run ``cmd`` (exec_plan); it does not return when the kexec happens."""
    r = subprocess.run(cmd)
    raise HandoverError(f"{shlex.join(cmd)}: returned (exit {r.returncode}): the kexec did not "
                        f"happen")


def shutdown_save(result_dir: str, sysroot: str, progress=None) -> dict:
    """What the systemd unit runs on the way down: when armed (marker present and a kernel
    loaded), save again with the armed options; else nothing. The token's salted hash from
    the marker goes into the state as it is (the token is not needed, nor kept)."""
    from .save import SaveRequest, save

    m = read_marker(result_dir)
    if m is None:
        return {"saved": False, "reason": "not armed (no marker): nothing to save"}
    if not kexec_loaded(sysroot):
        return {"saved": False,
                "reason": "armed, but no kexec kernel is loaded: not a kexec, nothing saved"}
    th = None
    if m.get("token_salt") and m.get("token_hash"):
        try:
            th = (bytes.fromhex(m["token_salt"]), bytes.fromhex(m["token_hash"]))
        except ValueError:
            raise HandoverError(f"{marker_path(result_dir)}: token hash is not hex") from None
        if len(th[0]) != 16 or len(th[1]) != 32:
            raise HandoverError(f"{marker_path(result_dir)}: token salt/hash of the wrong size")
    report = save(SaveRequest(region=m["region"], devices=tuple(m.get("devices") or ()),
                              token_hash=th, force=bool(m.get("force")), minor=m.get("minor"),
                              sysroot=sysroot, progress=progress))
    return {"saved": True, "region": m["region"], "generation": report.get("generation"),
            "report": report}
