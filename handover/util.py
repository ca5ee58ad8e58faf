"""Small helpers every layer may use (imports nothing of ours but ``errors``).

- :func:`jsonable`: any value read from a state or a host as strict JSON data (bytes as hex,
  NaN and the infinities as strings, keys as strings);
- :func:`dumps_json`: the one JSON writer (strict: no NaN, sorted keys);
- :func:`parse_size`: the one size parser (``64M``, ``0x30000000``, ``1G``, ``4096``, ``2MiB``);
- :func:`write_new_file`: a blob file, never over an existing one without ``force``.
"""

from __future__ import annotations

import json
import math
import os
import re

from .errors import HandoverError

_SIZE = re.compile(r"\s*(0x[0-9a-fA-F]+|\d+)\s*(?:([KMGTkmgt])(?:i?B)?)?\s*")
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text: str) -> int:
    """``memparse()``-style sizes: a decimal or 0x number, optionally K/M/G/T (KiB, MB, ...
    read as binary units). Raises ValueError naming the text."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size (such as 64M, 1G, 0x4000000 or 4096)")
    return int(m.group(1), 0) << _SHIFT[(m.group(2) or "").upper()]


def jsonable(obj):
    """``obj`` as data that strict JSON (and msgpack) can carry.

    A state's META is msgpack written by anyone: it may hold bytes, NaN, infinities, integer
    keys or nested containers; none of them may break a JSON document."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)          # "nan", "inf", "-inf"
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def dumps_json(obj) -> str:
    """The JSON text of ``obj`` (after :func:`jsonable`): indented, sorted, strict."""
    return json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False)


def write_new_file(path: str, data: bytes, force: bool = False) -> None:
    """Write ``data`` to a new file (mode 0600); an existing ``path`` only with ``force``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise HandoverError(f"{path}: exists (use --force to overwrite)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
