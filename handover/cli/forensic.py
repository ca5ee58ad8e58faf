"""``inspect``, ``verify``, ``diff``, ``convert``, ``check-kernel``: saved states and kernel
images, read-only (``convert`` writes a new blob file only)."""

from __future__ import annotations

import sys

import click

from ..errors import EXIT_ERROR, EXIT_FALLBACK, EXIT_OK, VersionError
from .common import (emit_json, err, exit_with, generation_option, handle_errors, one_output,
                     out, parse_format_version, settings, text, warn)

SCHEMA_VERIFY = "handover.verify/1"
SCHEMA_DIFF = "handover.diff/1"
SCHEMA_CHECK_KERNEL = "handover.check-kernel/1"
SCHEMA_CONVERT = "handover.convert/1"


def _source_note(info: dict) -> None:
    if info.get("fallback"):
        warn(f"{info.get('path')}: newest generation unusable ({info.get('reason')}); using "
             f"generation {info.get('generation')}")


@click.command()
@click.argument("source", required=False)
@generation_option
@click.option("--vmcore", "vmcore", type=click.Path(dir_okay=False), default=None, metavar="VMCORE",
              help="Find the state in an ELF crash dump (VMCOREINFO HANDOVER_STATE line).")
@click.option("--json", "as_json", is_flag=True, help="Full decoded state as JSON on stdout.")
@click.option("--msgpack", "as_msgpack", is_flag=True,
              help="The same as --json, as compact msgpack (binary) on stdout.")
@click.option("--limit", type=click.IntRange(min=0), default=16, show_default=True,
              help="Records shown per list in the tree (0: all).")
@handle_errors
def inspect(source: str | None, generation: int | None, vmcore: str | None, as_json: bool,
            as_msgpack: bool, limit: int) -> None:
    """Show a saved state: units, decoded IRTEs, devices with BARs and vectors, ...

    SOURCE is a blob file, a region, or - (stdin); with --vmcore, an ELF crash dump."""
    from .. import render
    from ..ops import source as src

    one_output(as_json, as_msgpack)
    if (source is None) == (vmcore is None):
        raise click.UsageError("give SOURCE or --vmcore VMCORE (one of them)")
    loaded = src.load(vmcore, vmcore=True) if vmcore else src.load(source, generation)
    _source_note(loaded.info)
    if as_msgpack:
        import msgpack

        sys.stdout.buffer.write(msgpack.packb(render.state_dict(loaded.state, source=loaded.info),
                                              use_bin_type=True))
    elif as_json:
        w = sys.stdout.write
        for chunk in render.state_json_chunks(loaded.state, source=loaded.info):
            w(chunk)
    else:
        for line in render.tree_lines(loaded.state, limit=limit or 1 << 62,
                                      source=source or vmcore):
            out(line)
    exit_with(EXIT_FALLBACK if loaded.fallback else EXIT_OK)


@click.command()
@click.argument("source")
@generation_option
@click.option("--json", "as_json", is_flag=True, help="Verdict and section table as JSON.")
@handle_errors
def verify(source: str, generation: int | None, as_json: bool) -> None:
    """Check integrity (magic, CRCs, bounds, references) and version only."""
    from ..formats.enums import section_name
    from ..ops import source as src

    loaded = src.load(source, generation)
    _source_note(loaded.info)
    st = loaded.state
    hdr, secs = st.header, st.sections
    if as_json:
        emit_json({
            "schema": SCHEMA_VERIFY,
            "ok": True, "format": f"{st.version[0]}.{st.version[1]}", "generation": st.generation,
            "size": len(loaded.blob), "source": loaded.info, "absent": sorted(st.absent),
            "header_crc": f"0x{hdr['header_crc']:08x}",
            "sections": [{"type": section_name(e["type"]), "type_id": e["type"],
                          "version": e["version"], "flags": e["flags"],
                          "offset": f"{e['offset']:#x}", "length": e["length"],
                          "count": e["count"], "record_size": e["record_size"],
                          "crc": f"0x{e['crc']:08x}"}
                         for e in secs],
        })
    else:
        out(f"{source}: OK: format {st.version[0]}.{st.version[1]}, generation "
            f"{st.generation}, {len(loaded.blob)} bytes, {len(secs)} sections, CRC32C verified"
            + (f"; not captured: {', '.join(sorted(st.absent))}" if st.absent else ""))
    exit_with(EXIT_FALLBACK if loaded.fallback else EXIT_OK)


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Differences as JSON.")
@click.option("--meta", "include_meta", is_flag=True,
              help="Also report creation time, generation and boot id.")
