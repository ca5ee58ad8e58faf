"""The guest kernel: Debian's stock ``linux-image-6.12.N+deb12-amd64``, downloaded with
apt-get and unpacked with dpkg (never installed), and the :class:`Kernel` record of a kernel
tree (that one, or a self-built one laid out the same way)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path

from .base import LabError, LabUnavailable, Step, apt_env, run
from .config import GUEST_MODULES, cache_dir


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A kernel tree: ``boot/vmlinuz-<version>``, ``boot/config-<version>`` and
    ``lib/modules/<version>`` (with modules.dep) under ``root``. A tree that only carries
    modules (``run_guest(extra_kernels=...)``) needs no vmlinuz."""

    version: str          # uname -r, e.g. "6.12.117+deb12-amd64"
    root: Path            # dpkg -x tree

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def config(self) -> Path:
        return self.root / "boot" / f"config-{self.version}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version


def kver_key(v: str):
    """Sort key of a kernel release ("6.12.117+deb12-amd64" after "6.12.9+deb12-amd64")."""
    return [int(x) if x.isdigit() else x for x in re.split(r"[.+-]", v)]


def fetch_kernel(version: str | None = None) -> Kernel:
    """Return the cached Debian 6.12 kernel, downloading it (apt-get download + dpkg -x) if needed.

    ``version`` (or env HANDOVER_LAB_KERNEL) pins ``6.12.N+deb12-amd64``; otherwise the newest
    already cached is used, and if none is, the newest that apt-cache knows.
    """
    version = version or os.environ.get("HANDOVER_LAB_KERNEL")
    kroot = cache_dir() / "kernel"
    kroot.mkdir(exist_ok=True)
    if not version:
        cached = [p.name for p in kroot.iterdir() if (p / ".complete").exists()]
        if cached:
            version = max(cached, key=kver_key)
    if not version:
        pat = r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$"
        out = run(["apt-cache", "search", pat], capture_output=True, text=True).stdout
        if not out.strip():
            run(["apt-get", "update", "-q"], env=apt_env(), capture_output=True)
            out = run(["apt-cache", "search", pat], capture_output=True, text=True).stdout
        names = [ln.split()[0] for ln in out.splitlines() if ln.strip()]
        if not names:
            raise LabUnavailable("apt-cache knows no linux-image-6.12.N+deb12-amd64")
        version = max((n[len("linux-image-"):] for n in names), key=kver_key)
    k = Kernel(version, kroot / version)
    if (k.root / ".complete").exists():
        return k
    with Step(f"fetch kernel {version}"):
        shutil.rmtree(k.root, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=kroot) as td:
            os.chmod(td, 0o755)  # so that _apt can write into it
            run(["apt-get", "download", "-q", f"linux-image-{version}"], cwd=td,
                env=apt_env(), capture_output=True)
            debs = list(Path(td).glob("*.deb"))
            if not debs:
                raise LabUnavailable(f"apt-get download linux-image-{version} gave no .deb")
            run(["dpkg-deb", "-x", str(debs[0]), str(k.root)])
        if not k.vmlinuz.exists():
            raise LabError(f"{k.vmlinuz} missing after dpkg -x")
        # the .deb ships no modules.dep (postinst runs depmod); make one for this tree
        run(["depmod", "-b", str(k.root), version], capture_output=True)
        (k.root / ".complete").write_text(version + "\n")
    return k


def module_closure(k: Kernel, names) -> list[str]:
    """Module paths (relative to modules dir, as in modules.dep) for ``names`` plus deps,
    dependencies first. A name listed in modules.builtin is skipped."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for ln in (k.modules / "modules.dep").read_text().splitlines():
        mod, _, rest = ln.partition(":")
        deps[mod] = rest.split()
        base = os.path.basename(mod).split(".ko")[0].replace("-", "_")
        by_name[base] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for d in deps.get(mod, []):
            visit(d)
        order.append(mod)

    builtin = (k.modules / "modules.builtin").read_text() if (k.modules / "modules.builtin").exists() else ""
    for n in names:
        n = n.replace("-", "_")
        if n not in by_name:
            if f"/{n}.ko" in builtin:
                continue
            raise LabError(f"kernel module {n} not found in {k.version}")
        visit(by_name[n])
    return order


def module_names(k: Kernel) -> list[str]:
    """Names (as in /proc/modules) of the loadable modules the guest loads for ``k``."""
    return [os.path.basename(m).split(".ko")[0].replace("-", "_")
            for m in module_closure(k, GUEST_MODULES)]
