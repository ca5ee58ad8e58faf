"""Compatibility: :mod:`handover.host.kernel_handover` at its old name (see
handover.sources)."""

from ..host.kernel_handover import (ROOT, STATUS_FILES, parse_status,  # noqa: F401
                                    read_status)
