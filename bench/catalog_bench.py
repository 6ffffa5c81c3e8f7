"""Catalog benchmark (not a test): how many compute-driver listing calls
``ls -l /images`` (20 images) and 100 ``exec``s cost, with the per-daemon
catalog (cloudfs.catalog) against the anchor of no cache (``ttl=0``,
``miss_interval=0``: every walk, getattr, read and exec asks the driver,
as cloudfs did before the catalog), in the same run.

Starts its own ZooKeeper (Debian's package, loopback, temporary data dir,
killed at the end) and one CloudFS daemon with the fake driver (which counts
its listing calls), and measures through the ninep.fs interface (what the
9P server and FUSE call):

- ``ls -l /images``: readdir, then a walk and getattr of each entry, 20
  times in a row (well within one staleness period);
- 100 ``exec tiny flavor=m1.small net=user`` of fresh children of init.

Target: one listing call per kind per staleness period (CATALOG_TTL), i.e.
1 list_images for all 20 ``ls -l`` and at most 1 per kind for the 100
execs.  Beside the counts: wall and CPU time per operation (the fake
driver's listings are free, so the times show the catalog's own cost).
Writes bench/results/catalog.json and prints a table.

    .venv/bin/python bench/catalog_bench.py
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cloudfs.catalog import CATALOG_TTL, Catalog  # noqa: E402
from cloudfs.drivers.base import Image  # noqa: E402
from cloudfs.drivers.fake import FakeDriver  # noqa: E402
from cloudfs.namespace import open_cloudfs  # noqa: E402
from tests.cloudfs.fsops import ctl, ls, walk  # noqa: E402
from tests.zookeeper import ZooKeeperServer  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "catalog.json"


def driver_with_images(n: int) -> FakeDriver:
    d = FakeDriver()
    for i in range(n - len(d.images)):
        d.images[f"img{i:02d}"] = Image(f"id-{i}", f"img{i:02d}", "active", 1 << 20, "qcow2", "0" * 32,
                                          "2026-01-01T00:00:00Z")
    return d


async def measure(hosts: str, cached: bool, images: int, listings: int, execs: int) -> dict:
    driver = driver_with_images(images)
    async with open_cloudfs(hosts, driver, f"/bench-catalog-{'cached' if cached else 'anchor'}-{time.time_ns()}",
                            resync_interval=None) as fs:
        if not cached:
            fs.catalog = fs.lifecycle.catalog = Catalog(driver, ttl=0, miss_interval=0)
        root = await fs.attach("", "")
        pids = [int(await ctl(root, 1, "fork")) for _ in range(execs)]

        driver.listings.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(listings):
            names = await ls(root, "/images")
            for n in names:
                await (await walk(root, f"/images/{n}")).getattr()
        ls_wall, ls_cpu = time.perf_counter() - t0, time.process_time() - c0
        ls_calls = dict(driver.listings)

        driver.listings.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        for pid in pids:
            await ctl(root, pid, "exec tiny flavor=m1.small net=user")
        ex_wall, ex_cpu = time.perf_counter() - t0, time.process_time() - c0
        ex_calls = dict(driver.listings)
        assert len(names) == images
    return {
        "ls_l_images": {"runs": listings, "entries": images, "driver_calls": ls_calls,
                        "ms_per_ls": round(1000 * ls_wall / listings, 3),
                        "cpu_ms_per_ls": round(1000 * ls_cpu / listings, 3)},
        "exec": {"runs": execs, "driver_calls": ex_calls, "ms_per_exec": round(1000 * ex_wall / execs, 3),
                 "cpu_ms_per_exec": round(1000 * ex_cpu / execs, 3)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--listings", type=int, default=20)
    ap.add_argument("--execs", type=int, default=100)
    args = ap.parse_args()
    zk = ZooKeeperServer(die_with_parent=True)
    zk.start()
    try:
        anchor = trio.run(measure, zk.hosts, False, args.images, args.listings, args.execs)
        cached = trio.run(measure, zk.hosts, True, args.images, args.listings, args.execs)
    finally:
        zk.cleanup()
    out = {
        "host": platform.node(), "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "catalog_ttl_s": CATALOG_TTL,
        "catalog": cached, "anchor_no_cache": anchor,
        "target": "1 listing call per kind per staleness period",
    }
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'':24} {'catalog':>22} {'no cache (anchor)':>22}")
    for what, key in (("ls -l /images", "ls_l_images"), ("exec", "exec")):
        c, a = cached[key], anchor[key]
        print(f"{what:24} {sum(c['driver_calls'].values()):>14} calls {sum(a['driver_calls'].values()):>16} calls")
        unit = "ls" if key == "ls_l_images" else "exec"
        print(f"{'  cpu ms per ' + unit:24} {c['cpu_ms_per_' + unit]:>22} {a['cpu_ms_per_' + unit]:>22}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
