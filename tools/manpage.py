#!/usr/bin/env python3
"""Man pages from the click definitions: ``handover.1`` and one ``handover-<command>.1`` per
command (``handover-region-status.1`` for a subcommand), in roff.

    python tools/manpage.py DIR          write the pages into DIR
    python tools/manpage.py DIR --check  exit 1 when a page in DIR is not current

The text is the commands' own --help (docstrings and option help), so the pages cannot
drift from the tool; ``make man`` regenerates them.
"""

from __future__ import annotations

import os
import sys

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from handover import __version__  # noqa: E402
from handover import errors as E  # noqa: E402
from handover.cli import main as group  # noqa: E402

EXIT_CODES = [
    (E.EXIT_OK, "ok (for diff: the states are the same; for doctor: ready)"),
    (E.EXIT_ERROR, "error (I/O, refused operation); for diff: differences found; for doctor: "
                   "not ready"),
    (E.EXIT_USAGE, "usage error (bad option or argument)"),
    (E.EXIT_NO_STATE, "no saved state found at SOURCE"),
    (E.EXIT_INTEGRITY, "integrity failure: magic, checksum, truncation, bounds, record order, "
                       "references"),
    (E.EXIT_VERSION, "unsupported version"),
    (E.EXIT_MISMATCH, "the saved state does not match the running host (load)"),
    (E.EXIT_FALLBACK, "the state was read, but from an older generation because the newest "
                      "is damaged"),
    (E.EXIT_VMM, "vm save / vm restore: a step in QEMU failed (its QMP socket, a monitor "
                 "command, the migration, the state file); save undid what it had done"),
    (E.EXIT_ROLLBACK, "vm save: a step failed and undoing it failed too (the message says "
                      "what is left)"),
    (E.EXIT_PIPE, "stdout was closed by its reader (| head), as for SIGPIPE"),
]


def esc(text: str) -> str:
    """Text for roff: backslashes and leading dots/quotes escaped."""
    out = []
    for line in text.replace("\\", "\\e").splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _options(cmd: click.Command, ctx: click.Context) -> list[str]:
    lines = []
    for p in cmd.get_params(ctx):
        rec = p.get_help_record(ctx)
        if rec is None or getattr(p, "hidden", False):
            continue
        names, help_ = rec
        lines += [".TP", f"\\fB{esc(names)}\\fR", esc(help_ or "")]
    return lines


def page(path: list[str], cmd: click.Command, parent: click.Context | None) -> str:
    name = "-".join(path)
    ctx = click.Context(cmd, info_name=" ".join(path), parent=parent)
    usage = cmd.collect_usage_pieces(ctx)
    short = cmd.get_short_help_str(limit=120)
    lines = [f'.TH "{name.upper()}" "1" "" "handover {__version__}" "handover manual"',
             ".SH NAME", f"{name} \\- {esc(short)}",
             ".SH SYNOPSIS", f"\\fB{' '.join(path)}\\fR {esc(' '.join(usage))}"]
    if cmd.help:
        lines += [".SH DESCRIPTION"]
        for para in cmd.help.split("\n\n"):
            lines += [".PP", esc(" ".join(para.split()))]
    opts = _options(cmd, ctx)
    if opts:
        lines += [".SH OPTIONS"] + opts
    if isinstance(cmd, click.Group):
        lines += [".SH COMMANDS"]
        for sub in cmd.list_commands(ctx):
            c = cmd.get_command(ctx, sub)
            lines += [".TP", f"\\fB{sub}\\fR", esc(c.get_short_help_str(limit=120)),
                      f"See \\fB{name}-{sub}\\fR(1)."]
    lines += [".SH EXIT STATUS"]
    for code, text in EXIT_CODES:
        lines += [".TP", f"\\fB{code}\\fR", esc(text)]
    lines += [".SH SEE ALSO", "\\fBhandover\\fR(1); the README of the handover sources."]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    out = {}

    def walk(path, cmd, parent):
        out["-".join(path) + ".1"] = page(path, cmd, parent)
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd, info_name=" ".join(path), parent=parent)
            for sub in cmd.list_commands(ctx):
                walk(path + [sub], cmd.get_command(ctx, sub), ctx)

    walk(["handover"], group, None)
    return out


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    outdir = args[0] if args else os.path.join(ROOT, "docs", "man")
    want = pages()
    if "--check" in argv:
        have = {f for f in os.listdir(outdir) if f.endswith(".1")} if os.path.isdir(outdir) else set()
        stale = sorted(f for f, t in want.items()
                       if f not in have or open(os.path.join(outdir, f)).read() != t)
        stale += sorted(have - set(want))
        if stale:
            print(f"stale man pages in {outdir}: {', '.join(stale)} (run make man)",
                  file=sys.stderr)
            return 1
        return 0
    os.makedirs(outdir, exist_ok=True)
    for f in {f for f in os.listdir(outdir) if f.endswith(".1")} - set(want):
        os.unlink(os.path.join(outdir, f))
    for f, text in want.items():
        with open(os.path.join(outdir, f), "w") as fh:
            fh.write(text)
    print(f"wrote {len(want)} man pages to {outdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
