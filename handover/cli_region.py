"""``handover region list|init|status|wipe``.

Errors are one line on stderr with the documented exit code (handover/errors.py); JSON goes
to stdout only with --json; everything else a human reads goes to stderr or stdout as text.
"""

from __future__ import annotations

import functools
import json
import re
import sys

import click

from handover import errors
from handover import pmem

SCHEMA_LIST = "handover.region-list/1"
SCHEMA_STATUS = "handover.region-status/1"


def _fail(err: Exception) -> None:
    if isinstance(err, errors.HandoverError):
        click.echo(f"handover: {err}", err=True)
        sys.exit(err.exit_code)
    click.echo(f"handover: {' '.join(str(err).split())}", err=True)
    sys.exit(errors.EXIT_ERROR)


def _guard(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (errors.HandoverError, OSError) as e:
            _fail(e)
    return wrapper


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+)\s*([KMGT]i?B?|[kmgt])?\s*", text)
    if not m:
        raise click.BadParameter(f"{text!r}: expected a size such as 64M, 1G or 4096")
    n = int(m.group(1), 0)
    unit = (m.group(2) or "").upper()[:1]
    return n << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[unit]


def _hex(v):
    return "-" if v is None else f"{v:#x}"


def _json_out(obj) -> None:
    click.echo(json.dumps(obj, sort_keys=True, indent=2))


@click.group("region")
def region():
    """Persistent-memory regions that hold the saved state."""


@region.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@_guard
def list_cmd(as_json):
    """What persistent memory this host has, and which of it holds handover state."""
    entries = pmem.list_regions()
    if as_json:
        _json_out({"schema": SCHEMA_LIST, "regions": entries})
        return
    if not entries:
        click.echo("no persistent memory found (/sys/bus/nd, /sys/bus/dax, /proc/iomem)", err=True)
        return
    click.echo(f"{'DEVICE':<14} {'KIND':<10} {'MODE':<7} {'PHYS START':>14} {'SIZE':>12} "
               f"{'ALIGN':>9} {'DATA OFF':>10} {'HANDOVER':<12} GEN")
    for e in entries:
        click.echo(
            f"{e['device'] or '-':<14} {e['kind']:<10} {e['mode'] or '-':<7} "
            f"{_hex(e['phys_start']):>14} {_hex(e['size']):>12} {_hex(e.get('align')):>9} "
            f"{_hex(e.get('data_offset')):>10} {e.get('handover') or '-':<12} "
            f"{e.get('generation') if e.get('generation') is not None else '-'}")
        if e.get("next_cmdline"):
            click.echo(f"{'':<14} legacy range: the next kernel's command line must repeat "
                       f"{e['next_cmdline']}")
        if e.get("note"):
            click.echo(f"{'':<14} {e['note']}")


@region.command("init")
@click.argument("region_path", metavar="REGION")
@click.option("--size", type=str, default=None,
              help="Size of a region FILE to create (e.g. 64M); devices use their own size.")
@click.option("--force", is_flag=True,
              help="Re-initialize an existing region or overwrite non-region data; accept "
                   "permissions that let non-root users read/write it.")
@click.option("--json", "as_json", is_flag=True)
@_guard
def init_cmd(region_path, size, force, as_json):
    """Initialize REGION (empty, two slots)."""
    nbytes = parse_size(size) if size is not None else None
    info = pmem.init(region_path, size=nbytes, force=force)
    if as_json:
        _json_out({"schema": "handover.region-init/1", **info})
        return
    click.echo(f"initialized {info['path']} ({info['kind']}, {info['size']} bytes): two slots of "
               f"{info['slot_capacity']} bytes at offsets "
               f"{', '.join(hex(o) for o in info['slots'])}; uuid {info['uuid']}")
    click.echo(f"durability: {info['durability']}", err=True)


@region.command("status")
@click.argument("region_path", metavar="REGION")
@click.option("--json", "as_json", is_flag=True)
@_guard
def status_cmd(region_path, as_json):
    """Header copies, slots and the newest valid state of REGION.

    Exit: 0 state ok, 3 no state/not initialized, 4 damaged, 5 newer layout,
    7 newest generation damaged (an older one is intact)."""
    st = pmem.status(region_path)
    code = errors.EXIT_OK
    if not st["initialized"]:
        code = errors.EXIT_NO_STATE
    elif st.get("error"):
        code = st["error"]["exit_code"]
    elif st["state"] and st["state"]["fallback"]:
        code = errors.EXIT_FALLBACK
    st["exit_code"] = code
    if as_json:
        _json_out({"schema": SCHEMA_STATUS, **st})
        sys.exit(code)
    click.echo(f"region     {st['path']} ({st['kind']}, {st['size']} bytes, align {st['align']:#x})")
    click.echo(f"phys       {_hex(st['phys_start'])}")
    click.echo(f"durability {st['durability']}")
    if not st["initialized"]:
        click.echo("not an initialized handover region (run: handover region init REGION)")
        sys.exit(code)
    click.echo(f"uuid       {st.get('uuid', '-')}")
    for h in st["headers"]:
        if h["valid"]:
            click.echo(f"header {h['copy']}   @{h['offset']:#x}: layout {h['layout']} seq {h['seq']} "
                       f"generation {h['generation']} active slot {h['active_slot']}")
        else:
            click.echo(f"header {h['copy']}   @{h['offset']:#x}: INVALID: {h['problem']}")
    for s in st.get("slots", []):
        click.echo(f"slot {s['slot']}     @{s['offset']:#x} capacity {s['capacity']} phys {_hex(s['phys'])}")
    s = st["state"]
    if s:
        click.echo(f"state      generation {s['generation']} in slot {s['slot']}: {s['length']} bytes "
                   f"crc32c {s['crc']:#010x} at offset {s['offset']:#x} (phys {_hex(s['phys'])})")
    for p in st["problems"]:
        click.echo(f"problem    {p}")
    sys.exit(code)


@region.command("wipe")
@click.argument("region_path", metavar="REGION")
@click.option("--yes", is_flag=True, help="Do not ask; required when stdin is not a terminal.")
@click.option("--force", is_flag=True, help="Accept permissions that let non-root users in.")
@click.option("--wait", is_flag=True, help="Wait for a running save instead of failing.")
@_guard
def wipe_cmd(region_path, yes, force, wait):
    """Drop the saved state of REGION (it stays initialized)."""
    if not yes:
        if not sys.stdin.isatty():
            click.echo("handover: refusing to wipe without --yes (stdin is not a terminal)", err=True)
            sys.exit(errors.EXIT_USAGE)
        if not click.confirm(f"wipe all saved state in {region_path}?", err=True):
            sys.exit(errors.EXIT_ERROR)
    n = pmem.wipe(region_path, force=force, wait=wait)
    click.echo(f"wiped {region_path} ({n} slot bytes zeroed)", err=True)
