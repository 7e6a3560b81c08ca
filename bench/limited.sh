#!/usr/bin/env bash
# Run a command inside a cgroup v1 memory limit, so that a model bigger than the limit is really bigger than the
# memory it may use (the page cache counts against a v1 memory limit too).
#
#   bench/limited.sh LIMIT COMMAND [ARGS...]      e.g. bench/limited.sh 8G target/release/moestream run ...
#
# Drops the page cache first (cold start), prints the command's output, then the cgroup's peak usage and
# failure count. Needs root and /sys/fs/cgroup/memory (cgroup v1).
set -euo pipefail
limit="$1"
shift
cg=/sys/fs/cgroup/memory/moestream-bench-$$
[ -d /sys/fs/cgroup/memory ] || { echo "limited.sh: no cgroup v1 memory controller" >&2; exit 77; }
mkdir "$cg"
trap 'rmdir "$cg" 2>/dev/null || true' EXIT
echo "$limit" > "$cg/memory.limit_in_bytes"
sync
echo 3 > /proc/sys/vm/drop_caches
rc=0
bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' _ "$cg" "$@" || rc=$?
echo "limited.sh: limit $limit, peak usage $(( $(cat "$cg/memory.max_usage_in_bytes") / 1048576 )) MiB, failcnt $(cat "$cg/memory.failcnt"), exit $rc" >&2
exit "$rc"
