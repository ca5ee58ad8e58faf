"""``handover vm save|restore|list``: the VMM side of a fast restart (``handover.ops.vm``).

``save`` keeps the vfio-pci devices of a running patched QEMU alive, stops it and migrates
its state to a file (x-ignore-shared); ``restore`` loads that file into the next QEMU
(``-incoming defer``), returns the devices to the normal resets and continues the VM;
``list`` shows the QEMU processes, their QMP sockets and VFIO devices. Errors: one line,
exit 1 (refused, nothing changed), 3 (no state file), 8 (a step failed: undone), 9 (a step
failed and undoing it failed too). The token goes to QEMU only: never printed or logged.
"""

from __future__ import annotations

import click

from .common import emit_json, err, handle_errors, out, progress, read_token, settings, text

SCHEMA_SAVE = "handover.vm-save/1"
SCHEMA_RESTORE = "handover.vm-restore/1"
SCHEMA_LIST = "handover.vm-list/1"


def _timeout(f):
    return click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0,
                        show_default=True, metavar="S",
                        help="Give up (and undo) when the migration has not completed "
                             "within S seconds.")(f)


def _times(times: dict) -> str:
    return ", ".join(f"{k.replace('_', '-')} {v:.3f} s" for k, v in times.items())


def _devices(devs: list[dict]) -> str:
    return text([f"{d['id'] or d['qom_path']} ({d['host'] or '?'}"
                 f"{', kept alive' if d.get('kept') else ''})" for d in devs])


@click.group("vm")
def vm():
    """A fast restart of QEMU that keeps its vfio-pci devices running (patched QEMU)."""


@vm.command("save")
@click.option("--qmp", "qmp", required=True, metavar="SOCKET",
              help="The running QEMU's QMP unix socket.")
@click.option("--state", "state", required=True, type=click.Path(dir_okay=False),
              metavar="FILE", help="Where the VM state goes (replaced only by a complete one).")
@click.option("--token-file", "token_file", metavar="FILE", default=None,
              help="Read the owner token (a UUID) from FILE; - reads stdin.")
@click.option("--token", metavar="UUID", default=None,
              help="Owner token (visible in ps: prefer --token-file).")
@click.option("--id", "ids", multiple=True, metavar="DEV",
              help="Keep this vfio-pci device (its qdev id) alive (repeatable). "
                   "Default: every vfio-pci device.")
@click.option("--quit", "quit_", is_flag=True,
              help="Quit QEMU once the state is saved (the devices stay kept alive).")
@click.option("--allow-no-device", is_flag=True,
              help="Save a VM without vfio-pci devices too (nothing is kept alive).")
@click.option("--hold", is_flag=True,
              help="Keep QEMU's VFIO files open in a holder process once the state is saved, "
                   "so that QEMU may quit and the next one take them over on the same kernel "
                   "(handover vm exec). Needs the token.")
@_timeout
@click.option("--json", "as_json", is_flag=True, help="Report as JSON on stdout.")
@handle_errors
def save(qmp, state, token_file, token, ids, quit_, allow_no_device, hold, timeout, as_json):
    """Keep the devices alive, stop the VM and save its state to FILE (x-ignore-shared:
    guest RAM on a shared memory backend is not copied). Any failure before FILE is complete
    undoes it all: keepalive off, the VM running again if it ran, no partial file."""
    from ..ops.vm import VmSaveRequest, save as run

    tok = read_token(token, token_file)
    if hold and not tok:
        raise click.UsageError("--hold needs the token (--token-file)")
    if hold and quit_:
        raise click.UsageError("--hold takes QEMU's files after the save: quit QEMU afterwards")
    report = run(VmSaveRequest(qmp=qmp, state=state, token=tok, ids=ids, quit=quit_,
                               allow_no_device=allow_no_device, timeout=timeout,
                               progress=progress()))
    report["hold"] = None
    if hold:
        from ..ops.vm_takeover import hold_vm

        report["hold"] = hold_vm(report["pid"], tok)
        (progress() or (lambda _m: None))(f"holder pid {report['hold']['holder']} keeps {report['hold']['fds']} VFIO "
                   f"files of QEMU pid {report['pid']}")
    if as_json:
        emit_json({"schema": SCHEMA_SAVE, "ok": True, **report})
        return
    out(f"saved {report['state']}: {report['size']} bytes (QEMU pid {text(report['pid'])})")
    out(f"  devices: {_devices(report['devices'])}")
    ka = report["keepalive"]
    out(f"  keepalive: {'on' if ka['set'] else 'not set (no device)'}"
        + (f" for {text(ka['ids'])}" if ka["set"] and ka["ids"] else ""))
    out(f"  times: {_times(report['times'])}")
    if report["quit"]:
        out(f"  QEMU quit{'' if report['exited'] is not False else ' (still running)'}")
    elif not settings().quiet:
        err(f"QEMU pid {text(report['pid'])} is {text(report['status'])}: its devices stay "
            f"kept alive; quit it before starting the next QEMU")


