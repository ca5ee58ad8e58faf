"""``handover arm``: save the state, then load the next kernel with kexec-tools.

    handover arm --kernel IMAGE [--initrd I] [--append ARGS] [--region R] [--exec]

1. checks IMAGE's ``Handover`` ELF note (kernelimage.read_declaration): no note = a stock
   kernel (user-space validation only, in the initramfs); a note that does not include a
   format this tool writes = refused (exit 5); otherwise the newest format it reads is written;
2. saves (the code path of ``handover save``) into the region;
3. builds the next command line: the current one (``/proc/cmdline`` without BOOT_IMAGE=,
   initrd= and old handover words) or ``--command-line``, then ``--append``, then
   ``handover.region=<spec>``, ``handover.policy=``, the legacy region's ``memmap=`` again
   (the next kernel does not inherit it) and, when IMAGE declares the note,
   ``handover=<size>@<phys>`` (read by the patched kernel itself);
4. ``kexec -l`` (``--kexec-mode s``: ``kexec -s -l``) and writes the marker
   ``/run/handover/armed`` that gates the systemd save-on-kexec unit;
5. ``--exec``: ``systemctl kexec`` when systemd is PID 1, else ``kexec -e``.

``--dry-run`` collects, builds and prints the kexec command; it writes and loads nothing.
``handover arm --exec`` without ``--kernel`` executes what an earlier ``arm`` loaded.
``handover arm --on-shutdown`` is what the systemd unit runs: when armed (marker present and
a kernel loaded) it saves again with the armed options, else it does nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time

import click

from .cli import _emit_json, handle_errors
from .cli_host import DEFAULT_RESULT_DIR, _print_save_report, _sysroot_option, save_state
from .errors import HandoverError, VersionError

MARKER = "armed"
#: Words of the current command line that are not carried to the next kernel.
DROP_WORDS = re.compile(r"^(BOOT_IMAGE|initrd|handover|handover\.[a-z_.]+|kexec_jump_back_entry)(=|$)")
MEMMAP_RE = re.compile(r"^memmap=(?P<size>(?:0x)?[0-9a-fA-F]+[KMGkmg]?)!(?P<start>(?:0x)?[0-9a-fA-F]+[KMGkmg]?)$")


def parse_mem(text: str) -> int:
    """memparse(): 64M, 0x30000000, 768M, 1G, 4096."""
    m = re.fullmatch(r"(0x[0-9a-fA-F]+|\d+)([KMGkmg]?)", text)
    if not m:
        raise ValueError(text)
    return int(m.group(1), 0) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def memmap_words_for(cmdline: str, phys: int | None) -> list[str]:
    """The ``memmap=size!start`` words of ``cmdline`` whose range holds ``phys``."""
    out = []
    if phys is None:
        return out
    for w in cmdline.split():
        m = MEMMAP_RE.match(w)
        if not m:
            continue
        start, size = parse_mem(m.group("start")), parse_mem(m.group("size"))
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
    return " ".join(words)


def plan_cmdline(current: str, command_line: str | None, append: str, region: str, facts: dict,
                 *, next_region: str | None = None, policy: str | None = None,
                 declared: bool = False, token: str | None = None) -> tuple[str, str]:
    """(next command line, handover.region= value) from the current command line (or
    ``command_line``), the region's facts (``region_facts``) and the options of ``arm``."""
    base = carried_cmdline(current if command_line is None else command_line)
    memmap: list[str] = []
    if facts.get("legacy"):
        memmap = memmap_words_for(current, facts["phys_start"]) or [facts["memmap_option"]]
    phys = facts.get("phys_start")
    word = next_region or (f"phys:{phys:#x}" if phys is not None else region)
    hparam = None
    if declared and phys is not None and facts.get("size"):
        hparam = f"handover={facts['size']:#x}@{phys:#x}"
    cmd = next_cmdline(base, append, word, policy, memmap, hparam)
    return (cmd + f" handover.token={token}" if token else cmd), word


def kexec_command(kernel: str, initrd: str | None, cmdline: str, mode: str = "l",
                  kexec: str = "kexec") -> list[str]:
    cmd = [kexec] + (["-s", "-l"] if mode == "s" else ["-l"]) + [kernel]
    if initrd:
        cmd.append(f"--initrd={initrd}")
    cmd.append(f"--command-line={cmdline}")
    return cmd


def exec_command(systemd_running: bool, kexec: str = "kexec") -> list[str]:
    """``systemctl kexec`` when systemd is PID 1 (the unit saves on the way), else ``kexec -e``."""
    return ["systemctl", "kexec"] if systemd_running else [kexec, "-e"]


def systemd_running(root: str = "/") -> bool:
    """sd_booted(): /run/systemd/system exists."""
    return os.path.isdir(os.path.join(root, "run/systemd/system"))


