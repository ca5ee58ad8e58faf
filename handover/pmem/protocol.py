"""The crash-consistent A/B commit protocol, and reading the newest valid generation.

commit(blob), with the region flock'ed exclusively for the whole save:

1. read both header copies; find the newest generation whose slot CRC verifies (slot K, read
   and checked piecewise); the target is the other slot T.  Check len(blob) <= capacity
   before writing anything.
2. write the blob into slot T (CRC computed piecewise on the way), persist it.
3. publish: write header copy A with slot[T] = {generation G+1, length, crc}, generation =
   G+1, active_slot = T, slot[K] unchanged; persist; then the same as copy B; persist.

At every instant at most one header copy is being written, and the other one is complete.
Slot K is never written, and every valid header copy describes slot K's generation G (or,
from step 3 on, G+1 in T).  A reader gathers the slot descriptors of all valid copies and
returns the newest one whose blob CRC verifies: G until copy A of step 3 is durable, G+1
from then on.  While T is being written, a header may still describe the older generation
that T held; that descriptor is only tried if slot K fails its CRC, and then T's torn bytes
fail theirs (the same 2^-32 CRC reliance as for a torn header copy).
"""

from __future__ import annotations

import contextlib
import errno
import dataclasses
import os
import threading
import time
import uuid as _uuid

from handover.errors import IntegrityError, NoStateError, VersionError
from handover.formats.crc import crc32c
from handover.formats.structs import MAX_GENERATION

from . import kinds
from .kinds import RegionError
from .layout import (
    HEADER_BLOCK,
    HEADER_OFFSETS,
    HEADER_SIZE,
    NO_SLOT,
    HeaderDecodeError,
    RegionHeader,
    Slot,
    decode_header,
    encode_header,
    plan_slots,
)

# Test hook: called with the name of each protocol step before it runs ("slot-write",
# "slot-persist", "publish-A", "publish-B", "done").
_STEP_HOOK = None
PARALLEL_CRC_MIN = 4 << 20


def _step(name: str) -> None:
    if _STEP_HOOK is not None:
        _STEP_HOOK(name)


@dataclasses.dataclass
class RegionRead:
    blob: bytes
    generation: int
    slot: int
    fallback: bool
    reason: str | None
    path: str = ""
    kind: str = ""
    slot_offset: int = 0
    length: int = 0
    crc: int = 0
    commit_time_ns: int = 0
    phys_blob: int | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CommitResult:
    generation: int
    slot: int
    durability: str
    path: str = ""
    kind: str = ""
    slot_offset: int = 0
    length: int = 0
    crc: int = 0
    phys_blob: int | None = None
    elapsed_s: float = 0.0


@dataclasses.dataclass
class Candidate:
    slot: int
    desc: Slot
    ok: bool | None = None
    problem: str | None = None