@vm.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--token-file", "token_file", metavar="FILE", default=None,
              help="Read the owner token (a UUID) from FILE; - reads stdin.")
@click.option("--token", metavar="UUID", default=None,
              help="Owner token (visible in ps: prefer --token-file).")
@click.option("--from-pid", type=int, default=None, metavar="PID",
              help="Take the files from this QEMU (still running, its state saved) instead "
                   "of the holder of vm save --hold; no token check then (root only).")
@click.argument("qemu", nargs=-1, type=click.UNPROCESSED, required=True)
@handle_errors
def exec_cmd(token_file, token, from_pid, qemu):
    """Start the next QEMU on the same kernel with the VFIO files of the saved one (Stage-1
    of a fast restart): checks the token against the one vm save --hold recorded, takes the
    files from the holder, invalidates the mappings' virtual addresses (the next QEMU gives
    them its own), stops the holder and execs QEMU (after --) with -add-fd options naming
    the files. The QEMU command needs -device vfio-pci,...,keepalive_token=UUID and
    -incoming defer; then handover vm restore."""
    import os

    from ..ops.vm_takeover import prepare_exec

    tok = read_token(token, token_file)
    if from_pid is None and not tok:
        raise click.UsageError("vm exec needs the token (--token-file), or --from-pid")
    say = progress() or (lambda _m: None)
    argv, report = prepare_exec(list(qemu), tok, from_pid=from_pid, say=say)
    say(f"exec {argv[0]} with {len(report['fds'])} VFIO files")
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        from ..errors import HandoverError

        raise HandoverError(f"vm exec: {argv[0]}: {e.strerror}") from None


@vm.command("restore")
@click.option("--qmp", "qmp", required=True, metavar="SOCKET",
              help="The QMP unix socket of the next QEMU, started with -incoming defer.")
@click.option("--state", "state", required=True, type=click.Path(dir_okay=False),
              metavar="FILE", help="The state vm save wrote.")
@click.option("--keepalive-off/--keep-keepalive", "keepalive_off", default=True,
              show_default=True, help="Return the kept devices to the normal resets after "
                                      "the load (x-set-keepalive off), or leave them kept.")
@click.option("--no-cont", is_flag=True, help="Leave the VM paused after the load.")
@_timeout
@click.option("--json", "as_json", is_flag=True, help="Report as JSON on stdout.")
@handle_errors
def restore(qmp, state, keepalive_off, no_cont, timeout, as_json):
    """Load FILE into the next QEMU (started with -incoming defer and -device
    vfio-pci,...,keepalive_token=UUID), then keepalive off and cont. A failure leaves QEMU
    as it is (paused) and deletes nothing."""
    from ..ops.vm import VmRestoreRequest, restore as run

    report = run(VmRestoreRequest(qmp=qmp, state=state, keepalive_off=keepalive_off,
                                  cont=not no_cont, timeout=timeout, progress=progress()))
    if as_json:
        emit_json({"schema": SCHEMA_RESTORE, "ok": True, **report})
        return
    out(f"restored {report['state']} ({report['size']} bytes) into QEMU pid "
        f"{text(report['pid'])}: {report['status']}")
    out(f"  devices: {_devices(report['devices'])}")
    out(f"  keepalive off: {text(report['keepalive_off'])}")
    out(f"  times: {_times(report['times'])}")


@vm.command("list")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON on stdout.")
@click.option("--sysroot", default="/", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False),
              help="Read /proc under DIR (a captured tree) instead of /.")
@handle_errors
def list_cmd(as_json, sysroot):
    """Running QEMU processes: their QMP sockets and vfio-pci devices (whether a
    keepalive_token is given, never its value)."""
    from ..ops.vm import list_vms

    vms = list_vms(sysroot)
    if as_json:
        emit_json({"schema": SCHEMA_LIST, "ok": True, "vms": vms})
        return
    if not vms:
        out("no QEMU process")
    for v in vms:
        name = f" ({v['name']})" if v["name"] else ""
        out(f"pid {v['pid']}{name}: {v['binary']}"
            + (f", incoming {v['incoming']}" if v["incoming"] else ""))
        for q in v["qmp"]:
            out(f"  qmp     {q['path'] or q.get('kind', '?')}  ({q['via']})")
        for d in v["devices"]:
            out(f"  device  {d['host'] or '?'}  id {text(d['id'])}  "
                f"keepalive_token {'given' if d['token'] else 'none'}")
        for n in v["notes"]:
            out(f"  note    {n}")
