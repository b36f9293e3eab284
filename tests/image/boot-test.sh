#!/usr/bin/env bash
# The box as a user gets it: build the x86-64 image, write it with secta-flash
# onto a card (an image file) with first-boot settings, boot it in qemu with
# the homeserver's port forwarded, and from outside: wait for "ready",
# register with the pre-seeded invite, send a message, cut the power, boot
# again and find the message. Ends with a cargo-style "test result:" line that
# ./run-tests counts.
#
# Environment: SECTA_BIN, FLASH_BIN (default: debug builds in $CARGO_TARGET_DIR),
# BOOT_TIMEOUT (seconds per boot, default 300), KEEP=1 keeps the work folder,
# BOOT_JSON=FILE writes the measured boot times there (for the bench).
#
# Last, the admin's duress wipe through the panel's endpoint (port 8090 in the
# image's config): the box must come back in first-boot setup ("not set up" on
# the ready line) with the old accounts gone.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/secta-target}
SECTA_BIN=${SECTA_BIN:-$TARGET_DIR/debug/secta}
FLASH_BIN=${FLASH_BIN:-$TARGET_DIR/debug/secta-flash}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-300}
passed=0 failed=0 ignored=0

finish() {
  echo "test result: $([ $failed = 0 ] && echo ok || echo FAILED). $passed passed; $failed failed; $ignored ignored"
  [ $failed = 0 ]
  exit
}
skip() {
  echo "SKIPPED: qemu boot test ($*)"
  ignored=$((ignored + 1))
  finish
}
ok() { echo "ok: $*"; passed=$((passed + 1)); }
bad() { echo "FAILED: $*"; failed=$((failed + 1)); }

command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 not installed; apt-get install qemu-system-x86"
for t in genimage mtype syslinux cpio curl; do
  command -v "$t" >/dev/null || skip "$t not installed; run ./run-tests as root to install the image tools"
done
ls /boot/vmlinuz-*amd64 >/dev/null 2>&1 || skip "no Debian kernel in /boot; apt-get install linux-image-cloud-amd64"
[ -x "$SECTA_BIN" ] || skip "no secta binary at $SECTA_BIN (cargo build -p secta)"
[ -x "$FLASH_BIN" ] || skip "no secta-flash binary at $FLASH_BIN (cargo build -p secta-flash)"

ACCEL="-accel tcg"
if [ -w /dev/kvm ] && grep -qE '\b(vmx|svm)\b' /proc/cpuinfo; then
  ACCEL="-accel kvm -cpu host"
fi

