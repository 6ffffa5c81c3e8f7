"""A cluster run: for each nemesis a phase on a fresh deployment (the
daemons restarted on it), the workload for ``duration`` seconds with the
fault injected a quarter of the way in, everything healed, the cluster
left to converge, the state read, and the history checked
(tests.cluster.checker).  :func:`run` returns the results that
``bench/results/cluster.json`` holds; :func:`table` prints them.

The state after healing is read from ZooKeeper directly (kazoo, with the
deployment's credential), from every daemon over 9P (env values), and from
the fake cloud's directory (servers).
"""

from __future__ import annotations

import errno
import json
import os
import random
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import trio
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from cloudfs.drivers.base import META_DEPLOYMENT, META_PID
from cloudfs.drivers.fakecloud import FakeCloudDriver
from ninep.client import open_client
from ninep.errors import FsError

from .checker import Final, check, check_servers
from .history import OK, History, Op
from .hosts import Cluster
from .nemesis import NEMESES, inject
from .workload import Workload

#: Seconds after the heal within which every daemon must answer and the
#: deployment converge (no pending work, nothing creating).
CONVERGE_TIMEOUT = 90.0


def _zk_state(cluster: Cluster, root: str) -> tuple[Final, str]:
    """The ZooKeeper half of the final state, and the deployment id (blocking)."""
    auth = (cluster.state_dir(1) / "zookeeper.auth").read_text().strip()
    k = KazooClient(cluster.state.zk_hosts, auth_data=[("digest", auth)], timeout=10)
    k.start(30)
    try:
        final = Final()
        dep_id = k.get(f"{root}/id")[0].decode()
        final.next_pid = int(k.get(f"{root}/nextpid")[0])
        for name in k.get_children(f"{root}/proc"):
            pid = int(name)
            try:  # a process may end while this looks (before convergence)
                rec = json.loads(k.get(f"{root}/proc/{name}")[0])
                waits = []
                for w in k.get_children(f"{root}/proc/{name}/wait"):
                    wr = json.loads(k.get(f"{root}/proc/{name}/wait/{w}")[0])
                    waits.append(wr["pid"])
                    final.ended[wr["pid"]] = (wr["state"], wr.get("message", ""))
            except NoNodeError:
                continue
            final.procs[pid] = (rec["ppid"], rec["state"], rec.get("vm"))
            if waits:
                final.waits[pid] = waits
        final.pending = len(k.get_children(f"{root}/pending"))
        return final, dep_id
    finally:
        k.stop()
        k.close()


async def _converged(cluster: Cluster, root: str) -> Final:
    """Wait until every daemon answers, nothing is pending or creating and
    the fake cloud holds one server per VM process (eventually true is what
    is promised); then return the ZooKeeper and fake-cloud parts of the
    final state (as they are at the deadline if that never happens)."""
    for i in range(1, cluster.n_daemons + 1):
        await cluster.wait_daemon(i, CONVERGE_TIMEOUT)
    cloud = FakeCloudDriver(cluster.dir / "cloud")
    deadline = trio.current_time() + CONVERGE_TIMEOUT
    while True:
        final, dep_id = await trio.to_thread.run_sync(_zk_state, cluster, root)
        servers = await trio.to_thread.run_sync(cloud.servers_on_disk)
        final.servers = [(s.id, int(md[META_PID])) for s, md in servers if md.get(META_DEPLOYMENT) == dep_id]
        creating = [p for p, (_, s, _) in final.procs.items() if s == "creating"]
        if (final.pending == 0 and not creating and not check_servers([], final)) \
                or trio.current_time() > deadline:
            return final
        await trio.sleep(0.5)


async def _env_after(cluster: Cluster, keys: list[str]) -> dict[int, dict[str, str | None]]:
    out: dict[int, dict[str, str | None]] = {}
    for i in range(1, cluster.n_daemons + 1):
        values: dict[str, str | None] = {}
        async with open_client(cluster.socket(i)) as c:
            for key in keys:
                try:
                    async with await c.walk(f"proc/1/env/{key}") as f:
                        await f.open(os.O_RDONLY | os.O_NONBLOCK)
                        values[key] = (await f.read_all()).decode()
                except FsError as e:
                    values[key] = None if e.errno in (errno.EAGAIN, errno.ENOENT) else f"<errno {e.errno}>"
        out[i] = values
    return out


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]
    return {"n": len(values), "p50_ms": round(statistics.median(values) * 1000, 1), "p99_ms": round(p99 * 1000, 1)}


