"""Use case ``load`` (in the next kernel's initramfs): check the saved state against the
running host, tell a patched kernel the verdict, write ``result.json``.

:func:`load` returns the result document; its ``exit_code`` is 0 (match), 6 (mismatch: this
wins), or 7 (match, but read from an older generation because the newest is damaged). A
patched kernel is told ``accept`` only for 0: an older generation may not describe the
devices as they were at the kexec, so 7 tells it ``abort``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from ..errors import EXIT_FALLBACK, EXIT_MISMATCH, EXIT_OK, HandoverError
from ..util import dumps_json

DEFAULT_RESULT_DIR = "/run/handover"


@dataclass
class LoadRequest:
    region: str
    token: str | None = None
    generation: int | None = None
    check_only: bool = False
    result_dir: str = DEFAULT_RESULT_DIR
    sysroot: str = "/"


def load(req: LoadRequest) -> dict:
    from ..formats.descriptions import bdf_str
    from ..host import Sysroot
    from ..host.kernel_handover import feed, read_status
    from . import check, source as src, save

    sr = Sysroot(req.sysroot).check()
    loaded = src.load(req.region, req.generation)
    st = loaded.state
    host = save.read_host(sr, {bdf_str(d.sbdf) for d in st.devices}, None)
    verdicts = check.compare_state(st, host, req.token)
    iface = host.kernel_handover
    kernel = {"present": iface is not None, "action": "none", "written": None}
    if iface is not None:
        kernel.update(iface.as_dict())
        if req.check_only:
            kernel["action"] = "none (--check-only)"
        else:
            fails = [v["item"] for v in verdicts if v["status"] in check.FAIL]
            # a state read from an older generation (the newest damaged) is not accepted:
            # the devices may have changed since it was saved
            verdict = "accept" if verdicts.ok and not loaded.fallback else "abort"
            kernel["written"] = feed(sr, verdict, "mismatch: " + "; ".join(fails[:4])
                                     if fails else "the newest generation is damaged")
            kernel["action"] = verdict
            # what the kernel did with it (an abort releases the keepalive devices)
            kernel["status_after"] = read_status(sr).as_dict()
    else:
        kernel["action"] = "none (stock kernel: no /sys/kernel/handover; nothing changed)"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = check.result_doc(st, host, verdicts, source=loaded.info, check_only=req.check_only,
                           kernel=kernel, created=now)
    doc["exit_code"] = (EXIT_MISMATCH if not doc["ok"] else
                        EXIT_FALLBACK if loaded.fallback else EXIT_OK)
    if loaded.fallback:
        doc["fallback"] = {"generation": loaded.info.get("generation"),
                           "reason": loaded.info.get("reason")}
    doc["result_path"] = write_result(req.result_dir, doc)
    return doc


def write_result(result_dir: str, doc: dict) -> str:
    """``result.json`` in ``result_dir``, atomically (no ``.tmp`` left behind, whatever
    fails)."""
    path = os.path.abspath(os.path.join(result_dir, "result.json"))
    tmp = path + ".tmp"
    try:
        text = dumps_json(doc) + "\n"
        os.makedirs(result_dir, exist_ok=True)
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise HandoverError(f"{result_dir}: cannot write result.json: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def failure_summary(region: str, doc: dict) -> str:
    """The one-line mismatch error of a failed load."""
    f = doc["failures"]
    return (f"{region}: the saved state does not match this host: " + "; ".join(f[:3])
            + (f" (+{len(f) - 3} more)" if len(f) > 3 else ""))
