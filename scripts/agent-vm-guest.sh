#!/bin/sh
# Guest program of tests/tests/agent_vm.rs, run by the VM's init (scripts/ipvs-vm.sh with
# SHOAL_VM_BUILD=shoal) on Debian's cloud kernel under qemu: the agent itself on a kernel
# with IPVS and WireGuard. A two-node lab (namespaces, local etcd) whose agents use
# `[lb] dataplane = "ipvs"` and kernel WireGuard; an encrypted network with a published
# service of two replicas (one per node) and an observer task. Checks:
#   - the VIP spreads requests over both replicas, through IPVS (ipvsadm lists the service);
#   - the published port answers from the lab's client on both nodes;
#   - the encrypted network carries traffic across nodes with no plaintext on the underlay
#     (tcpdump on the lab's bridge) and the agents report the kernel backend.
# Last line: AGENT-VM-TEST: PASS or AGENT-VM-TEST: FAIL <reason>.
export PATH=/sbin:/bin SHOAL_LB_NFT=process HOME=/root
alias ip=/sbin/ip
fail() {
  echo "AGENT-VM-TEST: FAIL $*"
  for f in /run/shoal/lab/vm/node1/agent.log /run/shoal/lab/vm/node2/agent.log; do
    [ -f "$f" ] && { echo "--- $f"; tail -n 15 "$f"; }
  done
  exit 0
}
t0=$(date +%s)
step() { echo "guest: $(($(date +%s) - t0)) s: $*"; }

shoal lab up --name vm --nodes 2 --store etcd --lb-dataplane ipvs >/tmp/up.out 2>/tmp/up.err ||
  fail "lab up: $(tail -n 5 /tmp/up.err)"
step "lab up"
export SHOAL_HOST=unix:///run/shoal/lab/vm/node1/shoal.sock SHOAL_LAB=vm
shoal network create --opt encrypted secure >/dev/null || fail "network create"
shoal service create --name web --network secure --replicas 2 -p 8080:80 -- shoal whoami --port 80 >/dev/null ||
  fail "service create web"
shoal service create --name obs --network secure -- sleep 100000 >/dev/null || fail "service create obs"

# Both web tasks and the observer running.
i=0
while :; do
  n=$(shoal service ps web | grep -c ' running  *running')
  o=$(shoal service ps obs | grep -c ' running  *running')
  [ "$n" = 2 ] && [ "$o" = 1 ] && break
  i=$((i + 1))
  [ $i -gt 120 ] && fail "tasks not running: $(shoal service ps web)"
  sleep 1
done
step "tasks running"
nodes=$(shoal service ps web | awk 'NR > 1 {print $4}' | sort -u | wc -l)
[ "$nodes" = 2 ] || fail "web's tasks are not on both nodes"

# The VIP through IPVS: answers from both replicas.
i=0
while :; do
  shoal lab exec obs.1 -- curl -s -m 3 http://web/ | grep Hostname >/tmp/h1 && break
  i=$((i + 1))
  [ $i -gt 60 ] && fail "the VIP does not answer"
  sleep 1
done
: >/tmp/hosts
for k in $(seq 1 16); do
  shoal lab exec obs.1 -- curl -s -m 3 http://web/ | grep Hostname >>/tmp/hosts
done
distinct=$(sort -u /tmp/hosts | wc -l)
[ "$distinct" = 2 ] || fail "VIP answers came from $distinct replicas: $(sort /tmp/hosts | uniq -c)"
found=0
for ns in $(ls /run/netns | grep '^shoal-vm-node1-n-'); do
  /sbin/ip netns exec "$ns" /sbin/ipvsadm -Ln >/tmp/ipvs.$ns 2>&1
  grep -q 'TCP\|FWM' /tmp/ipvs.$ns && found=1
done
[ "$found" = 1 ] || fail "no IPVS service in node1's network namespaces: $(ls /run/netns) $(cat /tmp/ipvs.* 2>&1) $(grep -A2 '\[lb\]' /run/shoal/lab/vm/node1/agent.toml)"
step "VIP spread over 2 replicas through IPVS"

# The published port from the lab's client on both nodes.
for a in 192.0.2.11 192.0.2.12; do
  ip netns exec shoal-vm-client curl -s -m 5 "http://$a:8080/" | grep -q Hostname ||
    fail "published port on $a"
done
step "published port answers on both nodes"

# Encrypted across nodes, nothing in the clear on the underlay; kernel WireGuard.
ip netns exec shoal-vm-ul tcpdump -i br0 -U -n -w /tmp/ul.pcap 2>/tmp/tcpdump.err &
cap=$!
sleep 2
for k in $(seq 1 6); do
  shoal lab exec obs.1 -- curl -s -m 3 -H "X-Marker: VM-SECRET-2718" http://web/ >/dev/null
done
sleep 1
kill -INT $cap
sleep 1
grep -q VM-SECRET-2718 /tmp/ul.pcap && fail "plaintext of the encrypted network on the underlay"
[ -s /tmp/ul.pcap ] || fail "tcpdump captured nothing: $(cat /tmp/tcpdump.err)"
tcpdump -r /tmp/ul.pcap -n 2>/dev/null | grep -q '\.51820 ' ||
  fail "no WireGuard traffic on the underlay: $(tcpdump -r /tmp/ul.pcap -n 2>&1 | head -5)"
shoal node inspect | grep -q '"backend": "kernel"' || fail "node1's WireGuard is not the kernel's: $(shoal node inspect | grep -A3 wireguard)"
ip netns exec shoal-vm-node1 ip -d link show shoalwg0 | grep -q wireguard || fail "no wireguard link on node1"
step "encrypted traffic inside kernel WireGuard, none in the clear"
shoal lab down --name vm >/dev/null 2>&1
step "lab down"
echo "AGENT-VM-TEST: PASS"
