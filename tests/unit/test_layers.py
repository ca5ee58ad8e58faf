"""The layering rules of handover/ (README "Python layout"), checked on the source: every
import (module level or inside a function) is read with ``ast``.

    errors, util  <  formats (+ synth)  <  pmem  <  host  <  ops  <  render  <  cli

A module may import its own package and the layers below it, never one above; click only
in cli/; no module imports another module's private name; the import graph between modules
has no cycle.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "handover"

# layer of each top-level part of the package; a part may import parts of a lower layer
LAYER = {"handover": 0, "errors": 0, "util": 0, "formats": 1, "synth": 2, "pmem": 2,
         "host": 3, "ops": 4, "render": 5, "cli": 6, "__main__": 7, "initramfs": 0,
         "schemas": 0}
# what each part may import beyond its own part (the rules, exactly)
ALLOWED = {
    "errors": set(), "util": {"errors"}, "handover": set(), "initramfs": set(), "schemas": set(),
    "formats": {"errors"},
    "synth": {"errors", "formats"},
    "pmem": {"errors", "formats"},
}


def modules():
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), p


def imports(name: str, path: Path):
    """(imported module, imported names, line) of every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [a.name for a in node.names]
            if node.module is None:   # from . import x: x is a module, or a name of the package
                for n in names:
                    if f"{mod}.{n}" in ALL:
                        yield f"{mod}.{n}", [], node.lineno
                    else:
                        yield mod, [n], node.lineno
            else:
                yield mod, names, node.lineno


def part(mod: str) -> str:
    bits = mod.split(".")
    return bits[1] if len(bits) > 1 else "handover"


ALL = dict(modules())


def ours(mod: str) -> str | None:
    """The module of the package that ``mod`` names (a name imported from a package may
    be a submodule)."""
    while mod and mod not in ALL:
        mod = mod.rsplit(".", 1)[0] if "." in mod else ""
    return mod or None


def test_every_part_has_a_layer():
    assert {part(m) for m in ALL} <= set(LAYER)


@pytest.mark.parametrize("name", sorted(ALL))
def test_no_upward_import_and_click_only_in_cli(name):
    me = part(name)
    bad = []
    for mod, names, line in imports(name, ALL[name]):
        if mod.split(".")[0] == "click" and me != "cli":
            bad.append(f"line {line}: click outside cli/")
        if not mod.startswith("handover"):
            continue
        target = part(mod)
        if target == me:
            continue
        if me in ALLOWED:
            if target not in ALLOWED[me]:
                bad.append(f"line {line}: {me} imports {mod} (allowed: {sorted(ALLOWED[me])})")
        elif LAYER[target] >= LAYER[me] and target != "handover":
            bad.append(f"line {line}: {me} (layer {LAYER[me]}) imports {mod} "
                       f"(layer {LAYER[target]})")
    assert not bad, f"{name}: " + "; ".join(bad)


@pytest.mark.parametrize("name", sorted(ALL))
def test_no_private_names_across_modules(name):
    bad = [f"line {line}: {n} from {mod}" for mod, names, line in imports(name, ALL[name])
           if mod.startswith("handover") and ours(mod) != name
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, f"{name}: " + "; ".join(bad)


def test_cli_modules_import_only_common():
    for name in ALL:
        if part(name) != "cli" or name in ("handover.cli.common",):
            continue
        for mod, _names, line in imports(name, ALL[name]):
            if mod.startswith("handover.cli") and mod not in ("handover.cli.common",):
                if name == "handover.cli" and mod.startswith("handover.cli."):
                    continue   # the group registers the command modules by name
                pytest.fail(f"{name} line {line} imports {mod}")


def test_no_import_cycle_between_modules():
    graph = {n: set() for n in ALL}
    for name, path in ALL.items():
        for mod, names, _line in imports(name, path):
            if not mod.startswith("handover"):
                continue
            targets = {ours(mod)} | {ours(f"{mod}.{n}") for n in names}
            for t in targets - {None, name}:
                # importing a submodule runs its package's __init__ too; the package
                # __init__ importing its own submodules is not an edge back
                if not (name.startswith(t + ".") and t != "handover"):
                    graph[name].add(t)
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_only_host_reads_sys_proc_dev():
    """/sys, /proc and /dev paths appear in host/ (and in pmem/, which opens the region
    devices and reads their sysfs attributes) only; everything else goes through them."""
    import re

    pat = re.compile(r"""["'](/sys|/proc|/dev)/""")
    bad = []
    for name, path in ALL.items():
        if part(name) in ("host", "pmem", "initramfs"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pat.search(code) and "open(" in code:
                bad.append(f"{name}:{n}")
    assert not bad, bad


def test_what_the_system_tests_and_tools_import_still_imports():
    """Modules moved by the layering keep their old names where tests/system, tools/ or
    benchmarks/ import them (they belong to others; a move must not break them)."""
    import importlib
    import importlib.util
    import re

    root = PKG.parent
    pat = re.compile(r"^\s*from (handover[\w.]*) import \(?([\w, ]+)", re.M)
    seen = 0
    for d in ("tests/system", "tools", "benchmarks"):
        for p in sorted((root / d).rglob("*.py")):
            for mod, names in pat.findall(p.read_text()):
                m = importlib.import_module(mod)
                for n in (x.strip().split(" as ")[0] for x in names.split(",")):
                    if n:
                        assert hasattr(m, n) or importlib.util.find_spec(f"{mod}.{n}"), \
                            f"{p.relative_to(root)}: from {mod} import {n}"
                        seen += 1
    assert seen > 10
