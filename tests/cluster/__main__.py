"""``scripts/cluster up|down|run``: the cluster harness from the command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import trio

from .hosts import Cluster, down
from .nemesis import NEMESES
from .run import run, table

DEFAULT_DIR = "/tmp/cloudfs-cluster"


def cmd_up(args) -> int:
    c = Cluster(args.dir, session_timeout=args.session_timeout)
    try:
        c.up()
        trio.run(c.start_daemons, args.deployment)
    except BaseException:
        c.down()
        raise
    st = c.state
    print(f"cluster up in {c.dir} (bridge {st.bridge}, {st.subnet}.0/24)")
    for name, h in st.hosts.items():
        print(f"  {name:4} {h.address:15} netns {h.netns}")
    print(f"ZooKeeper: {st.zk_hosts}")
    for i in range(1, c.n_daemons + 1):
        print(f"  .venv/bin/cloudfs ps --state-dir {c.state_dir(i)}      # daemon d{i}")
    print(f"  .venv/bin/cloudfs ctl 1 fork --state-dir {c.state_dir(1)}")
    print(f"  ip netns exec {st.hosts['d1'].netns} ip addr     # a host's view")
    print(f"stop with: bash scripts/cluster down {c.dir}")
    # the daemons and servers run on; this process leaves them
    c.daemons.clear()
    return 0


def cmd_down(args) -> int:
    down(args.dir)
    print(f"cluster in {args.dir} stopped")
    return 0


def cmd_run(args) -> int:
    nemeses = args.nemesis or list(NEMESES)
    results = trio.run(lambda: run(args.dir, nemeses=nemeses, duration=args.seconds, clients=args.clients,
                                   session_timeout=args.session_timeout, history_file=args.history))
    sys.stdout.write(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"results in {args.out}")
    return 1 if results["anomalies"] else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/cluster", description="A cloudfs cluster on one machine (root).")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start 3 ZooKeeper hosts and 3 daemon hosts")
    up.add_argument("dir", nargs="?", default=DEFAULT_DIR)
    up.add_argument("--deployment", default="default")
    up.add_argument("--session-timeout", type=float, default=10.0, help="the daemons' (s, default 10)")
    up.set_defaults(func=cmd_up)
    dn = sub.add_parser("down", help="stop what `up` started and remove its network")
    dn.add_argument("dir", nargs="?", default=DEFAULT_DIR)
    dn.set_defaults(func=cmd_down)
    r = sub.add_parser("run", help="workload + nemesis + checker, one phase per nemesis")
    r.add_argument("--dir", default="/tmp/cloudfs-cluster-run", help="where the cluster lives (logs stay)")
    r.add_argument("--nemesis", action="append", choices=NEMESES, help="repeatable (default: all, in order)")
    r.add_argument("--seconds", type=float, default=60.0, help="workload time per phase (default 60)")
    r.add_argument("--clients", type=int, default=2, help="clients per daemon (default 2)")
    r.add_argument("--session-timeout", type=float, default=4.0, help="the daemons' (s, default 4)")
    r.add_argument("--out", default="bench/results/cluster.json", help="results JSON ('' for none)")
    r.add_argument("--history", help="write every operation here (JSON lines)")
    r.set_defaults(func=cmd_run)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/cluster: needs root (network namespaces, a bridge)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up as on ^C
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
