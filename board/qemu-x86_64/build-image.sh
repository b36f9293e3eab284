#!/usr/bin/env bash
# Builds a bootable x86-64 Secta image from this machine's own Debian packages:
# the Debian kernel (linux-image-cloud-amd64 or linux-image-amd64), busybox-static,
# dnsmasq, e2fsprogs' mke2fs, the secta binary with the shared libraries it
# needs, the web app, and the rootfs overlay — laid out by genimage like the
# Pi images (MBR; FAT boot partition with kernel, initramfs and later the
# pre-seed file; a data partition formatted on first boot). syslinux makes it
# boot from the disk (BIOS), so qemu boots it as a PC boots a card.
#
#   board/qemu-x86_64/build-image.sh [OUT_DIR]
#
# Environment: SECTA_BIN (default: the release build if there is one, else the
# debug build, in $CARGO_TARGET_DIR), KERNEL_VERSION (default: the newest cloud
# kernel in /boot), SECTA_APPEND (extra kernel arguments, e.g. secta.debug=1).
# Output: OUT_DIR/secta-qemu-x86_64.img and its .sha256 (of the image), and
# OUT_DIR/build.json (sizes). Needs: genimage, mtools, dosfstools, syslinux,
# syslinux-common, cpio, busybox-static, kmod, a linux-image-*amd64 package.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${1:-$HERE/out}
TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/secta-target}

die() { echo "build-image: $*" >&2; exit 1; }

for tool in genimage mcopy mkdosfs syslinux cpio modprobe gzip ldd; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install genimage mtools dosfstools syslinux syslinux-common cpio kmod)"
done
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin
[ -f "$MBR_BIN" ] || die "$MBR_BIN is missing (apt-get install syslinux-common)"
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] && ! ldd "$BUSYBOX" >/dev/null 2>&1 || die "a static $BUSYBOX is needed (apt-get install busybox-static)"

if [ -z "${SECTA_BIN:-}" ]; then
  for b in "$TARGET_DIR/release/secta" "$TARGET_DIR/debug/secta"; do
    [ -x "$b" ] && { SECTA_BIN=$b; break; }
  done
fi
[ -x "${SECTA_BIN:-}" ] || die "no secta binary (cargo build -p secta, or set SECTA_BIN)"

if [ -z "${KERNEL_VERSION:-}" ]; then
  KERNEL_VERSION=$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sed 's|/boot/vmlinuz-||' | sort -V | tail -n 1)
  [ -n "$KERNEL_VERSION" ] || KERNEL_VERSION=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | grep -v -- -rt- | sed 's|/boot/vmlinuz-||' | sort -V | tail -n 1)
fi
KERNEL=/boot/vmlinuz-$KERNEL_VERSION
[ -f "$KERNEL" ] || die "no kernel in /boot (apt-get install linux-image-cloud-amd64)"
[ -d "/lib/modules/$KERNEL_VERSION" ] || die "no modules for $KERNEL_VERSION"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
R=$WORK/rootfs
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib,proc,sys,dev,run,tmp,data,boot,root,var,etc/secta} "$OUT"
ln -s ../run "$R/var/run"
ln -s ../tmp "$R/var/tmp"

# busybox and its applets
install -m 755 "$BUSYBOX" "$R/bin/busybox"
for a in $("$BUSYBOX" --list-full); do
  [ -e "$R/$a" ] || ln -s /bin/busybox "$R/$a"
done
ln -s bin/busybox "$R/init"

# A program with the shared libraries it loads.
copy_bin() {
  local src=$1 dst=$2 lib
  install -D -m 755 "$src" "$R$dst"
  for lib in $(ldd "$src" | grep -o '/[^ ]*'); do
    [ -e "$R$lib" ] || install -D -m 755 "$lib" "$R$lib"
  done
}
copy_bin "$SECTA_BIN" /usr/bin/secta
strip --strip-unneeded "$R/usr/bin/secta" 2>/dev/null || true
for p in dnsmasq mke2fs e2fsck; do
  src=$(PATH=$PATH:/usr/sbin:/sbin command -v "$p" || true)
  if [ -z "$src" ]; then
    [ "$p" = dnsmasq ] && die "dnsmasq is missing (apt-get install dnsmasq-base)"
    continue # busybox's mke2fs (ext2) is used instead
  fi
  rm -f "$R/bin/$p" "$R/sbin/$p" "$R/usr/bin/$p" "$R/usr/sbin/$p" # busybox applet links
  copy_bin "$src" "/usr/sbin/$p"
