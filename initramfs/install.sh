#!/bin/sh
# Install the initramfs integrations, the systemd unit and the udev rule (as a package would).
#   initramfs/install.sh [PYTHON]     PYTHON: an interpreter that can import handover
#                                     (default: the one of the `handover` on PATH)
# DESTROOT=/some/dir installs into a staging tree instead of /.  Afterwards:
#   update-initramfs -u    (or: dracut -f --add handover)
#   systemctl enable --now handover-save.service
#   udevadm trigger --settle /dev/pmem0   (the region's device root:root 0600 now, not at the
#                                          next boot)
# The udev rule goes to /usr/lib/udev/rules.d, where packages put theirs (the administrator's
# /etc/udev/rules.d overrides a file of the same name), with its probe
# /usr/lib/handover/udev-probe, a script for PYTHON.
set -eu
D=$(cd "$(dirname "$0")" && pwd)
R=${DESTROOT:-}
PY=${1:-}
if [ -z "$PY" ] && command -v handover >/dev/null; then
    PY=$(head -n 1 "$(command -v handover)" | sed -n 's/^#!//p')
fi
PY=${PY:-python3}
"$PY" -c 'import handover.initramfs' || { echo "install.sh: $PY cannot import handover" >&2; exit 1; }
install -D -m 644 "$D/handover-boot.sh" "$R/usr/share/handover/initramfs/handover-boot.sh"
install -D -m 755 "$D/initramfs-tools/hooks/handover" "$R/usr/share/initramfs-tools/hooks/handover"
install -D -m 755 "$D/initramfs-tools/scripts/init-premount/handover" \
    "$R/usr/share/initramfs-tools/scripts/init-premount/handover"
M="$R/usr/lib/dracut/modules.d/90handover"
install -D -m 755 "$D/dracut/90handover/module-setup.sh" "$M/module-setup.sh"
install -m 755 "$D/dracut/90handover/handover-pre-mount.sh" "$M/handover-pre-mount.sh"
install -m 644 "$D/handover-boot.sh" "$M/handover-boot.sh"
install -D -m 644 "$D/systemd/handover-save.service" "$R/lib/systemd/system/handover-save.service"
install -D -m 644 "$D/udev/60-handover-region.rules" "$R/usr/lib/udev/rules.d/60-handover-region.rules"
"$PY" -m handover.initramfs udev-probe "${R:-/}"
mkdir -p "$R/etc/handover"
[ -e "$R/etc/handover/initramfs.conf" ] || echo "HANDOVER_PYTHON=$PY" > "$R/etc/handover/initramfs.conf"
echo "installed; HANDOVER_PYTHON=$PY (/etc/handover/initramfs.conf)" >&2
