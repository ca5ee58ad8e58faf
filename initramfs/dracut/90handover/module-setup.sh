#!/bin/bash
# dracut module "handover": the boot-time check of the handover state (same logic as the
# initramfs-tools integration: /usr/lib/handover/handover-boot.sh), as a pre-mount hook
# (udev has settled, the root file system is not mounted yet), and the udev rule that makes
# the region's device root:root 0600 (60-handover-region.rules).
# Include with `dracut --add handover` or add_dracutmodules+=" handover " in dracut.conf.d.
# Which Python has handover installed: $HANDOVER_PYTHON, else HANDOVER_PYTHON= in
# /etc/handover/initramfs.conf, else python3.

_handover_python() {
    [ -r /etc/handover/initramfs.conf ] && . /etc/handover/initramfs.conf
    echo "${HANDOVER_PYTHON:-python3}"
}

check() {
    "$(_handover_python)" -c 'import handover.initramfs' 2>/dev/null || return 1
    require_binaries /usr/bin/python3.11 || return 1
    # only when asked for (--add handover / add_dracutmodules)
    return 255
}

depends() {
    echo nvdimm
    return 0
}

installkernel() {
    hostonly='' instmods libnvdimm nd_pmem nd_e820 nfit dax device_dax dax_pmem
}

install() {
    inst_simple "$moddir/handover-boot.sh" /usr/lib/handover/handover-boot.sh
    inst_hook pre-mount 50 "$moddir/handover-pre-mount.sh"
    "$(_handover_python)" -m handover.initramfs install "$initdir" ||
        derror "handover: installing the Python runtime failed"
    # the region's device root:root 0600 (installed by initramfs/install.sh); after the runtime,
    # which wrote the rule's probe /usr/lib/handover/udev-probe for the initramfs's python
    # (dracut keeps a file that is already there)
    inst_rules 60-handover-region.rules
}
