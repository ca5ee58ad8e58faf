"""The documentation the tool generates: man pages current with the click definitions,
shell completion, and a README that names every command."""

import os
import re
import subprocess
import sys

from handover.cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_man_pages_are_current():
    r = subprocess.run([sys.executable, "tools/manpage.py", "docs/man", "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_bash_completion_script():
    env = dict(os.environ, _HANDOVER_COMPLETE="bash_source")
    r = subprocess.run([sys.executable, "-c", "from handover.cli import main; main(prog_name='handover')"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "_handover_completion" in r.stdout, r.stderr
    env = dict(os.environ, _HANDOVER_COMPLETE="bash_complete", COMP_WORDS="handover re",
               COMP_CWORD="1")
    r = subprocess.run([sys.executable, "-c", "from handover.cli import main; main(prog_name='handover')"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "plain,region" in r.stdout.split(), r.stdout


def test_readme_documents_every_command_and_exit_code():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    table = text[text.index("## Commands"):text.index("## Exit codes")]
    for name in COMMANDS:
        assert re.search(rf"`handover {re.escape(name)}\b", table), name
    for opt in ("--sysroot", "--token-file", "_HANDOVER_COMPLETE"):
        assert opt in text, opt
