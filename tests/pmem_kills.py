"""Real SIGKILLs of a process saving into a region: the loop shared by the unit test
(tests/unit/test_pmem_kill.py, a few hundred kills) and the stress run
(``python -m tests.stress.pmem_kill_stress``, thousands)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
import time

import handover.pmem as pmem
from handover.pmem import protocol as P

MB = 1 << 20


def _sha(b):
    return hashlib.sha256(b).hexdigest()


def _child_loop(path, wfd, seed, pool):
    rng = random.Random(seed)

    def step(name):
        os.write(wfd, b"S" + name.encode().ljust(64))  # 65-byte records
    P._STEP_HOOK = step
    try:
        while True:
            # a fresh random prefix makes every state distinct; the pool keeps it cheap
            blob = rng.randbytes(32) + rng.choice(pool)
            os.write(wfd, b"B" + _sha(blob).encode())
            pmem.commit(path, blob)
    finally:
        os._exit(1)


def run_kills(path, kills, *, sizes=(1 * MB, 2 * MB, 4 * MB), seed=0, max_delay=None,
              deadline=None, progress=None):
    """Kill a saving child KILLS times; return stats.  Raises AssertionError on a bad state."""
    rng = random.Random(seed)
    pool = [rng.randbytes(n) for n in sizes]
    current = _sha(pmem.read_latest(path).blob)
    t_commit = max_delay
    if t_commit is None:
        t0 = time.perf_counter()
        pmem.commit(path, rng.randbytes(max(sizes)))
        t_commit = (time.perf_counter() - t0) * 1.5
        current = _sha(pmem.read_latest(path).blob)
    stats = {"kills": 0, "new": 0, "old": 0, "by_step": {}, "max_delay_s": t_commit}
    for i in range(kills):
        if deadline and time.monotonic() > deadline:
            break
        r_fd, w_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r_fd)
            _child_loop(path, w_fd, rng.getrandbits(64), pool)
        os.close(w_fd)
        first = os.read(r_fd, 65)          # child is running its first commit attempt
        assert first[:1] in (b"B", b"S")
        time.sleep(rng.uniform(0, t_commit))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        msgs = first
        while chunk := os.read(r_fd, 1 << 16):
            msgs += chunk
        os.close(r_fd)
        recs = [msgs[j:j + 65] for j in range(0, len(msgs), 65)]
        begins = [m[1:65].strip().decode() for m in recs if m[:1] == b"B"]
        steps = [m[1:65].strip().decode() for m in recs if m[:1] == b"S"]
        allowed = {current} | set(begins[-1:])
        if len(begins) >= 2:
            allowed = {begins[-2], begins[-1]}
        got = pmem.read_latest(path)
        h = _sha(got.blob)
        assert h in allowed, f"kill {i}: region holds a state that is neither old nor new"
        assert not got.fallback, got.reason
        stats["new" if begins and h == begins[-1] else "old"] += 1
        # where the kill landed: "verify" = the save had begun (headers, newest-slot check),
        # a step name = inside that step, "between-saves" = after a save returned
        last = steps[-1] if steps and (not begins or msgs.rfind(b"S") > msgs.rfind(b"B")) else "verify"
        last = "between-saves" if last == "done" else last
        stats["by_step"][last] = stats["by_step"].get(last, 0) + 1
        stats["kills"] += 1
        current = h
        if progress and (i + 1) % progress == 0:
            print(f"{i + 1} kills ok: {stats}", file=sys.stderr, flush=True)
    return stats
