"""An in-memory region with a power-cut model, for tests and the stress script.

``SimAccess`` keeps a *volatile* image (what the CPU sees) and a *durable* image (what is in
the persistence domain).  ``write`` changes the volatile image and marks the touched 64-byte
cache lines pending; ``persist(off, n)`` makes the pending lines in that range durable (like
clwb+sfence on device-dax); with ``persist_all=True`` it makes every pending line durable
(like fdatasync on a file).  ``power_cut(rng)`` returns the image after a power loss: the
durable image plus, for each pending line, a random subset of its 8-byte words (the CPU may
have evicted any line, and only 8-byte stores are atomic).  ``fail_at`` raises PowerCut when
the given operation number (writes and persists counted from 1) is about to run.
"""

from __future__ import annotations

import random

from .kinds import Access

LINE = 64
WORD = 8


class PowerCut(Exception):
    pass


class SimAccess(Access):
    def __init__(self, image: bytes | bytearray | int, *, kind: str = "sim", persist_all=False,
                 fail_at: int | None = None):
        if isinstance(image, int):
            image = bytes(image)
        self.vol = bytearray(image)
        self.dur = bytearray(image)
        self.size = len(self.vol)
        self.kind = kind
        self.align = 4096
        self.phys_start = None
        self.durability = "simulated"
        self.pending: set[int] = set()
        self.persist_all = persist_all
        self.ops = 0
        self.fail_at = fail_at

    def _tick(self):
        self.ops += 1
        if self.fail_at is not None and self.ops >= self.fail_at:
            raise PowerCut(self.ops)

    def read(self, off, n):
        return bytes(self.vol[off:off + n])

    def write(self, off, data):
        self._tick()
        data = bytes(data)
        self.vol[off:off + len(data)] = data
        first, last = off // LINE, (off + len(data) - 1) // LINE
        self.pending.update(range(first, last + 1))

    def persist(self, off, n):
        self._tick()
        if self.persist_all:
            lines = list(self.pending)
        else:
            first, last = off // LINE, (off + n - 1) // LINE
            lines = [ln for ln in self.pending if first <= ln <= last]
        for ln in lines:
            self.dur[ln * LINE:(ln + 1) * LINE] = self.vol[ln * LINE:(ln + 1) * LINE]
            self.pending.discard(ln)

    def power_cut(self, rng: random.Random) -> bytearray:
        img = bytearray(self.dur)
        for ln in self.pending:
            mode = rng.random()
            if mode < 0.4:
                continue                      # line never left the cache
            for w in range(ln * LINE, (ln + 1) * LINE, WORD):
                if mode >= 0.7 or rng.random() < 0.5:
                    img[w:w + WORD] = self.vol[w:w + WORD]
        return img
