#!/bin/sh
# Secta: shared post-build step (Buildroot runs it with TARGET_DIR as $1).
#   common/post-build.sh TARGET_DIR BOOT_DEV DATA_DEV DHCP_IF
# Writes the board's partitions into /etc/secta/board.env (read by the
# overlay's rcS), drops init scripts of packages (secta's rcS starts what the
# box needs; secta itself runs hostapd and dnsmasq) and makes the mount points.
set -eu
TARGET_DIR=$1
BOOT_DEV=$2
DATA_DEV=$3
DHCP_IF=${4:-}

mkdir -p "$TARGET_DIR/etc/secta" "$TARGET_DIR/data" "$TARGET_DIR/boot"
cat >"$TARGET_DIR/etc/secta/board.env" <<ENV
# Written by buildroot/board/common/post-build.sh
SECTA_BOOT_DEV=$BOOT_DEV
SECTA_DATA_DEV=$DATA_DEV
SECTA_DHCP_IF=$DHCP_IF
ENV
rm -f "$TARGET_DIR"/etc/init.d/S[0-9][0-9]*
# The root file system is read-only: /etc/resolv.conf points into /run.
ln -sf ../run/resolv.conf "$TARGET_DIR/etc/resolv.conf"
