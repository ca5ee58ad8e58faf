"""The ``handover`` command line: a thin layer over the library.

Machine output (``--json``, ``--msgpack``) goes to stdout; logs, progress and errors to
stderr. Errors are one line, ``handover: <kind>: <what and where>``, with the exit codes of
``handover.errors`` (README "Exit codes"). Imports are lazy so that ``inspect`` starts fast.
"""

from __future__ import annotations

import functools
import json
import logging
import sys

import click

from . import __version__
from .errors import EXIT_ERROR, EXIT_FALLBACK, EXIT_OK, HandoverError

log = logging.getLogger("handover")


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fail(err: HandoverError, as_json: bool = False) -> None:
    if as_json:
        _emit_json({"ok": False, "error": str(err), "kind": err.kind, "exit_code": err.exit_code})
    click.echo(f"handover: {err.kind}: {err}", err=True)
    sys.exit(err.exit_code)


def handle_errors(fn):
    """Map library errors to one stderr line and a documented exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except HandoverError as e:
            _fail(e, as_json)
        except OSError as e:
            _fail(HandoverError(f"{e.filename or ''}: {e.strerror or e}".strip(": ")), as_json)
        except MemoryError:
            _fail(HandoverError("out of memory"), as_json)

    return wrapper


def _version_text() -> str:
    from .formats.crc import IMPLEMENTATION
    from .formats.structs import FORMAT_MAJOR, FORMAT_MINOR, READ_MAJOR, WRITABLE_MINORS

    writes = ", ".join(f"{FORMAT_MAJOR}.{m}" for m in WRITABLE_MINORS)
    return (f"handover {__version__}\n"
            f"format: reads {READ_MAJOR}.x (knows up to {FORMAT_MAJOR}.{FORMAT_MINOR}), writes {writes}\n"
            f"crc32c: {IMPLEMENTATION}")


def _print_version(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    click.echo(_version_text())
    ctx.exit(0)


# commands that live in their own modules, imported only when invoked (or listed by --help):
# importing them all up front (pmem, sources, collect) cost ~60 ms on every `inspect`
_LAZY_COMMANDS = {
    "arm": ("handover.cli_arm", "arm"),
    "capture-sysroot": ("handover.cli_host", "capture_sysroot"),
    "load": ("handover.cli_host", "load"),
    "region": ("handover.cli_region", "region"),
    "save": ("handover.cli_host", "save"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in _LAZY_COMMANDS and name not in self.commands:
            import importlib

            mod, attr = _LAZY_COMMANDS[name]
            self.add_command(getattr(importlib.import_module(mod), attr), name)
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Tool version, format versions read and written, CRC implementation.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
def main(verbose: int, quiet: bool) -> None:
    """Carry VT-d, interrupt-remapping and PCI keepalive state across kexec."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else
                                         logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(stream=sys.stderr, level=level, format="handover: %(message)s")


def _source_note(info: dict) -> None:
    if info.get("fallback"):
        click.echo(f"handover: warning: newest generation unusable ({info.get('reason')}); "
                   f"using generation {info.get('generation')}", err=True)


def _generation_option(f):
    return click.option("--generation", type=int, default=None, metavar="N",
                        help="For a region: this generation instead of the newest valid one.")(f)


@main.command()
@click.argument("source", type=click.Path(dir_okay=False), required=False)
@_generation_option
@click.option("--vmcore", "vmcore", type=click.Path(dir_okay=False), default=None, metavar="VMCORE",
              help="Find the state in an ELF crash dump (VMCOREINFO HANDOVER_STATE line).")
@click.option("--json", "as_json", is_flag=True, help="Full decoded state as JSON on stdout.")
@click.option("--msgpack", "as_msgpack", is_flag=True,
              help="The same as --json, as compact msgpack (binary) on stdout.")
@click.option("--limit", type=int, default=16, show_default=True,
              help="Records shown per list in the tree (0: all).")
@handle_errors
def inspect(source: str | None, generation: int | None, vmcore: str | None, as_json: bool,
            as_msgpack: bool, limit: int) -> None:
    """Show a saved state: units, decoded IRTEs, devices with BARs and vectors, ...

    SOURCE is a blob file or a region; with --vmcore, an ELF crash dump instead."""
    from . import render, source as src

    if (source is None) == (vmcore is None):
        raise click.UsageError("give SOURCE or --vmcore VMCORE (one of them)")
    loaded = src.load(vmcore, vmcore=True) if vmcore else src.load(source, generation)
    source = source or vmcore
    _source_note(loaded.info)
    if as_json or as_msgpack:
        d = render.state_dict(loaded.state, source=loaded.info)
        if as_msgpack:
            import msgpack

            sys.stdout.buffer.write(msgpack.packb(d, use_bin_type=True))
        else:
            _emit_json(d)
    else:
        out = sys.stdout
        for line in render.tree_lines(loaded.state, limit=limit or 1 << 62, source=source):
            out.write(line + "\n")
    if loaded.fallback:
        sys.exit(EXIT_FALLBACK)


