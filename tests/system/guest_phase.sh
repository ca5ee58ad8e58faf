# The phase of the handover QEMU lab guest: what a boot does once the modules are loaded,
# shared by the two inits (sourced, POSIX sh):
#   - the initramfs guest: /init (guest_init.sh, busybox sh) sources /lib/lab/phase.sh and
#     calls lab_phase; LAB_INIT=initramfs: kexec -e, poweroff -f
#   - the rootfs guest (RunOptions(rootfs=...)): /init switch_roots to systemd, whose
#     lab-phase.service runs `sh /usr/local/lib/lab/phase.sh run` (Debian's dash);
#     LAB_INIT=systemd: kexec -l then `systemctl kexec`, `systemctl poweroff`
# Phase N (kernel cmdline word handover.lab.phase=N, default 1):
#   1. unpack the read-only payload disk (virtio-blk at 00:05.0, a plain tar) into /payload
#      (rootfs: /init did, and installed its handover package and the project's save unit)
#   2. run /payload/lab/phaseN.sh with stdout/stderr teed to the console between markers
#   3. if /payload/lab/phase$((N+1)).sh exists: kexec-load the payload kernel+initrd with
#      the command line in /payload/lab/cmdline.$((N+1)) (mode in /payload/lab/kexec.mode)
#   4. write a tar of /lab/out into slot N of the results disk (virtio-blk at 00:06.0)
#   5. kexec into phase N+1, or power off.
#   A script that writes /lab/exec (a command) replaces steps 3 and 5: it loaded the next
#   kernel itself, and the phase runs that command after step 4.
# Every line starting with "@@LAB " on the console is a marker the host parses.

up() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "@@LAB $* uptime=$(up)" > /dev/console; }

# PHASE, NEXT, SHELL_MODE, ROOTFS (the PCI slot of the root disk, or empty) from /proc/cmdline
lab_args() {
    PHASE=1
    SHELL_MODE=0
    ROOTFS=
    for w in $(cat /proc/cmdline); do
        case "$w" in
            handover.lab.phase=*) PHASE="${w#handover.lab.phase=}" ;;
            handover.lab.shell=1) SHELL_MODE=1 ;;
            handover.lab.rootfs=*) ROOTFS="${w#handover.lab.rootfs=}" ;;
        esac
    done
    NEXT=$((PHASE + 1))
}

# block device of the virtio disk in PCI slot $1 (e.g. 05.0)
blkdev() {
    for b in /sys/bus/pci/devices/0000:00:$1/virtio*/block/*; do
        [ -e "$b" ] && { echo "/dev/${b##*/}"; return; }
    done
}
resdev() { blkdev 06.0; }

