#!/bin/sh
# dracut pre-mount hook (sourced): check the handover state, never stop the boot.
if [ -r /usr/lib/handover/handover-boot.sh ]; then
    . /usr/lib/handover/handover-boot.sh
    handover_boot
fi
