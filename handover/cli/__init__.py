"""The ``handover`` command line: parses options, calls ``handover.ops``, renders.

Each command lives in a module of this package, imported only when the command runs (or
``--help`` lists it): importing them all up front (pmem, host, ops) cost ~60 ms on every
``inspect``. The modules share ``common`` (the one error mapper, output, options) and never
import each other.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from .. import __version__
from ..errors import safe_text
from .common import Settings

log = logging.getLogger("handover")

# command -> (module of this package, attribute)
COMMANDS = {
    "arm": ("arm", "arm"),
    "capture-sysroot": ("host", "capture_sysroot"),
    "check-kernel": ("forensic", "check_kernel"),
    "convert": ("forensic", "convert"),
    "diff": ("forensic", "diff"),
    "doctor": ("doctor", "doctor"),
    "inspect": ("forensic", "inspect"),
    "load": ("host", "load"),
    "region": ("region", "region"),
    "save": ("host", "save"),
    "verify": ("forensic", "verify"),
    "vm": ("vm", "vm"),
}


def version_text() -> str:
    from ..formats.crc import IMPLEMENTATION
    from ..formats.structs import FORMAT_MAJOR, FORMAT_MINOR, READ_MAJOR, WRITABLE_MINORS

    writes = ", ".join(f"{FORMAT_MAJOR}.{m}" for m in WRITABLE_MINORS)
    return (f"handover {__version__}\n"
            f"format: reads {READ_MAJOR}.x (knows up to {FORMAT_MAJOR}.{FORMAT_MINOR}), writes {writes}\n"
            f"crc32c: {IMPLEMENTATION}")


def _print_version(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    click.echo(version_text())
    ctx.exit(0)


class UsageLine(click.UsageError):
    """A usage error as one line like every other error (exit 2):
    ``handover: usage: <command>: <what> (see <command> --help)``."""

    def show(self, file=None) -> None:
        cmd = self.ctx.command_path if self.ctx is not None else "handover"
        click.echo(f"handover: usage: {cmd}: {safe_text(self.message)} (see {cmd} --help)",
                   err=True)


def _one_line(e: click.UsageError) -> UsageLine:
    return UsageLine(" ".join(e.format_message().split()), ctx=e.ctx)


#: click >= 8.2 raises this for a group called without arguments (it prints the help);
#: Debian 12's click 8.1 prints the help itself and raises nothing (feature detection)
_NO_ARGS_HELP = tuple(c for c in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if c)


class _LazyGroup(click.Group):
    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except _NO_ARGS_HELP:
            raise
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (*_NO_ARGS_HELP, UsageLine):
            raise
        except click.UsageError as e:
            raise _one_line(e) from None

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        mod, attr = COMMANDS[name]
        return getattr(importlib.import_module(f"{__name__}.{mod}"), attr)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Tool version, format versions read and written, CRC implementation.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr (no progress, no notes).")
@click.pass_context
def main(ctx, verbose: int, quiet: bool) -> None:
    """Carry VT-d, interrupt-remapping and PCI keepalive state across kexec.

    Shell completion (bash): eval "$(_HANDOVER_COMPLETE=bash_source handover)"."""
    ctx.obj = Settings(quiet=quiet, verbose=verbose)
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else
                                         logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(stream=sys.stderr, level=level, format="handover: %(message)s")
