"""The nemesis: one kind of fault per phase, injected once the workload
runs and healed before it ends.  Each fault is bounded in time
(``hold`` seconds, or past the session timeout where the fault is about
sessions) and recorded as ``{"kind", "target", "start", "end"}`` in history
time.

- ``zk-leader-kill``: SIGKILL the ZooKeeper leader, restart it ``hold`` s later.
- ``zk-minority-partition``: cut one ZooKeeper server (a minority) off.
- ``daemon-partition``: cut one daemon off from every ZooKeeper server for
  twice its session timeout (its session expires; others take its work over).
- ``daemon-pause``: SIGSTOP one daemon for twice its session timeout, then
  SIGCONT (a "GC pause": what it does late must be fenced).
- ``daemon-kill``: SIGKILL one daemon, start it again ``hold`` s later.
"""

from __future__ import annotations

import random
import signal

import trio

from .history import History
from .hosts import Cluster

NEMESES = ("zk-leader-kill", "zk-minority-partition", "daemon-partition", "daemon-pause", "daemon-kill")


async def inject(kind: str, cluster: Cluster, history: History, rng: random.Random, hold: float = 5.0) -> dict:
    """Inject one fault of ``kind``, hold it, heal it; returns its record."""
    if kind not in NEMESES:
        raise ValueError(f"unknown nemesis {kind!r}; one of {', '.join(NEMESES)}")
    fault: dict = {"kind": kind}
    session_hold = 2 * cluster.session_timeout + 1
    if kind == "zk-leader-kill":
        leader = await trio.to_thread.run_sync(cluster.zk_leader)
        fault.update(target=f"zk{leader}", start=history.now())
        await trio.to_thread.run_sync(cluster.zk_kill, leader)
        await trio.sleep(hold)
        await trio.to_thread.run_sync(cluster.zk_start, leader)
    elif kind == "zk-minority-partition":
        target = f"zk{rng.randint(1, cluster.n_zk)}"
        fault.update(target=target, start=history.now())
        cluster.partition(target)
        await trio.sleep(hold)
        cluster.heal(target)
    else:
        i = rng.randint(1, cluster.n_daemons)
        fault.update(target=f"d{i}", start=history.now())
        if kind == "daemon-partition":
            cluster.partition(f"d{i}")
            await trio.sleep(session_hold)
            cluster.heal(f"d{i}")
        elif kind == "daemon-pause":
            cluster.daemon_signal(i, signal.SIGSTOP)
            await trio.sleep(session_hold)
            cluster.daemon_signal(i, signal.SIGCONT)
        else:
            await trio.to_thread.run_sync(cluster.daemon_kill, i)
            await trio.sleep(hold)
            cluster.daemon_start(i)
            await cluster.wait_daemon(i)
    fault["end"] = history.now()
    return fault
