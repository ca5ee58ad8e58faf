#!/bin/sh
# /init of the handover QEMU lab guest (busybox sh).  Built into the initramfs by
# tests/system/lab.py; do not run on a host.
#
# Phase N (kernel cmdline word handover.lab.phase=N, default 1):
#   1. mount proc/sys/dev/tmp/debugfs, load the modules in /etc/lab/modules.load.$(uname -r)
#      if the initrd has that list (another kernel's modules), else /etc/lab/modules.load
#   2. unpack the read-only payload disk (virtio-blk at 00:05.0, a plain tar) into /payload
#   3. run /payload/lab/phaseN.sh with stdout/stderr teed to the console between markers
#   4. if /payload/lab/phase$((N+1)).sh exists: kexec-load the payload kernel+initrd with
#      the command line in /payload/lab/cmdline.$((N+1)) (mode in /payload/lab/kexec.mode)
#   5. write a tar of $LAB_OUT into slot N of the results disk (virtio-blk at 00:06.0)
#   6. kexec -e into phase N+1, or power off.
#   A script that writes /lab/exec (a command) replaces steps 4 and 6: it loaded the next
#   kernel itself, and /init runs that command after step 5.
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

up() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "@@LAB $* uptime=$(up)" > /dev/console; }

PHASE=1
SHELL_MODE=0
for w in $(cat /proc/cmdline); do
    case "$w" in
        handover.lab.phase=*) PHASE="${w#handover.lab.phase=}" ;;
        handover.lab.shell=1) SHELL_MODE=1 ;;
    esac
done
NEXT=$((PHASE + 1))
mark "INIT phase=$PHASE"

finish() {
    # $1: what to do at the end: poweroff | kexec
    mark "RESULTS-BEGIN phase=$PHASE"
    dmesg > /lab/out/lab-dmesg.txt 2>/dev/null
    cp /proc/cmdline /lab/out/lab-cmdline.txt
    uname -r > /lab/out/lab-release.txt
    cat /proc/modules > /lab/out/lab-modules.txt 2>/dev/null
    cat /lab/modules.list /lab/modules.failed > /lab/out/lab-modules-load.txt 2>/dev/null
    RES=$(resdev)
    if [ -n "$RES" ]; then
        SLOT_MB=$(cat /payload/lab/slot_mb 2>/dev/null || echo 32)
        (cd /lab/out && tar -cf /tmp/lab-results.tar .)
        SZ=$(wc -c < /tmp/lab-results.tar)
        if [ "$SZ" -gt $((SLOT_MB * 1048576)) ]; then
            echo "@@LAB ERROR results tar of $SZ bytes exceeds slot of $SLOT_MB MiB" > /dev/console
            rm -rf /lab/out/files
            (cd /lab/out && tar -cf /tmp/lab-results.tar .)
        fi
        dd if=/tmp/lab-results.tar of="$RES" bs=1M seek=$(( (PHASE - 1) * SLOT_MB )) conv=notrunc,fsync 2>/dev/null
        mark "RESULTS-END phase=$PHASE bytes=$SZ"
    else
        mark "RESULTS-END phase=$PHASE bytes=-1 no-results-disk"
    fi
    sync
    if [ "$1" = crash ]; then
        mark "KEXEC-EXEC phase=$PHASE crash"
        echo 1 > /proc/sys/kernel/sysrq
        echo c > /proc/sysrq-trigger
    fi
    if [ "$1" = exec ]; then
        # the script loaded the next kernel itself and left the command that executes it
        mark "KEXEC-EXEC phase=$PHASE by-script"
        sh /lab/exec > /dev/console 2>&1
        mark "KEXEC-EXEC-FAILED phase=$PHASE rc=$?"
    fi
    if [ "$1" = kexec ]; then
        mark "KEXEC-EXEC phase=$PHASE"
        kexec -e
        mark "KEXEC-EXEC-FAILED phase=$PHASE rc=$?"
    fi
    mark "POWEROFF phase=$PHASE"
    poweroff -f
    sleep 5
    echo o > /proc/sysrq-trigger
}

