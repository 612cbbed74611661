#!/usr/bin/env bash
# Tests shoal_lb::ipvs against a real kernel with IPVS: boots Debian's cloud kernel under qemu
# (software emulation) with a small initramfs (busybox-static, the ip_vs module chain, ipvsadm
# and its libraries, and our statically linked `ipvs_guest` example), and prints the guest's
# output. The guest's last line is `IPVS-TEST: PASS` or `IPVS-TEST: FAIL <reason>`; qemu exits
# 0 on poweroff whatever happened, so this script judges by that marker (exit 0 only on PASS).
#
#   scripts/ipvs-vm.sh          build what is missing (cached), boot, judge
#   scripts/ipvs-vm.sh fetch    only download the kernel package (scripts/deps.sh calls this)
#
# Other guest programs use the same VM (kernel WireGuard: tests/tests/wg_vm.rs):
#   SHOAL_VM_PKG=shoal-wg SHOAL_VM_EXAMPLE=wg_guest SHOAL_VM_MARKER=WG-TEST \
#   SHOAL_VM_MODULES="wireguard" scripts/ipvs-vm.sh
# and the agent itself (tests/tests/agent_vm.rs): SHOAL_VM_BUILD=shoal builds the whole
# `shoal` binary (static, stripped) into /bin/shoal and runs SHOAL_VM_GUEST_SCRIPT as the
# guest program; SHOAL_VM_BINS names more host programs to copy with their libraries;
# SHOAL_VM_MEM (MiB) and SHOAL_VM_SMP size the VM.
#
# Cache: $CARGO_TARGET_DIR (or target/)/ipvs-vm/. The kernel .deb is fetched with
# `apt-get download` and unpacked with `dpkg-deb -x` there: nothing is installed on the host.
# Host packages needed: qemu-system-x86 busybox-static ipvsadm kmod (scripts/deps.sh).
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"
repo=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
cache=$target/ipvs-vm
kpkg=${SHOAL_IPVS_KERNEL_PKG:-linux-image-cloud-amd64}
timeout_s=${SHOAL_IPVS_VM_TIMEOUT:-180}
vm_pkg=${SHOAL_VM_PKG:-shoal-lb}
vm_example=${SHOAL_VM_EXAMPLE:-ipvs_guest}
marker=${SHOAL_VM_MARKER:-IPVS-TEST}
extra_modules=${SHOAL_VM_MODULES:-}
vm_build=${SHOAL_VM_BUILD:-example}
vm_bins=${SHOAL_VM_BINS:-}
vm_mem=${SHOAL_VM_MEM:-512}
vm_smp=${SHOAL_VM_SMP:-1}
[ "$vm_build" = shoal ] && vm_example=${SHOAL_VM_NAME:-agent}
mkdir -p "$cache"
log() { echo "ipvs-vm: $*" >&2; }
die() {
  echo "ipvs-vm: $*" >&2
  exit 2
}

