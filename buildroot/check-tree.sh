#!/usr/bin/env bash
# Checks the Buildroot external tree without the network and without Buildroot:
#  - external.desc, Config.in and external.mk are well formed; every `source`
#    and every package's .mk is there, and the .mk files parse with make;
#  - every defconfig line is a valid assignment or "is not set" comment, no
#    symbol twice, every symbol is defined in this tree or listed in
#    known-symbols.txt, and every path it names inside the tree exists;
#  - every shell script of the tree, the boards and the overlay passes `sh -n`,
#    and the scripts Buildroot runs are executable;
#  - every genimage.cfg lays out a card: genimage runs on stand-in input files
#    (when genimage, mkdosfs and mcopy are installed; otherwise a brace check);
#  - the Pi boot files: SPI on, core clock pinned (Pi 4, Zero 2 W), spidev
#    buffer raised, partitions as the overlay expects.
# Ends with a cargo-style "test result:" line for ./run-tests.
set -uo pipefail
TREE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$TREE/.." && pwd)
passed=0 failed=0 ignored=0
ok() { passed=$((passed + 1)); }
bad() { echo "FAILED: $*"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@"; then ok; else bad "$what"; fi; }

# --- the tree's own files -----------------------------------------------------------------
name=$(sed -nE 's/^name: *([A-Za-z0-9_]+) *$/\1/p' "$TREE/external.desc")
check "external.desc has a name" [ "$name" = SECTA ]
check "external.mk includes the packages" grep -q 'BR2_EXTERNAL_SECTA_PATH)/package/\*/\*.mk' "$TREE/external.mk"

# Kconfig files: sources exist, blocks balanced, each package defines its symbol.
kconfig_ok() {
  local f=$1 depth=0 line src
  while IFS= read -r line; do
    case "$line" in
      source\ *)
        src=$(echo "$line" | sed -E 's/^source +"?([^"]*)"?.*/\1/; s|\$BR2_EXTERNAL_SECTA_PATH|'"$TREE"'|')
        [ -f "$src" ] || { echo "$f: sources missing $src"; return 1; } ;;
      if\ * | menu\ * | choice*) depth=$((depth + 1)) ;;
      endif* | endmenu* | endchoice*) depth=$((depth - 1)) ;;
    esac
  done <"$f"
  [ $depth = 0 ] || { echo "$f: unbalanced if/menu/choice"; return 1; }
}
mapfile -t kconfigs < <(find "$TREE" -name Config.in)
for f in "${kconfigs[@]}"; do check "$f parses" kconfig_ok "$f"; done
defined=$(cat "${kconfigs[@]}" | sed -nE 's/^(menu)?config (BR2_[A-Za-z0-9_]+).*/\2/p')
for pkg in "$TREE"/package/*/; do
  p=$(basename "$pkg")
  P=$(echo "$p" | tr 'a-z-' 'A-Z_')
  check "package $p defines BR2_PACKAGE_$P" grep -qx "BR2_PACKAGE_$P" <<<"$defined"
  check "package $p has $p.mk with ${P}_ variables and an infrastructure" \
    grep -qE "^${P}_VERSION|eval \\$\\((generic|cargo)-package\\)" "$pkg/$p.mk"
done
# make parses the .mk files (Buildroot's macros stubbed out).
stub=$(mktemp)
cat >"$stub" <<EOF
BR2_EXTERNAL_SECTA_PATH := $TREE
qstrip = \$(strip \$(subst ",,\$(1)))
cargo-package =
generic-package =
include $TREE/external.mk
all: ; @true
EOF
check "the package .mk files parse with make" make -s -f "$stub" all
rm -f "$stub"

# --- defconfigs ---------------------------------------------------------------------------
known=$(grep -vE '^\s*(#|$)' "$TREE/known-symbols.txt")
defconfig_ok() {
  local f=$1 rc=0 line sym seen="" path
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
      "" | "# "*" is not set") ;;
      "#"*) continue ;;
    esac
    if [[ "$line" =~ ^#\ (BR2_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
      sym=${BASH_REMATCH[1]}
    elif [[ "$line" =~ ^(BR2_[A-Za-z0-9_]+)=(y|[0-9]+|0x[0-9a-fA-F]+|\"([^\"\\]|\\.)*\")$ ]]; then
      sym=${BASH_REMATCH[1]}
    elif [ -z "$line" ]; then
      continue
    else
      echo "$f: not a defconfig line: $line"; rc=1; continue
    fi
    if grep -qx "$sym" <<<"$seen"; then echo "$f: $sym set twice"; rc=1; fi
    seen=$(printf '%s\n%s' "$seen" "$sym")
    if ! grep -qx "$sym" <<<"$defined" && ! grep -qx "$sym" <<<"$known"; then
      echo "$f: unknown symbol $sym (not in this tree nor in known-symbols.txt)"; rc=1
    fi
    # Paths inside this tree must exist.
    for path in $(grep -oE '\$\(BR2_EXTERNAL_SECTA_PATH\)[^" ]*' <<<"$line"); do
      path=${path/\$(BR2_EXTERNAL_SECTA_PATH)/$TREE}
      [ -e "$path" ] || { echo "$f: $sym names a missing $path"; rc=1; }
    done
  done <"$f"
  for sym in BR2_PACKAGE_SECTA BR2_ROOTFS_OVERLAY BR2_TARGET_ROOTFS_SQUASHFS BR2_PACKAGE_HOSTAPD BR2_PACKAGE_DNSMASQ \
             BR2_PACKAGE_NFTABLES BR2_PACKAGE_IPROUTE2 BR2_PACKAGE_CA_CERTIFICATES BR2_ROOTFS_POST_IMAGE_SCRIPT; do
    grep -q "^$sym=" "$f" || { echo "$f: does not set $sym"; rc=1; }
  done
  return $rc
}
for f in "$TREE"/configs/*_defconfig; do check "$(basename "$f") is valid" defconfig_ok "$f"; done
for b in raspberrypi4_64 raspberrypi5 raspberrypizero2w qemu_x86_64; do
  check "a defconfig for $b" [ -f "$TREE/configs/secta_${b}_defconfig" ]
done

# --- shell scripts ------------------------------------------------------------------------
mapfile -t scripts < <(
  find "$TREE" "$ROOT/board" -name '*.sh'
  find "$ROOT/overlays" -type f | while read -r f; do head -c 2 "$f" | grep -q '#!' && echo "$f"; done
)
for s in "${scripts[@]}"; do
  if head -n 1 "$s" | grep -q bash; then
    check "$s passes bash -n" bash -n "$s"
  else
    check "$s passes sh -n" sh -n "$s"
  fi
done
for s in "$TREE"/board/*/post-*.sh "$ROOT"/overlays/rootfs/etc/init.d/* "$ROOT"/overlays/rootfs/usr/libexec/secta/*; do
  check "$s is executable" [ -x "$s" ]
done

# --- genimage -------------------------------------------------------------------------------
braces_ok() { [ "$(tr -cd '{' <"$1" | wc -c)" = "$(tr -cd '}' <"$1" | wc -c)" ]; }
genimage_ok() { # lays the card out from stand-in files named in the config
  local cfg=$1 w rc
  w=$(mktemp -d)
  mkdir -p "$w/in" "$w/root" "$w/tmp" "$w/out"
  grep -oE '"[^"]+"' "$cfg" | tr -d '"' | grep -vE '^(mbr|true|false|SECTABOOT)$' | while read -r f; do
    case "$f" in
      */overlays | overlays) mkdir -p "$w/in/$f" && echo x >"$w/in/$f/README" ;;
      *.vfat) ;; # made by genimage
      *) mkdir -p "$(dirname "$w/in/$f")" && head -c 100000 /dev/urandom >"$w/in/$f" ;;
    esac
  done
  genimage --config "$cfg" --rootpath "$w/root" --tmppath "$w/tmp" --inputpath "$w/in" --outputpath "$w/out" >"$w/log" 2>&1
  rc=$?
  [ $rc = 0 ] || cat "$w/log"
  rm -rf "$w"
  return $rc
}
mapfile -t cfgs < <(find "$TREE/board" "$ROOT/board" -name genimage.cfg)
if command -v genimage >/dev/null && command -v mkdosfs >/dev/null && command -v mcopy >/dev/null; then
  for c in "${cfgs[@]}"; do
    if grep -q BOOT_SIZE "$c"; then # the host image's template: size filled in by its script
      sed 's/BOOT_SIZE/64M/' "$c" >"$c.check" && check "$c lays out a card" genimage_ok "$c.check"
      rm -f "$c.check"
    else
      check "$c lays out a card" genimage_ok "$c"
    fi
  done
