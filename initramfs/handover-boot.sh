# handover: the boot-time check, shared by the initramfs-tools boot script
# (scripts/init-premount/handover) and the dracut hook (90handover/handover-pre-mount.sh).
# POSIX sh (busybox, dash, bash).  Sourced; defines handover_boot and nothing runs by itself.
#
# Kernel command line:
#   handover.region=SPEC   /dev/pmem0, /dev/dax0.0, or phys:0x30000000 (the device whose data
#                          starts there, found with `handover region list --json`); without
#                          it the check is skipped (a plain boot)
#   handover.policy=report|abort   (default report) on a mismatch or unreadable state: report
#                          only, or also write "abort" to /sys/kernel/handover/decision (only
#                          patched kernels have it; on a stock kernel there is nothing to abort)
#   handover.token=UUID    check the ownership token too
#   handover.wait=SECONDS  how long to wait for the region's device (default 10)
#
# Writes /run/handover/result.json (by `handover load`), /run/handover/boot.json (rc, policy,
# action, timings) and /run/handover/boot.log.  Never fails: a failed validation must not
# leave the machine unbootable, so handover_boot always returns 0.

HANDOVER_MODULES="libnvdimm nd_pmem nd_e820 nfit dax device_dax dax_pmem"
# Tests only: HANDOVER_BOOT_ROOT=DIR reads proc/sys/dev/run under DIR (a captured host tree),
# passes --sysroot DIR to handover and loads no modules.  Unset at boot.
_HO_R="${HANDOVER_BOOT_ROOT:-}"
_HO_RUN="$_HO_R/run/handover"

_ho_up() { read -r _ho_u _ho_rest < "$_HO_R/proc/uptime"; echo "$_ho_u"; }

_ho_log() {
    echo "handover: $*" >> "$_HO_RUN/boot.log"
    echo "handover: $*" >> "$_HO_R/dev/console" 2>/dev/null || echo "handover: $*" >&2
    [ -w "$_HO_R/dev/kmsg" ] && echo "<5>handover: $*" > "$_HO_R/dev/kmsg" 2>/dev/null
    return 0
}

# last line of a file (no tail/sed: dracut images need not have them)
_ho_last() { _ho_l=""; [ -r "$1" ] && while IFS= read -r _ho_x || [ -n "$_ho_x" ]; do _ho_l="$_ho_x"; done < "$1"; echo "$_ho_l"; }

