"""``handover save``, ``handover load`` and ``handover capture-sysroot``: the live host.

Registered into the main CLI lazily by ``handover.cli._LAZY_COMMANDS``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import click

from .cli import _emit_json, handle_errors
from .errors import EXIT_MISMATCH, HandoverError, MismatchError, VersionError

DEFAULT_RESULT_DIR = "/run/handover"


def _progress(quiet: bool):
    if quiet:
        return None
    return lambda msg: click.echo(f"handover: {msg}", err=True)


def _sysroot_option(f):
    return click.option("--sysroot", default="/", show_default=True, metavar="DIR",
                        help="Read sysfs/procfs/debugfs under DIR (a captured tree) instead of /.")(f)


def _parse_alter(values) -> list:
    out = []
    for v in values:
        try:
            bdf, idx, start = v.rsplit(":", 2)
            out.append((bdf, int(idx, 0), int(start, 0)))
        except ValueError:
            raise click.BadParameter(f"{v!r} is not BDF:INDEX:START",
                                     param_hint="--test-alter-bar") from None
    return out


def _region_info(region: str) -> tuple[int, list]:
    """(next generation, [(phys start, size)]) of a region; (1, []) for a plain file."""
    from . import pmem

    if not pmem.probe(region):
        return 1, []
    st = pmem.status(region)
    gens = [h.get("generation") or 0 for h in st.get("headers", []) if h.get("valid")]
    ranges = []
    if st.get("phys_start"):
        ranges.append((st["phys_start"], st.get("size") or 0))
    return max(gens, default=0) + 1, ranges


@click.command()
@click.option("--region", "region", metavar="R", help="Persistent-memory region (or a blob file "
              "with --output) that receives the state.")
@click.option("--device", "devices", multiple=True, metavar="BDF",
              help="Keep this device alive (repeatable). Default: every device bound to vfio-pci.")
@click.option("--token", metavar="UUID", help="Owner token; stored only as a salted hash.")
@click.option("--dry-run", is_flag=True, help="Collect and show what would be saved; write nothing.")
@click.option("--require", type=click.Choice(["available", "full"]), default="available",
              show_default=True, help="full: fail when any item cannot be captured.")
@click.option("--force", is_flag=True, help="Keep devices the rules refuse (not vfio-pci, "
              "IOMMU group shared with a device not kept); also passed to the region commit.")
@click.option("--output", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also (or, without --region, only) write the blob to FILE.")
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
@_sysroot_option
@handle_errors
def save(region, devices, token, dry_run, require, force, output, wait, as_json, quiet, fmt,
         target, alter, sysroot):
    """Capture the keepalive state of the host and commit it to a region (before kexec)."""
    from .cli import parse_format_version

    if not region and not output and not dry_run:
        raise click.UsageError("give --region R (or --output FILE, or --dry-run)")
    minor = parse_format_version(fmt)
    if target:
        from .cli_arm import kernel_declaration

        tminor, note = kernel_declaration(target)
        if minor is not None and tminor is not None and minor > tminor:
            raise VersionError(f"--format-version {fmt} is newer than {target} reads")
        minor = tminor if minor is None else minor
        if not quiet:
            click.echo(f"handover: {target}: {note}", err=True)
    report = save_state(region=region, devices=devices, token=token, dry_run=dry_run,
                        require=require, force=force, output=output, wait=wait, quiet=quiet,
                        alter=alter, sysroot=sysroot, minor=minor)
    if as_json:
        _emit_json({"ok": True, **report})
        return
    _print_save_report(report, dry_run)


def save_state(*, region=None, devices=(), token=None, dry_run=False, require="available",
               force=False, output=None, wait=False, quiet=False, alter=(), sysroot="/",
               minor: int | None = None) -> dict:
    """What ``save`` does (also ``arm``): collect, encode (format minor ``minor``, default the
    newest), commit.  Returns the report; raises HandoverError."""
    from . import collect
    from .formats.codec import encode
    from .token import token_bytes

    if token:
        token_bytes(token)  # validate early
    import contextlib

    from . import pmem

    # the region is locked (flock) for the whole save: collection, encoding and commit,
    # so that the generation in the blob is the one the region gets
    ranges, lock = [], contextlib.nullcontext()
    if region and not dry_run:
        if pmem.probe(region):
            _g, ranges = _region_info(region)
            lock = pmem.open_region(region, write=True, wait=wait, force=force)
        elif output is None:
            raise HandoverError(f"{region}: not an initialized handover region "
                                f"(handover region init {region})")
    with lock as reg:
        generation = reg.next_generation() if reg is not None else 1
        progress = _progress(quiet)
        host_wanted = None
        if devices:
            host_wanted = {collect.normalize_bdf(d) for d in devices}
        from .sources.base import Sysroot
        sr = Sysroot(sysroot)
        host = _read(sr, host_wanted, progress)
        kept, warnings = collect.select_devices(host, list(devices) or None, force=force)
        for w in warnings:
            click.echo(f"handover: warning: forced: {w}", err=True)
        opts = collect.SaveOptions(devices=[d.bdf for d in kept], token=token, force=force,
                                   require=require, region_ranges=ranges, generation=generation,
                                   alter_bars=_parse_alter(alter))
        st, report = collect.build_state(host, kept, opts)
        blob = encode(st, generation=generation, **({} if minor is None else {"minor": minor}))
        report.update(size=len(blob), generation=generation, dry_run=dry_run, warnings=warnings)
        if alter:
            report["test_altered_bars"] = list(alter)
        if not dry_run:
            if output:
                with open(output, "wb") as f:
                    f.write(blob)
                report["output"] = output
            if reg is not None:
                res = reg.commit(blob)
                if res.generation != generation:
                    raise HandoverError(f"{region}: committed as generation {res.generation}, "
                                        f"the state says {generation}")
                report["commit"] = {"region": region, "generation": res.generation,
                                    "slot": res.slot, "durability": res.durability}
    return report


def _read(sr, wanted, progress):
    from .sources import read_host

    if progress:
        progress(f"reading host under {sr.root}")
    host = read_host(sr, progress=progress, wanted=wanted) if wanted is not None else \
        read_host(sr, progress=progress)
    return host


def _print_save_report(report: dict, dry_run: bool) -> None:
    out = click.echo
    verb = "would save" if dry_run else "saved"
    out(f"{verb}: {', '.join(report['devices'])} ({report['size']} bytes, generation "
        f"{report['generation']})")
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items() if v)
    out(f"  records: {counts}")
    for k, src in report["captured"].items():
        out(f"  captured  {k:<22} from {src}")
    for k, why in report["not_captured"].items():
        out(f"  missing   {k:<22} {why}")
    if "commit" in report:
        c = report["commit"]
        out(f"  committed to {c['region']}: generation {c['generation']}, slot {c['slot']}, "
            f"{c['durability']}")
    if "output" in report:
        out(f"  wrote {report['output']}")


@click.command()
@click.option("--region", "region", required=True, metavar="R",
              help="Region (or blob file) holding the saved state.")
@click.option("--check-only", is_flag=True, help="Compare only; never feed the kernel interface.")
@click.option("--token", metavar="UUID", help="Check this token against the stored hashes.")
@click.option("--generation", type=int, default=None, metavar="N",
              help="This generation instead of the newest valid one.")
@click.option("--result-dir", default=DEFAULT_RESULT_DIR, show_default=True, metavar="DIR",
              help="Where result.json is written.")
@click.option("--json", "as_json", is_flag=True, help="The result document on stdout.")
@_sysroot_option
@handle_errors
def load(region, check_only, token, generation, result_dir, as_json, sysroot):
    """Check the saved state against the running host (in the new kernel); exit 6 on mismatch."""
    from . import hostcheck, source as src
    from .formats.descriptions import bdf_str
    from .sources.base import Sysroot

    loaded = src.load(region, generation)
    st = loaded.state
    if loaded.fallback:
        click.echo(f"handover: warning: newest generation unusable ({loaded.info.get('reason')}); "
                   f"using generation {loaded.info.get('generation')}", err=True)
    sr = Sysroot(sysroot)
    host = _read(sr, {bdf_str(d.sbdf) for d in st.devices}, None)
    verdicts = hostcheck.check_state(st, host, token)
    kernel = {"present": "kernel-handover" in host.interfaces, "action": "none", "written": None}
    if kernel["present"]:
        kernel.update(host.interfaces["kernel-handover"])
        if check_only:
            kernel["action"] = "none (--check-only)"
        else:
            from .sources.kernel_handover import feed, read_status

            fails = [v["item"] for v in verdicts if v["status"] in hostcheck.FAIL]
            verdict = "accept" if verdicts.ok else "abort"
            kernel["written"] = feed(sr, verdict, "mismatch: " + "; ".join(fails[:4]))
            kernel["action"] = verdict
            # what the kernel did with it (an abort releases the keepalive devices)
            kernel["status_after"] = read_status(sr)
    else:
        kernel["action"] = "none (stock kernel: no /sys/kernel/handover; nothing changed)"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = hostcheck.result_doc(st, host, verdicts, source=loaded.info, check_only=check_only,
                               kernel=kernel, created=now)
    path = _write_result(result_dir, doc)
    doc_path_note = f"result written to {path}"
    if as_json:
        _emit_json(doc)
    else:
        for v in verdicts:
            mark = {"match": "ok  ", "mismatch": "FAIL", "missing": "FAIL",
                    "unverified": "??  "}[v["status"]]
            extra = ""
            if v["status"] != "match":
                extra = f": saved {v.get('saved')}, host {v.get('host')}" + \
                    (f" ({v['detail']})" if v.get("detail") else "")
            click.echo(f"{mark} {v['item']}{extra}")
        s = doc["summary"]
        status = kernel.get("status_after") or kernel.get("status") or {}
        for d in status.get("keepalive", []):
            click.echo("kernel keepalive " + keepalive_line(d))
        # the summary stays the last line: the initramfs boot script logs that one
        click.echo(f"{'MATCH' if doc['ok'] else 'MISMATCH'}: {s['match']} match, "
                   f"{s['mismatch']} mismatch, {s['missing']} missing, {s['unverified']} "
                   f"unverified; kernel: {kernel['action']}")
    click.echo(f"handover: {doc_path_note}", err=True)
    if not doc["ok"]:
        err = MismatchError(f"{region}: the saved state does not match this host: "
                            + "; ".join(doc["failures"][:3])
                            + (f" (+{len(doc['failures']) - 3} more)" if len(doc["failures"]) > 3 else ""))
        click.echo(f"handover: {err.kind}: {err}", err=True)
        sys.exit(EXIT_MISMATCH)


def keepalive_line(d: dict) -> str:
    """One keepalive device as the kernel reported it (kernel_handover.parse_status)."""
    if "bdf" not in d:
        return d.get("line", "?")
    text = f"{d['bdf']}: {d['state']}"
    if d.get("adopted"):
        text += f", translation adopted (domain {d['domain']})"
    return text + (f" ({d['why']})" if d.get("why") else "")


def _write_result(result_dir: str, doc: dict) -> str:
    try:
        os.makedirs(result_dir, exist_ok=True)
        path = os.path.join(result_dir, "result.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise HandoverError(f"cannot write result to {result_dir}: {e.strerror or e}") from None
    return path


@click.command("capture-sysroot")
@click.argument("output", type=click.Path(dir_okay=False))
@_sysroot_option
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
@click.option("--note", default="", help="A line of text stored in the archive's manifest.")
@handle_errors
def capture_sysroot(output, sysroot, force, note):
    """Archive exactly the files the sources read (a fixture, or for a bug report)."""
    from .sources._capture import capture

    if os.path.exists(output) and not force:
        raise HandoverError(f"{output} exists (use --force to overwrite)")
    man = capture(sysroot, output, note=note, progress=_progress(False))
    click.echo(f"wrote {output}: {man['counts']['files']} files, {man['counts']['links']} links, "
               f"{man['counts']['dirs']} directories, {len(man['errors'])} unreadable", err=True)
