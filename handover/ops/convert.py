"""Use case ``convert``: re-encode a saved state into a blob file (e.g. an older minor).

The header generation of the new blob is the source's header generation (checked by its
CRC), never META's ``generation``: META is msgpack anyone could have written."""

from __future__ import annotations

import os

from ..errors import HandoverError
from ..util import write_new_file


def convert(source: str, output: str, *, generation: int | None = None,
            minor: int | None = None, force: bool = False) -> dict:
    from ..formats.codec import encode
    from ..formats.structs import FORMAT_MINOR
    from . import source as src

    loaded = src.load(source, generation)
    st = loaded.state
    if os.path.exists(output) and loaded.info.get("path") not in (None, "-") \
            and os.path.samefile(output, loaded.info["path"]):
        raise HandoverError(f"{output}: is the SOURCE itself")
    blob = encode(st, generation=st.generation, **({} if minor is None else {"minor": minor}))
    write_new_file(output, blob, force)
    fmt_minor = FORMAT_MINOR if minor is None else minor
    return {"output": os.path.abspath(output), "size": len(blob), "generation": st.generation,
            "format": f"{st.version[0]}.{fmt_minor}", "source": loaded.info}
