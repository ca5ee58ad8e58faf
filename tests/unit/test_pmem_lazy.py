"""handover.pmem imports its submodules on first use: ``import handover.pmem`` stays cheap
(no construct, no ctypes), and every public name and function still works."""

import subprocess
import sys

import pytest

import handover.pmem as pmem


def test_import_is_cheap():
    code = ("import sys, handover.pmem; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'construct', 'ctypes', 'click'}), "
            "sorted(m for m in sys.modules if m.startswith('handover.pmem.')))")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[] []", r.stdout + r.stderr


def test_lazy_pmem_package_functions_in_a_fresh_process(tmp_path):
    """Each public function of handover.pmem works in a process where nothing else imported
    the submodules first (a name the package no longer imports at the top would fail)."""
    code = f"""
import sys, handover.pmem as pmem
which = sys.argv[1]
p = {str(tmp_path / 'r.img')!r}
if which != "init":
    pmem.init(p, size=1 << 20)
if which == "commit":
    print(pmem.commit(p, b"x").generation)
elif which == "read_latest":
    pmem.commit(p, b"x")
    print(pmem.read_latest(p).blob)
elif which == "status":
    print(pmem.status(p)["initialized"])
elif which == "wipe":
    print(pmem.wipe(p) >= 0)
elif which == "probe":
    print(pmem.probe(p))
elif which == "init":
    print(pmem.init(p, size=1 << 20)["created"])
elif which == "list_regions":
    print(isinstance(pmem.list_regions(), list))
"""
    for which, want in (("init", "True"), ("commit", "1"), ("read_latest", "b'x'"),
                        ("status", "True"), ("wipe", "True"), ("probe", "True"),
                        ("list_regions", "True")):
        (tmp_path / "r.img").unlink(missing_ok=True)
        r = subprocess.run([sys.executable, "-c", code, which], capture_output=True, text=True)
        assert (r.returncode, r.stdout.strip()) == (0, want), (which, r.stderr[-2000:])


def test_lazy_pmem_package_keeps_its_names():
    from handover.pmem import kinds, protocol
    assert pmem.RegionError is kinds.RegionError and pmem.open_region is protocol.open_region
    assert {"commit", "Region", "HEADER_SIZE", "protocol"} <= set(dir(pmem))
    with pytest.raises(AttributeError):
        pmem.no_such_name    # noqa: B018
