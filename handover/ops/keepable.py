"""What the kernel can keep running across the kexec, and why it cannot keep a device.

A kernel of the series keeps a device whose unit is in legacy mode, whose DMA reaches the
IOMMU with its own requester ID (no DMA alias), and that is neither an SR-IOV VF nor a PF
with VF Enable on. Anything beyond that must be declared by the running kernel in
/sys/kernel/handover/features (feature detection, not versions; host.kernel_handover):

- ``scalable``: units in scalable mode (PASID tables) are adopted (kernel-patches 0012);
- ``dma-alias``: devices whose DMA carries a bridge's requester ID are handed over;
- ``sriov``: the next kernel's SR-IOV init leaves VF Enable (and so the VFs) as it was.

``refusals`` gives, per device, the reasons it would not be kept: ``arm`` refuses such a
device before the kexec, ``doctor`` says why.
"""

from __future__ import annotations

from ..formats import enums as E
from ..host.base import Host, PciDev
from ..host.pci import dma_alias_bridges

FEATURE_SCALABLE, FEATURE_DMA_ALIAS, FEATURE_SRIOV = "scalable", "dma-alias", "sriov"
NOT_DECLARED = "the kernel does not declare '{}' in /sys/kernel/handover/features"


def features_of(host: Host) -> frozenset:
    """The running kernel's declared features (empty: legacy only, or a stock kernel)."""
    return host.kernel_handover.features if host.kernel_handover is not None else frozenset()


def unit_scalable(host: Host, dev: PciDev) -> tuple[str, bool] | None:
    """(unit name, True) when the unit covering ``dev`` is in scalable mode (RTADDR bit
    10), (name, False) in legacy mode, None when unknown."""
    u = host.unit_for(dev)
    if u is None or u.regs.rtaddr is None:
        return None
    return u.name, bool(u.regs.rtaddr >> 10 & 1)


def refusals(host: Host, dev: PciDev, features: frozenset) -> list[str]:
    """Why the kernel would not keep ``dev`` (empty: it can)."""
    out = []
    mode = unit_scalable(host, dev)
    if mode and mode[1] and FEATURE_SCALABLE not in features:
        out.append(f"its unit {mode[0]} is in scalable mode (PASID tables), which is not kept "
                   f"yet: {NOT_DECLARED.format(FEATURE_SCALABLE)}")
    aliases = dma_alias_bridges(host, dev)
    if aliases and FEATURE_DMA_ALIAS not in features:
        b, kind = aliases[0]
        out.append(f"it has DMA aliases: behind {b} ({kind}), its DMA reaches the IOMMU with "
                   f"that bridge's requester ID, and the kernel refuses devices with DMA "
                   f"aliases: {NOT_DECLARED.format(FEATURE_DMA_ALIAS)}")
    if FEATURE_SRIOV not in features:
        sriov = dev.caps.sriov
        if dev.physfn:
            out.append(f"it is an SR-IOV VF of {dev.physfn}: not kept yet (the next kernel's "
                       f"SR-IOV init clears its PF's VF Enable): "
                       f"{NOT_DECLARED.format(FEATURE_SRIOV)}")
        elif sriov is not None and sriov.ctrl & E.SRIOV_CTRL_VFE:
            out.append(f"it is an SR-IOV PF with VF Enable on ({sriov.num_vfs} of "
                       f"{sriov.total_vfs} VFs): not kept yet (the next kernel's SR-IOV init "
                       f"clears VF Enable, its VFs would vanish): "
                       f"{NOT_DECLARED.format(FEATURE_SRIOV)}")
    return out


def refuse_unkeepable(host: Host, devices: list) -> None:
    """Raise RefusedError naming every device the kernel would not keep, and why."""
    from .build import RefusedError

    features = features_of(host)
    problems = [f"{d.bdf}: {why}" for d in devices for why in refusals(host, d, features)]
    if problems:
        raise RefusedError("refused before the kexec, the kernel cannot keep: "
                           + "; ".join(problems))
