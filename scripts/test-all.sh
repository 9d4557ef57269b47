#!/usr/bin/env bash
# `make test`'s pytest part: two pytest processes at once, so the machine's two cores both work.
#   host tiers: tests/unit, tests/integration without its vm/ folder and tests/reliability
#               (Python on loopback: envd on the host, the control plane with fake agents, real
#               SQLite and PostgreSQL, the short fuzz run)
#   VM tiers:   tests/integration/vm and tests/e2e (QEMU guests, mostly waiting on TCG and on
#               the network, so a second process costs them little), the `cold_boots` tests
#               included (base templates at the size asked, the `base` template: ~90 s here)
# The VM tiers print as they run; the host tiers' output follows when both are done. The exit
# status is non-zero when either failed. Extra arguments go to both pytest runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=.venv/bin/pytest
logdir=$(mktemp -d)
start=$(date +%s)

$PYTEST tests/unit tests/integration tests/reliability --ignore=tests/integration/vm --durations=15 \
  "$@" >"$logdir/host.log" 2>&1 &
host=$!
trap 'kill "$host" 2>/dev/null; rm -rf "$logdir"' EXIT

$PYTEST tests/integration/vm tests/e2e --durations=30 "$@"
vm=$?
wait "$host"
hostrc=$?

echo
echo "======== host tiers (tests/unit, tests/integration without vm/, tests/reliability) ========"
cat "$logdir/host.log"
echo
echo "make test: VM tiers exit $vm, host tiers exit $hostrc; $(( $(date +%s) - start )) s in pytest"
[ "$vm" -eq 0 ] && [ "$hostrc" -eq 0 ]
