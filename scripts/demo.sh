#!/usr/bin/env bash
# The lab demo: a three-node Shoal cluster (etcd, VXLAN overlay) in network namespaces,
# running services from OCI images (podman + runc, images built offline by images.sh):
# names resolved inside containers, a VIP spreading requests over replicas on every node,
# a routing-mesh port answering on every node with the client's address kept, a host-mode
# port answering only where its replica runs, a standalone container (`shoal run`) and a
# podman container through the CNI plugin on an attachable network, the publish-mode
# comparison table with its HTML report, and service logs from every node.
# DEMO_KEEP=1 leaves the lab up afterwards (then: shoal lab down --name demo).
set -euo pipefail
BIN=$(realpath "${1:-target/release/shoal}")
HERE=$(cd "$(dirname "$0")" && pwd)
export SHOAL_LAB=demo
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
note() { printf '\033[2m# %s\033[0m\n' "$*"; }
run() { say "$*"; "$@"; }
shoal() { "$BIN" "$@"; }
CONF=/run/shoal/lab/demo-podman.conf
cleanup() {
  [ -f "$CONF" ] && CONTAINERS_CONF=$CONF podman rm -f -t 0 --ignore cnibox >/dev/null 2>&1 || true
  rm -f "$CONF"
  "$BIN" lab down --name demo >/dev/null 2>&1 || true
}
cleanup
[ "${DEMO_KEEP:-0}" = 1 ] || trap cleanup EXIT

say "bash scripts/images.sh   # images from Debian packages and this shoal binary, no registry"
IMG=$(bash "$HERE/images.sh" "$BIN")
echo "$IMG  localhost/shoal-busybox:2"

say "shoal lab up --nodes 3"
eval "$(shoal lab up --name demo --nodes 3)"
echo "export SHOAL_HOST=$SHOAL_HOST"
run shoal node ls

wait_running() { # service count
  for _ in $(seq 300); do
    [ "$(shoal service ps "$1" --format json | grep -c '"state": "running"')" -ge "$2" ] && return
    sleep 0.2
  done
  echo "demo: $1 did not reach $2 running tasks" >&2; exit 1
}
run shoal network create --attachable appnet
run shoal service create --name web --network appnet --replicas 3 -p 8080:80 "$IMG"
run shoal service create --name api --network appnet --publish published=8081,target=80,mode=host "$IMG"
wait_running web 3
wait_running api 1
run shoal service ls
run shoal service ps web

say "shoal run -d --name box --network appnet,alias=toolbox localhost/shoal-busybox:2 sleep 1000"
shoal run -d --name box --network appnet,alias=toolbox localhost/shoal-busybox:2 sleep 1000
for _ in $(seq 100); do shoal ps | grep -q 'box .*running' && break; sleep 0.2; done
run shoal ps
note "names resolve inside the containers (busybox's own resolver asks 127.0.0.11)"
run shoal lab exec box.1 -- nslookup web
run shoal lab exec box.1 -- nslookup tasks.web
run shoal lab exec web.1 -- nslookup toolbox
say "12 x GET http://web/ from box (which replica answered, on which node)"
for _ in $(seq 12); do
  shoal lab exec box.1 -- sh -c "(printf 'GET / HTTP/1.0\r\n\r\n'; sleep 0.3) | nc web 80" | sed -n 's/^Task: //p'
done | sort | uniq -c

note "the routing mesh: port 8080 answers on every node, the client's address kept (RemoteAddr)"
for ip in 192.0.2.11 192.0.2.12 192.0.2.13; do
  say "curl http://$ip:8080/   (from the lab's client, 192.0.2.100)"
  shoal lab exec client -- curl -s --max-time 3 "http://$ip:8080/" | grep -E '^(Task|RemoteAddr):'
done
API_NODE=$(shoal service ps api | awk 'NR==2 {print $4}')
note "host mode: port 8081 answers only on $API_NODE, where api.1 runs"
for n in 1 2 3; do
  ip=192.0.2.1$n
  say "curl http://$ip:8081/   (node$n)"
  shoal lab exec client -- curl -s --max-time 2 "http://$ip:8081/" | grep -E '^Task:' || echo "(refused: no replica on node$n)"
done

say "CONTAINERS_CONF=<(shoal lab podman-conf) podman --network-backend cni run -d --name cnibox --network appnet ..."
shoal lab podman-conf --node node1 > "$CONF"
CONTAINERS_CONF=$CONF podman --network-backend cni run -d --name cnibox --network appnet:alias=cni-alias \
  localhost/shoal-busybox:2 sleep 1000 >/dev/null
run shoal ps
run env CONTAINERS_CONF="$CONF" podman exec cnibox nslookup web
run shoal lab exec box.1 -- nslookup cnibox
run env CONTAINERS_CONF="$CONF" podman rm -f -t 0 cnibox

run shoal service logs web --tail 2

say "shoal lab compare --duration 1s --report ./shoal-compare.html"
shoal lab compare --duration 1s --report ./shoal-compare.html

run shoal rm box
run shoal service rm web api
say "shoal lab down"
