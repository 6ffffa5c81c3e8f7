"""migrate benchmark (not a test): moving a running guest between two
hosts' daemons (``echo migrate HOST > ctl``) against the anchor, QEMU's own
live migration between two QEMUs on one host over a socket pair (no
daemons, no TCP relay, no ZooKeeper), measured in the same run.

Needs root (network namespaces, as tests/cluster): two daemon hosts with the
QEMU driver on a 3-server ZooKeeper ensemble (tests/cluster/hosts.py), one
guest whose user-data writes a rising counter into its env every 0.1 s,
retrying a failed write with the same number.  The guest is moved d1 → d2
→ d1 … N times; per move: seconds from the ctl write to the record naming
the new host (state running), the VM's pause (the ``move`` line's: QEMU's
downtime plus the disk copy and the load on the other host),
how long the counter stood still as seen by a host reading it every 50 ms
(the guest's /cloud comes back by itself: cloudfs-watch), and whether any
value went back.  The anchor: the same guest image, flavor and accelerator
migrated QEMU to QEMU N times (total time and downtime).  CPU time of the
daemons per move beside it.  Then the same moves of a guest that first
wrote ``--disk-mib`` MiB of random data on its scratch disk (each move
carries them while the VM is paused), against ``cp --sparse=never`` of a
file holding as much data.  Writes bench/results/migrate.json.

    .venv/bin/python bench/migrate_bench.py [--moves 6] [--disk-mib 64]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cloudfs.drivers.base import ServerSpec  # noqa: E402
from cloudfs.drivers.qemu import QemuDriver  # noqa: E402
from cloudfs.guestimage import build_tiny  # noqa: E402
from cloudfs.imagestore import install_image  # noqa: E402
from ninep.client import open_client  # noqa: E402
from tests.cluster.hosts import Cluster  # noqa: E402
from tests.guestfixtures import CACHE_DIR  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "migrate.json"
COUNTER = r"""
i=0
while :; do
  i=$((i+1))
  until echo $i > /cloud/proc/self/env/n 2>/dev/null; do sleep 0.1; done
  sleep 0.1
