"""Regenerate the golden vectors: python -m tests.vectors.make_vectors [--check]

Each vector is a synthetic host (handover.synth, fixed seed) encoded with the current
writer, plus the ``handover inspect --json`` view of it (without the "source" key).
``--check`` exits 1 if any committed file differs from what the code produces now: the
unit test does the same, so a change to the encoding cannot go unnoticed. After an
intended format change, regenerate, review the diff, and bump the format version.
"""

from __future__ import annotations

import json
import os
import sys

from handover.formats.codec import decode, encode
from handover.render import state_dict
from handover.synth import synth_state

HERE = os.path.dirname(os.path.abspath(__file__))

VECTORS = {
    # file stem: (profile, seed, generation, minor)
    "tiny-1.1": ("tiny", 1, 1, 1),
    "tiny-1.0": ("tiny", 1, 1, 0),
    "typical-1.1": ("typical", 1, 7, 1),
}


def produce() -> dict[str, bytes]:
    out = {}
    for stem, (profile, seed, gen, minor) in VECTORS.items():
        blob = encode(synth_state(profile, seed=seed, generation=gen), minor=minor)
        view = json.dumps(state_dict(decode(blob)), indent=1, sort_keys=True) + "\n"
        out[f"{stem}.bin"] = blob
        out[f"{stem}.json"] = view.encode()
    return out


def main(argv: list[str]) -> int:
    check = "--check" in argv
    bad = 0
    for name, data in produce().items():
        path = os.path.join(HERE, name)
        if check:
            with open(path, "rb") as f:
                if f.read() != data:
                    print(f"{name}: differs from the current encoder", file=sys.stderr)
                    bad = 1
        else:
            with open(path, "wb") as f:
                f.write(data)
            print(f"wrote {name} ({len(data)} bytes)", file=sys.stderr)
    return bad


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