@main.command()
@click.argument("source", type=click.Path(dir_okay=False))
@_generation_option
@click.option("--json", "as_json", is_flag=True, help="Verdict and section table as JSON.")
@handle_errors
def verify(source: str, generation: int | None, as_json: bool) -> None:
    """Check integrity (magic, CRCs, bounds, references) and version only."""
    from . import source as src
    from .formats.enums import section_name

    loaded = src.load(source, generation)
    _source_note(loaded.info)
    st = loaded.state
    hdr, secs = st.header, st.sections
    if as_json:
        _emit_json({
            "ok": True, "format": f"{st.version[0]}.{st.version[1]}", "generation": st.generation,
            "size": len(loaded.blob), "source": loaded.info, "absent": sorted(st.absent),
            "header_crc": f"0x{hdr['header_crc']:08x}",
            "sections": [{"type": section_name(e["type"]), "type_id": e["type"],
                          "version": e["version"], "flags": e["flags"],
                          "offset": e["offset"], "length": e["length"], "count": e["count"],
                          "record_size": e["record_size"], "crc": f"0x{e['crc']:08x}"}
                         for e in secs],
        })
    else:
        click.echo(f"{source}: OK: format {st.version[0]}.{st.version[1]}, generation "
                   f"{st.generation}, {len(loaded.blob)} bytes, {len(secs)} sections, CRC32C verified"
                   + (f"; not captured: {', '.join(sorted(st.absent))}" if st.absent else ""))
    if loaded.fallback:
        sys.exit(EXIT_FALLBACK)


@main.command()
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Differences as JSON.")
@click.option("--meta", "include_meta", is_flag=True,
              help="Also report creation time, generation and boot id.")
@click.option("--generation-a", "gen_a", type=int, default=None, metavar="N",
              help="For a region A: this generation instead of the newest valid one.")
@click.option("--generation-b", "gen_b", type=int, default=None, metavar="N",
              help="For a region B: this generation instead of the newest valid one.")
@handle_errors
def diff(a: str, b: str, as_json: bool, include_meta: bool, gen_a: int | None,
         gen_b: int | None) -> None:
    """What changed between two saved states, per object (exit 0 same, 1 different).

    A and B are blob files or regions; `diff R R --generation-a 3` compares a region's
    generation 3 with its newest."""
    from . import render, source as src

    la, lb = src.load(a, gen_a), src.load(b, gen_b)
    changes = render.diff_states(la.state, lb.state, include_meta=include_meta)
    if as_json:
        _emit_json({"same": not changes, "a": la.info, "b": lb.info, "changes": changes})
    else:
        for c in changes:
            if c["change"] == "changed":
                fields = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in c["fields"].items())
                click.echo(f"~ {c['section']} {c['key']}: {fields}")
            else:
                click.echo(f"{'+' if c['change'] == 'added' else '-'} {c['section']} {c['key']}")
        click.echo(f"{len(changes)} difference(s)" if changes else "same", err=True)
    sys.exit(EXIT_ERROR if changes else EXIT_OK)


@main.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@_generation_option
@click.option("--format-version", "fmt", default=None, metavar="MAJOR.MINOR",
              help="Write this (older) format version, for a kernel that knows only that.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@handle_errors
def convert(source: str, output: str, generation: int | None, fmt: str | None, force: bool) -> None:
    """Re-encode a saved state into a blob file (optionally as an older minor)."""
    import os

    from . import source as src
    from .formats.codec import encode

    minor = parse_format_version(fmt)
    loaded = src.load(source, generation)
    blob = encode(loaded.state, **({} if minor is None else {"minor": minor}))
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(output, flags, 0o600)
    except FileExistsError:
        raise HandoverError(f"{output} exists (use --force to overwrite)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    click.echo(f"wrote {output}: {len(blob)} bytes", err=True)


@main.command("check-kernel")
@click.argument("image", type=click.Path(dir_okay=False), required=False)
@click.option("--json", "as_json", is_flag=True, help="The declaration as JSON.")
@handle_errors
def check_kernel(image: str | None, as_json: bool) -> None:
    """Which handover format versions a kernel reads (its "Handover" ELF note).

    IMAGE is a vmlinux or a bzImage; without it, the running kernel (/sys/kernel/notes).
    Exit 0 if it reads a format this tool writes, 5 if it declares none."""
    from .errors import VersionError
    from .formats.structs import FORMAT_MAJOR, WRITABLE_MINORS
    from .kernelimage import read_declaration

    d = read_declaration(image)
    best = d.best_minor(FORMAT_MAJOR, WRITABLE_MINORS) if d else None
    if as_json:
        _emit_json({"image": image or "running", "declares": d.text() if d else None,
                    "source": d.source if d else None,
                    "write": f"{FORMAT_MAJOR}.{best}" if best is not None else None})
    elif d:
        click.echo(f"{image or 'running kernel'}: reads handover format {d.text()}"
                   + (f"; handover will write {FORMAT_MAJOR}.{best}" if best is not None else ""))
    if d is None:
        raise VersionError(f"{image or 'the running kernel'} declares no handover format support "
                           f"(no Handover ELF note: a kernel without the handover patches)")
    if best is None:
        raise VersionError(f"{image or 'the running kernel'} reads {d.text()}, this tool writes "
                           + ", ".join(f"{FORMAT_MAJOR}.{m}" for m in WRITABLE_MINORS))


def parse_format_version(text: str | None) -> int | None:
    """'1.0' -> 0 (the minor); None -> None. Raises a click usage error otherwise."""
    if text is None:
        return None
    from .errors import VersionError
    from .formats.structs import FORMAT_MAJOR, WRITABLE_MINORS

    try:
        major, minor = (int(x) for x in text.split("."))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not MAJOR.MINOR", param_hint="--format-version")
    if major != FORMAT_MAJOR or minor not in WRITABLE_MINORS:
        known = ", ".join(f"{FORMAT_MAJOR}.{m}" for m in WRITABLE_MINORS)
        raise VersionError(f"cannot write format {text}: this writer emits {known}")
    return minor
