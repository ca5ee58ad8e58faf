"""Crash consistency: a save interrupted anywhere leaves the old or the new state, exactly.

Three layers:
- every protocol step, interrupted in-process (what a kill leaves in the page cache);
- a simulated power cut at every write/persist of a commit, with random cache-line and 8-byte
  tearing of everything not yet persisted (handover.pmem.simulate);
- >= 200 real SIGKILLs of a child that saves large random states in a loop
  (HANDOVER_KILLS overrides the count; tests/stress/pmem_kill_stress.py runs thousands;
  the kill loop is tests/pmem_kills.py, shared by both).
"""

import hashlib
import os
import random
import time

import pytest

import handover.pmem as pmem
from handover.pmem import protocol as P
from handover.pmem.simulate import PowerCut, SimAccess
from tests.pmem_kills import run_kills

MB = 1 << 20
STEPS = ["slot-write", "slot-persist", "publish-A", "publish-B", "done"]


class _Crash(Exception):
    pass


def _sha(b):
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def hook():
    yield
    P._STEP_HOOK = None


@pytest.mark.parametrize("step", STEPS)
def test_crash_before_each_step(tmp_path, hook, step):
    p = str(tmp_path / "r")
    pmem.init(p, size=4 * MB)
    a, b, c = (os.urandom(500_000) for _ in range(3))
    pmem.commit(p, a)
    pmem.commit(p, b)          # both slots now hold state: the next save overwrites a's

    def crash(name):
        if name == step:
            raise _Crash(name)
    P._STEP_HOOK = crash
    with pytest.raises(_Crash):
        pmem.commit(p, c)
    P._STEP_HOOK = None
    got = pmem.read_latest(p)
    new_from = STEPS.index("publish-B")   # copy A of the new header is durable from here on
    expect = c if STEPS.index(step) >= new_from else b
    assert got.blob == expect and not got.fallback
    # and the region stays usable
    pmem.commit(p, a)
    assert pmem.read_latest(p).blob == a


def _sim_region(acc):
    return P.Region("sim", acc, -1, None)


def _fresh_sim(size=1 * MB, persist_all=False):
    acc = SimAccess(size, persist_all=persist_all)
    r = _sim_region(acc)
    r.init(force=True)
    return acc, r


@pytest.mark.parametrize("persist_all", [False, True], ids=["range-flush", "fsync-all"])
def test_power_cut_at_every_operation(persist_all):
    rng = random.Random(1234)
    checked = 0
    acc, r = _fresh_sim(size=4 * MB, persist_all=persist_all)
    blobs = [os.urandom(n) for n in (rng.randrange(1000, 200_000), rng.randrange(1000, 200_000),
                                      1 * MB + 12345)]  # the new one is written in two pieces
    r.commit(blobs[0])
    r.commit(blobs[1])
    acc.pending.clear()
    acc.dur[:] = acc.vol
    base = bytes(acc.vol)
    # count the operations of one commit
    probe = SimAccess(base, persist_all=persist_all)
    _sim_region(probe).commit(blobs[2])
    nops = probe.ops
    assert nops == 7  # 2 slot pieces, slot persist, 2 x (header write + persist)
    for k in range(1, nops + 2):
        for trial in range(12):
            sim = SimAccess(base, persist_all=persist_all, fail_at=k)
            try:
                _sim_region(sim).commit(blobs[2])
                completed = True
            except PowerCut:
                completed = False
            img = sim.power_cut(rng)
            got = _sim_region(SimAccess(img)).read_latest()
            assert got.blob in (blobs[1], blobs[2]), (k, trial)
            if completed:
                assert got.blob == blobs[2]
            checked += 1
    assert checked >= 12 * nops


def test_sigkill_during_saves(tmp_path):
    p = str(tmp_path / "r")
    pmem.init(p, size=16 * MB)
    pmem.commit(p, b"initial")
    kills = int(os.environ.get("HANDOVER_KILLS", "220"))
    t0 = time.monotonic()
    stats = run_kills(p, kills, seed=int(os.environ.get("HANDOVER_KILL_SEED", "7")))
    elapsed = time.monotonic() - t0
    print(f"\n{stats['kills']} kills in {elapsed:.1f}s: {stats}")
    assert stats["kills"] == kills
    # the kills landed inside commits, not only between them
    inside = sum(v for k, v in stats["by_step"].items() if k != "between-saves")
    assert inside >= kills // 4, stats
