#!/bin/sh
# Montecarlo estimate of pi on cloudfs (RACK's sample app, in RACK's shape:
# the workers write their counts into the coordinator's pipe, which it reads
# until EOF), as user-data for the "tiny" image.  The namespace is mounted
# at /cloud; $CLOUDFS_PID is set.
#
# One script for every VM of the job: a process whose parent is init (ppid 1)
# is the coordinator; the VMs it forks run the same image and user-data and
# find out from /cloud/proc/self/status that they are workers.
#
#   coordinator: make the pipe counts (/cloud/proc/self/pipe/counts), open it
#                for reading, and for writing until every worker has joined
#                (the workers boot one by one: a pipe with no writer open
#                would end early); fork N workers (N from env/n if set, else
#                3); read messages until EOF (each read is one message:
#                busybox dd with one read), write RACK's report table to
#                /cloud/files/output/result.txt (or the path below
#                /cloud/files in env/stdout), then 4*inside/total to
#                env/pi, kill the workers, reap them from wait, then idle
#                until killed (or until env/quit is written).
#   worker:      open the coordinator's pipe for writing, say "join <pid>",
#                sample POINTS random points in the unit square with awk,
#                write "<inside> <total>", close the pipe, idle until killed.
#
# From the host:  cat /mnt/cloud/proc/<coordinator>/env/pi   (blocks until ready)
#                 cat /mnt/cloud/files/output/result.txt     (then)
C=/cloud/proc
SELF=$C/self
POINTS=${POINTS:-20000}

ppid=$(awk '$1 == "ppid" { print $2 }' $SELF/status)
if [ "$ppid" != 1 ]; then
  exec 5>$C/$ppid/pipe/counts
  echo "join $CLOUDFS_PID" >&5
  inside=$(awk -v n="$POINTS" -v seed="$CLOUDFS_PID" 'BEGIN {
    srand(seed * 7919 + 17); c = 0
    for (i = 0; i < n; i++) { x = rand(); y = rand(); if (x * x + y * y <= 1) c++ }
    print c }')
  echo "$inside $POINTS" >&5
  exec 5>&-
  echo "montecarlo worker $CLOUDFS_PID: $inside of $POINTS points inside"
  exec cat $SELF/env/quit
fi

start=$(date +%s)
n=3
if ls $SELF/env | grep -qx n; then n=$(cat $SELF/env/n); fi
out=output/result.txt
if ls $SELF/env | grep -qx stdout; then out=$(cat $SELF/env/stdout); fi
: > $SELF/pipe/counts
exec 4<$SELF/pipe/counts 5>$SELF/pipe/counts
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

joined=0
inside=0
total=0
while msg=$(dd bs=65536 count=1 <&4 2>/dev/null); [ -n "$msg" ]; do
  set -- $msg
  if [ "$1" = join ]; then
    joined=$((joined + 1))
    if [ "$joined" -eq "$n" ]; then exec 5>&-; fi   # now the last worker's close is the EOF
  else
    inside=$((inside + $1))
    total=$((total + $2))
  fi
done
exec 4<&-
pi=$(awk -v i="$inside" -v t="$total" 'BEGIN { printf "%.6f\n", 4 * i / t }')
mkdir -p "$(dirname "/cloud/files/$out")"
awk -v t="$total" -v w="$n" -v p="$inside" -v r="$pi" -v s=$(($(date +%s) - start)) 'BEGIN {
  e = r - 3.14159265359; if (e < 0) e = -e
  line = "+----------+---------------+"
  print line; printf "| %-8s | %-13s |\n", "Property", "Value"; print line
  printf "| %-8s | %-13s |\n", "trials", t; printf "| %-8s | %-13s |\n", "workers", w
  printf "| %-8s | %-13s |\n", "points", p; printf "| %-8s | %-13s |\n", "pi", "3.14159265359"
  printf "| %-8s | %-13s |\n", "result", r; printf "| %-8s | %-13.11f |\n", "error", e
  printf "| %-8s | %-13s |\n", "time", s; print line }' > "/cloud/files/$out"
echo "$pi" > $SELF/env/pi
echo "montecarlo coordinator $CLOUDFS_PID: pi ~ $pi ($inside of $total, read until EOF)"

for k in $kids; do echo kill > $C/$k/ctl; done
for k in $kids; do cat $SELF/wait; done
exec cat $SELF/env/quit
