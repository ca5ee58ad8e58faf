# handover: formats/model.py
"""The in-memory model of a keepalive state.

Bulk tables stay packed: a ``Table`` holds its records as the bytes of the on-media layout
(one ``struct`` record after another) and makes named tuples only when asked. A full host
(8 x 65,536 IRTEs) therefore costs about its blob size in memory, not ~7x as Python objects,
and encoding a decoded state is a join plus a CRC.
"""

from __future__ import annotations

import functools
import operator
import struct
import sys
from array import array
from dataclasses import dataclass, field
from itertools import starmap
from typing import Any, Iterable, Iterator

from .enums import ITEMS, SECTION_LAYOUT
from .structs import RECORD_SPECS, RecordSpec

_ATTR_SPEC = {attr: RECORD_SPECS[spec] for attr, spec, _s, _f in SECTION_LAYOUT.values() if spec}


_BATCH = 512   # records per struct call when packing many


@functools.lru_cache(maxsize=None)
def _batch_pack(fmt: str, k: int):
    return struct.Struct(fmt[0] + fmt[1:] * k).pack


def _flatten(rows: list) -> list:
    """The fields of ``rows``, one row after another, in one list."""
    return functools.reduce(operator.iconcat, rows, [])


def _pack_rows(s: struct.Struct, rows: list) -> bytes:
    """The records of ``rows`` packed one after another: ``_BATCH`` records per call of one
    repeated struct (0.6x the time of one call per record for the largest tables). Each
    batch is a slice of ``rows`` flattened into one list by ``list += row`` per row (a C
    loop copying whole rows: ~0.8x the time of chaining the fields one by one). Every row
    must carry every field (the count is checked per batch: a short row is a struct.error)."""
    n = len(rows)
    if n < 2 * _BATCH:
        return b"".join(starmap(s.pack, rows))
    full = n - n % _BATCH
    pack = _batch_pack(s.format, _BATCH)
    parts = [pack(*_flatten(rows[i:i + _BATCH])) for i in range(0, full, _BATCH)]
    if full < n:
        parts.append(_batch_pack(s.format, n - full)(*_flatten(rows[full:])))
    return b"".join(parts)


class Table:
    """Fixed-size records of one type, kept packed."""

    __slots__ = ("spec", "buf", "wire_size")

    def __init__(self, spec: RecordSpec, buf: bytes = b"", wire_size: int | None = None):
        if len(buf) % spec.size:
            raise ValueError(f"{spec.name}: {len(buf)} bytes is not a multiple of {spec.size}")
        self.spec = spec
        self.buf = bytes(buf)
        # record size as found on media (decides which trailing fields were present)
        self.wire_size = spec.size if wire_size is None else wire_size

    @classmethod
    def from_rows(cls, spec: RecordSpec, rows: Iterable[tuple], *, presorted: bool = False) -> "Table":
        """Pack rows (tuples in field order, or dicts) sorted by the spec's key."""
        rows = rows if isinstance(rows, list) else list(rows)
        try:
            if rows and isinstance(rows[0], dict):
                raise TypeError("dict rows")
            return cls._pack(spec, rows, presorted)
        except (TypeError, KeyError, IndexError, struct.error):
            pass  # dicts among the rows: name their fields (the slow path)
        make = spec.tuple_type
        rows = [make(**r) if isinstance(r, dict) else r for r in rows]
        try:
            return cls._pack(spec, rows, presorted)
        except (TypeError, struct.error) as e:  # a value out of range for its field
            raise ValueError(f"{spec.name}: cannot pack record: {e}") from None

    @classmethod
    def _pack(cls, spec: RecordSpec, rows: list, presorted: bool) -> "Table":
        if not presorted:
            idx = [spec.fields.index(k) for k in spec.key]
            if len(idx) == 1:
                rows = sorted(rows, key=operator.itemgetter(idx[0]))
            else:
                rows = sorted(rows, key=operator.itemgetter(*idx))
        return cls(spec, _pack_rows(spec_struct(spec), rows))

    def __len__(self) -> int:
        return len(self.buf) // self.spec.size

    def __iter__(self) -> Iterator[tuple]:
        make = self.spec.tuple_type._make
        return map(make, spec_struct(self.spec).iter_unpack(self.buf))

    def rows(self) -> Iterator[tuple]:
        """Plain tuples (faster than the named ones)."""
        return spec_struct(self.spec).iter_unpack(self.buf)

    def __getitem__(self, i: int):
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self.spec.tuple_type._make(spec_struct(self.spec).unpack_from(self.buf, i * self.spec.size))

    def words(self):
        """The table as 64-bit words (records are 8-byte multiples): a zero-copy view on
        little-endian hosts, an array elsewhere."""
        if sys.byteorder == "little":
            return memoryview(self.buf).cast("Q")
        a = array("Q")
        a.frombytes(self.buf)
        if sys.byteorder != "little":
            a.byteswap()
        return a

    def missing_fields(self) -> tuple[str, ...]:
        """Fields this reader knows that the source did not carry (older minor)."""
        have = set(self.spec.fields_at(self.wire_size))
        return tuple(f for f in self.spec.fields if f not in have)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Table) and other.spec is self.spec and other.buf == self.buf

    def __repr__(self) -> str:
        return f"<Table {self.spec.name} x{len(self)}>"


