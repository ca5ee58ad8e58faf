"""A short libFuzzer run of the C parser (ASan + UBSan, checksums not enforced) in CI.

Longer runs: `make -C tests/c fuzz OUT=/tmp && /tmp/fuzz_parse -max_total_time=3600 corpus/`.
HANDOVER_FUZZ_SECONDS sets this run's length (default 20).
"""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed (make test installs it)")
def test_fuzz_parser_briefly(tmp_path):
    subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "tests", "c"), "fuzz", f"OUT={tmp_path}"],
                   check=True)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    vec = os.path.join(ROOT, "tests", "vectors")
    for name in os.listdir(vec):
        if name.endswith(".bin"):
            shutil.copy(os.path.join(vec, name), corpus)
    secs = os.environ.get("HANDOVER_FUZZ_SECONDS", "20")
    r = subprocess.run([str(tmp_path / "fuzz_parse"), f"-max_total_time={secs}", "-rss_limit_mb=1500",
                        f"-artifact_prefix={tmp_path}/",
                        "-print_final_stats=1", str(corpus)], capture_output=True, text=True,
                       timeout=int(secs) + 120)
    tail = r.stderr[-3000:]
    assert r.returncode == 0, tail
    assert "Done" in r.stderr and "ERROR" not in r.stderr, tail
    runs = [ln for ln in r.stderr.splitlines() if ln.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[0].split(":")[-1]) > 1000, tail


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed (make test installs it)")
def test_fuzz_regressions(tmp_path):
    """Inputs the fuzzer once crashed on (tests/c/regressions/) stay fixed."""
    subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "tests", "c"), "fuzz", f"OUT={tmp_path}"],
                   check=True)
    reg = os.path.join(ROOT, "tests", "c", "regressions")
    files = sorted(os.path.join(reg, n) for n in os.listdir(reg))
    assert files
    r = subprocess.run([str(tmp_path / "fuzz_parse"), *files], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
