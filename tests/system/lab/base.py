"""What every part of the lab shares: its exceptions, its log lines on stderr, timed steps,
subprocess helpers, and the host packages it installs with apt-get."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from .config import HOST_PACKAGES


class LabError(RuntimeError):
    """The lab itself failed (build, boot, guest script) in a way a test should report."""


class LabUnavailable(LabError):
    """The host cannot run the lab at all (QEMU cannot be installed)."""


class LabTimeout(LabError):
    """The guest did not finish in time and was killed."""


def log(msg: str) -> None:
    print(f"[lab] {msg}", file=sys.stderr, flush=True)


class Step:
    """Context manager that reports how long a step took (stderr) and records it."""

    def __init__(self, name: str, sink: dict | None = None):
        self.name, self.sink = name, sink

    def __enter__(self):
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        dt = time.monotonic() - self.t0
        if self.sink is not None:
            self.sink[self.name] = round(dt, 3)
        log(f"{self.name}: {dt:.2f} s")


def run(cmd, **kw) -> subprocess.CompletedProcess:
    """subprocess.run, check=True unless told otherwise."""
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def apt_env() -> dict:
    return dict(os.environ, DEBIAN_FRONTEND="noninteractive")


def ensure_host_packages(packages: dict | None = None) -> None:
    """apt-get install whatever of HOST_PACKAGES (or ``packages``, {package: a file it
    installs}) is missing.  Raises LabUnavailable."""
    packages = HOST_PACKAGES if packages is None else packages
    missing = [p for p, f in packages.items() if not os.path.exists(f)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise LabUnavailable(f"missing packages {missing} and cannot apt-get install them")
    with Step(f"apt-get install {' '.join(missing)}"):
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        r = subprocess.run(cmd, env=apt_env(), capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=apt_env(), capture_output=True)
            r = subprocess.run(cmd, env=apt_env(), capture_output=True, text=True)
    still = [p for p, f in packages.items() if not os.path.exists(f)]
    if still:
        raise LabUnavailable(f"apt-get could not install {still}: {r.stderr[-2000:]}")
