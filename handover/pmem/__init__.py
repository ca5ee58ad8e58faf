"""pmem regions: where `handover save` puts the state blob for the next kernel.

Public API (other modules call exactly these):

- :func:`probe` (path) -> bool
- :func:`read_latest` (path, generation=None) -> :class:`RegionRead`
- :func:`commit` (path, blob, *, wait=False, force=False) -> :class:`CommitResult`
- :func:`init` (path, *, size=None, force=False) -> dict
- :func:`status` (path) -> dict, :func:`wipe` (path, *, force=False) -> int
- :func:`open_region` (path, write=..., wait=..., force=...): context manager; hold the lock
  across a whole save with ``with open_region(p, write=True) as r: ... r.commit(blob)``
- :func:`list_regions` () -> list of dict (``region list``; module ``discover``)

The blob is opaque here; the region layer has its own magic and CRC (see layout.py).

The submodules are imported on first use (PEP 562 ``__getattr__`` for the names above and
inside the functions): ``protocol`` brings in construct and ctypes (~90 ms), which a
short-lived reader of the headers alone (udev's probe) must not pay.
"""

from __future__ import annotations

import importlib
import os

from handover.errors import HandoverError

TYPE_CHECKING = False    # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from .protocol import CommitResult, RegionRead

__all__ = [
    "probe", "read_latest", "commit", "init", "status", "wipe", "open_region", "list_regions",
    "RegionRead", "CommitResult", "RegionError", "RegionLockedError", "Region",
]

#: names this package re-exports -> the submodule that defines them
_LAZY = {
    "CommitResult": "protocol", "Region": "protocol", "RegionRead": "protocol",
    "create_file": "protocol", "open_region": "protocol",
    "RegionError": "kinds", "RegionLockedError": "kinds",
    "HEADER_OFFSETS": "layout", "HEADER_SIZE": "layout", "has_magic": "layout",
}
_SUBMODULES = {"discover", "kinds", "layout", "protocol", "simulate", "udev"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


def probe(path) -> bool:
    """True when PATH holds an initialized handover region (region magic in a header copy).

    Never raises: a missing path, a plain blob file, garbage or a device that cannot be read
    all give False."""
    from . import kinds
    from .layout import HEADER_OFFSETS, HEADER_SIZE, has_magic

    try:
        acc, fd, _ = kinds.open_access(os.fspath(path), write=False)
    except (HandoverError, OSError, ValueError):
        return False
    try:
        for off in HEADER_OFFSETS:
            if off + HEADER_SIZE <= acc.size and has_magic(acc.read(off, 8)):
                return True
        return False
    except (OSError, ValueError):
        return False
    finally:
        try:
            acc.close()
        finally:
            os.close(fd)


def read_latest(path, generation: int | None = None) -> RegionRead:
    """The newest valid generation (or GENERATION).  Raises NoStateError, IntegrityError,
    VersionError; ``fallback`` is True when a newer generation was found damaged."""
    from .protocol import open_region

    with open_region(os.fspath(path), write=False) as r:
        return r.read_latest(generation)


def commit(path, blob: bytes, *, wait: bool = False, force: bool = False) -> CommitResult:
    """Crash-consistent A/B commit of BLOB, under an exclusive flock for the whole call."""
    from .protocol import open_region

    with open_region(os.fspath(path), write=True, wait=wait, force=force) as r:
        return r.commit(blob)


def init(path, *, size: int | None = None, force: bool = False, wait: bool = False) -> dict:
    """Initialize PATH as an empty region.  A missing file is created 0600 with SIZE bytes
    (SIZE is required then); an existing region or non-zero data needs FORCE."""
    from .kinds import RegionError
    from .protocol import create_file, open_region

    path = os.fspath(path)
    created = False
    if not os.path.exists(path):
        if size is None:
            raise RegionError(f"{path}: does not exist; give --size to create a region file")
        create_file(path, size)
        created = True
    elif size is not None and not os.path.isfile(path):
        raise RegionError(f"{path}: --size applies only to region files; a device has its own size")
    elif size is not None:
        cur = os.path.getsize(path)
        if cur != size:
            if not force:
                raise RegionError(f"{path}: exists with {cur} bytes, not {size}; pass --force to "
                                  f"resize (destroys its content)")
            os.truncate(path, size)
    try:
        with open_region(path, write=True, wait=wait, force=force) as r:
            h = r.init(force=force or created)
            return {"path": path, "created": created, "kind": r.acc.kind, "size": r.acc.size,
                    "uuid": h.uuid_str, "slot_capacity": h.slots[0].capacity,
                    "slots": [s.offset for s in h.slots], "phys_start": r.acc.phys_start,
                    "durability": r.acc.durability}
    except BaseException:
        if created:
            os.unlink(path)
        raise


def status(path) -> dict:
    from .protocol import open_region

    with open_region(os.fspath(path), write=False) as r:
        return r.status()


def wipe(path, *, force: bool = False, wait: bool = False) -> int:
    from .protocol import open_region

    with open_region(os.fspath(path), write=True, wait=wait, force=force) as r:
        return r.wipe()


def list_regions(**kw) -> list[dict]:
    """``region list``: the host's pmem devices and legacy ranges (see discover.py)."""
    from . import discover as _discover
    return _discover.discover(**kw)