else
  echo "SKIPPED: genimage layout check (genimage, dosfstools or mtools missing); checking braces only"
  ignored=$((ignored + 1))
  for c in "${cfgs[@]}"; do check "$c has balanced braces" braces_ok "$c"; done
fi

# --- the Pi boot files ------------------------------------------------------------------------
for b in raspberrypi4_64 raspberrypi5 raspberrypizero2w; do
  d=$TREE/board/$b
  check "$b config.txt enables SPI" grep -qx 'dtparam=spi=on' "$d/config.txt"
  check "$b cmdline.txt is one line" [ "$(wc -l <"$d/cmdline.txt")" = 1 ]
  check "$b cmdline.txt raises the spidev buffer" grep -q 'spidev.bufsiz=' "$d/cmdline.txt"
  check "$b cmdline.txt mounts the read-only root and names boot/data" \
    grep -qE 'root=/dev/mmcblk0p2 .*ro .*secta.boot=/dev/mmcblk0p1 secta.data=/dev/mmcblk0p3' "$d/cmdline.txt"
done
for b in raspberrypi4_64 raspberrypizero2w; do
  check "$b pins the core clock for the LED strip" grep -qE '^core_freq_min=[0-9]+' "$TREE/board/$b/config.txt"
done

echo "buildroot tree: $passed checks passed, $failed failed"
echo "test result: $([ $failed = 0 ] && echo ok || echo FAILED). $passed passed; $failed failed; $ignored ignored"
[ $failed = 0 ]
