#!/usr/bin/env bash
# The whole test suite, kernel tests included (they need root and never skip here), then a
# check that the host namespace is as it was: same namespaces, same nft ruleset, same
# podman containers.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "make test must run as root: the kernel tests create namespaces, links and nft tables" >&2
  exit 1
fi
ns_before=$(ip netns list | sort)
# Counter-free: rules left behind fail the suite, packets counted by a host firewall do not.
nft_before=$(nft -s list ruleset)
containers() { podman ps -a --format '{{.Names}}' | sort; }
ct_before=$(containers)
start=$(date +%s)
cargo build --workspace --all-targets
# The images of the container tests, built offline from Debian packages and this build.
bash scripts/images.sh target/debug/shoal
status=0
# Kernel tests that cannot run (no root, no nft) fail instead of skipping.
export SHOAL_REQUIRE_KERNEL_TESTS=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$log" || status=1
# The DNS fuzz target at full size (1,000,000 inputs) needs an optimised build.
cargo test --release -p shoal-dns --lib fuzz_one_million -- --ignored 2>&1 | tee -a "$log" || status=1
ns_after=$(ip netns list | sort)
nft_after=$(nft -s list ruleset)
if [ "$ns_before" != "$ns_after" ]; then
  echo "FAIL: the tests left network namespaces behind:" >&2
  diff <(echo "$ns_before") <(echo "$ns_after") >&2 || true
  status=1
fi
if [ "$nft_before" != "$nft_after" ]; then
  echo "FAIL: the tests changed the host's nft ruleset" >&2
  diff <(echo "$nft_before") <(echo "$nft_after") >&2 || true
  status=1
fi
ct_after=$(containers)
if [ "$ct_before" != "$ct_after" ]; then
  echo "FAIL: the tests left podman containers behind:" >&2
  diff <(echo "$ct_before") <(echo "$ct_after") >&2 || true
  status=1
fi
passed=$(awk '/^test result:/ {for (i=1;i<=NF;i++) if ($i ~ /^passed;?$/) s+=$(i-1)} END {print s+0}' "$log")
failed=$(awk '/^test result:/ {for (i=1;i<=NF;i++) if ($i ~ /^failed;?$/) s+=$(i-1)} END {print s+0}' "$log")
echo "make test: $(( $(date +%s) - start )) s, exit $status"
echo "total: $passed passed, $failed failed"
exit $status
