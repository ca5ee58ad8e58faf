"""Golden vectors are pinned: any change to the encoding or the JSON view is noticed."""

import json
import os

import pytest

from handover.formats.codec import decode
from handover.render import state_dict
from tests.vectors import make_vectors

HERE = os.path.dirname(make_vectors.__file__)


@pytest.mark.parametrize("name", sorted(make_vectors.produce()))
def test_vector_is_what_the_code_produces(name):
    with open(os.path.join(HERE, name), "rb") as f:
        committed = f.read()
    assert committed == make_vectors.produce()[name], f"{name} changed: regenerate and review"


@pytest.mark.parametrize("stem", sorted(make_vectors.VECTORS))
def test_committed_blob_decodes_to_committed_json(stem):
    with open(os.path.join(HERE, stem + ".bin"), "rb") as f:
        st = decode(f.read())
    with open(os.path.join(HERE, stem + ".json")) as f:
        expected = json.load(f)
    assert json.loads(json.dumps(state_dict(st))) == expected
    assert f"{st.version[0]}.{st.version[1]}" == stem.split("-")[1]
