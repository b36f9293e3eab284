#!/bin/sh
# Secta: shared post-image step (Buildroot runs it with BINARIES_DIR as $1).
#   common/post-image.sh BINARIES_DIR BOARD_DIR IMAGE_NAME
# Lays out the card with genimage, then writes IMAGE_NAME.sha256 (of the
# raw image: secta-flash checks it) and IMAGE_NAME.xz (what people download).
set -eu
BINARIES_DIR=$1
BOARD_DIR=$2
IMAGE=$3
GENIMAGE_TMP="${BUILD_DIR}/genimage.tmp"
rm -rf "$GENIMAGE_TMP"
genimage --rootpath "$TARGET_DIR" --tmppath "$GENIMAGE_TMP" \
  --inputpath "$BINARIES_DIR" --outputpath "$BINARIES_DIR" \
  --config "$BOARD_DIR/genimage.cfg"
cd "$BINARIES_DIR"
sha256sum "$IMAGE" >"$IMAGE.sha256"
xz -T0 -6 -k -f "$IMAGE"
echo "secta: $BINARIES_DIR/$IMAGE.xz — write it with: secta-flash write $IMAGE.xz /dev/sdX --server-name … --ssid … --country …"
