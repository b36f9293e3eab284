#!/usr/bin/env bash
# Image benchmark; prints one JSON object:
#  - secta_binary: size of the release `secta` per cargo feature set (stripped),
#    for x86_64 and, with BENCH_ARM=1 and the cross tools, aarch64;
#  - image: the x86-64 qemu image raw, compressed (xz -6, zstd -19), and
#    installed (root file system, kernel, initramfs);
#  - boot: power-on to "ready" in the VM (first boot with the pre-seed, and a
#    later boot) as seen from the host, the guest's own kernel-start-to-ready,
#    and whether that was KVM or plain emulation (TCG). Under TCG these depend
#    on how busy the host is: run it on an idle machine.
# Runs release builds (slow the first time). Progress goes to stderr.
#   tests/image/image-bench.sh > bench.json
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/secta-target}
export CARGO_TARGET_DIR=$TARGET_DIR
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
log() { echo "image-bench: $*" >&2; }

# Feature sets: the default, plus each optional feature of the secta crate alone.
features=$(sed -n '/^\[features\]/,/^\[/p' "$ROOT/firmware/secta/Cargo.toml" | sed -nE 's/^([a-z0-9_-]+) *=.*/\1/p' | grep -vx default || true)
sets=("default")
for f in $features; do sets+=("$f"); done

stripped_size() { cp "$1" "$W/bin" && strip "$W/bin" 2>/dev/null; stat -c %s "$W/bin"; }
bin_json=""
for s in "${sets[@]}"; do
  args=()
  [ "$s" = default ] || args=(--features "secta/$s")
  log "release build of secta ($s)"
  # Built together with secta-flash, as below, so features unify the same way
  # and the second build is a no-op.
  (cd "$ROOT" && cargo build --quiet --release -p secta -p secta-flash "${args[@]}" >&2)
  bin_json+="${bin_json:+, }\"x86_64/$s\": $(stripped_size "$TARGET_DIR/release/secta")"
  if [ "${BENCH_ARM:-0}" = 1 ] && command -v aarch64-linux-gnu-gcc >/dev/null; then
    log "release build of secta for aarch64 ($s)"
    (cd "$ROOT" && CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
      cargo build --quiet --release --target aarch64-unknown-linux-gnu -p secta "${args[@]}" >&2)
    cp "$TARGET_DIR/aarch64-unknown-linux-gnu/release/secta" "$W/arm"
    aarch64-linux-gnu-strip "$W/arm"
    bin_json+=", \"aarch64/$s\": $(stat -c %s "$W/arm")"
  fi
done
# The release build of the default set is what goes into the image.
(cd "$ROOT" && cargo build --quiet --release -p secta -p secta-flash >&2)

log "building the image"
SECTA_BIN="$TARGET_DIR/release/secta" "$ROOT/board/qemu-x86_64/build-image.sh" "$W/out" >&2
img=$W/out/secta-qemu-x86_64.img
xz -T2 -6 -c "$img" >"$W/img.xz"
zstd -q -19 -T2 -c "$img" >"$W/img.zst"
build=$(cat "$W/out/build.json")
field() { sed -nE "s/.*\"$1\": ([0-9]+).*/\1/p" <<<"$build"; }

log "boot test with the release build"
BOOT_JSON=$W/boot.json SECTA_BIN="$TARGET_DIR/release/secta" FLASH_BIN="$TARGET_DIR/release/secta-flash" \
  "$HERE/boot-test.sh" >&2 || log "the boot test failed (boot figures may be missing)"
boot=$(cat "$W/boot.json" 2>/dev/null || echo null)

cat <<EOF
{"secta_binary_bytes": {$bin_json},
 "image": {"raw_bytes": $(stat -c %s "$img"), "xz_bytes": $(stat -c %s "$W/img.xz"), "zstd_bytes": $(stat -c %s "$W/img.zst"),
   "installed": {"rootfs_bytes": $(field rootfs_bytes), "initramfs_bytes": $(field initramfs_bytes), "kernel_bytes": $(field kernel_bytes), "secta_bytes": $(field secta_bytes)}},
 "boot": $boot}
EOF
