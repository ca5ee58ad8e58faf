"""The patched QEMU (qemu-patches/, built by ``make qemu``) on the host, without a VFIO device:
the monitor knows ``set-keepalive`` (HMP) and ``x-set-keepalive`` (QMP), which reject a
malformed token, and ``-device vfio-pci,help`` lists ``keepalive_token``.

Marker ``qemu``: skipped, with the reason, when the binary is not built or is older than the
series (``make qemu`` builds it). Each test starts qemu-system-x86_64 with ``-machine none
-nodefaults -display none`` for a second or two; no guest runs.
"""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.qemu

GOOD_TOKEN = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
BAD_TOKENS = ["not-a-uuid", GOOD_TOKEN[:-1], GOOD_TOKEN + "0", GOOD_TOKEN.replace("-", "_"),
              " " + GOOD_TOKEN[1:], "0x" + GOOD_TOKEN[2:], "00000000-0000-0000-0000-000000000000"]


@pytest.fixture(scope="module")
def qemu_bin():
    from tools import qemu

    b = qemu.built()
    if b is None:
        binary = qemu.paths()["binary"]
        import os

        why = "older than qemu-patches/" if os.path.exists(binary) else "not built"
        pytest.skip(f"patched QEMU {why} ({binary}): make qemu")
    return b


def _run(qemu_bin, args, stdin, timeout=60):
    r = subprocess.run([qemu_bin, "-machine", "none", "-nodefaults", "-display", "none", *args],
                       input=stdin, capture_output=True, text=True, timeout=timeout)
    return r


def _qmp(qemu_bin, commands):
    """Run QMP commands through -qmp stdio; the answers (returns or errors), in order."""
    lines = [{"execute": "qmp_capabilities"}, *commands, {"execute": "quit"}]
    r = _run(qemu_bin, ["-qmp", "stdio"], "".join(json.dumps(c) + "\n" for c in lines))
    answers = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
    answers = [a for a in answers if "return" in a or "error" in a]
    assert len(answers) == len(lines), r.stdout + r.stderr
    return answers[1:-1]


def _hmp(qemu_bin, commands):
    r = _run(qemu_bin, ["-monitor", "stdio"], "".join(c + "\n" for c in commands) + "quit\n")
    return r.stdout + r.stderr


def test_hmp_help_lists_set_keepalive(qemu_bin):
    out = _hmp(qemu_bin, ["help set-keepalive"])
    assert "set-keepalive on,token=uuid[,id=id]|off[,id=id]" in out, out


def test_hmp_set_keepalive_rejects_bad_arguments(qemu_bin):
    out = _hmp(qemu_bin, ["set-keepalive on,token=not-a-uuid", "set-keepalive maybe",
                          "set-keepalive on,token=%s,colour=red" % GOOD_TOKEN,
                          "set-keepalive on,token=%s" % GOOD_TOKEN])
    assert "keepalive token 'not-a-uuid' is not a UUID" in out, out
    assert "expects 'on' or 'off'" in out and "unknown parameter 'colour'" in out, out
    # a good token, but -machine none has no vfio-pci device
    assert "no vfio-pci device to keep alive" in out, out


def test_qmp_command_exists(qemu_bin):
    (cmds,) = _qmp(qemu_bin, [{"execute": "query-commands"}])
    assert "x-set-keepalive" in {c["name"] for c in cmds["return"]}


@pytest.mark.parametrize("token", BAD_TOKENS)
def test_qmp_rejects_malformed_token(qemu_bin, token):
    (a,) = _qmp(qemu_bin, [{"execute": "x-set-keepalive",
                            "arguments": {"enable": True, "token": token}}])
    assert a["error"]["class"] == "GenericError"
    desc = a["error"]["desc"]
    assert "is not a UUID" in desc or "nil UUID" in desc, desc


def test_qmp_argument_rules(qemu_bin):
    no_token, off_token, no_dev, no_id = _qmp(qemu_bin, [
        {"execute": "x-set-keepalive", "arguments": {"enable": True}},
        {"execute": "x-set-keepalive", "arguments": {"enable": False, "token": GOOD_TOKEN}},
        {"execute": "x-set-keepalive", "arguments": {"enable": True, "token": GOOD_TOKEN}},
        {"execute": "x-set-keepalive", "arguments": {"enable": False, "id": "nic0"}},
    ])
    assert "needs the owner's token" in no_token["error"]["desc"]
    assert "no token is needed" in off_token["error"]["desc"]
    assert "no vfio-pci device to keep alive" in no_dev["error"]["desc"]
    assert "no vfio-pci device with id 'nic0'" in no_id["error"]["desc"]


def test_vfio_pci_lists_keepalive_token(qemu_bin):
    r = subprocess.run([qemu_bin, "-device", "vfio-pci,help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "keepalive_token=<str>" in r.stdout, r.stdout
