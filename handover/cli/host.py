"""``save``, ``load``, ``capture-sysroot``: the live host (or a captured tree, ``--sysroot``)."""

from __future__ import annotations

import click

from ..errors import MismatchError
from .common import (emit_json, err, exit_with, handle_errors, out, parse_alter,
                     parse_format_version, print_save_report, progress, read_token, settings,
                     sysroot_option, text, token_options, warn)

SCHEMA_SAVE = "handover.save/1"


@click.command()
@click.option("--region", "region", metavar="R", help="Persistent-memory region (or a blob file "
              "with --output) that receives the state.")
@click.option("--device", "devices", multiple=True, metavar="BDF",
              help="Keep this device alive (repeatable). Default: every device bound to vfio-pci.")
@token_options
@click.option("--dry-run", is_flag=True, help="Collect and show what would be saved; write nothing.")
@click.option("--require", type=click.Choice(["available", "full"]), default="available",
              show_default=True, help="full: fail when any item cannot be captured.")
@click.option("--force", is_flag=True, help="Keep devices the rules refuse (not vfio-pci, "
              "IOMMU group shared with a device not kept); overwrite an existing --output; "
              "also passed to the region commit.")
@click.option("--output", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also (or, without --region, only) write the blob to FILE (refused when "
                   "FILE exists, unless --force; never onto the region itself).")
@click.option("--wait", is_flag=True, help="Wait for the region lock instead of failing.")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.option("--format-version", "fmt", default=None, metavar="MAJOR.MINOR",
              help="Write this (older) format version, for a kernel that knows only that.")
@click.option("--target-kernel", "target", default=None, type=click.Path(dir_okay=False),
              metavar="IMAGE", help="Write the newest format this kernel image declares it "
              "reads (its Handover ELF note); refuse if it reads none this tool writes.")
@click.option("--test-alter-bar", "alter", multiple=True, metavar="BDF:INDEX:START", hidden=True,
              help="TEST ONLY: save BAR INDEX of BDF at START (a deliberately stale state).")
@sysroot_option
@handle_errors
def save(region, devices, token, token_file, dry_run, require, force, output, wait, as_json,
         quiet, fmt, target, alter, sysroot):
    """Capture the keepalive state of the host and commit it to a region (before kexec)."""
    from ..errors import VersionError
    from ..ops.arm import kernel_declaration
    from ..ops.save import SaveRequest, save as run

    if not region and not output and not dry_run:
        raise click.UsageError("give --region R (or --output FILE, or --dry-run)")
    token = read_token(token, token_file)
    minor = parse_format_version(fmt)
    quiet = quiet or settings().quiet
    if target:
        tminor, note = kernel_declaration(target)
        if minor is not None and tminor is not None and minor > tminor:
            raise VersionError(f"{target}: --format-version {fmt} is newer than it reads")
        minor = tminor if minor is None else minor
        if not quiet:
            err(f"{target}: {note}")
    report = run(SaveRequest(region=region, devices=devices, token=token, dry_run=dry_run,
                             require=require, force=force, output=output, wait=wait,
                             alter=parse_alter(alter), sysroot=sysroot, minor=minor,
                             progress=progress(quiet)))
    for w in report.get("warnings", []):
        warn(w)
    if as_json:
        emit_json({"schema": SCHEMA_SAVE, "ok": True, **report})
        return
    print_save_report(report, dry_run)


def keepalive_line(d: dict) -> str:
    """One keepalive device as the kernel reported it (host.kernel_handover.parse_status)."""
    if "bdf" not in d:
        return d.get("line", "?")
    line = f"{d['bdf']}: {d['state']}"
    if d.get("adopted"):
        line += f", translation adopted (domain {d['domain']})"
    return line + (f" ({d['why']})" if d.get("why") else "")


@click.command()
@click.option("--region", "region", required=True, metavar="R",
              help="Region (or blob file) holding the saved state.")
@click.option("--check-only", is_flag=True, help="Compare only; never feed the kernel interface.")
@token_options
@click.option("--generation", type=click.IntRange(min=0), default=None, metavar="N",
              help="This generation instead of the newest valid one.")
@click.option("--result-dir", default="/run/handover", show_default=True, metavar="DIR",
              help="Where result.json is written.")
@click.option("--json", "as_json", is_flag=True, help="The result document on stdout.")
@sysroot_option
@handle_errors
def load(region, check_only, token, token_file, generation, result_dir, as_json, sysroot):
    """Check the saved state against the running host (in the new kernel).

    Exit 0 match, 6 mismatch, 7 match but read from an older generation (the newest is
    damaged)."""
    from ..ops.load import LoadRequest, failure_summary, load as run

    doc = run(LoadRequest(region=region, token=read_token(token, token_file),
                          generation=generation, check_only=check_only, result_dir=result_dir,
                          sysroot=sysroot))
    if doc.get("fallback"):
        warn(f"{region}: newest generation unusable ({doc['fallback']['reason']}); using "
             f"generation {doc['fallback']['generation']}")
    if as_json:
        emit_json(doc)
    else:
        for v in doc["verdicts"]:
            mark = {"match": "ok  ", "mismatch": "FAIL", "missing": "FAIL",
                    "unverified": "??  "}[v["status"]]
            extra = ""
            if v["status"] != "match":
                extra = f": saved {text(v.get('saved'))}, host {text(v.get('host'))}" + \
                    (f" ({v['detail']})" if v.get("detail") else "")
            out(f"{mark} {v['item']}{extra}")
        s = doc["summary"]
        kernel = doc["kernel_interface"]
        status = kernel.get("status_after") or kernel.get("status") or {}
        for d in status.get("keepalive", []):
            out("kernel keepalive " + keepalive_line(d))
        # the summary stays the last line: the initramfs boot script logs that one
        out(f"{'MATCH' if doc['ok'] else 'MISMATCH'}: {s['match']} match, "
            f"{s['mismatch']} mismatch, {s['missing']} missing, {s['unverified']} "
            f"unverified; kernel: {kernel['action']}")
    if not settings().quiet:
        err(f"result written to {doc['result_path']}")
    if not doc["ok"]:
        e = MismatchError(failure_summary(region, doc))
        click.echo(f"handover: {e.kind}: {e}", err=True)
    exit_with(doc["exit_code"])


@click.command("capture-sysroot")
@click.argument("output", type=click.Path(dir_okay=False))
@sysroot_option
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
@click.option("--note", default="", help="A line of text stored in the archive's manifest.")
@handle_errors
def capture_sysroot(output, sysroot, force, note):
    """Archive exactly the files the sources read (a fixture, or for a bug report)."""
    import os

    from ..errors import HandoverError
    from ..ops.capture import capture

    if os.path.exists(output) and not force:
        raise HandoverError(f"{output}: exists (use --force to overwrite)")
    man = capture(sysroot, output, note=note, progress=progress())
    if not settings().quiet:
        err(f"wrote {output}: {man['counts']['files']} files, {man['counts']['links']} links, "
            f"{man['counts']['dirs']} directories, {len(man['errors'])} unreadable")
