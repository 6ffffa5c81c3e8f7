#!/bin/sh
# run.sh [MNT] [N]: run the montecarlo demo on a cloudfs mount (the operator's
# view, e.g. the daemon's FUSE mount at /mnt/cloud) with N workers (default
# 3); print the process tree, the estimate of pi and the report
# /files/output/result.txt.  KEEP=1 leaves the
# coordinator running afterwards; by default it is killed at the end.
set -e
MNT=${1:-/mnt/cloud}
N=${2:-3}
HERE=$(cd "$(dirname "$0")" && pwd)

tree() {  # tree PID INDENT: one line per process, children indented (one that ends meanwhile is left out)
  line=$(awk '$1 == "pid" || $1 == "name" || $1 == "state" { printf "%s%s", sep, $2; sep = " " }' \
    "$MNT/proc/$1/status" 2>/dev/null) || return 0
  echo "$2$line"
  for kid in $(cat "$MNT/proc/$1/children" 2>/dev/null); do tree "$kid" "$2  "; done
}

exec 3<>"$MNT/proc/1/ctl"
echo fork >&3
read pid <&3
exec 3<&-
cat "$HERE/userdata.sh" > "$MNT/proc/$pid/userdata"
rm -f "$MNT/files/output/result.txt"           # the last run's report (only the operator may replace it)
echo "$N" > "$MNT/proc/$pid/env/n"
echo "exec tiny name=montecarlo" > "$MNT/proc/$pid/ctl"
echo "montecarlo: coordinator is process $pid"

workers=$(cat "$MNT/proc/$pid/env/workers")    # blocks until it has forked them
tree 1 ""                                      # the workers live until the coordinator has all their points
pi=$(cat "$MNT/proc/$pid/env/pi")             # blocks until the answer appears
echo "pi ~ $pi"
cat "$MNT/files/output/result.txt"            # RACK's report, written by the coordinator before env/pi
if [ -z "$KEEP" ]; then echo kill > "$MNT/proc/$pid/ctl"; fi
