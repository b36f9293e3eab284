#!/bin/sh
# Secta on raspberrypi5: the card is mmcblk0 (p1 boot, p2 read-only root, p3 data).
set -eu
exec "$(dirname "$0")/../common/post-build.sh" "$1" /dev/mmcblk0p1 /dev/mmcblk0p3 "eth0"
