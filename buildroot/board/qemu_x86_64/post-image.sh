#!/bin/sh
# Lays out the image and writes start-qemu.sh next to it (qemu boots the
# kernel directly; the disk has the same partitions as the Pi cards).
set -eu
BOARD_DIR=$(cd "$(dirname "$0")" && pwd)
"$BOARD_DIR/../common/post-image.sh" "$1" "$BOARD_DIR" secta-qemu_x86_64.img
cat >"$1/start-qemu.sh" <<'SH'
#!/bin/sh
# Boots the image written by secta-flash to card.img (default: the image itself).
cd "$(dirname "$0")"
exec qemu-system-x86_64 -M pc -m 512 -nographic \
  -kernel bzImage -append "root=/dev/vda2 rootfstype=squashfs ro console=ttyS0 secta.boot=/dev/vda1 secta.data=/dev/vda3" \
  -drive file="${1:-secta-qemu_x86_64.img}",format=raw,if=virtio \
  -netdev user,id=n0,hostfwd=tcp:127.0.0.1:8008-:8008 -device virtio-net-pci,netdev=n0
SH
chmod +x "$1/start-qemu.sh"
