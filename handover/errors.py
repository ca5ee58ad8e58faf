"""Errors and the exit codes the CLI maps them to.

Every failure the tool reports is one line; the CLI prints ``str(err)`` and exits with
``err.exit_code``. The codes are documented in README.md ("Exit codes").
"""

EXIT_OK = 0
EXIT_ERROR = 1          # generic error, or "differences found" for diff
EXIT_USAGE = 2          # bad command line (click's own code)
EXIT_NO_STATE = 3       # no saved state at SOURCE
EXIT_INTEGRITY = 4      # magic, checksum, truncation, bounds
EXIT_VERSION = 5        # unsupported format (or region layout) version
EXIT_MISMATCH = 6       # saved state does not match the running host (load)
EXIT_FALLBACK = 7       # state read, but from an older generation: the newest is damaged
EXIT_VMM = 8            # vm save/restore: a step in QEMU failed (connection, QMP, migration)
EXIT_ROLLBACK = 9       # vm save: a step failed and undoing what was done failed too
EXIT_PIPE = 141         # stdout closed by the reader (``| head``), as a shell reports SIGPIPE

# C0 controls (ESC, CR, LF, BS, ...), DEL and C1 controls (CSI 0x9b, ...): never printed raw
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def safe_text(text) -> str:
    """``text`` for a terminal or a log line: control characters (terminal escapes, CR, LF)
    as ``\\xNN``, so that a string read from a state or a host cannot forge a line or
    drive the terminal."""
    return str(text).translate(_CONTROL)


class HandoverError(Exception):
    """Base class: a one-line, user-facing error with an exit code.

    ``code`` is a stable machine-readable name for format errors (the HO_E_* codes that the
    C parser returns too, see handover/formats/enums.py ErrorCode)."""

    exit_code = EXIT_ERROR
    kind = "error"

    def __init__(self, *args, code: str | None = None, document: dict | None = None):
        super().__init__(*args)
        self.code = code
        # with --json, the command's own document goes out with the error (one document)
        self.document = document

    def __str__(self) -> str:  # one line, always, without terminal control characters
        return safe_text(" ".join(super().__str__().split()))


class NoStateError(HandoverError):
    exit_code = EXIT_NO_STATE
    kind = "no-state"


class IntegrityError(HandoverError):
    exit_code = EXIT_INTEGRITY
    kind = "integrity"


class VersionError(HandoverError):
    exit_code = EXIT_VERSION
    kind = "version"


class MismatchError(HandoverError):
    exit_code = EXIT_MISMATCH
    kind = "mismatch"


class VmmError(HandoverError):
    """A step in the VMM (QEMU) failed: its QMP socket, a monitor command, the migration.
    ``vm save`` raises it after undoing what it had done (the VM is as it was)."""

    exit_code = EXIT_VMM
    kind = "vmm"


class RollbackError(HandoverError):
    """``vm save`` failed, and undoing what it had done failed too: the VM may be paused,
    or its devices still kept alive (the message says what is left)."""

    exit_code = EXIT_ROLLBACK
    kind = "rollback"
