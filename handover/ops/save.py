"""Use case ``save``: read the host, build the keepalive state, commit it to a region.

``save`` (and ``arm``, and the shutdown save) call :func:`save`; it returns the report and
raises :class:`~handover.errors.HandoverError`; it prints nothing (``progress`` is a callback).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

from ..errors import HandoverError
from ..formats.structs import MAX_GENERATION
from ..util import write_new_file

Progress = Callable[[str], None] | None


@dataclass
class SaveRequest:
    region: str | None = None
    devices: tuple = ()
    token: str | None = None                       # the owner's UUID (validated here)
    token_hash: tuple[bytes, bytes] | None = None  # or its salted hash (the shutdown save)
    dry_run: bool = False
    require: str = "available"
    force: bool = False
    output: str | None = None
    wait: bool = False
    alter: list = field(default_factory=list)       # [(bdf, index, start)] (tests only)
    sysroot: str = "/"
    minor: int | None = None
    progress: Progress = None
    #: the devices will be armed for a keepalive kexec (arm): refuse, before anything is
    #: written, a device the kernel cannot keep (ops.keepable)
    keepalive: bool = False


def region_ranges(region: str) -> list[tuple[int, int]]:
    """[(phys start, size)] of a region (its own memory must never be reused)."""
    from .. import pmem

    st = pmem.status(region)
    return [(st["phys_start"], st.get("size") or 0)] if st.get("phys_start") else []


def check_output(output: str, region: str | None, force: bool) -> None:
    """Refuse to write a blob file over something precious: the region itself (whatever the
    path or symlink that names it), an initialized region, or any existing file without
    ``force``."""
    from .. import pmem

    if not os.path.lexists(output):
        return
    if region and os.path.exists(region) and os.path.exists(output) \
            and os.path.samefile(output, region):
        raise HandoverError(f"{output}: --output is the region {region} itself: writing the "
                            f"blob there would destroy the region")
    if os.path.exists(output) and pmem.probe(output):
        if not force:
            raise HandoverError(f"{output}: is an initialized handover region; --output "
                                f"would overwrite it (use --region to commit to it, or --force)")
    elif not force:
        raise HandoverError(f"{output}: exists (use --force to overwrite)")


def save(req: SaveRequest) -> dict:
    """Collect, encode (format minor ``req.minor``, default the newest), commit.

    The region is locked (flock) for the whole save: collection, encoding and commit, so that
    the generation in the blob is the one the region gets."""
    from .. import pmem
    from ..formats.codec import encode
    from ..formats.token import token_bytes
    from ..host import Sysroot
    from ..host.pci import normalize_bdf
    from . import build

    if req.token:
        token_bytes(req.token)  # validate early
    if req.output and not req.dry_run:
        check_output(req.output, req.region, req.force)
    sr = Sysroot(req.sysroot).check()
    ranges, lock = [], contextlib.nullcontext()
    if req.region and not req.dry_run:
        if pmem.probe(req.region):
            ranges = region_ranges(req.region)
            lock = pmem.open_region(req.region, write=True, wait=req.wait, force=req.force)
        elif req.output is None:
            raise HandoverError(f"{req.region}: not an initialized handover region "
                                f"(handover region init {req.region})")
    with lock as reg:
        generation = reg.next_generation() if reg is not None else 1
        if generation > MAX_GENERATION:
            raise HandoverError(f"{req.region}: generation {generation - 1} is the last one a "
                                f"state can carry; start over with handover region init "
                                f"--force {req.region}")
        wanted = {normalize_bdf(d) for d in req.devices} if req.devices else None
        host = read_host(sr, wanted, req.progress)
        kept, warnings = build.select_devices(host, list(req.devices) or None, force=req.force)
        if req.keepalive:
            from .keepable import refuse_unkeepable

            refuse_unkeepable(host, kept)
        opts = build.SaveOptions(devices=[d.bdf for d in kept], token=req.token,
                                 token_hash=req.token_hash, force=req.force, require=req.require,
                                 region_ranges=ranges, generation=generation,
                                 alter_bars=list(req.alter))
        st, report = build.build_state(host, kept, opts)
        # what the state preserves (arm keeps the kexec segments off it)
        report["reserved"] = [{"start": r.start, "size": r.size, "kind": r.kind}
                              for r in st.reserved]
        blob = encode(st, generation=generation,
                      **({} if req.minor is None else {"minor": req.minor}))
        report.update(size=len(blob), generation=generation, dry_run=req.dry_run,
                      warnings=[f"forced: {w}" for w in warnings])
        if req.alter:
            report["test_altered_bars"] = [f"{b}:{i}:{s:#x}" for b, i, s in req.alter]
        if not req.dry_run:
            if req.output:
                write_new_file(req.output, blob, req.force)
                report["output"] = os.path.abspath(req.output)
            if reg is not None:
                res = reg.commit(blob)
                if res.generation != generation:
                    raise HandoverError(f"{req.region}: committed as generation "
                                        f"{res.generation}, the state says {generation}")
                report["commit"] = {"region": os.path.abspath(req.region),
                                    "generation": res.generation, "slot": res.slot,
                                    "durability": res.durability}
    return report


def read_host(sr, wanted: set | None, progress: Progress):
    from ..host import read_host as _read_host

    if progress:
        progress(f"reading host under {sr.root}")
    return _read_host(sr, progress=progress, wanted=wanted)