class Region:
    """An open region.  Use :func:`open_region` (it handles locking and closing)."""

    def __init__(self, path: str, access: kinds.Access, fd: int, st: os.stat_result):
        self.path, self.acc, self.fd, self.st = path, access, fd, st

    # ---- headers -------------------------------------------------------------------------
    def read_headers(self):
        """Return ([hdr or None, hdr or None], [error or None, error or None])."""
        hdrs, errs = [None, None], [None, None]
        for c, off in enumerate(HEADER_OFFSETS):
            if off + HEADER_SIZE > self.acc.size:
                errs[c] = HeaderDecodeError(
                    f"header copy {'AB'[c]} at offset {off:#x}: region of {self.acc.size} bytes "
                    f"is too small", no_magic=True)
                continue
            raw = self.acc.read(off, HEADER_SIZE)
            try:
                hdrs[c] = decode_header(raw, copy=c, region_size=self.acc.size)
            except HeaderDecodeError as e:
                errs[c] = e
        return hdrs, errs

    def initialized(self) -> bool:
        hdrs, errs = self.read_headers()
        return any(h is not None for h in hdrs) or any(e is not None and not e.no_magic for e in errs)

    def _valid_headers(self):
        hdrs, errs = self.read_headers()
        for e in errs:
            if e is not None and e.newer_layout:
                raise VersionError(f"{self.path}: {e.reason}; refusing to use it (upgrade handover)")
        valid = [h for h in hdrs if h is not None]
        if not valid:
            if all(e is not None and e.no_magic for e in errs):
                raise NoStateError(f"{self.path}: not an initialized handover region (no region magic)")
            raise IntegrityError(
                f"{self.path}: both region header copies are damaged: "
                + "; ".join(e.reason for e in errs if e is not None))
        warnings = [e.reason for e in errs if e is not None]
        return hdrs, valid, warnings

    def _candidates(self, valid: list[RegionHeader]) -> list[Candidate]:
        seen = {}
        for h in valid:
            for i, s in enumerate(h.slots):
                if s.empty:
                    continue
                key = (i, s.generation, s.length, s.crc)
                seen.setdefault(key, Candidate(i, s))
        return sorted(seen.values(), key=lambda c: (-c.desc.generation, c.slot))

    def _verify(self, c: Candidate) -> bytes | None:
        s = c.desc
        data = self.acc.read(s.offset, s.length)
        if len(data) != s.length:
            c.ok, c.problem = False, (f"slot {c.slot} (generation {s.generation}) at offset "
                                      f"{s.offset:#x}: truncated")
            return None
        got = crc32c(data)
        if got != s.crc:
            c.ok, c.problem = False, (
                f"slot {c.slot} (generation {s.generation}) at offset {s.offset:#x}, "
                f"{s.length} bytes: CRC mismatch (header {s.crc:#010x}, data {got:#010x})")
            return None
        c.ok = True
        return data

    # ---- read ----------------------------------------------------------------------------
    def read_latest(self, generation: int | None = None) -> RegionRead:
        _, valid, warnings = self._valid_headers()
        cands = self._candidates(valid)
        if not cands:
            raise NoStateError(f"{self.path}: region holds no committed state")
        if generation is not None:
            cands_g = [c for c in cands if c.desc.generation == generation]
            if not cands_g:
                have = ", ".join(str(c.desc.generation) for c in cands)
                raise NoStateError(f"{self.path}: generation {generation} is not in the region "
                                   f"(available: {have})")
            cands = cands_g
        failed = []
        for c in cands:
            data = self._verify(c)
            if data is None:
                failed.append(c)
                continue
            newer = [f for f in failed if f.desc.generation > c.desc.generation]
            fallback = bool(newer)
            reason = None
            if fallback:
                reason = (f"newest generation {newer[0].desc.generation} is damaged "
                          f"({newer[0].problem}); returned generation {c.desc.generation}")
            phys = None if self.acc.phys_start is None else self.acc.phys_start + c.desc.offset
            return RegionRead(
                blob=data, generation=c.desc.generation, slot=c.slot, fallback=fallback,
                reason=reason, path=self.path, kind=self.acc.kind, slot_offset=c.desc.offset,
                length=c.desc.length, crc=c.desc.crc, commit_time_ns=c.desc.commit_time_ns,
                phys_blob=phys,
                warnings=warnings + [f.problem for f in failed if f not in newer])
        raise IntegrityError(f"{self.path}: no slot verifies: " + "; ".join(f.problem for f in failed))

    def status(self) -> dict:
        """Everything `region status` shows; never raises for damage (reports it)."""
        d = kinds.describe(self.path)
        out = {
            "path": self.path, "kind": self.acc.kind, "size": self.acc.size,
            "align": self.acc.align, "phys_start": self.acc.phys_start,
            "durability": self.acc.durability, "initialized": False, "headers": [],
            "state": None, "problems": [],
        }
        if d.get("fs_type"):
            out["fs_type"] = d["fs_type"]
        hdrs, errs = self.read_headers()
        for c in (0, 1):
            h, e = hdrs[c], errs[c]
            entry = {"copy": "AB"[c], "offset": HEADER_OFFSETS[c], "valid": h is not None}
            if h is not None:
                entry.update(seq=h.seq, generation=h.generation,
                             active_slot=None if h.active_slot == NO_SLOT else h.active_slot,
                             layout=f"{h.layout_major}.{h.layout_minor}")
            else:
                entry["problem"] = e.reason
            out["headers"].append(entry)
        if all(h is None for h in hdrs) and all(e.no_magic for e in errs):
            return out
        out["initialized"] = True
        h = next((x for x in hdrs if x is not None), None)
        if h is not None:
            out.update(uuid=h.uuid_str, region_size=h.region_size, slot_align=h.slot_align,
                       phys_hint=h.phys_hint)
            out["slots"] = [
                {"slot": i, "offset": s.offset, "capacity": s.capacity,
                 "phys": None if self.acc.phys_start is None else self.acc.phys_start + s.offset}
                for i, s in enumerate(h.slots)]
        try:
            r = self.read_latest()
            out["state"] = {"generation": r.generation, "slot": r.slot, "length": r.length,
                            "crc": r.crc, "offset": r.slot_offset, "phys": r.phys_blob,
                            "commit_time_ns": r.commit_time_ns, "fallback": r.fallback,
                            "reason": r.reason}
            out["problems"] += r.warnings
            if r.reason:
                out["problems"].append(r.reason)
            # verify every generation the headers describe, so a missing fallback shows
            _, valid, _ = self._valid_headers()
            gens = []
            for c in self._candidates(valid):
                ok = c.desc.generation == r.generation and c.slot == r.slot or self._verify(c) is not None
                gens.append({"generation": c.desc.generation, "slot": c.slot,
                             "length": c.desc.length, "ok": bool(ok)})
                if not ok and c.desc.generation < r.generation:
                    out["problems"].append(f"older {c.problem} (no fallback available)")
            out["generations"] = gens
        except (NoStateError, IntegrityError, VersionError) as e:
            out["problems"].append(str(e))
            out["error"] = {"kind": e.kind, "exit_code": e.exit_code, "message": str(e)}
        return out

    def next_generation(self) -> int:
        """The generation the next commit() on this open region will assign.  Hold the region
        open with write=True (the lock) between this call and commit() so that the number
        embedded in the blob and the region's agree."""
        _, valid, _ = self._valid_headers()
        return max([h.generation for h in valid] +
                   [s.generation for h in valid for s in h.slots] + [0]) + 1

    # ---- write ---------------------------------------------------------------------------
    def _write_header(self, h: RegionHeader, copy: int) -> None:
        off = HEADER_OFFSETS[copy]
        self.acc.write(off, encode_header(h.copy_for(copy)))
        self.acc.persist(off, HEADER_SIZE)

    def commit(self, blob) -> CommitResult:
        t0 = time.perf_counter()
        blob = blob if isinstance(blob, bytes) else bytes(blob)   # immutable while we work
        if len(blob) == 0:
            raise RegionError(f"{self.path}: refusing to commit an empty state")
        hdrs, valid, _ = self._valid_headers()
        base = max(valid, key=lambda h: h.seq)
        for h in valid:
            if h.slots[0].offset != base.slots[0].offset or h.slots[1].offset != base.slots[1].offset:
                raise IntegrityError(f"{self.path}: header copies disagree on the slot layout")
        cap = min(s.capacity for s in base.slots)
        if len(blob) > cap:
            raise RegionError(
                f"{self.path}: state of {len(blob)} bytes does not fit a slot of {cap} bytes "
                f"(region {self.acc.size} bytes); nothing was written")
        threads: list[threading.Thread] = []
        try:
            return self._commit(blob, t0, hdrs, valid, base, threads)
        finally:
            for t in threads:   # never leave a helper thread behind on an error
                t.join()

    def _commit(self, blob, t0, hdrs, valid, base, threads) -> CommitResult:
        cands = self._candidates(valid)
        keep = None
        for c in cands:   # the newest generation whose slot verifies is never overwritten
            got, n = self.acc.crc(c.desc.offset, c.desc.length)
            if n == c.desc.length and got == c.desc.crc:
                keep = c
                break
        top_gen = max([h.generation for h in valid] + [c.desc.generation for c in cands] + [0])
        gen = top_gen + 1
        if gen > MAX_GENERATION:
            raise RegionError(f"{self.path}: generation {top_gen} is the last a region can "
                              f"hold; re-initialize it (handover region init --force)")
        target = 0 if keep is None else 1 - keep.slot
        seq = max(h.seq for h in valid) + 1

        def make(slots, generation, active, seq_):
            return dataclasses.replace(base, slots=slots, generation=generation,
                                       active_slot=active, seq=seq_)

        geometry = [Slot(s.offset, s.capacity) for s in base.slots]
        slots = [dataclasses.replace(g) for g in geometry]
        if keep is not None:
            slots[keep.slot] = dataclasses.replace(keep.desc)

        # 2. the blob, into the slot that does not hold the newest valid state.  The headers
        #    may still describe that slot's older generation: a reader only falls back to it
        #    when the newer slot fails its CRC, and then rejects the torn older one by CRC.
        off = geometry[target].offset
        # CRC of the new blob on a second core while the blob is written (google-crc32c and
        # pwrite release the GIL)
        crc_thread, crc_out = None, []
        if len(blob) >= PARALLEL_CRC_MIN:
            crc_thread = threading.Thread(target=lambda: crc_out.append(crc32c(blob)),
                                          name="handover-crc")
            threads.append(crc_thread)
            crc_thread.start()
        _step("slot-write")
        if crc_thread is None:
            crc = self.acc.write_crc(off, blob)
        else:
            self.acc.write(off, blob)
        _step("slot-persist")
        self.acc.persist(off, len(blob))
        if crc_thread is not None:
            crc_thread.join()
            if not crc_out:
                raise RegionError(f"{self.path}: computing the CRC of the state failed")
            crc = crc_out[0]
        # 3. publish: copy A made durable, then copy B
        slots[target] = Slot(off, geometry[target].capacity, gen, len(blob), time.time_ns(), crc)
        pub = make(slots, gen, target, seq)
        _step("publish-A")
        self._write_header(pub, 0)
        _step("publish-B")
        self._write_header(pub, 1)
        _step("done")
        phys = None if self.acc.phys_start is None else self.acc.phys_start + off
        return CommitResult(generation=gen, slot=target, durability=self.acc.durability,
                            path=self.path, kind=self.acc.kind, slot_offset=off,
                            length=len(blob), crc=crc, phys_blob=phys,
                            elapsed_s=time.perf_counter() - t0)

    def init(self, *, force: bool = False, phys_hint: int | None = None) -> RegionHeader:
        hdrs, errs = self.read_headers()
        if not force:
            for e in errs:
                if e is not None and e.newer_layout:
                    raise VersionError(f"{self.path}: {e.reason}; refusing to re-initialize it "
                                       f"(pass --force to destroy it anyway)")
            if any(h is not None for h in hdrs) or any(e is not None and not e.no_magic for e in errs):
                raise RegionError(f"{self.path}: already holds a handover region; pass --force to "
                                  f"re-initialize it (destroys the saved state)")
            head = self.acc.read(0, min(2 * HEADER_BLOCK, self.acc.size))
            if head.strip(b"\0"):
                raise RegionError(f"{self.path}: the first {len(head)} bytes hold data that is not "
                                  f"a handover region; pass --force to overwrite it")
        slot_align = max(4096, self.acc.align if self.acc.kind == "devdax" else 4096)
        try:
            slots = plan_slots(self.acc.size, slot_align)
        except ValueError as e:
            raise RegionError(f"{self.path}: {e}") from None
        old = next((h for h in hdrs if h is not None), None)
        seq = (old.seq + 1) if old else 1
        h = RegionHeader(
            region_size=self.acc.size, slots=slots, slot_align=slot_align, seq=seq,
            uuid=_uuid.uuid4().bytes, init_time_ns=time.time_ns(),
            phys_hint=(phys_hint if phys_hint is not None else (self.acc.phys_start or 0)),
        )
        # Copy B first is cleared, then both written: a crash leaves either no valid copy
        # (uninitialized) or only the new layout.
        zero = b"\0" * HEADER_BLOCK
        self.acc.write(HEADER_OFFSETS[1], zero)
        self.acc.write(HEADER_OFFSETS[0], zero)
        self.acc.persist(0, 2 * HEADER_BLOCK)
        self._write_header(h, 0)
        self._write_header(h, 1)
        return h

    def wipe(self) -> int:
        """Drop all saved state (zero the used slot bytes too); keep the region initialized.

        Returns the number of slot bytes zeroed."""
        _, valid, _ = self._valid_headers()
        base = max(valid, key=lambda h: h.seq)
        empty = [Slot(s.offset, s.capacity) for s in base.slots]
        h = dataclasses.replace(base, slots=empty, generation=0, active_slot=NO_SLOT,
                                seq=max(x.seq for x in valid) + 1)
        self._write_header(h, 0)
        self._write_header(h, 1)
        zeroed = 0
        for i in (0, 1):
            n = max([x.slots[i].length for x in valid] + [0])
            if n:
                off = base.slots[i].offset
                chunk = 1 << 22
                for p in range(0, n, chunk):
                    m = min(chunk, n - p)
                    self.acc.write(off + p, b"\0" * m)
                self.acc.persist(off, n)
                zeroed += n
        return zeroed

    def close(self) -> None:
        self.acc.close()
        os.close(self.fd)


