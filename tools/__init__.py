"""The repository's tools (run as scripts: ``python tools/kernel.py ...``). A package only so
that tests and benchmarks import them by name from the repository root (``from tools import
kernel``) instead of editing sys.path."""
