"""handover: carry device keepalive state (VT-d, interrupt remapping, PCI) across kexec."""

__version__ = "0.1.0"