@contextlib.contextmanager
def open_region(path: str, *, write: bool = False, wait: bool = False, force: bool = False,
                lock: bool | None = None, mode: str | None = None):
    """Open PATH as a region.  With ``write`` the region is flock'ed exclusively (``wait``
    blocks, else RegionLockedError) and its permissions are checked (``force`` skips that)."""
    acc, fd, st = kinds.open_access(path, write=write, mode=mode)
    region = Region(path, acc, fd, st)
    try:
        if write:
            kinds.check_permissions(path, st, force)
        if lock if lock is not None else write:
            kinds.lock_fd(fd, path, exclusive=True, wait=wait)
        yield region
    finally:
        region.close()


def create_file(path: str, size: int) -> None:
    """Create a region file of SIZE bytes, mode 0600, blocks allocated up front.

    Refuses a SIZE beyond the free space of the filesystem before writing anything, and
    removes the file when the allocation fails: a region file never fills a filesystem, and
    a failed ``region init`` leaves nothing behind.  Only a filesystem without fallocate
    (EOPNOTSUPP) gets a sparse file instead."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        vfs = os.statvfs(directory)
    except OSError as e:
        raise RegionError(f"{path}: cannot create a region file: {e.strerror}") from None
    free = vfs.f_bavail * vfs.f_frsize
    if size > free:
        raise RegionError(f"{path}: cannot create a region file of {size} bytes: the "
                          f"filesystem of {directory} has {free} bytes free")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise RegionError(f"{path}: cannot allocate {size} bytes: {e.strerror}") from None
            os.ftruncate(fd, size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
