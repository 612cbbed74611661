#!/usr/bin/env bash
# The agent itself on a kernel with IPVS and WireGuard: boots Debian's cloud kernel under
# qemu (scripts/ipvs-vm.sh) with the whole `shoal` binary, etcd, curl and tcpdump, and runs
# scripts/agent-vm-guest.sh there (a two-node lab with [lb] dataplane = "ipvs" and an
# encrypted network over kernel WireGuard). Exit 0 only on the guest's AGENT-VM-TEST: PASS.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export SHOAL_VM_BUILD=shoal \
  SHOAL_VM_GUEST_SCRIPT="$here/agent-vm-guest.sh" \
  SHOAL_VM_MARKER=AGENT-VM-TEST \
  SHOAL_VM_MODULES="wireguard vxlan bridge tun nf_conntrack_netlink nft_ct nft_nat nft_fib_ipv4 nft_numgen nft_hash nft_reject_ipv4 nft_reject_inet nft_limit nft_log nft_objref nft_quota" \
  SHOAL_VM_BINS="etcd curl tcpdump" \
  SHOAL_VM_MEM=2048 \
  SHOAL_VM_SMP=2 \
  SHOAL_IPVS_VM_TIMEOUT=${SHOAL_IPVS_VM_TIMEOUT:-400}
exec bash "$here/ipvs-vm.sh" "$@"