# the block device of slot $1 once it exists (10 s at most), or nothing
waitdev() {
    i=0
    while [ -z "$(blkdev "$1")" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    d=$(blkdev "$1")
    i=0
    while [ -n "$d" ] && [ ! -b "$d" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    echo "$d"
}

finish() {
    # $1: what to do at the end: poweroff | kexec | crash | exec
    mark "RESULTS-BEGIN phase=$PHASE"
    dmesg > /lab/out/lab-dmesg.txt 2>/dev/null
    cp /proc/cmdline /lab/out/lab-cmdline.txt
    uname -r > /lab/out/lab-release.txt
    cat /proc/modules > /lab/out/lab-modules.txt 2>/dev/null
    cat /lab/modules.list /lab/modules.failed > /lab/out/lab-modules-load.txt 2>/dev/null
    [ "$LAB_INIT" = systemd ] && journalctl -b -o short-monotonic --no-pager > /lab/out/lab-journal.txt 2>&1
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
        rc=$?
        # under systemd the command (handover arm --exec: systemctl kexec) only queued the
        # shutdown, which stops this unit and kexecs
        [ "$LAB_INIT" = systemd ] && [ $rc = 0 ] && exit 0
        mark "KEXEC-EXEC-FAILED phase=$PHASE rc=$rc"
    fi
    if [ "$1" = kexec ]; then
        if [ "$LAB_INIT" = systemd ]; then
            # as a host does: the shutdown transaction stops the units (the save unit's
            # ExecStop among them), then systemd kexecs the loaded kernel
            mark "KEXEC-EXEC phase=$PHASE systemctl"
            systemctl kexec > /dev/console 2>&1 && exit 0
        else
            mark "KEXEC-EXEC phase=$PHASE"
            kexec -e
        fi
        mark "KEXEC-EXEC-FAILED phase=$PHASE rc=$?"
    fi
    mark "POWEROFF phase=$PHASE"
    if [ "$LAB_INIT" = systemd ]; then
        systemctl poweroff > /dev/console 2>&1 && exit 0
        systemctl poweroff -ff
    fi
    poweroff -f
    sleep 5
    echo o > /proc/sysrq-trigger
}

# the payload disk's tar unpacked into $1 (emptied first)
unpack_payload() {
    PAY=$(waitdev 05.0)
    rm -rf "$1"
    mkdir -p "$1"
    if [ -n "$PAY" ]; then
        (cd "$1" && tar -xf "$PAY")
    fi
    mark "PAYLOAD phase=$PHASE dev=${PAY:-none}"
}

# rootfs (/init, before switch_root; $1 the new root, its payload at $1/payload): the
# payload's Python packages (lab/py/: handover) into the system's Python and a handover
# command, the payload's units (lab/systemd/*.service: the project's save unit) installed
# and enabled, as a host's package would do, so systemd starts them with no reload
install_payload_tools() {
    R=$1
    if [ -d "$R/payload/lab/py" ]; then
        SITE=$R/usr/local/lib/python3.11/dist-packages
        mkdir -p "$SITE"
        for p in "$R"/payload/lab/py/*; do
            rm -rf "$SITE/${p##*/}"
            cp -a "$p" "$SITE/"
        done
        printf '#!/bin/sh\nexec python3 -m handover "$@"\n' > "$R/usr/bin/handover"
        chmod 755 "$R/usr/bin/handover"
    fi
    if [ -f "$R/payload/lab/udev/60-handover-region.rules" ]; then
        # the region's udev rule and its probe, where initramfs/install.sh puts them
        mkdir -p "$R/usr/lib/udev/rules.d" "$R/usr/lib/handover"
        cp "$R/payload/lab/udev/60-handover-region.rules" "$R/usr/lib/udev/rules.d/"
        cp "$R/payload/lab/udev/udev-probe" "$R/usr/lib/handover/udev-probe"
        chmod 755 "$R/usr/lib/handover/udev-probe"
    fi
    units=
    for u in "$R"/payload/lab/systemd/*.service; do
        [ -f "$u" ] || continue
        n=${u##*/}
        cp "$u" "$R/etc/systemd/system/$n"
        for t in $(sed -n 's/^WantedBy=//p' "$u"); do
            mkdir -p "$R/etc/systemd/system/$t.wants"
            ln -sf "../$n" "$R/etc/systemd/system/$t.wants/$n"
        done
        units="$units${units:+,}$n"
    done
    mark "TOOLS phase=$PHASE units=${units:-none}"
}

lab_phase() {
    # --- payload (rootfs: /init unpacked it into a tmpfs at /payload) ---------------
    mkdir -p /lab/out
    [ "$LAB_INIT" = systemd ] || unpack_payload /payload

    if [ "$SHELL_MODE" = 1 ]; then
        echo "handover lab: interactive shell (phase $PHASE); exit to power off" > /dev/console
        if [ "$LAB_INIT" = systemd ]; then
            setsid sh -c 'exec sh -l <> /dev/console >&0 2>&1'
            systemctl poweroff -ff
        fi
        setsid cttyhack sh -l
        poweroff -f
    fi

    # --- the test's script --------------------------------------------------------
    export LAB_PHASE=$PHASE LAB_OUT=/lab/out/files LAB_PAYLOAD=/payload
    export HOME=/root PYTHONDONTWRITEBYTECODE=1
    mkdir -p "$LAB_OUT" /root
    SCRIPT=/payload/lab/phase$PHASE.sh
    if [ -f "$SCRIPT" ]; then
        rm -f /tmp/lab-stderr.fifo
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
    # A script that wrote /lab/exec (a shell command, e.g. "handover arm --exec") has loaded
    # the next kernel itself: save the results, then run that command instead of our kexec.
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
}

# lab-phase.service: `sh phase.sh run`
if [ "${1:-}" = run ]; then
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    export PATH
    LAB_INIT=systemd
    lab_args
    mark "UNIT phase=$PHASE"
    lab_phase
fi
