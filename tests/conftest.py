"""Fixtures every test directory shares. Test modules never import each other: what they
share is a fixture here, or a helper module (tests/elfwriter.py, tests/system/lab/,
tests/system/patched.py, ...). The repository's root is on sys.path without editing it:
``tests`` is a package, so pytest inserts the directory that holds it (its rootdir) before
importing this file; ``from tests.system import lab`` and ``from tools import kernel`` (tools/
is a package too) work in every test."""

import pytest


@pytest.fixture(scope="module", params=["lab", "debian"])
def patched(request):
    """The patched kernel of one build configuration, ``lab`` or ``debian`` (tools/kernel.py
    paths() + "release" and "run_guest", the run_guest arguments its phases need); skips
    when that configuration is not built (tests/system/patched.py, patched_kernel)."""
    from tests.system.patched import patched_kernel

    return patched_kernel(request.param)