done
"""


async def ctl(c, pid, command: str) -> str:
    async with await c.walk(f"proc/{pid}/ctl") as f:
        await f.open(os.O_RDWR)
        await f.write(0, command.encode() + b"\n")
        return (await f.read_all()).decode().strip()


async def status(sock: str, pid: int) -> dict[str, str]:
    async with open_client(sock) as c:
        text = (await c.read_file(f"proc/{pid}/status")).decode()
    return dict(line.split(" ", 1) for line in text.splitlines())


async def counter(sock: str, pid: int) -> int | None:
    try:
        async with open_client(sock) as c:
            async with await c.walk(f"proc/{pid}/env/n") as f:
                await f.open(os.O_RDONLY | os.O_NONBLOCK)
                v = (await f.read_all()).decode().strip()
                return int(v) if v.isdigit() else None
    except Exception:
        return None


def cpu_s(pid: int) -> float:
    total = 0.0
    for p in [pid] + [int(x) for x in open(f"/proc/{pid}/task/{pid}/children").read().split()]:
        try:
            stat = open(f"/proc/{p}/stat", "rb").read()
        except OSError:
            continue
        f = stat[stat.rindex(b")") + 2:].split()
        total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def moves(n: int, image, disk_mib: int = 0) -> dict:
    """N moves of the counting guest; with ``disk_mib``, the guest first
    writes that many MiB on its scratch disk, which each move carries."""
    # random data: zeros are not carried (the copy's fresh disk reads zeros)
    userdata = COUNTER if not disk_mib else \
        f"dd if=/dev/urandom of=/dev/vda bs=1M count={disk_mib} conv=fsync 2>/dev/null\n" + COUNTER
    with tempfile.TemporaryDirectory(prefix="migrate-bench-") as tmp:
        cluster = Cluster(pathlib.Path(tmp) / "cluster", n_daemons=2, session_timeout=10.0, driver="qemu")
        try:
            await trio.to_thread.run_sync(cluster.up)
            for i in (1, 2):
                install_image(cluster.state_dir(i), image)
            await cluster.start_daemons("qemu")
            cluster.daemon_signal(2, signal.SIGSTOP)
            try:
                async with open_client(cluster.socket(1)) as c:
                    pid = int(await ctl(c, 1, "fork"))
                    await c.write_file(f"proc/{pid}/userdata", userdata.encode())
                    await ctl(c, pid, "exec tiny")
                with trio.fail_after(120):
                    while not list((cluster.state_dir(1) / "vms").iterdir()):
                        await trio.sleep(0.2)
            finally:
                cluster.daemon_signal(2, signal.SIGCONT)
            with trio.fail_after(180):
                while (await counter(cluster.socket(2), pid) or 0) < 5:
                    await trio.sleep(0.2)
            samples: list[tuple[float, int]] = []

            async def sample():
                while True:
                    v = await counter(cluster.socket(2), pid)
                    if v is not None:
                        samples.append((time.monotonic(), v))
                    await trio.sleep(0.05)

            rows = []
            daemons = [cluster.daemons[i].pid for i in (1, 2)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                for k in range(n):
                    to = "d2" if k % 2 == 0 else "d1"
                    await trio.sleep(2)
                    cpu0 = sum(cpu_s(p) for p in daemons)
                    first = len(samples)
                    t0 = time.monotonic()
                    async with open_client(cluster.socket(2)) as c:
                        await ctl(c, pid, f"migrate {to}")
                    with trio.fail_after(120):
                        while True:
                            st = await status(cluster.socket(2), pid)
                            if st.get("host") == to and st.get("state") == "running" \
                                    and st.get("move", "").startswith("from"):
                                break
                            await trio.sleep(0.02)
                    moved = time.monotonic() - t0
                    v0 = samples[-1][1] if samples else 0
                    with trio.fail_after(60):
                        while not samples or samples[-1][1] < v0 + 5:
                            await trio.sleep(0.05)
                    cpu = sum(cpu_s(p) for p in daemons) - cpu0
                    window = samples[max(0, first - 1):]
                    stall, since = 0.0, None
                    for (ta, va), (tb, vb) in zip(window, window[1:]):
                        since = ta if since is None else since
                        if vb != va:
                            stall, since = max(stall, tb - since), None
                    back = any(b[1] < a[1] for a, b in zip(window, window[1:]))
                    paused = st["move"].split("(paused ")[-1].split(" ms")[0] if "(paused" in st["move"] else None
                    rows.append({"to": to, "ctl_to_moved_s": round(moved, 3),
                                 "paused_ms": int(paused) if paused and paused.isdigit() else None,
                                 "counter_stalled_s": round(stall, 3), "counter_went_back": back,
                                 "daemons_cpu_s": round(cpu, 3)})
                    print(f"move {k + 1} to {to} ({disk_mib} MiB disk): {moved:.2f} s, paused {paused} ms, "
                          f"counter still {stall:.2f} s, daemons' CPU {cpu:.2f} s", flush=True)
                nursery.cancel_scope.cancel()
            async with open_client(cluster.socket(2)) as c:
                await ctl(c, pid, "kill")
            return {"rows": rows}
        finally:
            await trio.to_thread.run_sync(cluster.down)
            for i in (1, 2):
                await trio.to_thread.run_sync(lambda: QemuDriver(cluster.state_dir(i), accel="tcg").kill_all())


async def anchor(n: int, image) -> dict:
    """QEMU → QEMU over a socket pair on one host, N times, the same guest."""
    with tempfile.TemporaryDirectory(prefix="migrate-anchor-") as tmp:
        state = pathlib.Path(tmp)
        install_image(state, image)
        d = QemuDriver(state, accel="tcg", snapshot_boot=False)
        d.bind("b" * 32, "/bench/migrate")
        try:
            s = await d.create(ServerSpec(pid=2, ppid=1, name="p2", image="tiny", userdata=b"sleep 100000\n"))
            await trio.sleep(8)  # booted and idle
            vm, rows = s.id, []
            for _ in range(n):
                spec = await d.move_spec(vm)
                a, b = socket.socketpair()
                t0 = time.monotonic()
                copy = await trio.to_thread.run_sync(d.incoming_start, 2, 1, spec, b"", b.fileno())
                b.close()
                await trio.to_thread.run_sync(d.mark_moving, vm)
                stats = await trio.to_thread.run_sync(d.migrate_out, vm, a.fileno())
                a.close()
                await trio.to_thread.run_sync(d.incoming_wait, copy)
                await d.incoming_commit(copy, True)
                took = time.monotonic() - t0
                await trio.to_thread.run_sync(d.end_moved, vm)
                rows.append({"total_s": round(took, 3), "qemu_downtime_ms": stats.get("downtime")})
                print(f"anchor: {took:.2f} s, QEMU paused {stats.get('downtime')} ms", flush=True)
                vm = copy
                await trio.sleep(2)
            return {"rows": rows}
        finally:
            await trio.to_thread.run_sync(d.kill_all)


def copy_anchor(disk_mib: int) -> float:
    """Seconds ``cp --sparse=never`` takes to copy a file holding
    ``disk_mib`` MiB of random data on this machine's temporary directory
    (the least a disk copy costs), median of 3."""
    import subprocess
    times = []
    with tempfile.TemporaryDirectory(prefix="migrate-disk-") as tmp:
        src = pathlib.Path(tmp) / "src"
        src.write_bytes(os.urandom(disk_mib << 20))
        for _ in range(3):
            t0 = time.monotonic()
            subprocess.run(["cp", "--sparse=never", str(src), str(pathlib.Path(tmp) / "dst")], check=True)
            times.append(time.monotonic() - t0)
            (pathlib.Path(tmp) / "dst").unlink()
    return statistics.median(times)


async def run(n: int, disk_mib: int) -> dict:
    image = await trio.to_thread.run_sync(lambda: build_tiny(CACHE_DIR, progress=lambda _l: None))
    a = await anchor(n, image)
    m = await moves(n, image)
    md = await moves(n, image, disk_mib)
    cp_s = await trio.to_thread.run_sync(copy_anchor, disk_mib)
    moved = [r["ctl_to_moved_s"] for r in m["rows"]]
    direct = [r["total_s"] for r in a["rows"]]
    down = [r["paused_ms"] for r in m["rows"] if r["paused_ms"] is not None]
    down_a = [r["qemu_downtime_ms"] for r in a["rows"] if r["qemu_downtime_ms"] is not None]
    return {
        "what": "migrate HOST of a running tiny guest between two hosts' daemons (network namespaces, TCG), "
                "against QEMU-to-QEMU migration over a socket pair on one host",
        "moves": m["rows"], "anchor": a["rows"],
        "ctl_to_moved_p50_s": round(statistics.median(moved), 3),
        "anchor_total_p50_s": round(statistics.median(direct), 3),
        "moved_over_anchor_time": round(statistics.median(moved) / statistics.median(direct), 3),
        "paused_p50_ms": statistics.median(down) if down else None,
        "anchor_downtime_p50_ms": statistics.median(down_a) if down_a else None,
        "counter_stalled_max_s": max(r["counter_stalled_s"] for r in m["rows"]),
        "counter_went_back": any(r["counter_went_back"] for r in m["rows"]),
        "daemons_cpu_per_move_p50_s": round(statistics.median(r["daemons_cpu_s"] for r in m["rows"]), 3),
        "with_disk": {
            "what": f"the same guest having written {disk_mib} MiB of random data on its scratch disk: each move "
                    "carries them while the VM is paused; anchor: cp --sparse=never of a file with as much data",
            "disk_mib": disk_mib, "moves": md["rows"],
            "ctl_to_moved_p50_s": round(statistics.median(r["ctl_to_moved_s"] for r in md["rows"]), 3),
            "counter_stalled_p50_s": round(statistics.median(r["counter_stalled_s"] for r in md["rows"]), 3),
            "counter_stalled_p50_s_without_disk":
                round(statistics.median(r["counter_stalled_s"] for r in m["rows"]), 3),
            "counter_went_back": any(r["counter_went_back"] for r in md["rows"]),
            "paused_p50_ms": statistics.median([r["paused_ms"] for r in md["rows"] if r["paused_ms"] is not None]
                                               or [None]),
            "cp_anchor_s": round(cp_s, 3),
        },
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moves", type=int, default=6)
    ap.add_argument("--disk-mib", type=int, default=64, help="MiB the guest writes on its disk for the second set")
    args = ap.parse_args()
    result = trio.run(run, args.moves, args.disk_mib)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"migrate: ctl → moved p50 {result['ctl_to_moved_p50_s']:.2f} s (anchor, QEMU to QEMU: "
          f"{result['anchor_total_p50_s']:.2f} s; ratio {result['moved_over_anchor_time']:.2f}); paused p50 "
          f"{result['paused_p50_ms']} ms (anchor {result['anchor_downtime_p50_ms']} ms); the guest's counter "
          f"stood still {result['counter_stalled_max_s']:.2f} s at most, went back: {result['counter_went_back']}; "
          f"with {args.disk_mib} MiB written on its disk: moved p50 {result['with_disk']['ctl_to_moved_p50_s']:.2f} s, "
          f"paused p50 {result['with_disk']['paused_p50_ms']} ms, "
          f"counter still p50 {result['with_disk']['counter_stalled_p50_s']:.2f} s (without: "
          f"{result['with_disk']['counter_stalled_p50_s_without_disk']:.2f} s; cp of the data "
          f"{result['with_disk']['cp_anchor_s']:.2f} s); results in {RESULTS}")


if __name__ == "__main__":
    main()
