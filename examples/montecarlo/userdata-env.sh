#!/bin/sh
# Montecarlo estimate of pi on cloudfs (RACK's sample app) with env keys only
# (the pipe version is userdata.sh), as user-data for
# the "tiny" image.  The namespace is mounted at /cloud; $CLOUDFS_PID is set.
#
# One script for every VM of the job: a process whose parent is init (ppid 1)
# is the coordinator; the VMs it forks run the same image and user-data and
# find out from /cloud/proc/self/status that they are workers.
#
#   coordinator: fork N workers (N from env/n if set, else 3), read each
#                worker's env/points (the reads block until the worker
#                writes), write 4*inside/total to env/pi, kill the workers,
#                reap them from wait, then idle until killed (or until
#                env/quit is written) so env/pi stays readable.
#   worker:      sample POINTS random points in the unit square with awk,
#                write "<inside> <total>" to env/points, idle until killed.
#
# From the host:  cat /mnt/cloud/proc/<coordinator>/env/pi   (blocks until ready)
C=/cloud/proc
SELF=$C/self
POINTS=${POINTS:-20000}

ppid=$(awk '$1 == "ppid" { print $2 }' $SELF/status)
if [ "$ppid" != 1 ]; then
  inside=$(awk -v n="$POINTS" -v seed="$CLOUDFS_PID" 'BEGIN {
    srand(seed * 7919 + 17); c = 0
    for (i = 0; i < n; i++) { x = rand(); y = rand(); if (x * x + y * y <= 1) c++ }
    print c }')
  echo "$inside $POINTS" > $SELF/env/points
  echo "montecarlo worker $CLOUDFS_PID: $inside of $POINTS points inside"
  exec cat $SELF/env/quit
fi

n=3
if ls $SELF/env | grep -qx n; then n=$(cat $SELF/env/n); fi
kids=""
i=0
while [ "$i" -lt "$n" ]; do
  exec 3<>$SELF/ctl
  echo fork >&3
  read kid <&3
  exec 3<&-
  kids="$kids $kid"
  i=$((i + 1))
done
echo $kids > $SELF/env/workers
echo "montecarlo coordinator $CLOUDFS_PID: workers$kids"

inside=0
total=0
for k in $kids; do
  set -- $(cat $C/$k/env/points)
  inside=$((inside + $1))
  total=$((total + $2))
done
pi=$(awk -v i="$inside" -v t="$total" 'BEGIN { printf "%.6f\n", 4 * i / t }')
echo "$pi" > $SELF/env/pi
echo "montecarlo coordinator $CLOUDFS_PID: pi ~ $pi ($inside of $total)"

for k in $kids; do echo kill > $C/$k/ctl; done
for k in $kids; do cat $SELF/wait; done
exec cat $SELF/env/quit
