#!/bin/sh
# fork live demo (cloudfs): the parent computes a table once, in memory (a
# shell variable) and in tmpfs (/tmp/primes), then forks N children with
# `cloudfs-fork live`.  Each child starts as a copy of the parent's running
# VM, right where cloudfs-fork was called: it has the table without
# computing it, counts its share of it and writes the count to its own
# env/share; the parent adds the shares up into env/answer and kills them.
C=/cloud/proc
SELF=$C/self
n=3
if ls $SELF/env | grep -qx n; then n=$(cat $SELF/env/n); fi

t0=$(date +%s)
primes=""
i=2
while [ "$i" -lt 700 ]; do
  p=1
  for q in $primes; do
    [ $((q * q)) -gt "$i" ] && break
    [ $((i % q)) -eq 0 ] && { p=0; break; }
  done
  [ "$p" -eq 1 ] && primes="$primes $i"
  i=$((i + 1))
done
echo "$primes" > /tmp/primes
echo "$(echo $primes | wc -w) primes in $(($(date +%s) - t0)) s" > $SELF/env/table
echo "forklive parent $CLOUDFS_PID: table of $(echo $primes | wc -w) primes"

k=0
kids=""
while [ "$k" -lt "$n" ]; do
  kid=$(cloudfs-fork live) || { echo "forklive: fork live failed"; exit 1; }
  if [ "$kid" = 0 ]; then
    . /etc/cloudfs/identity  # the child's own CLOUDFS_PID
    share=0
    j=0
    for p in $primes; do  # the shell variable came with the copy
      [ $((j % n)) -eq "$k" ] && share=$((share + 1))
      j=$((j + 1))
    done
    echo "$k $share $(wc -w < /tmp/primes)" > $SELF/env/share
    echo "forklive child $CLOUDFS_PID (worker $k): $share primes"
    exec cat $SELF/env/quit  # stays readable until the parent has its share
  fi
  kids="$kids $kid"
  k=$((k + 1))
done
echo $kids > $SELF/env/children
total=0
for kid in $kids; do
  set -- $(cat $C/$kid/env/share)
  total=$((total + $2))
done
for kid in $kids; do echo kill > $C/$kid/ctl; done
echo "$total" > $SELF/env/answer
echo "forklive parent $CLOUDFS_PID: $total primes counted by$kids"
exec cat $SELF/env/quit