@click.option("--generation-a", "gen_a", type=click.IntRange(min=0), default=None, metavar="N",
              help="For a region A: this generation instead of the newest valid one.")
@click.option("--generation-b", "gen_b", type=click.IntRange(min=0), default=None, metavar="N",
              help="For a region B: this generation instead of the newest valid one.")
@handle_errors
def diff(a: str, b: str, as_json: bool, include_meta: bool, gen_a: int | None,
         gen_b: int | None) -> None:
    """What changed between two saved states, per object (exit 0 same, 1 different).

    A and B are blob files or regions; `diff R R --generation-a 3` compares a region's
    generation 3 with its newest."""
    from .. import render
    from ..ops import source as src

    la, lb = src.load(a, gen_a), src.load(b, gen_b)
    changes = render.diff_states(la.state, lb.state, include_meta=include_meta)
    if as_json:
        emit_json({"schema": SCHEMA_DIFF, "same": not changes, "a": la.info, "b": lb.info,
                   "changes": changes})
    else:
        for c in changes:
            if c["change"] == "changed":
                fields = ", ".join(f"{k} {text(v[0])} -> {text(v[1])}"
                                   for k, v in c["fields"].items())
                out(f"~ {c['section']} {c['key']}: {fields}")
            else:
                out(f"{'+' if c['change'] == 'added' else '-'} {c['section']} {c['key']}")
        if not settings().quiet:
            click.echo(f"{len(changes)} difference(s)" if changes else "same", err=True)
    exit_with(EXIT_ERROR if changes else EXIT_OK)


@click.command()
@click.argument("source")
@click.argument("output", type=click.Path(dir_okay=False))
@generation_option
@click.option("--format-version", "fmt", default=None, metavar="MAJOR.MINOR",
              help="Write this (older) format version, for a kernel that knows only that.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON on stdout.")
@handle_errors
def convert(source: str, output: str, generation: int | None, fmt: str | None, force: bool,
            as_json: bool) -> None:
    """Re-encode a saved state into a blob file (optionally as an older minor)."""
    from ..ops.convert import convert as run

    rep = run(source, output, generation=generation, minor=parse_format_version(fmt),
              force=force)
    if as_json:
        emit_json({"schema": SCHEMA_CONVERT, "ok": True, **rep})
    elif not settings().quiet:
        err(f"wrote {rep['output']}: {rep['size']} bytes, format {rep['format']}, "
            f"generation {rep['generation']}")


@click.command("check-kernel")
@click.argument("image", type=click.Path(dir_okay=False), required=False)
@click.option("--json", "as_json", is_flag=True, help="The declaration as JSON.")
@handle_errors
def check_kernel(image: str | None, as_json: bool) -> None:
    """Which handover format versions a kernel reads (its "Handover" ELF note).

    IMAGE is a vmlinux or a bzImage; without it, the running kernel (/sys/kernel/notes).
    Exit 0 if it reads a format this tool writes, 5 if it declares none."""
    from ..formats.structs import FORMAT_MAJOR, WRITABLE_MINORS
    from ..host.kernelimage import read_declaration

    d = read_declaration(image)
    best = d.best_minor(FORMAT_MAJOR, WRITABLE_MINORS) if d else None
    name = image or "the running kernel"
    doc = {"schema": SCHEMA_CHECK_KERNEL, "image": image or "running",
           "declares": d.text() if d else None, "source": d.source if d else None,
           "write": f"{FORMAT_MAJOR}.{best}" if best is not None else None}
    problem = None
    if d is None:
        problem = (f"{name}: declares no handover format support (no Handover ELF note: a "
                   f"kernel without the handover patches)")
    elif best is None:
        problem = (f"{name}: reads {d.text()}, this tool writes "
                   + ", ".join(f"{FORMAT_MAJOR}.{m}" for m in WRITABLE_MINORS))
    if problem:  # one document: the declaration rides on the error's
        raise VersionError(problem, document=doc)
    if as_json:
        emit_json({"ok": True, **doc})
    else:
        out(f"{image or 'running kernel'}: reads handover format {d.text()}; handover will "
            f"write {FORMAT_MAJOR}.{best}")