# block device of the virtio disk in PCI slot $1 (e.g. 05.0)
blkdev() {
    for b in /sys/bus/pci/devices/0000:00:$1/virtio*/block/*; do
        [ -e "$b" ] && { echo "/dev/${b##*/}"; return; }
    done
}
resdev() { blkdev 06.0; }

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

# --- payload ---------------------------------------------------------------
i=0
while [ -z "$(blkdev 05.0)" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
PAY=$(blkdev 05.0)
i=0
while [ -n "$PAY" ] && [ ! -b "$PAY" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ -n "$PAY" ]; then
    (cd /payload && tar -xf "$PAY")
fi
mark "PAYLOAD phase=$PHASE dev=${PAY:-none}"

if [ "$SHELL_MODE" = 1 ]; then
    echo "handover lab: interactive shell (phase $PHASE); exit to power off" > /dev/console
    setsid cttyhack sh -l
    poweroff -f
fi

# --- the test's script --------------------------------------------------------
export LAB_PHASE=$PHASE LAB_OUT=/lab/out/files LAB_PAYLOAD=/payload
export HOME=/root PYTHONDONTWRITEBYTECODE=1
mkdir -p "$LAB_OUT" /root
SCRIPT=/payload/lab/phase$PHASE.sh
if [ -f "$SCRIPT" ]; then
    mkfifo /tmp/lab-stderr.fifo
    tee /lab/out/stderr < /tmp/lab-stderr.fifo > /dev/console &
    TEEPID=$!
    mark "SCRIPT-BEGIN phase=$PHASE"
    echo "@@LAB STDOUT-BEGIN phase=$PHASE" > /dev/console
    ( cd /payload && sh "$SCRIPT" < /dev/null 2> /tmp/lab-stderr.fifo; echo $? > /lab/out/rc ) | tee /lab/out/stdout > /dev/console
    wait $TEEPID
    RC=$(cat /lab/out/rc)
    echo "@@LAB STDOUT-END phase=$PHASE" > /dev/console
    mark "SCRIPT-END phase=$PHASE rc=$RC"
else
    mark "SCRIPT-MISSING phase=$PHASE"
    echo 127 > /lab/out/rc
fi

# --- kexec into the next phase ------------------------------------------------
# A script that wrote /lab/exec (a shell command, e.g. "handover arm --exec") has loaded the
# next kernel itself: save the results, then run that command instead of our own kexec.
if [ -f /lab/exec ]; then
    finish exec
fi
if [ -f "/payload/lab/phase$NEXT.sh" ]; then
    MODE=$(cat /payload/lab/kexec.mode 2>/dev/null || echo l)
    # a test may put another kernel for the next phase at /payload/lab/vmlinuz.N
    # (files={"lab/vmlinuz.2": Path(...)}), e.g. a patched kernel after a stock one
    KIMG=/payload/lab/vmlinuz
    [ -f "/payload/lab/vmlinuz.$NEXT" ] && KIMG="/payload/lab/vmlinuz.$NEXT"
    mark "KEXEC-LOAD-BEGIN phase=$PHASE mode=$MODE"
    if [ "$MODE" = p ]; then
        kexec -p "$KIMG" --initrd=/payload/lab/initrd.img \
            --command-line="$(cat /payload/lab/cmdline.$NEXT)" > /lab/out/kexec.log 2>&1
    elif [ "$MODE" = s ]; then
        kexec -s -l "$KIMG" --initrd=/payload/lab/initrd.img \
            --command-line="$(cat /payload/lab/cmdline.$NEXT)" > /lab/out/kexec.log 2>&1
    else
        kexec -l "$KIMG" --initrd=/payload/lab/initrd.img \
            --command-line="$(cat /payload/lab/cmdline.$NEXT)" > /lab/out/kexec.log 2>&1
    fi
    KRC=$?
    echo $KRC > /lab/out/kexec.rc
    mark "KEXEC-LOAD-END phase=$PHASE rc=$KRC"
    if [ $KRC = 0 ] && [ "$MODE" = p ]; then
        finish crash
    elif [ $KRC = 0 ]; then
        finish kexec
    fi
    cat /lab/out/kexec.log > /dev/console
fi
finish poweroff
