"""``hstatus``: a guest shell function that prints what a patched kernel says in
/sys/kernel/handover/, and its parser on the host."""

from __future__ import annotations

#: The one-value files of /sys/kernel/handover/ that ``hstatus`` prints, in this order.
HSTATUS_KEYS = ("state", "reason", "region", "error", "generation", "format", "reserved_ranges",
                "reserved_bytes", "ir_tables_kept", "root_tables_kept")

#: Guest shell snippet (prepend it to a script): ``hstatus`` prints what a patched kernel says
#: in /sys/kernel/handover/ as ``key: value`` lines. A kernel of the first series has one
#: multi-line ``status`` file: printed as it is. The current one has one value per file:
#: a line for each non-empty file of HSTATUS_KEYS, then one line per keepalive device,
#: ``device: <bdf> <state>[ adopted domain=<n>][ (<reason>)]``. Exit 1 (and a line saying
#: so) without /sys/kernel/handover (``HSTATUS_DIR``: another directory, for tests). Parse the
#: text with ``parse_hstatus``.
HSTATUS = r"""
hstatus() {
    _hd=${HSTATUS_DIR:-/sys/kernel/handover}
    if [ -f $_hd/status ]; then cat $_hd/status; return; fi
    [ -d $_hd ] || { echo "no $_hd"; return 1; }
    for _hk in KEYS; do
        [ -f $_hd/$_hk ] || continue
        _hv=$(cat $_hd/$_hk 2>/dev/null)
        [ -n "$_hv" ] && echo "$_hk: $_hv"
    done
    for _hdev in $_hd/devices/*; do
        [ -d "$_hdev" ] || continue
        _hl="device: ${_hdev##*/} $(cat $_hdev/state 2>/dev/null)"
        _hv=$(cat $_hdev/domain 2>/dev/null)
        [ -n "$_hv" ] && _hl="$_hl adopted domain=$_hv"
        _hv=$(cat $_hdev/reason 2>/dev/null)
        [ -n "$_hv" ] && _hl="$_hl ($_hv)"
        echo "$_hl"
    done
    return 0
}
""".replace("KEYS", " ".join(HSTATUS_KEYS))


def parse_hstatus(text: str) -> dict:
    """``hstatus`` output -> {key: value} (device lines: the last one under "device"; use
    the text for those)."""
    return dict(ln.split(": ", 1) for ln in text.splitlines() if ": " in ln)
