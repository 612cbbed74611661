#!/usr/bin/env bash
# Builds the images Shoal's tests and demo run, offline, from Debian packages and this
# repository's own binary (no registry is reachable from these machines, and none is
# needed):
#   localhost/shoal-busybox:2    busybox-static's applets (sh, httpd, wget, nslookup, ...)
#   localhost/shoal-whoami:TAG   the same plus `shoal` (debug info stripped) and the
#                                libraries it links; runs `shoal whoami --port 80`.
#                                TAG is a hash of the binary, so a new build makes a new
#                                image; :latest points at the newest.
# Usage: scripts/images.sh [SHOAL_BINARY]   (default: target/debug/shoal)
# Prints the whoami image's name. Images already there are kept; concurrent runs wait for
# each other (flock).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
shoal=${1:-$repo/target/debug/shoal}
podman=${SHOAL_PODMAN:-podman}
command -v "$podman" >/dev/null || { echo "images: podman not found (scripts/deps.sh installs it)" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "images: /bin/busybox missing (apt-get install busybox-static)" >&2; exit 1; }
[ -x "$shoal" ] || { echo "images: $shoal is missing: build it first (cargo build -p shoal-cli)" >&2; exit 1; }

exec 9>/run/shoal-images.lock
flock 9

# Copies a binary or library and the libraries it links to the same paths under a root.
copy_with_deps() {
  local f=$1 root=$2
  for lib in "$f" $(ldd "$f" 2>/dev/null | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# A rootfs with busybox's applets in /bin (no symlink named busybox onto itself).
busybox_rootfs() {
  local root=$1
  mkdir -p "$root"/{bin,etc,tmp,root,proc,sys,dev,run,var/www}
  cp /bin/busybox "$root/bin/busybox"
  for a in $(/bin/busybox --list); do
    [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
  done
  ln -sf bin "$root/sbin"
  echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
  echo 'root:x:0:' >"$root/etc/group"
  # busybox-static is linked with glibc, whose name lookups (wget http://web/) load NSS
  # modules at run time: the host's, of the same glibc, with what they need.
  echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
  printf '127.0.0.1 localhost\n' >"$root/etc/hosts"
  for lib in /lib/x86_64-linux-gnu/libnss_files.so.2 /lib/x86_64-linux-gnu/libnss_dns.so.2 \
             /lib/x86_64-linux-gnu/libresolv.so.2; do
    copy_with_deps "$lib" "$root"
  done
  chmod 1777 "$root/tmp"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if ! "$podman" image exists localhost/shoal-busybox:2; then
  busybox_rootfs "$tmp/busybox"
  tar -C "$tmp/busybox" -c . |
    "$podman" import --change 'CMD ["/bin/sh"]' - localhost/shoal-busybox:2 >/dev/null
fi

tag=$(sha256sum "$shoal" | cut -c1-12)
image=localhost/shoal-whoami:$tag
if ! "$podman" image exists "$image"; then
  root=$tmp/whoami
  busybox_rootfs "$root"
  objcopy --strip-debug "$shoal" "$root/bin/shoal"
  # The libraries it links, at the paths the dynamic loader looks for them.
  for lib in $(ldd "$shoal" | grep -o '/[^ ]*'); do
    copy_with_deps "$lib" "$root"
  done
  tar -C "$root" -c . |
    "$podman" import --change 'CMD ["/bin/shoal", "whoami", "--port", "80"]' - "$image" >/dev/null
fi
"$podman" tag "$image" localhost/shoal-whoami:latest
# Older builds' images go (one still in use by a container stays: rmi refuses it).
"$podman" images --format '{{.Repository}}:{{.Tag}}' localhost/shoal-whoami |
  grep -v -e ":$tag\$" -e ':latest$' | xargs -r "$podman" rmi >/dev/null 2>&1 || true
echo "$image"