# --- kernel package: the real image package the meta package depends on ---------------------
fetch_kernel() {
  local real deb
  resolve() { apt-cache depends "$kpkg" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
  real=$(resolve)
  if [ -z "$real" ] && [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null 2>&1 || true
    real=$(resolve)
  fi
  [ -n "$real" ] || die "cannot resolve $kpkg to a kernel image package (apt-get update as root?): run the project's install step (make deps / scripts/deps.sh)"
  deb=$(ls "$cache"/debs/"$real"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    mkdir -p "$cache/debs"
    log "downloading $real (apt-get download)"
    (cd "$cache/debs" && apt-get download "$real" >/dev/null 2>&1) ||
      die "cannot download $real: run the project's install step (make deps / scripts/deps.sh)"
    deb=$(ls "$cache"/debs/"$real"_*.deb | head -1)
  fi
  echo "$deb"
}

if [ "${1:-}" = fetch ]; then
  fetch_kernel
  exit 0
fi

for t in qemu-system-x86_64 busybox ipvsadm depmod nft ip; do
  command -v "$t" >/dev/null ||
    die "$t not found: run the project's install step (make deps / scripts/deps.sh installs qemu-system-x86 busybox-static ipvsadm kmod)"
done
busybox_bin=$(command -v busybox)
is_static() {
  local o
  o=$(ldd "$1" 2>&1 || true)
  grep -q 'not a dynamic\|statically linked' <<<"$o"
}
is_static "$busybox_bin" ||
  die "$busybox_bin is not static: install busybox-static"

deb=$(ls "$cache"/debs/linux-image-[0-9]*.deb 2>/dev/null | head -1 || true)
[ -n "$deb" ] || deb=$(fetch_kernel)
kroot=$cache/kernel
if [ ! -f "$kroot/.done-$(basename "$deb")" ]; then
  log "unpacking $(basename "$deb")"
  rm -rf "$kroot"
  mkdir -p "$kroot"
  dpkg-deb -x "$deb" "$kroot"
  kver=$(ls "$kroot/lib/modules" | head -1)
  depmod -b "$kroot" "$kver"
  touch "$kroot/.done-$(basename "$deb")"
fi
kver=$(ls "$kroot/lib/modules" | head -1)
vmlinuz=$kroot/boot/vmlinuz-$kver
[ -f "$vmlinuz" ] || die "no $vmlinuz in $deb"

# --- the guest program, statically linked (its own cargo target dir: the test that runs this
# script holds the lock of the outer one) ------------------------------------------------------
t0=$(date +%s.%N)
if [ "$vm_build" = shoal ]; then
  # No debug info and stripped: the initramfs stays small enough to boot quickly.
  RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR=$cache/cargo \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true \
    cargo build --quiet --release --target x86_64-unknown-linux-gnu \
    --manifest-path "$repo/Cargo.toml" -p shoal-cli --bin shoal
  guest=$cache/cargo/x86_64-unknown-linux-gnu/release/shoal
else
  # The same profile settings as the shoal build above, so that they share dependencies.
  RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR=$cache/cargo \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true \
    cargo build --quiet --release --target x86_64-unknown-linux-gnu \
    --manifest-path "$repo/Cargo.toml" -p "$vm_pkg" --example "$vm_example"
  guest=$cache/cargo/x86_64-unknown-linux-gnu/release/examples/$vm_example
fi
is_static "$guest" || die "$guest is not static"
t1=$(date +%s.%N)

# --- initramfs -----------------------------------------------------------------------------
root=$cache/initramfs-$vm_example
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,run/netns,lib/modules}
cp "$busybox_bin" "$root/bin/busybox"
for a in sh mount insmod ip poweroff mkdir cat echo sleep ls; do
  ln -s busybox "$root/bin/$a"
done
# Modules: the dependency closure of what we need, deepest first (modules.dep lists a
# module's dependencies so that the last one must be loaded first).
declare -A seen=()
order=()
add_mod() {
  local m=$1 line deps d
  [ -n "${seen[$m]:-}" ] && return 0
  line=$(grep -E "(^|/)$m\.ko(\.[a-z]+)?:" "$kroot/lib/modules/$kver/modules.dep" | head -1) ||
    die "module $m not in $kver"
  deps=${line#*:}
  local rev=()
  for d in $deps; do rev=("$d" "${rev[@]}"); done
  for d in "${rev[@]}"; do
    d=$(basename "$d")
    add_mod "${d%%.ko*}"
  done
  seen[$m]=1
  order+=("${line%%:*}")
}
# nf_tables, nat and masquerade for the IPVS companion table; veth for the guest's
# client/backend namespaces.
# shellcheck disable=SC2086
for m in ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh ip_vs_mh dummy nf_tables nft_chain_nat nft_masq veth $extra_modules; do
  add_mod "$m"
done
: >"$root/modules.order"
for f in "${order[@]}"; do
  case $f in *crc32c-intel* | *crc32c_intel*) continue ;; esac
  cp "$kroot/lib/modules/$kver/$f" "$root/lib/modules/"
  basename "$f" >>"$root/modules.order"
done
# ipvsadm, nft (the guest applies the IPVS companion table with `nft -f -`: the static guest
# cannot dlopen libnftables, SHOAL_LB_NFT=process) and iproute2's ip (veth pairs into named
# namespaces, which busybox's ip cannot do), each with its shared libraries (same paths as on
# the host, found with ldd).
mkdir -p "$root/sbin"
# shellcheck disable=SC2086
for b in ipvsadm nft ip $vm_bins; do
  src=$(command -v "$b") || die "$b not found: run the project's install step (scripts/deps.sh)"
  cp "$src" "$root/sbin/$b"
  for lib in $(ldd "$src" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done
if [ "$vm_build" = shoal ]; then
  cp "$guest" "$root/bin/shoal"
  cp "${SHOAL_VM_GUEST_SCRIPT:?SHOAL_VM_GUEST_SCRIPT names the guest script}" "$root/guest"
  chmod +x "$root/guest"
  mkdir -p "$root"/{etc,root,var/lib,run/shoal}
  echo "127.0.0.1 localhost" >"$root/etc/hosts"
  echo "nameserver 127.0.0.1" >"$root/etc/resolv.conf"
  echo "hosts: files dns" >"$root/etc/nsswitch.conf"
  # tcpdump drops its privileges to a user it looks up.
  printf 'root:x:0:0:root:/root:/bin/sh\ntcpdump:x:0:0:tcpdump:/:/bin/sh\n' >"$root/etc/passwd"
  printf 'root:x:0:\ntcpdump:x:0:\n' >"$root/etc/group"
  for a in grep sed awk head tail wc sort uniq tr cut seq date kill ps rm cp touch test true false; do
    ln -sf busybox "$root/bin/$a"
  done
else
  cp "$guest" "$root/guest"
fi
cat >"$root/init" <<'EOF'
#!/bin/sh
export PATH=/sbin:/bin SHOAL_LB_NFT=process
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /modules.order); do
  insmod /lib/modules/$m || echo "insmod $m failed"
done
ip link set lo up
ip link set dummy0 up
ip addr add 10.0.0.1/24 dev dummy0
# The traffic step's VIP is a local address (as kube-proxy's IPVS mode binds VIPs to a dummy).
ip addr add 10.0.0.120/32 dev dummy0
ip -6 addr add fd00::1/64 dev dummy0
echo "guest: kernel $(cat /proc/sys/kernel/osrelease), $(ls /proc/net/ip_vs 2>/dev/null || echo no) /proc/net/ip_vs"
/guest 2>&1 || echo "MARKER: FAIL guest exited with $?"
poweroff -f
EOF
chmod +x "$root/init"
sed -i "s/MARKER:/$marker:/" "$root/init"
(cd "$root" && find . | "$busybox_bin" cpio -o -H newc -R 0:0 2>/dev/null | gzip -1) >"$cache/initrd-$vm_example.cpio.gz"
t2=$(date +%s.%N)

# --- boot ------------------------------------------------------------------------------------
out=$cache/console-$vm_example.log
# -cpu max: the emulated CPU has RDRAND, so the guest's random pool is ready at once
# (getrandom would otherwise block a freshly booted guest).
timeout "$timeout_s" qemu-system-x86_64 -m "$vm_mem" -smp "$vm_smp" -cpu max -net none \
  -kernel "$vmlinuz" -initrd "$cache/initrd-$vm_example.cpio.gz" \
  -append 'console=ttyS0 quiet panic=-1 random.trust_cpu=on' \
  -nographic -no-reboot -monitor none </dev/null >"$out" 2>&1 || log "qemu exited with $?"
t3=$(date +%s.%N)
tr -d '\r' <"$out"
log "$(awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" -v k="$kver" \
  'BEGIN {printf "guest build %.1f s, initramfs %.1f s, VM run %.1f s (kernel %s)", b-a, c-b, d-c, k}')"
if grep -q "^$marker: PASS" <(tr -d '\r' <"$out"); then
  exit 0
fi
grep -q "^$marker: FAIL" <(tr -d '\r' <"$out") || log "no $marker marker (timeout ${timeout_s}s or crash)"
exit 1