def _latencies(ops: list[Op], faults: list[dict]) -> dict:
    def during(o: Op) -> bool:
        return any(f["start"] <= o.start <= f["end"] for f in faults)

    forks = [o.end - o.start for o in ops if o.kind == "fork" and o.outcome == OK and during(o)]
    released = {}
    for o in ops:
        if o.kind == "release" and o.outcome == OK:
            released[o.args["key"]] = o
    rel = [max(0.0, o.end - released[o.args["key"]].end) for o in ops
           if o.kind == "block" and o.outcome == OK and o.args["key"] in released
           and during(released[o.args["key"]])]
    return {"fork_during_fault": _percentiles(forks), "release_during_fault": _percentiles(rel)}


async def run_phase(cluster: Cluster, history: History, nemesis: str, duration: float, *, clients: int = 2,
                    seed: int = 0) -> dict:
    """One phase: returns its results (ops by kind and outcome, faults,
    anomalies, latencies)."""
    rng = random.Random(seed)
    phase = f"{nemesis}-{cluster.tag}-{seed}"
    await cluster.start_daemons(phase)
    start = history.now()
    stop_at = start + duration
    work = Workload(history, phase, cluster.socket, list(range(1, cluster.n_daemons + 1)), clients=clients,
                    stop_at=stop_at, block_deadline=stop_at + CONVERGE_TIMEOUT, seed=seed)
    faults: list[dict] = []

    async def nemesis_task():
        await trio.sleep(duration * 0.25)
        faults.append(await inject(nemesis, cluster, history, rng))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(work.run)
        nursery.start_soon(nemesis_task)
    root = f"/cloudfs/{phase}"
    final = await _converged(cluster, root)
    ops = history.of_phase(phase)
    final.faults = [(f["start"], f["end"]) for f in faults]
    for f in faults:
        if f["kind"] == "daemon-kill":
            final.kills.setdefault(int(f["target"][1:]), []).append(f["start"])
    final.env = await _env_after(cluster, sorted({o.args["key"] for o in ops if o.kind == "write"}))
    anomalies = check(ops, final)
    by = defaultdict(Counter)
    for o in ops:
        by[o.kind][o.outcome] += 1
    return {
        "nemesis": nemesis,
        "deployment": phase,
        "seconds": round(history.now() - start, 1),
        "ops": {k: dict(v) for k, v in sorted(by.items())},
        "faults": faults,
        "anomalies": anomalies,
        "latency": _latencies(ops, faults),
        "processes_at_end": len(final.procs),
        "servers_at_end": len(final.servers),
    }


async def run(directory: str | os.PathLike, *, nemeses=NEMESES, duration: float = 30.0, clients: int = 2,
              session_timeout: float = 4.0, history_file: str | os.PathLike | None = None) -> dict:
    """Build a cluster in ``directory``, run one phase per nemesis, tear the
    cluster down; the results (also the whole history to ``history_file``
    as JSON lines, when given)."""
    cluster = Cluster(directory, session_timeout=session_timeout)
    history = History()
    phases = []
    t0 = time.time()
    try:
        await trio.to_thread.run_sync(cluster.up)
        for n, nemesis in enumerate(nemeses):
            phases.append(await run_phase(cluster, history, nemesis, duration, clients=clients, seed=n + 1))
    finally:
        await trio.to_thread.run_sync(cluster.down)
        if history_file is not None:
            with open(history_file, "w") as f:
                for o in history.ops:
                    f.write(json.dumps(o.to_json(), default=str) + "\n")
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "setup": {"zookeeper_servers": cluster.n_zk, "daemons": cluster.n_daemons,
                  "clients_per_daemon": clients, "blockers": 2, "phase_seconds": duration,
                  "session_timeout_s": session_timeout, "driver": "fake (shared fake cloud)"},
        "phases": phases,
        "anomalies": sum(len(p["anomalies"]) for p in phases),
        "operations": len(history.ops),
    }


def table(results: dict) -> str:
    """The results as a text table, one row per phase."""
    rows = [("nemesis", "ok", "fail", "unknown", "faults", "anomalies", "fork p50/p99 ms", "release p50/p99 ms")]
    for p in results["phases"]:
        tot = Counter()
        for c in p["ops"].values():
            tot.update(c)
        lat = p["latency"]

        def pp(d):
            return f"{d.get('p50_ms', '-')}/{d.get('p99_ms', '-')}"
        rows.append((p["nemesis"], str(tot["ok"]), str(tot["fail"]), str(tot["unknown"]), str(len(p["faults"])),
                     str(len(p["anomalies"])), pp(lat["fork_during_fault"]), pp(lat["release_during_fault"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for p in results["phases"]:
        for a in p["anomalies"]:
            lines.append(f"  {p['nemesis']}: {a['check']}: {a['detail']}")
    return "\n".join(lines) + "\n"