_STRUCTS: dict[str, Any] = {}


def spec_struct(spec: RecordSpec):
    import struct

    s = _STRUCTS.get(spec.name)
    if s is None:
        s = _STRUCTS[spec.name] = struct.Struct(spec.fmt)
    return s


@dataclass
class UnknownSection:
    """A section this reader does not know (from a newer minor); kept for inspection."""

    type: int
    version: int
    flags: int
    count: int
    record_size: int
    data: bytes


@dataclass
class State:
    """One saved keepalive state."""

    meta: dict = field(default_factory=dict)
    units: Table = field(default_factory=lambda: Table(_ATTR_SPEC["units"]))
    domains: Table = field(default_factory=lambda: Table(_ATTR_SPEC["domains"]))
    contexts: Table = field(default_factory=lambda: Table(_ATTR_SPEC["contexts"]))
    irtes: Table = field(default_factory=lambda: Table(_ATTR_SPEC["irtes"]))
    vectors: Table = field(default_factory=lambda: Table(_ATTR_SPEC["vectors"]))
    pi_descs: Table = field(default_factory=lambda: Table(_ATTR_SPEC["pi_descs"]))
    bars: Table = field(default_factory=lambda: Table(_ATTR_SPEC["bars"]))
    devices: Table = field(default_factory=lambda: Table(_ATTR_SPEC["devices"]))
    bridges: Table = field(default_factory=lambda: Table(_ATTR_SPEC["bridges"]))
    reserved: Table = field(default_factory=lambda: Table(_ATTR_SPEC["reserved"]))
    config: bytes = b""
    provenance: dict = field(default_factory=dict)
    absent: frozenset = frozenset()        # items the writer could not capture
    # filled by the decoder
    version: tuple[int, int] = (0, 0)
    generation: int = 0
    header: dict = field(default_factory=dict)      # the verified file header
    sections: list = field(default_factory=list)    # the verified section table (no data)
    unknown_sections: list = field(default_factory=list)

    def table(self, attr: str) -> Table:
        return getattr(self, attr)

    def device_config(self, dev) -> bytes:
        return self.config[dev.config_offset:dev.config_offset + dev.config_len]


TABLE_ATTRS = tuple(_ATTR_SPEC)


class StateBuilder:
    """Collect records as keyword arguments, then ``build()`` a sorted, packed State."""

    def __init__(self) -> None:
        self.meta: dict = {}
        self.provenance: dict = {}
        self.absent: set[str] = set()
        self._rows: dict[str, list] = {a: [] for a in TABLE_ATTRS}
        self._configs: dict[int, bytes] = {}

    def add(self, attr: str, **fields) -> None:
        spec = _ATTR_SPEC[attr]
        row = []
        for name in spec.fields:
            v = fields.pop(name, None)
            if v is None:
                v = _default(spec, name)
            row.append(v)
        if fields:
            raise TypeError(f"{spec.name}: unknown fields {sorted(fields)}")
        self._rows[attr].append(tuple(row))

    def add_device(self, config: bytes = b"", **fields) -> None:
        """A device; ``config`` is its config-space snapshot (placed in CONFIG)."""
        self._configs[fields["sbdf"]] = bytes(config)
        fields.setdefault("config_len", len(config))
        fields["config_offset"] = 0  # fixed at build time
        self.add("devices", **fields)

    def mark_absent(self, item: str, reason: str = "", source: str = "") -> None:
        if item not in ITEMS:
            raise ValueError(f"unknown item {item!r}")
        self.absent.add(item)
        self.provenance[item] = {"status": "absent", "source": source, "reason": reason}

    def build(self) -> State:
        st = State(meta=dict(self.meta), provenance=dict(self.provenance),
                   absent=frozenset(self.absent))
        for attr in TABLE_ATTRS:
            if attr == "devices":
                continue
            setattr(st, attr, Table.from_rows(_ATTR_SPEC[attr], self._rows[attr]))
        # devices: lay out config snapshots in sbdf order (deterministic)
        spec = _ATTR_SPEC["devices"]
        rows = sorted(self._rows["devices"], key=lambda r: r[0])
        i_off, i_len = spec.fields.index("config_offset"), spec.fields.index("config_len")
        heap, out, off = [], [], 0
        for r in rows:
            cfg = self._configs.get(r[0], b"")
            r = list(r)
            r[i_off], r[i_len] = off, len(cfg)
            heap.append(cfg)
            off += len(cfg)
            out.append(tuple(r))
        st.devices = Table.from_rows(spec, out, presorted=True)
        st.config = b"".join(heap)
        return st


_NONE_DEFAULT = {"unit": 0xFFFF, "physfn": 0xFFFFFFFF, "iommu_group": 0xFFFFFFFF}


def _default(spec: RecordSpec, name: str):
    if name in _NONE_DEFAULT and spec.name not in ("unit", "irte", "domain", "context"):
        return _NONE_DEFAULT[name]
    return b"" if spec.codes[name].endswith("s") else 0
