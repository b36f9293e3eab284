#!/bin/sh
# Secta on qemu x86-64 (Buildroot kernel): the card is the first virtio disk.
set -eu
exec "$(dirname "$0")/../common/post-build.sh" "$1" /dev/vda1 /dev/vda3 eth0
