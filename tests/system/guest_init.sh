#!/bin/sh
# /init of the handover QEMU lab guest (busybox sh).  Built into the initramfs by
# tests/system/lab.py; do not run on a host.
#
# The phase itself (payload, script, results, kexec or poweroff) is guest_phase.sh, which this
# file sources from /lib/lab/phase.sh; here: mounts, modules, and for a root file system
# (handover.lab.rootfs=<PCI slot of its disk>, RunOptions(rootfs=...)) the switch to it:
#   1. mount proc/sys/dev/tmp/debugfs, load the modules in /etc/lab/modules.load.$(uname -r)
#      if the initrd has that list (another kernel's modules), else /etc/lab/modules.load
#   2. initramfs guest: lab_phase (guest_phase.sh)
#      rootfs guest: load ext4 (/etc/lab/modules.rootfs.$(uname -r)), mount the disk, put
#      the modules, the phase code and lab-phase.service into it, switch_root to systemd,
#      whose lab-phase.service runs the phase (guest_phase.sh under dash)
# Every line starting with "@@LAB " on the console is a marker the host parses.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /run /payload /lab/out
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

LAB_INIT=initramfs
. /lib/lab/phase.sh
lab_args
mark "INIT phase=$PHASE"

# --- modules ---------------------------------------------------------------
# the initrd may carry the modules of several kernels (lab.build_modules_cpio): a kernel
# whose release has its own load list uses it, any other the base list
REL=$(uname -r)
LOADS=/etc/lab/modules.load
[ -f "/etc/lab/modules.load.$REL" ] && LOADS="/etc/lab/modules.load.$REL"
echo "$LOADS" > /lab/modules.list
if [ -f "$LOADS" ]; then
    while read -r m; do
        [ -n "$m" ] && { insmod "/lib/modules/$REL/$m" 2>/dev/null || echo "$m" >> /lab/modules.failed; }
    done < "$LOADS"
fi
mark "MODULES-LOADED phase=$PHASE"

# --- a root file system: switch to it --------------------------------------------
if [ -n "$ROOTFS" ]; then
    if [ -f "/etc/lab/modules.rootfs.$REL" ]; then
        while read -r m; do
            [ -n "$m" ] && { insmod "/lib/modules/$REL/$m" 2>/dev/null || echo "$m" >> /lab/modules.failed; }
        done < "/etc/lab/modules.rootfs.$REL"
    fi
    DEV=$(waitdev "$ROOTFS")
    mkdir -p /newroot
    if [ -z "$DEV" ] || ! mount -t ext4 -o rw "$DEV" /newroot; then
        mark "ROOTFS-FAILED phase=$PHASE dev=${DEV:-none}"
        unpack_payload /payload
        mkdir -p /lab/out && echo 125 > /lab/out/rc
        echo "root file system on slot $ROOTFS (${DEV:-no disk}) could not be mounted" > /lab/out/stderr
        finish poweroff
    fi
    # this boot's payload (a tmpfs: the disk need not hold it) and the tools it brings
    mkdir -p /newroot/payload
    mount -t tmpfs -o mode=755 payload /newroot/payload
    unpack_payload /newroot/payload
    install_payload_tools /newroot
    # the kernel's modules (those this initrd carries) for modprobe under systemd, this
    # boot's /lab (the phase's scratch and results), the phase code and its unit
    mkdir -p /newroot/lib/modules
    rm -rf "/newroot/lib/modules/$REL" /newroot/lab
    cp -a "/lib/modules/$REL" /newroot/lib/modules/
    mkdir -p /newroot/lab/out /newroot/usr/local/lib/lab /newroot/etc/systemd/system/multi-user.target.wants
    cp /lab/modules.list /newroot/lab/ 2>/dev/null
    cp /lab/modules.failed /newroot/lab/ 2>/dev/null
    cp /lib/lab/phase.sh /newroot/usr/local/lib/lab/phase.sh
    cp /lib/lab/lab-phase.service /newroot/etc/systemd/system/lab-phase.service
    ln -sf ../lab-phase.service /newroot/etc/systemd/system/multi-user.target.wants/lab-phase.service
    mark "SWITCH-ROOT phase=$PHASE dev=$DEV"
    umount /sys/kernel/debug /dev/pts /tmp /run 2>/dev/null
    mount --move /dev /newroot/dev
    mount --move /sys /newroot/sys
    mount --move /proc /newroot/proc
    exec switch_root /newroot /sbin/init
fi

lab_phase