def region_facts(region: str, sysroot: str = "/") -> dict:
    """phys_start/size of REGION and whether it is a legacy (memmap=) range."""
    from . import pmem
    from .pmem.discover import parse_iomem, memmap_option

    facts = {"phys_start": None, "size": None, "legacy": False, "memmap_option": None}
    try:
        st = pmem.status(region)
        facts["phys_start"], facts["size"] = st.get("phys_start"), st.get("size")
    except (HandoverError, OSError):
        pass
    try:
        with open(os.path.join(sysroot, "proc/iomem")) as f:
            ranges = parse_iomem(f.read())
    except OSError:
        ranges = []
    p = facts["phys_start"]
    for r in ranges:
        if p is not None and r["start"] <= p < r["start"] + r["size"] and r["legacy"]:
            facts["legacy"] = True
            facts["memmap_option"] = memmap_option(r["start"], r["size"])
    return facts


def kernel_declaration(image: str) -> tuple[int | None, str]:
    """(format minor to write or None for the default, a one-line note). Raises VersionError."""
    from .formats.structs import FORMAT_MAJOR, WRITABLE_MINORS
    from .kernelimage import read_declaration

    d = read_declaration(image)
    if d is None:
        return None, "stock kernel (no Handover note): user space validation only"
    best = d.best_minor(FORMAT_MAJOR, WRITABLE_MINORS)
    if best is None:
        raise VersionError(f"{image} reads handover format {d.text()}, this tool writes "
                           + ", ".join(f"{FORMAT_MAJOR}.{m}" for m in WRITABLE_MINORS)
                           + ": refusing to arm")
    return best, f"kernel reads {d.text()}: writing {FORMAT_MAJOR}.{best}"


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise HandoverError(f"{shlex.join(cmd[:3])}: exit {r.returncode}"
                            + (f": {msg[-1]}" if msg else ""))


def _marker_path(result_dir: str) -> str:
    return os.path.join(result_dir, MARKER)


def _write_marker(result_dir: str, doc: dict) -> str:
    os.makedirs(result_dir, exist_ok=True)
    path = _marker_path(result_dir)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path


def _kexec_loaded(sysroot: str) -> bool:
    try:
        with open(os.path.join(sysroot, "sys/kernel/kexec_loaded")) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


@click.command()
@click.option("--kernel", "image", type=click.Path(dir_okay=False), metavar="IMAGE",
              help="The next kernel (bzImage or vmlinux).")
@click.option("--initrd", type=click.Path(dir_okay=False), metavar="I", help="Its initramfs.")
@click.option("--append", default="", metavar="ARGS", help="Extra words for the next command line.")
@click.option("--command-line", "command_line", default=None, metavar="TEXT",
              help="Start from TEXT instead of the current /proc/cmdline.")
@click.option("--region", "region", metavar="R", help="The region the state goes to (default: "
              "the only initialized handover region).")
@click.option("--next-region", metavar="SPEC", help="handover.region= for the next kernel "
              "(default: phys:<start> when known, else R).")
@click.option("--policy", type=click.Choice(["report", "abort"]), default=None,
              help="handover.policy= for the next kernel's initramfs (default: not set = report).")
@click.option("--device", "devices", multiple=True, metavar="BDF", help="As for save.")
@click.option("--token", metavar="UUID", help="As for save.")
@click.option("--pass-token", is_flag=True, help="Also put handover.token=UUID on the next command "
              "line, so that the initramfs checks it (it is then readable in /proc/cmdline).")
@click.option("--force", is_flag=True, help="As for save.")
@click.option("--kexec-mode", type=click.Choice(["l", "s"]), default="l", show_default=True,
              help="l: kexec -l (kexec_load), s: kexec -s -l (kexec_file_load).")
@click.option("--exec", "do_exec", is_flag=True, help="Then kexec (systemctl kexec under systemd).")
@click.option("--on-shutdown", is_flag=True, help="(systemd unit) save again if armed.")
@click.option("--dry-run", is_flag=True, help="Collect and print the kexec command; change nothing.")
@click.option("--result-dir", default=DEFAULT_RESULT_DIR, show_default=True, metavar="DIR",
              help="Where the armed marker is written.")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.option("--test-alter-bar", "alter", multiple=True, metavar="BDF:INDEX:START", hidden=True)
