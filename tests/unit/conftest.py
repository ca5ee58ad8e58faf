"""Fixtures the unit tests share (test modules never import each other)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CDIR = os.path.join(ROOT, "tests", "c")


@pytest.fixture(scope="session")
def ho_check(tmp_path_factory):
    """tests/c's ho_check (the kernel's C parser in user space, with ASan/UBSan)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    out = tmp_path_factory.mktemp("c")
    subprocess.run(["make", "-s", "-C", CDIR, f"OUT={out}"], check=True)
    return str(out / "ho_check")
