"""The published JSON Schemas of every ``--json`` document (and of ``result.json``).

Each document carries ``"schema": "handover.<name>/<version>"``; its schema is the file
``<name>-<version>.json`` of this package (JSON Schema 2020-12). A version changes when a
key changes meaning or spelling; new keys may appear without one.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """'handover.inspect/2' -> the schema file."""
    if not name.startswith("handover.") or "/" not in name:
        raise ValueError(f"not a handover schema name: {name!r}")
    return HERE / (name[len("handover."):].replace("/", "-") + ".json")


def load(name: str) -> dict:
    with open(path(name)) as f:
        return json.load(f)


def names() -> list[str]:
    out = []
    for p in sorted(HERE.glob("*.json")):
        base, _, version = p.stem.rpartition("-")
        out.append(f"handover.{base}/{version}")
    return out
