"""Stage-1 of a fast restart (no kexec): the next QEMU takes over the VFIO files of the
previous one (handover.host.vfio_takeover, QEMU patch 0009).

``hold_vm``: after ``vm save``, a holder process keeps the saved QEMU's VFIO files open (the
same holder ``arm`` uses for a kexec), with the salted hash of the owner's token beside it,
so that QEMU may quit without its devices being reset. ``exec_qemu``: the next QEMU's
launcher; it checks the token against that hash, takes the files from the holder (or from a
previous QEMU still running), invalidates the mappings' virtual addresses, stops the holder
and execs QEMU with ``-add-fd`` options naming the files (same pid: a systemd unit's
ExecStart may be this command).
"""

from __future__ import annotations

import json
import os

from ..errors import HandoverError
from ..formats.token import check_token, hash_token
from ..host import vfio_hold as H
from ..host.base import Sysroot
from ..host.vfio_takeover import invalidate_vaddr, take_files

RESULT_DIR = "/run/handover"
TOKEN_FILE = "hold-token.json"


def hold_vm(pid: int, token: str, result_dir: str = RESULT_DIR, systemd: bool | None = None) -> dict:
    """Keep QEMU ``pid``'s VFIO files in a holder, the token's salted hash beside it."""
    sr = Sysroot("/")
    files = H.vfio_files(sr, pid)
    groups = {g for _fd, target in files if (g := H.group_of(target))}
    fds = [fd for fd, _target in files]
    if not groups:
        raise HandoverError(f"QEMU pid {pid} holds no VFIO group: nothing to hold")
    comm = (sr.try_text(f"/proc/{pid}/comm") or "?").strip()
    rep = H.hold_owners([H.VfioOwner(pid, comm, tuple(sorted(groups)), tuple(fds))],
                        result_dir, systemd=systemd)
    salt, digest = hash_token(token)
    path = os.path.join(result_dir, TOKEN_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"holder": rep.holder, "salt": salt.hex(), "sha256": digest.hex()}, f)
    return {"holder": rep.holder, "scope": rep.scope, "fds": rep.fds, "groups": sorted(groups)}


def _holder(result_dir: str) -> tuple[int, dict]:
    try:
        with open(os.path.join(result_dir, H.PIDFILE)) as f:
            pid = int(json.load(f)["holder"])
        with open(os.path.join(result_dir, TOKEN_FILE)) as f:
            tok = json.load(f)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HandoverError(f"{result_dir}: no holder of a saved VM's files "
                            f"(handover vm save --hold): {getattr(e, 'strerror', None) or e}") from None
    if tok.get("holder") != pid:
        raise HandoverError(f"{result_dir}: the holder ({pid}) is not the one the token was "
                            f"recorded for ({tok.get('holder')})")
    return pid, tok


def prepare_exec(argv: list[str], token: str, result_dir: str = RESULT_DIR,
                 from_pid: int | None = None, say=None) -> tuple[list[str], dict]:
    """Take the files (from the holder, or from QEMU ``from_pid``), check the token,
    invalidate the mappings' addresses; return the QEMU argv with ``-add-fd`` options and a
    report. The holder is stopped (the files stay open in this process)."""
    say = say or (lambda _m: None)
    if not argv:
        raise HandoverError("vm exec: no QEMU command given (after --)")
    if not any("keepalive_token=" in a for a in argv):
        raise HandoverError("vm exec: the QEMU command has no -device vfio-pci,...,"
                            "keepalive_token=: a device taken over needs it")
    holder = None
    if from_pid is None:
        holder, tok = _holder(result_dir)
        if not check_token(token, bytes.fromhex(tok["salt"]), bytes.fromhex(tok["sha256"])):
            raise HandoverError("vm exec: the token is not the one the VM was saved with")
        from_pid = holder
    taken = take_files(Sysroot("/"), from_pid)
    try:
        invalidate_vaddr(taken.container)
        for fd in taken.fds():
            os.set_inheritable(fd, True)
    except BaseException:
        taken.close()
        raise
    say(f"took {len(taken.fds())} VFIO files from pid {from_pid}: groups "
        f"{', '.join(sorted(taken.groups))}, devices {', '.join(sorted(taken.devices)) or 'none'}")
    if holder is not None:
        H.stop_holder(result_dir)
        try:
            os.unlink(os.path.join(result_dir, TOKEN_FILE))
        except OSError:
            pass
    report = {"from_pid": from_pid, "holder": holder, "groups": sorted(taken.groups),
              "devices": sorted(taken.devices), "fds": taken.fds()}
    return list(argv) + taken.add_fd_args(), report
