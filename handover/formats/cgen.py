# handover: formats/cgen.py
"""Generate the C header of the format from the construct definitions.

    python -m handover.formats.cgen [--check] [OUT]

writes kernel-patches/src/include/linux/handover_format.h (default). ``--check`` exits 1 if the
committed header differs from what the definitions produce (CI runs it). The header compiles
in the kernel (``__KERNEL__``) and in freestanding user space (only <stdint.h>/<stddef.h>).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import textwrap

from . import enums as E
from .mpcheck import MSGPACK_MAX_DEPTH
from .structs import (
    FORMAT_MAJOR,
    FORMAT_MINOR,
    HEADER_CRC_OFFSET,
    HEADER_SIZE,
    MAGIC,
    MAX_BLOB_SIZE,
    MAX_SECTIONS,
    READ_MAJOR,
    RECORD_SPECS,
    SEC_F_ABSENT,
    SEC_F_REQUIRED,
    SECTION_ALIGN,
    SECTION_ENTRY_SIZE,
    FileHeader,
    SectionEntry,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(ROOT, "kernel-patches", "src", "include", "linux", "handover_format.h")
REGION_OUT = os.path.join(os.path.dirname(DEFAULT_OUT), "handover_region.h")

_CTYPE = {1: "__u8", 2: "__u16", 4: "__u32", 8: "__u64"}


def _fields(struct_):
    """(name or None for padding, C declaration, size, comment) for each subcon."""
    out = []
    for sc in struct_.subcons:
        size = sc.sizeof()
        name = sc.name
        inner = getattr(sc, "subcon", None)
        is_bytes = (type(inner).__name__ in ("Bytes", "Const") or type(sc).__name__ == "Bytes")
        out.append((name, size, is_bytes))
    return out


@functools.lru_cache(maxsize=1)
def _structs_source() -> str:
    with open(os.path.join(os.path.dirname(__file__), "structs.py")) as f:
        return f.read()


def _comments(block_start: str) -> dict[str, str]:
    """Field comments of one definition in structs.py (kernel names and bits)."""
    src = _structs_source()
    i = src.index(block_start)
    j = src.find("\n)\n", i)
    block = src[i:j if j > 0 else None]
    out: dict[str, str] = {}
    for m in re.finditer(r'"(\w+)" / [\w()]+,\s+# (.*)((?:\n\s+# .*)*)', block):
        extra = " ".join(x.strip().lstrip("# ") for x in m.group(3).splitlines() if x.strip())
        text = re.sub(r"^\+\d+\s+", "", m.group(2).strip())
        out.setdefault(m.group(1), text + (" " + extra if extra else ""))
    return out


#: the kernel's line limit (checkpatch): a field whose comment would pass it gets the
#: comment on the lines above it
LINE_MAX = 100


def _field_c(decl: str, off: int, comment: str) -> list[str]:
    """A struct member with its offset and comment, within LINE_MAX columns (tab = 8)."""
    one = f"\t{decl};{'':<8}/* +{off} {comment} */" if comment else f"\t{decl};{'':<8}/* +{off} */"
    if len(one.expandtabs(8)) <= LINE_MAX:
        return [one]
    above = textwrap.wrap(comment, LINE_MAX - 8 - 6)  # tab, '/* ', ' */'
    if len(above) == 1:
        return [f"\t/* {above[0]} */", f"\t{decl};{'':<8}/* +{off} */"]
    return (["\t/*"] + [f"\t * {w}" for w in above] + ["\t */"]
            + [f"\t{decl};{'':<8}/* +{off} */"])


def _struct_c(cname: str, struct_, comments: dict, doc: str) -> list[str]:
    lines = [f"/* {doc} */", f"struct {cname} {{"]
    off = 0
    npad = 0
    for name, size, is_bytes in _fields(struct_):
        if name is None:
            lines.append(f"\t__u8 __pad{npad}[{size}];{'':<20}/* +{off} */")
            npad += 1
        elif is_bytes:
            lines += _field_c(f"__u8 {name}[{size}]", off, comments.get(name, ""))
        else:
            lines += _field_c(f"{_CTYPE[size]} {name}", off, comments.get(name, ""))
        off += size
    lines.append("} __packed;")
    lines.append("")
    lines.append(f"static_assert(sizeof(struct {cname}) == {off}, \"{cname} size\");")
    return lines


def _offsets(prefix: str, struct_) -> list[str]:
    out, off = [], 0
    for name, size, _b in _fields(struct_):
        if name is not None:
            out.append(f"#define {prefix}_OFF_{name.upper().rstrip('_')} {off}")
        off += size
    return out


def _flags(prefix: str, table: dict[int, str]) -> list[str]:
    return [f"#define {prefix}_{n.upper().replace('-', '_')} (1u << {b})" for b, n in sorted(table.items())]


def _key_cmp(spec) -> list[str]:
    """int ho_<rec>_key_cmp(a, b): the order the decoder enforces on records."""
    fname = f"ho_{spec.name}_key_cmp"
    lines = [f"static inline int {fname}(const __u8 *a, const __u8 *b)", "{"]
    if spec.name == "irte":
        lines.append("\t/* IRTE records are ordered by their first 64-bit word:"
                     " unit << 32 | index (padding zero) */")
        lines.append("\treturn ho_cmp_u64(ho_get_le64(a), ho_get_le64(b));")
    else:
        offs, off = {}, 0
        for name, size, _b in _fields(spec.struct_):
            if name is not None:
                offs[name] = (off, size)
            off += size
        lines.append("\tint c;\n")
        for k in spec.key:
            o, size = offs[k]
            lines.append(f"\tc = ho_cmp_u64(ho_get_le{size * 8}(a + {o}), ho_get_le{size * 8}(b + {o}));")
            lines.append("\tif (c)\n\t\treturn c;")
        lines.append("\treturn 0;")
    lines.append("}")
    return lines


def generate() -> str:
    L: list[str] = []
    a = L.append
    a("/* SPDX-License-Identifier: GPL-2.0-only OR MIT */")
    a("/*")
    a(" * handover_format.h - the handover keepalive state format, as C.")
    a(" *")
    a(" * GENERATED by `python -m handover.formats.cgen` from handover/formats/structs.py")
    a(" * and enums.py (the construct definitions are the single source of truth). Do not")
    a(" * edit: change the definitions and regenerate; CI checks that this file is current.")
    a(" *")
    a(" * All multi-byte fields are little-endian. Read records with the ho_get_le*() helpers")
    a(" * (or le*_to_cpu in the kernel) at the HO_<REC>_OFF_* offsets; the packed structs")
    a(" * document the layout and pin it with static size asserts.")
    a(" */")
    a("#ifndef _HANDOVER_FORMAT_H")
    a("#define _HANDOVER_FORMAT_H")
    a("")
    a("#ifdef __KERNEL__")
    a("#include <linux/build_bug.h>\n#include <linux/types.h>")
    a("#else")
    a("#include <assert.h>\n#include <stddef.h>\n#include <linux/types.h>")
    a("#endif")
    a("")
    magic = "".join(f"\\x{b:02x}" if not (32 <= b < 127) else chr(b) for b in MAGIC)
    a(f'#define HO_MAGIC "{magic}"')
    a(f"#define HO_MAGIC_LEN {len(MAGIC)}")
    a(f"#define HO_FORMAT_MAJOR {FORMAT_MAJOR}\t/* the major this header describes */")
    a(f"#define HO_FORMAT_MINOR {FORMAT_MINOR}\t/* the newest minor it describes */")
    a(f"#define HO_READ_MAJOR {READ_MAJOR}")
    a(f"#define HO_HEADER_SIZE {HEADER_SIZE}")
    a(f"#define HO_HEADER_CRC_OFFSET {HEADER_CRC_OFFSET}")
    a(f"#define HO_SECTION_ENTRY_SIZE {SECTION_ENTRY_SIZE}")
    a(f"#define HO_SECTION_ALIGN {SECTION_ALIGN}")
    a(f"#define HO_MAX_SECTIONS {MAX_SECTIONS}")
    a(f"#define HO_MAX_BLOB_SIZE {MAX_BLOB_SIZE}ULL")
    a(f"#define HO_MSGPACK_MAX_DEPTH {MSGPACK_MAX_DEPTH}")
    a("#define HO_NOSTATE_PROBE 4096\t/* a source whose first 4 KiB are zero holds no state */")
    a("")
    a("/* CRC32C (Castagnoli): reflected polynomial, init and xorout 0xffffffff */")
    a("#define HO_CRC32C_POLY 0x82f63b78u")
    a("#define HO_CRC32C_CHECK 0xe3069283u\t/* crc of \"123456789\" */")
    a("")
    a("/* section flags */")
    a(f"#define HO_SEC_F_REQUIRED {SEC_F_REQUIRED}u\t/* a reader that does not know the type must refuse */")
    a(f"#define HO_SEC_F_ABSENT {SEC_F_ABSENT}u\t/* the writer could not capture this item */")
    a("")
    a("enum ho_section_type {")
    for t in E.SectionType:
        attr, spec, since, _f = E.SECTION_LAYOUT[t]
        kind = f"struct ho_{spec}" if spec else "bytes"
        a(f"\tHO_SEC_{t.name} = {int(t)},\t/* {attr}: {kind}, since 1.{since} */")
    a("};")
    a("")
    a("/* decoder verdicts: the Python decoder raises the same codes (HandoverError.code) */")
    a("enum ho_error {")
    for e in E.ErrorCode:
        a(f"\tHO_{'E_' if e.value else ''}{e.name} = {e.value},")
    a("};")
    a("")
    a("#define HO_ERROR_NAMES { \\")
    a(" \\\n".join(f'\t[{e.value}] = "{e.name}",' for e in E.ErrorCode) + " \\")
    a("}")
    a("")
    a("/* flag bits and kinds (handover/formats/enums.py) */")
    L += _flags("HO_UNIT_F", E.UNIT_FLAGS)
    L += _flags("HO_UNIT_P", E.UNIT_PRESENT)
    L += _flags("HO_DOM_F", E.DOMAIN_FLAGS)
    L += _flags("HO_CTX_F", E.CONTEXT_FLAGS)
    L += _flags("HO_VEC_F", E.VECTOR_FLAGS)
    L += _flags("HO_BAR_F", E.BAR_FLAGS)
    L += _flags("HO_DEV_F", E.DEVICE_FLAGS)
    for v, n in sorted(E.VECTOR_KIND.items()):
        a(f"#define HO_VEC_{n.upper().replace('-', '')} {v}")
    for v, n in sorted(E.RESERVED_KIND.items()):
        a(f"#define HO_RES_{n.upper().replace('-', '_')} {v}")
    a("#define HO_DOMAIN_TT_SCALABLE 0x80")
    a("#define HO_NONE16 0xffffu")
    a("#define HO_NONE32 0xffffffffu")
    a("")
    L += _struct_c("ho_header", FileHeader, _comments("FileHeader = Struct("), "file header, at offset 0")
    L += _offsets("HO_HDR", FileHeader)
    a("")
    L += _struct_c("ho_section_entry", SectionEntry, _comments("SectionEntry = Struct("),
                   "section table entry, from offset 64")
    L += _offsets("HO_SEC", SectionEntry)
    a("")
    for spec in RECORD_SPECS.values():
        since = ", ".join(f"{f} since 1.{m}" for f, m in spec.since.items())
        L += _struct_c(f"ho_{spec.name}", spec.struct_, _comments(f'RecordSpec(\n    "{spec.name}",'),
                       f"{spec.name} record, key ({', '.join(spec.key)})" + (f"; {since}" if since else ""))
        up = spec.name.upper()
        a(f"#define HO_{up}_SIZE {spec.size}")
        a(f"#define HO_{up}_MIN_SIZE {spec.min_size}\t/* as written by format 1.0 */")
        L += _offsets(f"HO_{up}", spec.struct_)
        a("")
    a("/* little-endian accessors (no alignment assumptions) */")
    for bits in (8, 16, 32, 64):
        n = bits // 8
        terms = [f"(__u{bits})p[{i}] << {8 * i}" if i else f"(__u{bits})p[0]" for i in range(n)]
        expr = " |\n\t       ".join(" | ".join(terms[i:i + 4]) for i in range(0, n, 4))
        a(f"static inline __u{bits} ho_get_le{bits}(const __u8 *p)\n{{\n\treturn {expr};\n}}\n")
    a("static inline int ho_cmp_u64(__u64 a, __u64 b)\n{\n\treturn a < b ? -1 : a > b;\n}")
    a("")
    a("/* record order the decoder enforces (strictly increasing by key) */")
    for i, spec in enumerate(RECORD_SPECS.values()):
        L += ([""] if i else []) + _key_cmp(spec)
    a("")
    a("/* section type -> record size for 1.x (0: byte section; -1: unknown) */")
    a("static inline int ho_record_size(unsigned int type, int min)\n{\n\tswitch (type) {")
    for t in E.SectionType:
        attr, spec, _s, _f = E.SECTION_LAYOUT[t]
        if spec:
            up = spec.upper()
            a(f"\tcase HO_SEC_{t.name}:\n\t\treturn min ? HO_{up}_MIN_SIZE : HO_{up}_SIZE;")
        else:
            a(f"\tcase HO_SEC_{t.name}:\n\t\treturn 0;")
    a("\tdefault:\n\t\treturn -1;\n\t}\n}")
    a("")
    a("#endif /* _HANDOVER_FORMAT_H */")
    return "\n".join(L) + "\n"


def generate_region() -> str:
    """handover_region.h: the persistent-memory region layout (formats/region.py) as C."""
    from . import region as R

    L: list[str] = []
    a = L.append
    a("/* SPDX-License-Identifier: GPL-2.0-only OR MIT */")
    a("/*")
    a(" * handover_region.h - the layout of a handover persistent-memory region, as C.")
    a(" *")
    a(" * GENERATED by `python -m handover.formats.cgen` from handover/formats/region.py (the")
    a(" * construct definitions are the single source of truth). Do not edit: change the")
    a(" * definitions and regenerate; CI checks that this file is current.")
    a(" *")
    a(" * Two header copies (HO_REGION_HDR_SIZE bytes each, at HO_REGION_HDR_BLOCK * copy),")
    a(" * each with its CRC32C of bytes [0, HO_REGION_HDR_CRC_LEN); two slot descriptors per")
    a(" * copy. Read fields with ho_get_le*() at the HO_REGION_HDR_OFF_* and")
    a(" * HO_REGION_SLOT_OFF_* offsets; a slot's blob is at region start + slot offset.")
    a(" */")
    a("#ifndef _HANDOVER_REGION_H")
    a("#define _HANDOVER_REGION_H")
    a("")
    a("#include \"handover_format.h\"")
    a("")
    a(f"#define HO_REGION_MAGIC \"{R.REGION_MAGIC.decode()}\"")
    a(f"#define HO_REGION_MAGIC_LEN {len(R.REGION_MAGIC)}")
    a(f"#define HO_REGION_LAYOUT_MAJOR {R.LAYOUT_MAJOR}\t/* a reader refuses another major */")
    a(f"#define HO_REGION_LAYOUT_MINOR {R.LAYOUT_MINOR}")
    a(f"#define HO_REGION_HDR_SIZE {R.HEADER_SIZE}")
    a(f"#define HO_REGION_HDR_BLOCK {R.HEADER_BLOCK}\t/* copy n starts at n * this */")
    a(f"#define HO_REGION_HDR_COPIES {len(R.HEADER_OFFSETS)}")
    a(f"#define HO_REGION_HDR_CRC_LEN {R.CRC_OFFSET}")
    a(f"#define HO_REGION_DATA_START {R.DATA_START}")
    nslots = R.HeaderBody.subcons[[c.name for c in R.HeaderBody.subcons].index("slot")].count
    a(f"#define HO_REGION_SLOTS {nslots}")
    a(f"#define HO_REGION_SLOT_SIZE {R.SlotDesc.sizeof()}")
    a(f"#define HO_REGION_NO_SLOT {R.NO_SLOT:#x}u")
    a("")
    a("/* one slot descriptor; generation 0 = empty */")
    L += _offsets("HO_REGION_SLOT", R.SlotDesc)
    a("")
    a("/* one header copy (the slot descriptors at HO_REGION_HDR_OFF_SLOT) */")
    off = 0
    for sc in R.HeaderBody.subcons:
        name = sc.name or "reserved"
        a(f"#define HO_REGION_HDR_OFF_{name.upper()} {off}")
        off += sc.sizeof()
    a(f"#define HO_REGION_HDR_OFF_HDR_CRC {off}")
    a(f"static_assert(HO_REGION_HDR_OFF_HDR_CRC + 4 == HO_REGION_HDR_SIZE, \"region header size\");")
    a(f"static_assert(HO_REGION_HDR_OFF_SLOT + HO_REGION_SLOTS * HO_REGION_SLOT_SIZE <=\n"
      f"\t      HO_REGION_HDR_CRC_LEN, \"region slots\");")
    a("")
    a("#endif /* _HANDOVER_REGION_H */")
    return "\n".join(L) + "\n"


def _write_or_check(out: str, text: str, check: bool) -> int:
    if check:
        try:
            cur = open(out).read()
        except FileNotFoundError:
            cur = None
        if cur != text:
            print(f"{out} is not current: run python -m handover.formats.cgen", file=sys.stderr)
            return 1
        return 0
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    """Write (or --check) the state format header [OUT] and the region layout header beside it."""
    check = "--check" in argv
    paths = [x for x in argv if not x.startswith("--")]
    out = paths[0] if paths else DEFAULT_OUT
    rc = _write_or_check(out, generate(), check)
    rout = os.path.join(os.path.dirname(out), os.path.basename(REGION_OUT))
    return rc | _write_or_check(rout, generate_region(), check)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
