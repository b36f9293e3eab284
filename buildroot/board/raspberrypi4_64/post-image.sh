#!/bin/sh
set -eu
exec "$(dirname "$0")/../common/post-image.sh" "$1" "$(cd "$(dirname "$0")" && pwd)" secta-raspberrypi4_64.img
