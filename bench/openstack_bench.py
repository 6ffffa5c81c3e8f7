"""OpenStack driver benchmark (not a test): fork → ACTIVE through
cloudfs's OpenStackDriver against a direct openstacksdk create, in the same
run on the same cloud.

- single: ``rounds`` alternating pairs of one boot each: the driver's
  ``create`` (resolve image/flavor/network by name, look for an existing
  server of the pid, POST, dedupe check, wait for ACTIVE, read its ports)
  against openstacksdk's ``create_server`` with ids resolved beforehand plus
  ``wait_for_server`` polling at the same interval; ratio of medians
  (target ≤ 1.1);
- concurrent: 10 creates at once through the driver (trio) and 10 direct
  ones (10 threads), wall time until all are ACTIVE.

Servers are deleted after each measurement.  Without ``--os-cloud`` it
starts the project's own control plane (scripts/openstack/controlplane.py,
a temporary state dir, stopped at the end); Nova runs its fake hypervisor,
so the time is the control plane's (API, scheduler, placement, Neutron
port binding, conductor, compute), not a guest's boot.
Writes bench/results/openstack.json and prints a table.

    .venv/bin/python bench/openstack_bench.py [--rounds 7] [--concurrent 10] [--os-cloud NAME | --state DIR]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import trio

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloudfs.drivers.base import ServerSpec  # noqa: E402
from cloudfs.drivers.openstack import META_DEPLOYMENT, OpenStackDriver  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "openstack.json"
SCRIPT = ROOT / "scripts" / "openstack" / "controlplane.py"
POLL = 0.5


def connect(cloud: str, clouds_yaml: str | None):
    import openstack
    import openstack.config
    import openstack.connection

    if clouds_yaml:
        region = openstack.config.OpenStackConfig(config_files=[clouds_yaml]).get_one(cloud=cloud)
        return openstack.connection.Connection(config=region)
    return openstack.connect(cloud=cloud)


def cleanup(conn, dep: str) -> None:
    left = [s for s in conn.compute.servers() if (s.metadata or {}).get(META_DEPLOYMENT) == dep]
    for s in left:
        conn.compute.delete_server(s.id, ignore_missing=True)
    for s in left:
        conn.compute.wait_for_delete(s, interval=POLL, wait=300)


def bench(conn, rounds: int, concurrent: int) -> dict:
    dep = f"bench-{uuid.uuid4().hex[:8]}"
    drv = OpenStackDriver(conn, deployment=dep, poll_interval=POLL)
    image = conn.image.find_image("tiny").id
    flavor = conn.compute.find_flavor("m1.tiny").id
    net = conn.network.find_network("user").id
    ud = base64.b64encode(b"#cloud-config\n").decode()
    pids = iter(range(1000, 100000))

    def direct_one() -> float:
        t0 = time.monotonic()
        s = conn.compute.create_server(name="direct", image_id=image, flavor_id=flavor,
                                       networks=[{"uuid": net}], user_data=ud,
                                       metadata={META_DEPLOYMENT: dep})
        conn.compute.wait_for_server(s, interval=POLL, wait=300)
        return time.monotonic() - t0

    async def driver_one() -> float:
        t0 = time.monotonic()
        await drv.create(ServerSpec(pid=next(pids), ppid=1, name="fork", image="tiny", flavor="m1.tiny",
                                    networks=("user",), userdata=b"#cloud-config\n"))
        return time.monotonic() - t0

    # warm up both paths (token, endpoint discovery, caches) once
    trio.run(driver_one)
    direct_one()
    cleanup(conn, dep)

    d_times, s_times = [], []
    for _ in range(rounds):
        d_times.append(trio.run(driver_one))
        cleanup(conn, dep)
        s_times.append(direct_one())
        cleanup(conn, dep)
        print(f"  driver {d_times[-1]:.2f}s  direct {s_times[-1]:.2f}s", file=sys.stderr)

    async def driver_many() -> float:
        t0 = time.monotonic()
        async with trio.open_nursery() as n:
            for _ in range(concurrent):
                n.start_soon(driver_one)
        return time.monotonic() - t0

    conc_driver = trio.run(driver_many)
    cleanup(conn, dep)
    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrent) as ex:
        list(ex.map(lambda _: direct_one(), range(concurrent)))
    conc_direct = time.monotonic() - t0
    cleanup(conn, dep)

    md, ms = statistics.median(d_times), statistics.median(s_times)
    return {
        "single": {"driver_s": [round(x, 3) for x in d_times], "direct_s": [round(x, 3) for x in s_times],
                   "driver_median_s": round(md, 3), "direct_median_s": round(ms, 3),
                   "ratio": round(md / ms, 3), "target_ratio": 1.1},
        f"concurrent{concurrent}": {"driver_s": round(conc_driver, 2), "direct_s": round(conc_direct, 2)},
        "poll_interval_s": POLL,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--concurrent", type=int, default=10)
    ap.add_argument("--os-cloud", metavar="NAME", help="an existing cloud (clouds.yaml) instead of a local one")
    ap.add_argument("--state", metavar="DIR", help="use (and leave running) the local control plane in DIR")
    a = ap.parse_args()
    state = None
    try:
        if a.os_cloud:
            conn = connect(a.os_cloud, None)
            where = f"cloud {a.os_cloud}"
        else:
            where = "local control plane (scripts/openstack/controlplane.py, Nova fake driver)"
            if a.state:
                subprocess.run(["/usr/bin/python3", str(SCRIPT), "up", a.state], check=True)
                conn = connect("cloudfs", os.path.join(a.state, "clouds.yaml"))
            else:
                from tests.openstack import _free_port_base

                state = tempfile.mkdtemp(prefix="cloudfs-os-bench-")
                subprocess.run(["/usr/bin/python3", str(SCRIPT), "up", state,
                                "--port-base", str(_free_port_base())], check=True)
                conn = connect("cloudfs", os.path.join(state, "clouds.yaml"))
        res = bench(conn, a.rounds, a.concurrent)
    finally:
        if state:
            subprocess.run(["/usr/bin/python3", str(SCRIPT), "stop", state])
            shutil.rmtree(state, ignore_errors=True)
    res.update({"cloud": where, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    s = res["single"]
    c = res[f"concurrent{a.concurrent}"]
    print(f"fork → ACTIVE   driver {s['driver_median_s']:.2f}s  direct {s['direct_median_s']:.2f}s  "
          f"ratio {s['ratio']:.2f} (target ≤ 1.1)")
    print(f"{a.concurrent} concurrent  driver {c['driver_s']:.1f}s  direct {c['direct_s']:.1f}s")
    print(f"(results in {RESULTS})")


if __name__ == "__main__":
    main()
