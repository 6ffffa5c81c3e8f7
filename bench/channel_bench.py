"""What a VM and its 9P connections cost the host (not a test).

Starts its own ZooKeeper (Debian's package, loopback), a CloudFS with the
QEMU driver serving each VM's channel in this process (as ``cloudfs up``
does), boots ``--vms`` idle tiny guests that mount ``/cloud``, then measures:

- per idle VM: QEMU's RSS and PSS (/proc/PID/smaps_rollup) and the host
  processes it takes (those of QEMU's session: QEMU alone);
- per guest 9P connection, *after* (channels): one guest opens 3 more held
  connections (busybox ``nc`` to 10.0.2.2:564); the daemon's descriptors,
  RSS and the processes of QEMU's session (where guestfwd's connectors ran)
  before and after;
- per guest 9P connection, *before* (the anchor, same run): what the old
  ``guestfwd=…-cmd:`` path cost, one connector process per connection (the
  Python relay tests/guest.py keeps for test guests), started 3 times
  against a local listener: their processes, RSS and PSS.

Writes bench/results/channel.json and prints a table.

    .venv/bin/python bench/channel_bench.py [--vms 2] [--accel auto|tcg|kvm]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
import tempfile
import time

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cloudfs.channel import Channels  # noqa: E402
from cloudfs.drivers.qemu import QemuDriver  # noqa: E402
from cloudfs.guestimage import build_tiny  # noqa: E402
from cloudfs.imagestore import install_image  # noqa: E402
from cloudfs.namespace import open_cloudfs  # noqa: E402
from mountd.zkserver import ZooKeeperServer  # noqa: E402
from ninep.client import open_client  # noqa: E402
from ninep.server import Server  # noqa: E402
from tests.guest import _CONNECTOR  # noqa: E402
from tests.guestfixtures import CACHE_DIR  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "channel.json"
EXTRA = 3  # connections a guest opens beyond its /cloud mount (a channel takes 4)
USERDATA = f"""echo mounted > /cloud/proc/self/env/mounted
cat /cloud/proc/self/env/open
mkfifo /tmp/f
exec 9<>/tmp/f
for i in $(seq {EXTRA}); do nc 10.0.2.2 564 <&9 >/dev/null 2>&1 & done
sleep 2
echo opened > /cloud/proc/self/env/opened
cat /cloud/proc/self/env/quit
""".encode()


def _kib(pid: int, field: str, name: str = "smaps_rollup") -> int:
    for line in pathlib.Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _session(pid: int) -> int:
    sid = os.getsid(pid)
    n = 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                n += os.getsid(int(p)) == sid
            except OSError:
                pass
    return n


async def ctl(c, pid, command: str) -> str:
    async with await c.walk(f"proc/{pid}/ctl") as f:
        await f.open(os.O_RDWR)
        await f.write(0, command.encode() + b"\n")
        return (await f.read_all()).decode().strip()


def connectors(n: int) -> dict:
    """The anchor: ``n`` connector processes relaying to a local listener, as
    guestfwd=…-cmd: ran one per guest connection; their cost once idle."""
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _CONNECTOR, str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE) for _ in range(n)]
    conns = [lsock.accept()[0] for _ in range(n)]
    time.sleep(1.0)
    rss = sum(_kib(p.pid, "VmRSS", "status") for p in procs)
    pss = sum(_kib(p.pid, "Pss") for p in procs)
    for p in procs:
        p.kill()
        p.wait()
    for c in conns:
        c.close()
    lsock.close()
    return {"processes_per_connection": 1, "rss_kib_per_connection": rss // n, "pss_kib_per_connection": pss // n,
            "daemon_fds_per_connection": 1}


async def run(vms: int, accel: str) -> dict:
    image = await trio.to_thread.run_sync(lambda: build_tiny(CACHE_DIR, progress=lambda _l: None))
    zk = ZooKeeperServer(die_with_parent=True)
    zk.launch()
    await trio.to_thread.run_sync(zk.wait_ready)
    tmp = tempfile.TemporaryDirectory(prefix="channel-bench-")
    state = pathlib.Path(tmp.name)
    driver = None
    try:
        install_image(state, image)
        driver = QemuDriver(state, accel=accel)
        async with open_cloudfs(zk.hosts, driver, "/bench/channel", resync_interval=1.0) as fs:
            driver.channel_handler = Channels(fs).serve
            async with trio.open_nursery() as nursery:
                sock = f"unix!{state}/cloudfs.sock"
                await nursery.start(Server(fs).serve, sock)
                async with open_client(sock) as c:
                    pids = []
                    for _ in range(vms):
                        pid = int(await ctl(c, 1, "fork"))
                        await c.write_file(f"proc/{pid}/userdata", USERDATA)
                        await ctl(c, pid, "exec tiny")
                        pids.append(pid)
                    with trio.fail_after(300):
                        for pid in pids:
                            await c.read_file(f"proc/{pid}/env/mounted")
                    await trio.sleep(5)  # idle
                    qemus = [driver.qemu_pid((await fs.records.require(p)).value.vm) for p in pids]
                    per_vm = [{"rss_kib": _kib(q, "VmRSS", "status"), "pss_kib": _kib(q, "Pss"),
                               "host_processes": _session(q)} for q in qemus]
                    fds0 = len(os.listdir("/proc/self/fd"))
                    rss0 = _kib(os.getpid(), "VmRSS", "status")
                    procs0 = _session(qemus[0])
                    await c.write_file(f"proc/{pids[0]}/env/open", b"1\n")
                    with trio.fail_after(120):
                        await c.read_file(f"proc/{pids[0]}/env/opened")
                    await trio.sleep(1)
                    after = {"processes_per_connection": (_session(qemus[0]) - procs0) / EXTRA,
                             "daemon_fds_per_connection": (len(os.listdir("/proc/self/fd")) - fds0) / EXTRA,
                             "daemon_rss_kib_per_connection": (_kib(os.getpid(), "VmRSS", "status") - rss0) / EXTRA}
                    for pid in pids:
                        await c.write_file(f"proc/{pid}/env/quit", b"0\n")
                        await ctl(c, pid, "kill")
                nursery.cancel_scope.cancel()
        before = await trio.to_thread.run_sync(connectors, EXTRA)
        return {
            "what": "host cost of idle tiny VMs (256 MiB, TCG) and of each extra guest 9P connection: "
                    "channels (after) against one connector process per connection (before, same run)",
            "accel": driver._accel_chosen,
            "idle_vm": per_vm,
            "idle_vm_rss_kib_mean": sum(v["rss_kib"] for v in per_vm) // len(per_vm),
            "idle_vm_pss_kib_mean": sum(v["pss_kib"] for v in per_vm) // len(per_vm),
            "per_connection_after": after,
            "per_connection_before": before,
            "connections_per_vm_max": 4,
            "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    finally:
        if driver is not None:
            await trio.to_thread.run_sync(driver.kill_all)
        await trio.to_thread.run_sync(zk.cleanup)
        tmp.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=2)
    ap.add_argument("--accel", default="auto", choices=["auto", "tcg", "kvm"])
    args = ap.parse_args()
    r = trio.run(run, args.vms, args.accel)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(r, indent=2) + "\n")
    a, b = r["per_connection_after"], r["per_connection_before"]
    print(f"idle VM ({r['accel']}): QEMU RSS {r['idle_vm_rss_kib_mean'] / 1024:.0f} MiB, "
          f"PSS {r['idle_vm_pss_kib_mean'] / 1024:.0f} MiB, 1 host process")
    print(f"{'per guest connection':24} {'processes':>10} {'daemon fds':>11} {'memory KiB':>11}")
    print(f"{'before (connector)':24} {b['processes_per_connection']:>10} {b['daemon_fds_per_connection']:>11} "
          f"{b['rss_kib_per_connection']:>11} (connector RSS; PSS {b['pss_kib_per_connection']})")
    print(f"{'after (channel)':24} {a['processes_per_connection']:>10.1f} {a['daemon_fds_per_connection']:>11.1f} "
          f"{a['daemon_rss_kib_per_connection']:>11.0f} (daemon RSS growth)")
    print(f"results in {RESULTS}")


if __name__ == "__main__":
    main()