done
ln -sf mke2fs "$R/usr/sbin/mkfs.ext4"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$R/etc/"

# Kernel modules: the disk, the network, FAT; in dependency order.
: >"$R/etc/secta/modules"
for m in virtio_pci virtio_blk virtio_net vfat nls_cp437 nls_ascii nls_iso8859-1 nls_utf8 af_packet; do
  modprobe -S "$KERNEL_VERSION" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" { print $2 }' | while read -r ko; do
    grep -qxF "$ko" "$R/etc/secta/modules" && continue
    install -D -m 644 "$ko" "$R$ko"
    echo "$ko" >>"$R/etc/secta/modules"
  done
done
grep -q virtio_blk "$R/etc/secta/modules" || grep -q "CONFIG_VIRTIO_BLK=y" "/boot/config-$KERNEL_VERSION" \
  || die "no virtio_blk module for $KERNEL_VERSION"

# The overlay every board shares, then this board's.
cp -a "$ROOT/overlays/rootfs/." "$R/"
cp -a "$HERE/overlay/." "$R/"
if [ -f "$ROOT/web-ui/dist/index.html" ]; then
  mkdir -p "$R/usr/share/secta/web-ui"
  cp -a "$ROOT/web-ui/dist/." "$R/usr/share/secta/web-ui/"
else
  echo "build-image: note: web-ui/dist is not built; the image has no web app" >&2
fi

# The boot partition's files.
B=$WORK/input
mkdir -p "$B" "$WORK/empty" "$WORK/tmp"
cp "$KERNEL" "$B/vmlinuz"
(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -6 >"$B/initrd.img"
sed "s|SECTA_EXTRA_APPEND|${SECTA_APPEND:-}|" "$HERE/syslinux.cfg" >"$B/syslinux.cfg"
boot_mb=$(( ($(stat -c %s "$B/vmlinuz") + $(stat -c %s "$B/initrd.img")) / 1048576 + 24 ))
sed "s|BOOT_SIZE|${boot_mb}M|" "$HERE/genimage.cfg" >"$WORK/genimage.cfg"
genimage --config "$WORK/genimage.cfg" --rootpath "$WORK/empty" --tmppath "$WORK/tmp" \
  --inputpath "$B" --outputpath "$WORK/images" >"$WORK/genimage.log" 2>&1 \
  || { cat "$WORK/genimage.log" >&2; die "genimage failed"; }
IMG=$WORK/images/secta-qemu-x86_64.img

# Bootable from the disk: syslinux into the FAT (through mtools: no mount) and
# its boot code into the MBR (the partition table stays).
syslinux --offset $((1024 * 1024)) --install "$IMG"
dd if="$MBR_BIN" of="$IMG" bs=440 count=1 conv=notrunc status=none

mv "$IMG" "$OUT/"
(cd "$OUT" && sha256sum secta-qemu-x86_64.img >secta-qemu-x86_64.img.sha256)
cat >"$OUT/build.json" <<EOF
{"image_bytes": $(stat -c %s "$OUT/secta-qemu-x86_64.img"), "initramfs_bytes": $(stat -c %s "$B/initrd.img"), "kernel_bytes": $(stat -c %s "$B/vmlinuz"), "rootfs_bytes": $(du -sb "$R" | cut -f1), "secta_bytes": $(stat -c %s "$R/usr/bin/secta"), "kernel": "$KERNEL_VERSION", "secta_bin": "$SECTA_BIN"}
EOF
echo "build-image: $OUT/secta-qemu-x86_64.img (kernel $KERNEL_VERSION, secta from $SECTA_BIN)"