@_sysroot_option
@handle_errors
def arm(image, initrd, append, command_line, region, next_region, policy, devices, token,
        pass_token, force, kexec_mode, do_exec, on_shutdown, dry_run, result_dir, as_json, quiet, alter, sysroot):
    """Save the state, then kexec-load the next kernel with the handover command line."""
    if on_shutdown:
        return _on_shutdown(result_dir, sysroot, quiet)
    if image is None:
        if not do_exec:
            raise click.UsageError("give --kernel IMAGE (or --exec alone to execute an armed kernel)")
        if not os.path.exists(_marker_path(result_dir)) or not _kexec_loaded(sysroot):
            raise HandoverError("not armed: no marker in " + result_dir + " or no kernel loaded "
                                "(run handover arm --kernel IMAGE first)")
        return _exec(sysroot, dry_run)
    t0 = time.monotonic()
    minor, kernel_note = kernel_declaration(image)
    declared = minor is not None
    if pass_token and not token:
        raise click.UsageError("--pass-token needs --token")
    if region is None:
        region = _default_region()
    save_opts = {"region": region, "devices": list(devices), "token": token, "force": force,
                 "minor": minor}
    report = save_state(dry_run=dry_run, quiet=quiet or as_json, alter=alter, sysroot=sysroot,
                        **save_opts)
    t_save = time.monotonic() - t0
    facts = region_facts(region, sysroot)
    with open(os.path.join(sysroot, "proc/cmdline")) as f:
        current = f.read()
    cmdline, word = plan_cmdline(current, command_line, append, region, facts,
                                 next_region=next_region, policy=policy, declared=declared,
                                 token=token if pass_token else None)
    cmd = kexec_command(image, initrd, cmdline, kexec_mode)
    doc = {"ok": True, "kernel": image, "initrd": initrd, "kernel_declaration": kernel_note,
           "region": region, "next_region": word, "legacy": facts["legacy"],
           "cmdline": cmdline, "kexec_command": cmd, "dry_run": dry_run, "save": report,
           "timings": {"save": round(t_save, 3)}}
    if not dry_run:
        t1 = time.monotonic()
        _run(cmd)
        doc["timings"]["kexec_load"] = round(time.monotonic() - t1, 3)
        marker = {"region": region, "devices": list(devices), "token": token, "force": force,
                  "minor": minor, "kernel": image, "cmdline": cmdline,
                  "armed_at": time.time(), "generation": report.get("generation")}
        doc["marker"] = _write_marker(result_dir, marker)
        doc["keepalive"] = arm_keepalive(sysroot, report.get("devices") or [], declared)
    if as_json:
        _emit_json(doc)
    else:
        _print_save_report(report, dry_run)
        click.echo(f"kernel: {kernel_note}")
        click.echo(("would run: " if dry_run else "loaded: ") + shlex.join(cmd))
    sys.stdout.flush()
    if do_exec and not dry_run:
        _exec(sysroot, False)
    elif do_exec:
        click.echo("would run: " + shlex.join(exec_command(systemd_running(sysroot))), err=True)


KEEPALIVE = "sys/kernel/handover/keepalive"


def arm_keepalive(sysroot: str, devices: list[str], next_reads_state: bool = True) -> dict:
    """Tell a patched running kernel which devices its kexec must leave running (DMA
    translation on, bus mastering kept: kernel-patches 0005). Feature-detected: on a stock
    kernel the file does not exist and nothing changes.

    Only when the next kernel reads the state (it declares so in its Handover ELF note): a
    kernel that does not would find translation on, disable it as a stock kernel does, and
    the devices still bus-mastering would DMA to their IOVAs as physical addresses. Then
    any earlier arming is cleared and the kexec stops the devices as usual."""
    path = os.path.join(sysroot, KEEPALIVE)
    if not os.path.exists(path):
        return {"armed": False, "reason": f"/{KEEPALIVE} missing: kernel without handover patches"}
    if not next_reads_state:
        devices = []
    try:
        for word in ["clear", *devices]:
            with open(path, "w") as f:
                f.write(word + "\n")
    except OSError as e:
        raise HandoverError(f"/{KEEPALIVE}: cannot arm {word}: {e.strerror}") from None
    if not next_reads_state:
        return {"armed": False, "reason": "the next kernel does not declare that it reads the "
                "handover state: the kexec stops the devices as usual"}
    return {"armed": True, "devices": list(devices)}


def _default_region() -> str:
    from . import pmem

    found = [e["device"] for e in pmem.list_regions()
             if e.get("device") and e.get("handover") in ("initialized", "state")]
    if len(found) != 1:
        raise HandoverError("give --region R: " + (f"{len(found)} handover regions found ("
                                                  + ", ".join(found) + ")" if found else
                                                  "no initialized handover region found "
                                                  "(handover region list; handover region init)"))
    return found[0]


def _exec(sysroot: str, dry_run: bool) -> None:
    cmd = exec_command(systemd_running(sysroot))
    if dry_run:
        click.echo("would run: " + shlex.join(cmd), err=True)
        return
    click.echo(f"handover: executing {shlex.join(cmd)}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    r = subprocess.run(cmd)
    raise HandoverError(f"{shlex.join(cmd)} returned (exit {r.returncode}): the kexec did not happen")


def _on_shutdown(result_dir: str, sysroot: str, quiet: bool) -> None:
    path = _marker_path(result_dir)
    if not os.path.exists(path):
        click.echo("handover: not armed (no marker): nothing to save", err=True)
        return
    if not _kexec_loaded(sysroot):
        click.echo("handover: armed, but no kexec kernel is loaded: not a kexec, nothing saved",
                   err=True)
        return
    with open(path) as f:
        m = json.load(f)
    report = save_state(region=m["region"], devices=m.get("devices") or (), token=m.get("token"),
                        force=bool(m.get("force")), minor=m.get("minor"), quiet=quiet,
                        sysroot=sysroot)
    click.echo(f"handover: saved at shutdown: generation {report.get('generation')} to "
               f"{m['region']}", err=True)
