"""cloudfs benchmark (not a test): fork latency, blocked-read release latency
across two daemons, and listing /proc with 10,000 processes.

Starts its own ZooKeeper (Debian's package, loopback, temporary data dir,
killed at the end) and two CloudFS daemons with the fake driver, then
measures through the ninep.fs interface:

- fork: ``fork`` written to /proc/1/ctl on daemon A until the child is
  visible (the write returned *and* daemon B walks /proc/<pid>), N forks;
- release: a reader on A blocked on an unset env key, a writer on B sets it;
  time from the write's start to the reader's return;
- listing: readdir of /proc with 10,000 processes (made with ZooKeeper
  multis of 100 processes each).

Targets: fork p50 ≤ 5 ms, release p99 ≤ 20 ms, listing ≤ 0.3 s.
Writes bench/results/cloudfs.json and prints a table.

    .venv/bin/python bench/cloudfs_bench.py [--forks 1000] [--releases 500] [--procs 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cloudfs.drivers.fake import FakeDriver  # noqa: E402
from cloudfs.namespace import open_cloudfs  # noqa: E402
from cloudfs.process import Process  # noqa: E402
from cloudfs.quotas import ENV_KEYS  # noqa: E402
from tests.zookeeper import ZooKeeperServer  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "cloudfs.json"


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``xs`` (seconds) in ms."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k] * 1000


async def walk(root, path):
    node = root
    for name in [p for p in path.split("/") if p]:
        node = await node.walk(name)
    return node


async def bench_fork(a, b, n: int) -> list[float]:
    ctl = await walk(a, "/proc/1/ctl")
    bproc = await walk(b, "/proc")
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        f = await ctl.open(os.O_RDWR)
        await f.write(0, b"fork\n")
        pid = int(await f.read(0, 64))
        await f.release()
        await bproc.walk(str(pid))
        out.append(time.perf_counter() - t0)
    return out


async def bench_release(a, b, n: int) -> list[float]:
    pid_node = await walk(a, "/proc/1/ctl")
    f = await pid_node.open(os.O_RDWR)
    await f.write(0, b"fork\n")
    pid = int(await f.read(0, 64))
    envA = await walk(a, f"/proc/{pid}/env")
    envB = await walk(b, f"/proc/{pid}/env")
    out = []
    for i in range(n):
        key = f"k{i}"
        done = trio.Event()
        t_write = 0.0
        t_done = 0.0

        async def reader():
            nonlocal t_done
            rf = await (await envA.walk(key)).open(os.O_RDONLY)
            await rf.read(0, 100)
            t_done = time.perf_counter()
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.005)  # let the reader block (watch armed)
            wf = await (await envB.walk(key)).open(os.O_WRONLY)
            t_write = time.perf_counter()
            await wf.write(0, b"v")
            await done.wait()
        out.append(t_done - t_write)
    return out


async def make_processes(fs, count: int, batch: int = 100) -> None:
    """Create ``count`` new children of init directly in ZooKeeper, in multis."""
    L, store = fs.layout, fs.store
    data, stat = await store.get(L.nextpid)
    first = int(data)

    async def one(start: int, end: int):
        t = store.transaction()
        for pid in range(start, end):
            rec = Process(pid=pid, ppid=1, name=f"p{pid}")
            t.create(L.record(pid), rec.to_json())
            for p in L.process_subtree(pid)[1:]:
                t.create(p, b"")
            t.create(L.kid(1, pid), b"")
        await store.commit(t)

    limiter = trio.CapacityLimiter(32)

    async def limited(s, e):
        async with limiter:
            await one(s, e)

    async with trio.open_nursery() as n:
        for s in range(first, first + count, batch):
            n.start_soon(limited, s, min(s + batch, first + count))
    await store.set(L.nextpid, str(first + count).encode(), stat.version)


async def bench_listing(root, repeats: int = 7) -> tuple[list[float], int]:
    proc = await walk(root, "/proc")
    out, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        f = await proc.open(os.O_RDONLY)
        entries = await f.readdir()
        await f.release()
        out.append(time.perf_counter() - t0)
        n = len(entries)
    return out, n


async def main(args) -> dict:
    zk = ZooKeeperServer(die_with_parent=True)
    zk.launch()  # from the main thread: the server dies with this process
    await trio.to_thread.run_sync(zk.wait_ready)
    try:
        driver = FakeDriver()
        root = f"/bench-{os.getpid()}"
        # Room for every fork and env key the run makes (the defaults bound a guest, not a benchmark).
        room = dict(max_processes=args.forks + 100, limits={ENV_KEYS: args.releases + 1})
        async with open_cloudfs(zk.hosts, driver, root, daemon_id="A", **room) as A, \
                open_cloudfs(zk.hosts, driver, root, daemon_id="B", **room) as B:
            a, b = await A.attach("", ""), await B.attach("", "")
            await bench_fork(a, b, 50)  # warm up
            forks = await bench_fork(a, b, args.forks)
            releases = await bench_release(a, b, args.releases)
            t0 = time.perf_counter()
            await make_processes(A, args.procs)
            made = time.perf_counter() - t0
            listing, entries = await bench_listing(b)
    finally:
        await trio.to_thread.run_sync(zk.cleanup)
    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fork_ms": {"n": len(forks), "p50": pct(forks, 50), "p99": pct(forks, 99),
                    "mean": statistics.mean(forks) * 1000, "target_p50": 5.0},
        "release_ms": {"n": len(releases), "p50": pct(releases, 50), "p99": pct(releases, 99),
                       "mean": statistics.mean(releases) * 1000, "target_p99": 20.0},
        "listing_s": {"processes": entries, "median": statistics.median(listing), "max": max(listing),
                      "target": 0.3, "create_s": made},
    }


def table(r: dict) -> str:
    f, rl, ls = r["fork_ms"], r["release_ms"], r["listing_s"]
    rows = [
        ("measure", "p50 / median", "p99 / max", "target", "ok"),
        (f"fork → visible on other daemon (n={f['n']})", f"{f['p50']:.2f} ms", f"{f['p99']:.2f} ms",
         "p50 ≤ 5 ms", "yes" if f["p50"] <= 5 else "NO"),
        (f"env read release across daemons (n={rl['n']})", f"{rl['p50']:.2f} ms", f"{rl['p99']:.2f} ms",
         "p99 ≤ 20 ms", "yes" if rl["p99"] <= 20 else "NO"),
        (f"readdir /proc ({ls['processes']} entries)", f"{ls['median']*1000:.1f} ms", f"{ls['max']*1000:.1f} ms",
         "≤ 300 ms", "yes" if ls["median"] <= 0.3 else "NO"),
    ]
    w = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--forks", type=int, default=1000)
    p.add_argument("--releases", type=int, default=500)
    p.add_argument("--procs", type=int, default=10000)
    a = p.parse_args()
    res = trio.run(main, a)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    print(f"(created {a.procs} processes in {res['listing_s']['create_s']:.2f} s; results in {RESULTS})")
