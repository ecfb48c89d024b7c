#!/usr/bin/env bash
# A two-node Ray cluster on this machine, to try multi-node runs without cloud machines: a head (dashboard,
# Jobs API, token auth) plus a second raylet, each with its own temp dir, ports and CPUs, on loopback.
# Both nodes see the same filesystem, so a local runs_dir works; on real machines it must be shared storage.
#
#   bash cluster/two_nodes.sh start [CPUS_PER_NODE]   # prints `export RAY_ADDRESS=...`, the token, the pids
#   eval "$(bash cluster/two_nodes.sh start | grep ^export)"   # or: start and export in one go
#   ray status --address 127.0.0.1:GCS_PORT          # both nodes (the `# nodes:` line it printed)
#   ray job submit --working-dir . -- python -m dume_ray run --config configs/smoke/tiny.yaml runs_dir=$PWD/runs
#   bash cluster/two_nodes.sh stop                    # stops exactly these nodes, by process id (never `ray stop`)
#
# The state (address, token, pids, temp dirs) is kept in $DUME_CLUSTER_STATE (default /tmp/dume-two-nodes.json).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$(command -v python)}"
STATE="${DUME_CLUSTER_STATE:-/tmp/dume-two-nodes.json}"

case "${1:-}" in
  start)
    if [[ -f "$STATE" ]]; then
      echo "a cluster is already recorded in $STATE; run '$0 stop' first" >&2
      exit 1
    fi
    out="$("$PYTHON" "$HERE/local_cluster.py" up --nodes 2 --cpus-per-node "${2:-1}")"
    echo "$out"
    cp "$(echo "$out" | sed -n 's/^# stop: .* down //p')" "$STATE"
    echo "# state: $STATE (stop with: bash $0 stop)"
    ;;
  stop)
    if [[ ! -f "$STATE" ]]; then
      echo "no cluster recorded in $STATE" >&2
      exit 1
    fi
    "$PYTHON" "$HERE/local_cluster.py" down "$STATE"
    rm -f "$STATE"
    ;;
  *)
    echo "usage: $0 start [CPUS_PER_NODE] | stop" >&2
    exit 2
    ;;
esac
