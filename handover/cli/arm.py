"""``handover arm``: save the state, then load the next kernel with kexec-tools
(``handover.ops.arm`` does the work; this module parses and prints).

    handover arm --kernel IMAGE [--initrd I] [--append ARGS] [--region R] [--exec]

``--dry-run`` collects, builds and prints the kexec command; it writes and loads nothing.
``handover arm --exec`` without ``--kernel`` executes what an earlier ``arm`` loaded.
``handover arm --on-shutdown`` is what the systemd unit runs: when armed (marker present and
a kernel loaded) it saves again with the armed options, else it does nothing.
"""

from __future__ import annotations

import shlex
import sys

import click

from .common import (emit_json, err, handle_errors, out, parse_alter, print_save_report,
                     progress, read_token, settings, sysroot_option, token_options, warn)

SCHEMA_ARM = "handover.arm/1"


def _exec(cmd: list[str], dry_run: bool) -> None:
    from ..ops.arm import exec_armed

    if dry_run:
        err("would run: " + shlex.join(cmd))
        return
    err(f"executing {shlex.join(cmd)}")
    sys.stdout.flush()
    sys.stderr.flush()
    exec_armed(cmd)


def _vm_pairs(values) -> tuple:
    pairs = []
    for v in values:
        qmp, sep, state = v.partition("=")
        if not sep or not qmp or not state:
            raise click.UsageError(f"--vm {v!r}: expected QMP_SOCKET=STATE_FILE")
        pairs.append((qmp, state))
    return tuple(pairs)


@click.command()
@click.option("--kernel", "image", type=click.Path(dir_okay=False), metavar="IMAGE",
              help="The next kernel (bzImage or vmlinux).")
@click.option("--initrd", type=click.Path(dir_okay=False), metavar="I",
              help="Its initramfs (with the handover hook: without one, nothing checks the "
                   "state in user space).")
@click.option("--append", default="", metavar="ARGS", help="Extra words for the next command line.")
@click.option("--command-line", "command_line", default=None, metavar="TEXT",
              help="Start from TEXT instead of the current /proc/cmdline.")
@click.option("--region", "region", metavar="R", help="The region the state goes to (default: "
              "the only initialized handover region).")
@click.option("--next-region", metavar="SPEC", help="handover.region= for the next kernel "
              "(default: phys:<start> when known, else R as an absolute path).")
@click.option("--policy", type=click.Choice(["report", "abort"]), default=None,
              help="handover.policy= for the next kernel's initramfs (default: not set = report).")
@click.option("--device", "devices", multiple=True, metavar="BDF", help="As for save.")
@token_options
@click.option("--pass-token", is_flag=True, help="Also put handover.token=UUID on the next "
              "command line, so that the initramfs checks it. It EXPOSES the token: every "
              "user of the next kernel can read /proc/cmdline.")
@click.option("--force", is_flag=True, help="As for save.")
@click.option("--kexec-mode", type=click.Choice(["l", "s"]), default="l", show_default=True,
              help="l: kexec -l (kexec_load), s: kexec -s -l (kexec_file_load).")
@click.option("--hold/--no-hold", default=True, show_default=True,
              help="Keep the armed devices' VFIO files open in a holder process, so that "
                   "their owner (a VMM) may exit before the kexec without a device reset.")
@click.option("--vm", "vms", multiple=True, metavar="QMP=STATE",
              help="First save this VM (patched QEMU: its QMP socket, the state file): its "
                   "vfio-pci devices kept alive with the token, the VM stopped, its state "
                   "written as vm save does; repeatable. A later failure resumes the VMs.")
@click.option("--exec", "do_exec", is_flag=True, help="Then kexec (systemctl kexec under systemd).")
@click.option("--on-shutdown", is_flag=True, help="(systemd unit) save again if armed.")
@click.option("--dry-run", is_flag=True, help="Collect and print the kexec command; change nothing.")
@click.option("--result-dir", default="/run/handover", show_default=True, metavar="DIR",
              help="Where the armed marker is written.")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.option("--test-alter-bar", "alter", multiple=True, metavar="BDF:INDEX:START", hidden=True)
@sysroot_option
@handle_errors
def arm(image, initrd, append, command_line, region, next_region, policy, devices, token,
        token_file, pass_token, force, kexec_mode, hold, vms, do_exec, on_shutdown, dry_run,
        result_dir, as_json, quiet, alter, sysroot):
    """Save the state, then kexec-load the next kernel with the handover command line."""
    from ..ops import arm as ops

    quiet = quiet or settings().quiet
    if on_shutdown:
        res = ops.shutdown_save(result_dir, sysroot, progress(quiet))
        if res["saved"]:
            err(f"saved at shutdown: generation {res['generation']} to {res['region']}")
        else:
            err(res["reason"])
        return
    if image is None:
        if not do_exec:
            raise click.UsageError("give --kernel IMAGE (or --exec alone to execute an armed kernel)")
        return _exec(ops.exec_plan(sysroot, result_dir), dry_run)
    token = read_token(token, token_file)
    if pass_token and not token:
        raise click.UsageError("--pass-token needs --token-file (or --token)")
    doc = ops.arm(ops.ArmRequest(
        image=image, initrd=initrd, append=append, command_line=command_line, region=region,
        next_region=next_region, policy=policy, devices=devices, token=token,
        pass_token=pass_token, force=force, kexec_mode=kexec_mode, dry_run=dry_run,
        result_dir=result_dir, alter=parse_alter(alter), sysroot=sysroot,
        progress=progress(quiet or as_json), hold=hold, vms=_vm_pairs(vms)))
    for w in doc["save"].get("warnings", []) + doc["warnings"]:
        warn(w)
    if as_json:
        emit_json({"schema": SCHEMA_ARM, **doc})
    else:
        print_save_report(doc["save"], dry_run, brief=True)
        out(f"kernel: {doc['kernel_declaration']}")
        out(("would run: " if dry_run else "loaded: ") + shlex.join(doc["kexec_command"]))
        if doc.get("hold", {}).get("holder"):
            h = doc["hold"]
            out(f"holding {h['fds']} VFIO files of " +
                ", ".join(f"{o['comm']}[{o['pid']}]" for o in h["owners"]) +
                f" in pid {h['holder']} until the kexec")
    sys.stdout.flush()
    if do_exec:
        _exec(ops.exec_command(ops.systemd_running(sysroot)), dry_run)