# resolve SPEC to a device path ("" if not (yet) there).  phys:ADDR is the start of the
# device's data, as "handover region list" and "handover arm" compute it: a device-dax
# device's resource, an fsdax namespace's pfn resource, or a raw pmem namespace's resource.
_ho_resolve() {
    case "$1" in
        phys:*)
            _ho_want=$((${1#phys:}))
            for _ho_d in "$_HO_R"/sys/bus/dax/devices/dax*; do
                [ -r "$_ho_d/resource" ] || continue
                read -r _ho_r < "$_ho_d/resource"
                [ "$((_ho_r))" = "$_ho_want" ] && { echo "$_HO_R/dev/${_ho_d##*/}"; return; }
            done
            for _ho_d in "$_HO_R"/sys/class/block/pmem*; do
                [ -e "$_ho_d" ] || continue
                _ho_r=""
                for _ho_p in "$_ho_d"/device/pfn*/resource; do
                    [ -r "$_ho_p" ] && read -r _ho_r < "$_ho_p"
                done
                [ -z "$_ho_r" ] && [ -r "$_ho_d/device/resource" ] && read -r _ho_r < "$_ho_d/device/resource"
                [ -n "$_ho_r" ] && [ "$((_ho_r))" = "$_ho_want" ] && { echo "$_HO_R/dev/${_ho_d##*/}"; return; }
            done ;;
        *) [ -e "$_HO_R$1" ] && echo "$_HO_R$1" ;;
    esac
}

handover_boot() {
    _ho_region="" _ho_policy=report _ho_token="" _ho_wait=10
    for _ho_w in $(cat "$_HO_R/proc/cmdline"); do
        case "$_ho_w" in
            handover.region=*) _ho_region="${_ho_w#handover.region=}" ;;
            handover.policy=*) _ho_policy="${_ho_w#handover.policy=}" ;;
            handover.token=*) _ho_token="${_ho_w#handover.token=}" ;;
            handover.wait=*) _ho_wait="${_ho_w#handover.wait=}" ;;
        esac
    done
    [ -n "$_ho_region" ] || return 0
    mkdir -p "$_HO_RUN"
    _ho_t0=$(_ho_up)
    _ho_log "checking saved state in $_ho_region (policy $_ho_policy) uptime=$_ho_t0"
    case "$_ho_policy" in report|abort) ;; *) _ho_log "unknown policy '$_ho_policy': using report"; _ho_policy=report ;; esac
    if [ -z "$_HO_R" ]; then
        for _ho_m in $HANDOVER_MODULES; do modprobe -q "$_ho_m" 2>/dev/null; done
    fi
    _ho_dev="" _ho_i=0
    while :; do
        _ho_dev=$(_ho_resolve "$_ho_region")
        [ -n "$_ho_dev" ] && break
        [ "$_ho_i" -ge $((_ho_wait * 5)) ] && break
        sleep 0.2; _ho_i=$((_ho_i + 1))
    done
    _ho_rc=0
    if [ -z "$_ho_dev" ]; then
        _ho_rc=3
        echo "handover: region $_ho_region: no such device after ${_ho_wait}s" > "$_HO_RUN/load.err"
    else
        # report: compare only (the kernel is not told anything); abort: handover load tells
        # a patched kernel accept (match) or abort (mismatch) itself
        _ho_co=""; [ "$_ho_policy" = report ] && _ho_co="--check-only"
        handover load --region "$_ho_dev" $_ho_co ${_ho_token:+--token "$_ho_token"} \
            ${_HO_R:+--sysroot "$_HO_R"} \
            --result-dir "$_HO_RUN" > "$_HO_RUN/load.txt" 2> "$_HO_RUN/load.err" || _ho_rc=$?
    fi
    _ho_action=none
    if [ "$_ho_rc" != 0 ] && [ "$_ho_policy" = abort ]; then
        if [ -w "$_HO_R/sys/kernel/handover/decision" ]; then
            # load wrote abort already on a mismatch (6) or an older generation (7); for any
            # other failure write it here
            case "$_ho_rc" in 6|7) ;; *) echo abort > "$_HO_R/sys/kernel/handover/decision" 2>/dev/null ;; esac
            _ho_action=abort
        else
            _ho_action="none (stock kernel: no /sys/kernel/handover/decision)"
        fi
    elif [ "$_ho_rc" = 0 ] && [ "$_ho_policy" = abort ] && [ -w "$_HO_R/sys/kernel/handover/decision" ]; then
        _ho_action=accept
    fi
    if [ ! -s "$_HO_RUN/result.json" ]; then
        _ho_e=$(_ho_last "$_HO_RUN/load.err")
        while :; do case "$_ho_e" in *[\"\\]*) _ho_e="${_ho_e%%[\"\\]*}'${_ho_e#*[\"\\]}" ;; *) break ;; esac; done
        printf '{"ok": false, "exit_code": %s, "error": "%s"}\n' "$_ho_rc" "$_ho_e" \
            > "$_HO_RUN/result.json"
    fi
    _ho_t1=$(_ho_up)
    printf '{"region": "%s", "device": "%s", "policy": "%s", "rc": %s, "action": "%s", "uptime_start": %s, "uptime_end": %s}\n' \
        "$_ho_region" "$_ho_dev" "$_ho_policy" "$_ho_rc" "$_ho_action" "$_ho_t0" "$_ho_t1" \
        > "$_HO_RUN/boot.json"
    case "$_ho_rc" in
        0|6|7) _ho_log "$(_ho_last "$_HO_RUN/load.txt")" ;;
        *) _ho_log "NOT CHECKED (exit $_ho_rc)" ;;
    esac
    if [ "$_ho_rc" != 0 ]; then _ho_e=$(_ho_last "$_HO_RUN/load.err"); _ho_log "${_ho_e#handover: }"; fi
    _ho_log "done rc=$_ho_rc policy=$_ho_policy action=$_ho_action uptime=$_ho_t1; boot continues"
    unset _ho_region _ho_policy _ho_token _ho_wait _ho_w _ho_t0 _ho_t1 _ho_m _ho_dev _ho_i \
        _ho_rc _ho_co _ho_action _ho_e _ho_u _ho_rest \
        _ho_l _ho_x _ho_want _ho_d _ho_r _ho_p
    return 0
}
