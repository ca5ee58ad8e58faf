"""``handover region list|init|status|wipe|udev-probe``: persistent-memory regions
(``handover.pmem``).

Errors go through the one error mapper (``common.handle_errors``): one line on stderr with
the documented exit code. JSON goes to stdout only with --json; its addresses
(``phys_start``, ``phys``, ``offset``, ``start``, ``crc``) are ``"0x..."`` strings.
"""

from __future__ import annotations

import sys

import click

from .. import errors, pmem
from .common import emit_json, err, handle_errors, out, settings

SCHEMA_LIST = "handover.region-list/2"
SCHEMA_STATUS = "handover.region-status/2"
SCHEMA_INIT = "handover.region-init/2"
HEX_KEYS = {"phys_start", "phys", "offset", "start", "crc", "data_offset", "slot_offset",
            "phys_blob"}


def hexify(obj):
    """Addresses and raw words of a region document as "0x..." strings."""
    if isinstance(obj, dict):
        return {k: (f"{v:#x}" if k in HEX_KEYS and isinstance(v, int) and not isinstance(v, bool)
                    else [f"{x:#x}" for x in v] if k == "slots" and isinstance(v, list)
                    and all(isinstance(x, int) for x in v) else hexify(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [hexify(v) for v in obj]
    return obj


def _size(text: str) -> int:
    from ..util import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--size") from None


def _hex(v):
    return "-" if v is None else f"{v:#x}"


@click.group("region")
def region():
    """Persistent-memory regions that hold the saved state."""


@region.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
def list_cmd(as_json):
    """What persistent memory this host has, and which of it holds handover state."""
    entries = pmem.list_regions()
    if as_json:
        emit_json({"schema": SCHEMA_LIST, "regions": hexify(entries)})
        return
    if not entries:
        err("no persistent memory found (/sys/bus/nd, /sys/bus/dax, /proc/iomem)")
        return
    out(f"{'DEVICE':<14} {'KIND':<10} {'MODE':<7} {'PHYS START':>14} {'SIZE':>12} "
        f"{'ALIGN':>9} {'DATA OFF':>10} {'HANDOVER':<12} GEN")
    for e in entries:
        out(
            f"{e['device'] or '-':<14} {e['kind']:<10} {e['mode'] or '-':<7} "
            f"{_hex(e['phys_start']):>14} {_hex(e['size']):>12} {_hex(e.get('align')):>9} "
            f"{_hex(e.get('data_offset')):>10} {e.get('handover') or '-':<12} "
            f"{e.get('generation') if e.get('generation') is not None else '-'}")
        if e.get("next_cmdline"):
            out(f"{'':<14} legacy range: the next kernel's command line must repeat "
                f"{e['next_cmdline']}")
        if e.get("note"):
            out(f"{'':<14} {e['note']}")


@region.command("init")
@click.argument("region_path", metavar="REGION")
@click.option("--size", type=str, default=None,
              help="Size of a region FILE to create (e.g. 64M); devices use their own size.")
@click.option("--force", is_flag=True,
              help="Re-initialize an existing region or overwrite non-region data; accept "
                   "permissions that let non-root users read/write it.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
def init_cmd(region_path, size, force, as_json):
    """Initialize REGION (empty, two slots)."""
    nbytes = _size(size) if size is not None else None
    info = pmem.init(region_path, size=nbytes, force=force)
    if as_json:
        emit_json({"schema": SCHEMA_INIT, **hexify(info)})
        return
    out(f"initialized {info['path']} ({info['kind']}, {info['size']} bytes): two slots of "
        f"{info['slot_capacity']} bytes at offsets "
        f"{', '.join(hex(o) for o in info['slots'])}; uuid {info['uuid']}")
    if not settings().quiet:
        err(f"durability: {info['durability']}")


@region.command("status")
@click.argument("region_path", metavar="REGION")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
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
        emit_json({"schema": SCHEMA_STATUS, **hexify(st)})
        sys.exit(code)
    out(f"region     {st['path']} ({st['kind']}, {st['size']} bytes, align {st['align']:#x})")
    out(f"phys       {_hex(st['phys_start'])}")
    out(f"durability {st['durability']}")
    if not st["initialized"]:
        out("not an initialized handover region (run: handover region init REGION)")
        sys.exit(code)
    out(f"uuid       {st.get('uuid', '-')}")
    for h in st["headers"]:
        if h["valid"]:
            out(f"header {h['copy']}   @{h['offset']:#x}: layout {h['layout']} seq {h['seq']} "
                f"generation {h['generation']} active slot {h['active_slot']}")
        else:
            out(f"header {h['copy']}   @{h['offset']:#x}: INVALID: {h['problem']}")
    for s in st.get("slots", []):
        out(f"slot {s['slot']}     @{s['offset']:#x} capacity {s['capacity']} phys {_hex(s['phys'])}")
    s = st["state"]
    if s:
        out(f"state      generation {s['generation']} in slot {s['slot']}: {s['length']} bytes "
            f"crc32c {s['crc']:#010x} at offset {s['offset']:#x} (phys {_hex(s['phys'])})")
    for p in st["problems"]:
        out(f"problem    {p}")
    sys.exit(code)


@region.command("wipe")
@click.argument("region_path", metavar="REGION")
@click.option("--yes", is_flag=True, help="Do not ask; required when stdin is not a terminal.")
@click.option("--force", is_flag=True, help="Accept permissions that let non-root users in.")
@click.option("--wait", is_flag=True, help="Wait for a running save instead of failing.")
@handle_errors
def wipe_cmd(region_path, yes, force, wait):
    """Drop the saved state of REGION (it stays initialized)."""
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("refusing to wipe without --yes (stdin is not a terminal)")
        if not click.confirm(f"wipe all saved state in {region_path}?", err=True):
            raise errors.HandoverError(f"{region_path}: not wiped (not confirmed)")
    n = pmem.wipe(region_path, force=force, wait=wait)
    if not settings().quiet:
        err(f"wiped {region_path} ({n} slot bytes zeroed)")


@region.command("udev-probe")
@click.argument("device", metavar="DEVICE")
@handle_errors
def udev_probe_cmd(device):
    """What udev imports for DEVICE: KEY=value lines when it holds a handover region.

    HANDOVER_REGION=1, HANDOVER_REGION_LAYOUT (e.g. 1.0), HANDOVER_REGION_HEADERS (the header
    copies that verify: AB, A, B or none) and HANDOVER_REGION_UUID; nothing for any other
    device, file or path. Always exit 0. Reads the two header copies only, never writes.

    udev runs the same code for every pmem block device and device-dax device
    (60-handover-region.rules, through /usr/lib/handover/udev-probe, which starts faster than
    this command) and makes a region's device node root:root 0600."""
    from ..pmem import udev

    for key, value in udev.probe(device).items():
        out(f"{key}={value}")
