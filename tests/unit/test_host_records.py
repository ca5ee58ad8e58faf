"""The host's typed records (handover.host.base) and the outputs built from them.

The JSON outputs of the commands that read a host, on every captured tree, are pinned
(tests/captured_outputs.py, tests/fixtures/captured-outputs.json): the records may change
shape, what the tool prints and saves may not.
"""

import json

import pytest

from tests import captured_outputs


@pytest.fixture(scope="module")
def golden():
    with open(captured_outputs.GOLDEN) as f:
        return json.load(f)


@pytest.mark.parametrize("tree", captured_outputs.trees())
def test_outputs_on_captured_tree_are_unchanged(tree, golden):
    now = json.loads(json.dumps(captured_outputs.outputs(tree)))
    assert tree in golden, "a new captured tree: python -m tests.captured_outputs"
    for key in sorted(set(now) | set(golden[tree])):
        assert now.get(key) == golden[tree].get(key), f"{tree}: {key} changed"
    # key order too (the provenance of the capture manifest is written in note order)
    assert json.dumps(now) == json.dumps(golden[tree]), f"{tree}: the order of keys changed"
