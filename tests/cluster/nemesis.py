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
  SIGCONT (a "GC pause": what it does late must be fenced).  The daemon
  chosen is one caught with a create in flight (it owns a process in state
  ``creating``; the fake cloud's creates take a while), if one is caught
  within 5 s: its session expires, another daemon takes the process over
  and makes a server, and the paused create then finishes late; the record
  says ``mid_create``.
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
        i, creating = rng.randint(1, cluster.n_daemons), False
        if kind == "daemon-pause":  # pause one in the middle of a create, if one can be caught
            i, creating = await _creating_daemon(cluster, i)
        fault.update(target=f"d{i}", start=history.now())
        if kind == "daemon-partition":
            cluster.partition(f"d{i}")
            await trio.sleep(session_hold)
            cluster.heal(f"d{i}")
        elif kind == "daemon-pause":
            cluster.daemon_signal(i, signal.SIGSTOP)
            fault["mid_create"] = creating
            await trio.sleep(session_hold)
            cluster.daemon_signal(i, signal.SIGCONT)
        else:
            await trio.to_thread.run_sync(cluster.daemon_kill, i)
            await trio.sleep(hold)
            cluster.daemon_start(i)
            await cluster.wait_daemon(i)
    fault["end"] = history.now()
    return fault


async def _creating_daemon(cluster: Cluster, default: int, within: float = 5.0) -> tuple[int, bool]:
    """``(i, True)`` for a daemon that owns a process being created right
    now (its create is in flight in the fake cloud), found within ``within``
    seconds; else ``(default, False)``."""
    ids = {cluster.daemon_id(i): i for i in range(1, cluster.n_daemons + 1)}
    with trio.move_on_after(within):
        while True:
            owners = await trio.to_thread.run_sync(cluster.creating_owners)
            for owner in owners:
                if owner in ids:
                    return ids[owner], True
            await trio.sleep(0.02)
    return default, False
