"""What every command module shares: the one error mapper, output helpers, common options.

Output rules (README "Commands"): machine output (``--json``, ``--msgpack``) goes to stdout;
logs, progress and errors go to stderr. Every error is one line,
``handover: <kind>: <source>: <what> at <where>``, with the exit code of ``handover.errors``.
Every text line passes :func:`out` or :func:`err`, which print control characters (terminal
escapes, CR, LF read from a state or a host) as ``\\xNN``.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from dataclasses import dataclass

import click

from ..errors import EXIT_ERROR, EXIT_PIPE, HandoverError, safe_text
from ..util import dumps_json


@dataclass
class Settings:
    """The group's global options (``handover -q``, ``-v``)."""

    quiet: bool = False
    verbose: int = 0


def settings() -> Settings:
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return obj if isinstance(obj, Settings) else Settings()


def out(line: str = "") -> None:
    """One line of text on stdout."""
    click.echo(safe_text(line))


def err(line: str) -> None:
    """One line on stderr, prefixed ``handover: ``."""
    click.echo("handover: " + safe_text(line), err=True)


def warn(line: str) -> None:
    err("warning: " + line)


def progress(quiet: bool = False):
    """A progress callback for the ops layer, or None under ``-q`` (local or global)."""
    if quiet or settings().quiet:
        return None
    return err


def emit_json(obj) -> None:
    sys.stdout.write(dumps_json(obj) + "\n")


def text(v) -> str:
    """A value in human text: never a Python repr ("None", "[]", "{...}")."""
    if v is None:
        return "-"
    if isinstance(v, (list, tuple, set)):
        return ", ".join(text(x) for x in v) if v else "none"
    if isinstance(v, dict):
        return ", ".join(f"{k} {text(x)}" for k, x in v.items()) if v else "none"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def fail(e: HandoverError, as_json: bool = False) -> None:
    """The one error mapper's output: one stderr line (and one JSON document with --json)."""
    if as_json:
        emit_json({"schema": "handover.error/1", "ok": False, "error": str(e), "kind": e.kind,
                   "exit_code": e.exit_code, **(e.document or {})})
    click.echo(f"handover: {e.kind}: {e}", err=True)
    sys.exit(e.exit_code)


class InternalError(HandoverError):
    kind = "internal"


def _pipe_closed() -> None:
    """stdout's reader went away (``| head``): stop quietly, as a SIGPIPE would."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (CliRunner)
        pass
    sys.exit(EXIT_PIPE)


def handle_errors(fn):
    """Map every failure to one stderr line and a documented exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except HandoverError as e:
            fail(e, as_json)
        except BrokenPipeError:
            _pipe_closed()
        except OSError as e:
            if e.errno == errno.EPIPE:
                _pipe_closed()
            where = f"{e.filename}: " if e.filename else ""
            fail(HandoverError(f"{where}{e.strerror or e}"), as_json)
        except MemoryError:
            fail(HandoverError("out of memory"), as_json)
        except RecursionError:
            fail(HandoverError("input nested too deeply"), as_json)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # a bug: still one line (the traceback with -vv)
            if settings().verbose > 1:
                raise
            fail(InternalError(f"{type(e).__name__}: {e} (a bug in handover; -vv shows the "
                               f"traceback)"), as_json)

    return wrapper


# ---- options ------------------------------------------------------------------------------
def sysroot_option(f):
    return click.option("--sysroot", default="/", show_default=True, metavar="DIR",
                        type=click.Path(file_okay=False),
                        help="Read sysfs/procfs/debugfs under DIR (a captured tree) instead "
                             "of /.")(f)


def generation_option(f):
    return click.option("--generation", type=click.IntRange(min=0), default=None, metavar="N",
                        help="For a region: this generation instead of the newest valid one.")(f)


def token_options(f):
    f = click.option("--token-file", "token_file", metavar="FILE", default=None,
                     help="Read the owner token (a UUID) from FILE; - reads stdin. Preferred: "
                          "--token shows the token to every user in ps.")(f)
    return click.option("--token", metavar="UUID", default=None,
                        help="Owner token (visible in ps: prefer --token-file); stored only as "
                             "a salted hash.")(f)


def read_token(token: str | None, token_file: str | None) -> str | None:
    """The token of ``--token`` or ``--token-file`` (``-`` = stdin), validated."""
    from ..formats.token import token_bytes

    if token is not None and token_file is not None:
        raise click.UsageError("give --token or --token-file, not both")
    if token_file is not None:
        try:
            if token_file == "-":
                data = sys.stdin.read(4096)
            else:
                with open(token_file) as fh:
                    data = fh.read(4096)
        except OSError as e:
            raise HandoverError(f"{token_file}: cannot read the token: {e.strerror}") from None
        words = data.split()
        if len(words) != 1:
            raise HandoverError(f"{'stdin' if token_file == '-' else token_file}: expected one "
                                f"UUID, found {len(words)} words")
        token = words[0]
    if token is not None:
        try:
            token_bytes(token)
        except HandoverError:
            raise HandoverError("the token is not a UUID") from None  # never echo it
    return token


def parse_alter(values) -> list:
    from ..host.pci import normalize_bdf

    res = []
    for v in values:
        try:
            bdf, idx, start = v.rsplit(":", 2)
            res.append((normalize_bdf(bdf), int(idx, 0), int(start, 0)))
        except ValueError:
            raise click.BadParameter(f"{v!r} is not BDF:INDEX:START",
                                     param_hint="--test-alter-bar") from None
    return res


def print_save_report(report: dict, dry_run: bool, brief: bool = False) -> None:
    """A save's report as text (``brief``: without the per-item sources, for ``arm``)."""
    verb = "would save" if dry_run else "saved"
    out(f"{verb}: {text(report['devices'])} ({report['size']} bytes, generation "
        f"{report['generation']})")
    if not brief:
        counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items() if v)
        out(f"  records: {counts or 'none'}")
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


def one_output(as_json: bool, as_msgpack: bool) -> None:
    if as_json and as_msgpack:
        raise click.UsageError("give --json or --msgpack, not both")


def parse_format_version(text: str | None) -> int | None:
    """'1.0' -> 0 (the minor); None -> None."""
    if text is None:
        return None
    from ..errors import VersionError
    from ..formats.structs import FORMAT_MAJOR, WRITABLE_MINORS

    try:
        major, minor = (int(x) for x in text.split("."))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not MAJOR.MINOR", param_hint="--format-version")
    if major != FORMAT_MAJOR or minor not in WRITABLE_MINORS:
        known = ", ".join(f"{FORMAT_MAJOR}.{m}" for m in WRITABLE_MINORS)
        raise VersionError(f"--format-version {text}: cannot write it: this writer emits {known}")
    return minor


def exit_with(code: int) -> None:
    if code:
        sys.exit(code)


__all__ = ["EXIT_ERROR", "Settings", "settings", "out", "err", "warn", "progress", "emit_json",
           "text", "fail", "handle_errors", "sysroot_option", "generation_option",
           "token_options", "read_token", "parse_alter", "print_save_report", "one_output", "parse_format_version", "exit_with"]
