#!/usr/bin/env bash
# The lab demo: a one-node Shoal cluster in network namespaces, a service behind a VIP,
# its name resolved inside a container and requests spread across the replicas.
# DEMO_KEEP=1 leaves the lab up afterwards (then: shoal lab down --name demo).
set -euo pipefail
BIN=$(realpath "${1:-target/release/shoal}")
export SHOAL_LAB=demo
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@"; }
"$BIN" lab down --name demo >/dev/null 2>&1 || true
if [ "${DEMO_KEEP:-0}" != 1 ]; then
  trap '"$BIN" lab down --name demo >/dev/null 2>&1 || true' EXIT
fi
say "shoal lab up --nodes 1"
eval "$("$BIN" lab up --name demo --nodes 1 --store embedded)"
echo "export SHOAL_HOST=$SHOAL_HOST"
shoal() { "$BIN" "$@"; }
run shoal network create appnet
run shoal service create --name web --network appnet --replicas 3 -- shoal whoami --port 80
for _ in $(seq 100); do
  [ "$(shoal service ps web --format json | grep -c '"state": "running"')" = 3 ] && break
  sleep 0.1
done
run shoal service ls
run shoal service ps web
run shoal lab exec web.1 -- getent hosts web
run shoal lab exec web.1 -- getent hosts tasks.web
say "30 x curl http://web/ from web.1 (which replica answered)"
for _ in $(seq 30); do shoal lab exec web.1 -- curl -s http://web/ | sed -n 's/^Task: //p'; done | sort | uniq -c
run shoal lab exec web.1 -- curl -s http://web/
run shoal service scale web=5
sleep 1
run shoal lab exec web.1 -- dig +short @127.0.0.11 tasks.web
run shoal service rm web
sleep 0.5
run shoal network ls
say "shoal lab down"