WORK=$(mktemp -d)
VM_PID=
cleanup() {
  [ -n "$VM_PID" ] && kill "$VM_PID" 2>/dev/null && wait "$VM_PID" 2>/dev/null
  if [ "${KEEP:-0}" = 1 ]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# --- build and flash -------------------------------------------------------------------
echo "building the image (secta from $SECTA_BIN)"
if ! SECTA_BIN="$SECTA_BIN" "$ROOT/board/qemu-x86_64/build-image.sh" "$WORK/out" >"$WORK/build.log" 2>&1; then
  cat "$WORK/build.log"
  bad "the image builds"
  finish
fi
ok "the image builds ($(stat -c %s "$WORK/out/secta-qemu-x86_64.img") bytes)"

CARD=$WORK/card.img
truncate -s 512M "$CARD" # an empty "512 MB card"
ADMIN_PW="violet-harbor-sextant-$RANDOM"
INVITE="boot-test-invite-$RANDOM"
if SECTA_ADMIN_PASSWORD="$ADMIN_PW" SECTA_WIFI_PASSPHRASE="tulip-quarry-anvil-73" SECTA_INVITE_TOKEN="$INVITE" \
  "$FLASH_BIN" write "$WORK/out/secta-qemu-x86_64.img" "$CARD" --box-name "Тестовая коробка" \
  --server-name box.test --ssid SectaTest --country RU --timezone Europe/Moscow --invite-uses 5 \
  >"$WORK/flash.log" 2>&1 && grep -q "matches the expected one" "$WORK/flash.log"; then
  ok "secta-flash writes, verifies against the image's .sha256 and pre-seeds the card"
else
  cat "$WORK/flash.log"
  bad "secta-flash writes the card"
  finish
fi
mt() { MTOOLS_SKIP_CHECK=1 mtype -i "$CARD@@1M" "::$1" 2>/dev/null; }
mt secta-preseed.toml | grep -q 'server_name = "box.test"' && ok "the pre-seed is on the FAT boot partition (read with mtools)" \
  || bad "the pre-seed is on the FAT boot partition"

# --- boot ------------------------------------------------------------------------------
PORT=$((20000 + RANDOM % 20000))
BASE=http://127.0.0.1:$PORT
PANEL_PORT=$((PORT + 1))
PANEL=http://127.0.0.1:$PANEL_PORT
boot() { # $1: console log file
  : >"$1"
  BOOT_T0=$(date +%s.%N)
  qemu-system-x86_64 -m 768 -smp 2 $ACCEL -nographic -monitor none -serial "file:$1" \
    -drive "file=$CARD,format=raw,if=virtio" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$PORT-:8008,hostfwd=tcp:127.0.0.1:$PANEL_PORT-:8090" -device virtio-net-pci,netdev=n0,romfile= \
    -no-reboot >"$WORK/qemu.out" 2>&1 &
  VM_PID=$!
  local i
  for i in $(seq 1 $((BOOT_TIMEOUT * 4))); do
    if grep -aq "SECTA READY" "$1"; then
      BOOT_SECS=$(awk -v a="$BOOT_T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
      return 0
    fi
    kill -0 "$VM_PID" 2>/dev/null || break
    sleep 0.25
  done
  echo "--- console:"; tail -n 40 "$1"; cat "$WORK/qemu.out"
  return 1
}
power_cut() {
  kill -KILL "$VM_PID" 2>/dev/null
  wait "$VM_PID" 2>/dev/null
  VM_PID=
}
json() { sed -nE "s/.*\"$1\":\"([^\"]+)\".*/\1/p"; }
login() { # user password -> access token
  curl -sf -XPOST "$BASE/_matrix/client/v3/login" \
    -d "{\"type\":\"m.login.password\",\"identifier\":{\"type\":\"m.id.user\",\"user\":\"$1\"},\"password\":\"$2\"}" | json access_token
}

echo "booting ($ACCEL)"
if boot "$WORK/console1.log"; then
  FIRST_BOOT=$BOOT_SECS
  ok "first boot reaches ready in ${FIRST_BOOT}s: $(grep -a 'SECTA READY' "$WORK/console1.log" | tr -d '\r')"
else
  bad "first boot reaches ready within ${BOOT_TIMEOUT}s"
  finish
fi
grep -aq "not set up" "$WORK/console1.log" && bad "the pre-seed was applied (box says not set up)"
grep -a "secta firstboot" "$WORK/console1.log" | tr -d '\r'

# From outside: the pre-seeded admin and invite.
curl -sf "$BASE/_matrix/client/versions" | grep -q '"versions"' && ok "the homeserver answers through the forwarded port" \
  || bad "the homeserver answers through the forwarded port"
ADMIN_TOKEN=$(login admin "$ADMIN_PW")
[ -n "$ADMIN_TOKEN" ] && ok "the pre-seeded admin logs in with the one-time password" || bad "the pre-seeded admin logs in"
session=$(curl -s -XPOST "$BASE/_matrix/client/v3/register" -d '{"username":"alice","password":"tulip-harbor-41"}' | json session)
ALICE=$(curl -s -XPOST "$BASE/_matrix/client/v3/register" \
  -d "{\"username\":\"alice\",\"password\":\"tulip-harbor-41\",\"auth\":{\"type\":\"m.login.registration_token\",\"token\":\"$INVITE\",\"session\":\"$session\"}}" | json access_token)
[ -n "$ALICE" ] && ok "a member registers with the pre-seeded invite" || bad "a member registers with the pre-seeded invite"
ROOM=$(curl -s -XPOST -H "Authorization: Bearer $ALICE" "$BASE/_matrix/client/v3/createRoom" -d '{"name":"boot test"}' | json room_id)
BODY="привет из виртуальной коробки $RANDOM"
EVENT=$(curl -s -XPUT -H "Authorization: Bearer $ALICE" "$BASE/_matrix/client/v3/rooms/$ROOM/send/m.room.message/t1" \
  -d "{\"msgtype\":\"m.text\",\"body\":\"$BODY\"}" | json event_id)
[ -n "$EVENT" ] && ok "a message is sent through the Client-Server API" || bad "a message is sent"

# Power cut (no shutdown), then: secrets gone from the card, report left there.
power_cut
if mt secta-preseed.toml >/dev/null; then bad "first boot removed the pre-seed from the card"; else ok "first boot removed the pre-seed (secrets) from the card"; fi
report=$(mt secta-firstboot.txt)
if echo "$report" | grep -q "First boot done" && ! echo "$report" | grep -qF "$ADMIN_PW"; then
  ok "the card has the first-boot report, without the password"
else
  bad "the card has the first-boot report without secrets: $report"
fi

if boot "$WORK/console2.log"; then
  SECOND_BOOT=$BOOT_SECS
  ok "after a power cut the box boots again to ready in ${SECOND_BOOT}s"
else
  bad "the box boots again after a power cut"
  finish
fi
if grep -aE "EXT4-fs.*(error|warning)|I/O error" "$WORK/console1.log" "$WORK/console2.log"; then
  bad "the data file system comes through the power cut without errors"
else
  ok "the data file system comes through the power cut without errors (journal)"
fi
ALICE=$(login alice tulip-harbor-41)
curl -s -H "Authorization: Bearer $ALICE" "$BASE/_matrix/client/v3/rooms/$ROOM/messages?dir=b&limit=20" | grep -qF "$BODY" \
  && ok "the message is still there after the power cut" || bad "the message is still there after the power cut"
login admin "$ADMIN_PW" | grep -q . && ok "the admin still logs in" || bad "the admin still logs in"

# --- a card written without first-boot settings: the box starts and says so -------------
power_cut
MAIN_CARD=$CARD
CARD=$WORK/bare.img
truncate -s 256M "$CARD"
if "$FLASH_BIN" write "$WORK/out/secta-qemu-x86_64.img" "$CARD" --no-preseed >"$WORK/flash2.log" 2>&1 && boot "$WORK/console-bare.log"; then
  if grep -a "SECTA READY" "$WORK/console-bare.log" | grep -q "not set up"; then
    ok "without a pre-seed the box still comes up, in first-boot setup ($(grep -a 'SECTA READY' "$WORK/console-bare.log" | tr -d '\r'))"
  else
    bad "without a pre-seed the box says it is not set up"
  fi
  curl -sf "$BASE/_matrix/client/versions" | grep -q '"versions"' && ok "without a pre-seed the homeserver still answers" \
    || bad "without a pre-seed the homeserver still answers"
  power_cut
  mt secta-firstboot.txt | grep -q "no secta-preseed.toml" && ok "the card says why the box is not set up" \
    || bad "the card says why the box is not set up"
else
  cat "$WORK/flash2.log"; tail -n 20 "$WORK/console-bare.log"
  bad "a card without a pre-seed boots"
fi
rm -f "$CARD"
CARD=$MAIN_CARD

# --- the panic wipe: the admin's duress action ----------------------------------------------
if boot "$WORK/console-wipe.log"; then
  ADMIN_TOKEN=$(login admin "$ADMIN_PW")
  code=$(curl -s -o /dev/null -w '%{http_code}' -XPOST "$PANEL/admin/wipe" -H 'Content-Type: application/json' -d '{"confirm":"wipe"}')
  [ "$code" = 403 ] && ok "the duress wipe without an admin's token is refused (403)" || bad "the wipe without a token is refused (got $code)"
  code=$(curl -s -o /dev/null -w '%{http_code}' -XPOST "$PANEL/admin/wipe" -H "Authorization: Bearer $ALICE" -H 'Content-Type: application/json' -d '{"confirm":"wipe"}')
  [ "$code" = 403 ] && ok "a member's token cannot wipe the box (403)" || bad "a member's token is refused (got $code)"
  code=$(curl -s -o /dev/null -w '%{http_code}' -XPOST "$PANEL/admin/wipe" -H "Authorization: Bearer $ADMIN_TOKEN" -H 'Content-Type: application/json' -d '{"confirm":"wipe"}')
  if [ "$code" = 202 ]; then ok "the admin's duress wipe starts (202)"; else bad "the admin's duress wipe starts (got $code)"; fi
  wiped=1
  for _ in $(seq 1 60); do
    curl -s "$PANEL/panel" | grep -q '"wiped"' && { wiped=0; break; }
    sleep 0.5
  done
  [ $wiped = 0 ] && ok "the panel says the box is wiped" || bad "the panel says the box is wiped"
  power_cut
  if boot "$WORK/console3.log" && grep -a "SECTA READY" "$WORK/console3.log" | grep -q "not set up"; then
    ok "after the wipe the box is back at first boot ($(grep -a 'SECTA READY' "$WORK/console3.log" | tr -d '\r'))"
  else
    bad "after the wipe the box is back at first boot"
  fi
  [ -z "$(login alice tulip-harbor-41)" ] && ok "after the wipe the old account is gone" || bad "after the wipe the old account is gone"
  [ -z "$(login admin "$ADMIN_PW")" ] && ok "after the wipe the old admin is gone" || bad "after the wipe the old admin is gone"
else
  bad "the box boots for the wipe"
fi
power_cut
if [ -n "${BOOT_JSON:-}" ]; then
  guest() { sed -nE 's/.*SECTA READY after ([0-9.]+) s.*/\1/p' "$1" 2>/dev/null | head -n 1; }
  g1=$(guest "$WORK/console1.log")
  g2=$(guest "$WORK/console2.log")
  printf '{"accel": "%s", "first_boot_to_ready_secs": %s, "boot_to_ready_secs": %s, "guest_kernel_to_ready_secs": {"first_boot": %s, "boot": %s}}\n' \
    "${ACCEL#-accel }" "${FIRST_BOOT:-null}" "${SECOND_BOOT:-null}" "${g1:-null}" "${g2:-null}" >"$BOOT_JSON"
fi
finish
