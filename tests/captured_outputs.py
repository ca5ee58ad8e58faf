"""Pinned outputs on the captured trees: python -m tests.captured_outputs [--check]

For each tree of tests/fixtures/captured/, what the commands that read a host print as JSON
(``save --dry-run --json``, ``save --output --json``, ``inspect --json`` and its text view,
``load --check-only --json``, ``doctor --json``), the provenance ``capture-sysroot`` writes
into its manifest, and a SHA-256 of the saved blob (META included, byte for byte). The
save time is frozen and the temporary directory is replaced by ``<TMP>``, so the document
depends on the code and the trees only. ``--check`` exits 1 when the committed document
differs from what the code produces now (tests/unit/test_host_records.py does the same): a
refactoring of the host records cannot change an output unnoticed. After an intended change,
regenerate and review the diff.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import types

from click.testing import CliRunner

import handover.ops.build as build
from handover.formats.codec import read_header, read_sections
from handover.cli import main as cli_main
from handover.ops.capture import record

HERE = os.path.dirname(os.path.abspath(__file__))
CAPTURED = os.path.join(HERE, "fixtures", "captured")
GOLDEN = os.path.join(HERE, "fixtures", "captured-outputs.json")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
FROZEN = _dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=_dt.timezone.utc)


class _FrozenDatetime(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return FROZEN


@contextlib.contextmanager
def frozen_save_time():
    """The META "created" of a save, fixed (handover.ops.build reads datetime.now)."""
    saved = build.datetime
    build.datetime = types.SimpleNamespace(datetime=_FrozenDatetime, timezone=_dt.timezone)
    try:
        yield
    finally:
        build.datetime = saved


def trees() -> list[str]:
    return sorted(n for n in os.listdir(CAPTURED) if os.path.isdir(os.path.join(CAPTURED, n)))


def blob_digest(path: str, tmp: str) -> str:
    """SHA-256 of a saved blob's header fields and sections, the temporary directory in META
    replaced by as many "T" (the CRCs, which depend on it, are left out: they follow from the
    bytes hashed)."""
    with open(path, "rb") as f:
        blob = f.read()
    hdr = read_header(blob)
    h = hashlib.sha256(repr(sorted((k, v) for k, v in hdr.items() if "crc" not in k)).encode())
    for s in read_sections(blob, hdr):
        h.update(repr(sorted((k, v) for k, v in s.items() if k not in ("crc", "data"))).encode())
        h.update(s["data"].replace(tmp.encode(), b"T" * len(tmp.encode())))
    return h.hexdigest()


def _run(args: list[str], tmp: str) -> dict:
    r = CliRunner().invoke(cli_main, args)
    out = TIMESTAMP.sub("<TS>", r.stdout.replace(tmp, "<TMP>"))
    try:
        out = json.loads(out)
    except ValueError:
        pass
    return {"exit": r.exit_code, "out": out}


def outputs(name: str) -> dict:
    """Every pinned output of one captured tree (a copy of it, in a temporary directory of a
    fixed-length name, so that the blob's hash does not depend on where it was made)."""
    tmp = tempfile.mkdtemp(prefix="ho-outputs-", dir="/tmp")
    try:
        root = os.path.join(tmp, "host")
        shutil.copytree(os.path.join(CAPTURED, name), root, symlinks=True,
                        ignore=shutil.ignore_patterns("_capture"))
        blob = os.path.join(tmp, "state.bin")
        d = {}
        with frozen_save_time():
            d["save_dry_run"] = _run(["save", "--sysroot", root, "--dry-run", "--json",
                                      "--force"], tmp)
            d["save"] = _run(["save", "--sysroot", root, "--output", blob, "--json", "--force"],
                             tmp)
            if os.path.exists(blob):
                d["blob_sha256"] = blob_digest(blob, tmp)
                d["inspect"] = _run(["inspect", "--json", blob], tmp)
                d["inspect_text"] = _run(["inspect", "--limit", "0", blob], tmp)
                d["load"] = _run(["load", "--sysroot", root, "--region", blob, "--result-dir",
                                  os.path.join(tmp, "result"), "--json", "--check-only"], tmp)
            d["doctor"] = _run(["doctor", "--sysroot", root, "--json"], tmp)
            _sr, host = record(root)
        prov = {k: (v.as_dict() if hasattr(v, "as_dict") else v) for k, v in host.notes.items()}
        d["capture_provenance"] = json.loads(json.dumps(prov).replace(tmp, "<TMP>"))
        return d
    finally:
        shutil.rmtree(tmp)


def produce() -> str:
    return json.dumps({n: outputs(n) for n in trees()}, indent=1) + "\n"


def main(argv: list[str]) -> int:
    now = produce()
    if "--check" in argv:
        with open(GOLDEN) as f:
            if f.read() != now:
                print(f"{GOLDEN}: differs from what the code produces", file=sys.stderr)
                return 1
        return 0
    with open(GOLDEN, "w") as f:
        f.write(now)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
