"""The kernel series as a maintainer receives it: every patch compiles on its own, in series
order, and checkpatch.pl --strict finds no error in any of them.

Own command with the kernel tests (``make test-kernel``, marker ``kernel``): it needs the
unpacked linux-source-6.12 tree that ``make kernel`` prepares (tools/kernel.py), and
compiles in a worktree and build directory of its own (the builds are not touched).
"""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.system, pytest.mark.kernel]


@pytest.fixture(scope="module")
def kernel():
    from tools import kernel as k

    if not os.path.isdir(os.path.join(k.TREE, ".git")) and os.environ.get("HANDOVER_BUILD_KERNEL") != "1":
        pytest.skip("no kernel tree: make kernel, or make test-kernel")
    return k


def test_checkpatch_finds_no_error(kernel):
    res = kernel.checkpatch()
    assert len(res) == len(kernel.series())
    for name, (errors, warnings, checks) in res.items():
        print(f"  {name}: {errors} errors, {warnings} warnings, {checks} checks")
    assert not {n: v for n, v in res.items() if v[0]}


@pytest.mark.parametrize("config", ["lab", "debian"])
def test_every_patch_compiles_alone(kernel, config):
    if not os.path.exists(os.path.join(kernel.build_dir(config), ".config")) and \
            os.environ.get("HANDOVER_BUILD_KERNEL") != "1":
        pytest.skip(f"the {config} configuration is not set up: python tools/kernel.py build --config {config}")
    res = kernel.check_series(os.cpu_count() or 2, config)
    for r in res:
        print(f"  {r['patch']}: {'ok' if r['ok'] else 'FAILS'} ({len(r['objects'])} objects, {r['seconds']} s)")
    bad = [r for r in res if not r["ok"]]
    assert not bad, bad[0].get("log_tail", "")
    assert [r["patch"] for r in res] == [os.path.basename(p) for p in kernel.series()]
    # the objects of the last patch cover every C file the series touches
    assert "lib/handover/owner.o" in res[-1]["objects"]
    assert "drivers/vfio/pci/vfio_pci_core.o" in res[-1]["objects"]
