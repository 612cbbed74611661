#!/usr/bin/env bash
# Installs what Shoal's build, demo and tests need on Debian 12, and only what is missing.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
have() { command -v "$1" >/dev/null 2>&1; }
need=()
have nft       || need+=(nftables)
have ip        || need+=(iproute2)
have etcd      || need+=(etcd-server)
have etcdctl   || need+=(etcd-client)
have protoc    || need+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/descriptor.proto, ...), which etcd-client's
# protos import: only a Recommends of protobuf-compiler, and we install without those.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
have dig       || need+=(bind9-dnsutils)
have dnsperf   || need+=(dnsperf)
# benches/dns_bench compares against these (dnsmasq-base: the binary without a system service)
[ -x /usr/lib/podman/aardvark-dns ] || need+=(aardvark-dns)
have dnsmasq || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
have curl      || need+=(curl)
have conntrack || need+=(conntrack)
# tests/tests/encrypted.rs captures on the lab underlay: no plaintext of encrypted networks
have tcpdump || [ -x /usr/bin/tcpdump ] || need+=(tcpdump)
# benches/lb_sync compares against iptables-restore (legacy and nft back ends)
have iptables-legacy-restore || need+=(iptables)
have ping      || need+=(iputils-ping)
have ps        || need+=(procps)
have cc        || need+=(gcc)
# dns/tests/kernel.rs builds a static musl client (musl-gcc -static) for the truncation test
have musl-gcc  || need+=(musl-tools)
# IPVS tests in a qemu VM (scripts/ipvs-vm.sh): the kernel itself is NOT installed on the host,
# its .deb is downloaded into target/ipvs-vm/ and unpacked there (see below).
have qemu-system-x86_64 || need+=(qemu-system-x86)
dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need+=(busybox-static)
have ipvsadm || [ -x /usr/sbin/ipvsadm ] || need+=(ipvsadm)
have depmod  || [ -x /usr/sbin/depmod ]  || need+=(kmod)
# Image tasks (`service create --image`) run through podman with runc (crun refuses hybrid
# cgroup hosts such as this one); the CNI backend of podman uses Shoal's CNI plugin.
have podman || need+=(podman)
have runc   || need+=(runc)
[ -d /usr/lib/cni ] || need+=(containernetworking-plugins)
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "deps: missing packages: ${need[*]} (run as root so they can be installed)" >&2
    exit 1
  fi
  echo "deps: installing ${need[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's cloud kernel (has IPVS) for the VM tests: `apt-get download` + `dpkg-deb -x` into
# the cargo target dir; /boot and the host's initramfs are left alone.
bash "$(dirname "$0")/ipvs-vm.sh" fetch >/dev/null
if ! have cargo; then
  echo "deps: cargo not found: install a Rust toolchain >= 1.88 (rustup) first" >&2
  exit 1
fi
