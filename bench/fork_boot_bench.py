"""fork → booted benchmark (not a test): how long from ``echo fork >
/proc/<vm>/ctl`` until the child VM has mounted its namespace, and what an
idle child costs the host in memory (PSS), for the QEMU driver's two ways
of starting a VM: a cold boot (the anchor) and a restore from the image's
boot template (snapshot boot), measured in the same run, rounds alternated.

Starts its own ZooKeeper (Debian's package, loopback, temporary data dir,
killed at the end), a CloudFS with the QEMU driver (state in a temporary
directory, the cached "tiny" image of tests/guestfixtures), and serves the
VMs' channels (guests) and the operator face on a unix socket.  The boot
template is made first (timed on its own).  A parent VM is started the
documented way (fork init, userdata, exec); then, N rounds of one cold and
one snapshot fork (which goes first alternates), each timed until a blocked
read of the child's ``env/mounted`` returns: the child's user-data writes it
as its first command, right after /etc/cloudfs/boot mounted /cloud.  Also
per fork: the time until the reconciler had QEMU running, the child QEMU's
CPU time (utime+stime) by then, and its PSS (``/proc/PID/smaps_rollup``)
after 2 s idle.  Each child is killed before the next fork.  Last, per
mode, GROUP children idle at once: their PSS summed over the group (copies
of one template share its pages).

Targets (issue 15): snapshot fork → mounted p50 ≤ 0.5 s under TCG, PSS per
idle tiny VM ≤ 80 MB.  Writes bench/results/fork_boot.json and prints a table.

    .venv/bin/python bench/fork_boot_bench.py [--forks 5] [--group 4] [--accel auto|tcg|kvm]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
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
from tests.guestfixtures import CACHE_DIR  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "fork_boot.json"
USERDATA = b"""echo mounted > /cloud/proc/self/env/mounted
cat /cloud/proc/self/env/quit
"""
TARGET_S = 0.5
TARGET_PSS_MB = 80.0
MODES = ("cold", "snapshot")


async def ctl(c, pid, command: str) -> str:
    async with await c.walk(f"proc/{pid}/ctl") as f:
        await f.open(os.O_RDWR)
        await f.write(0, command.encode() + b"\n")
        return (await f.read_all()).decode().strip()


async def wait_state(c, pid: int, state: str, timeout: float = 120) -> float:
    with trio.fail_after(timeout):
        while True:
            text = (await c.read_file(f"proc/{pid}/status")).decode()
            if f"\nstate {state}\n" in text:
                return time.monotonic()
            await trio.sleep(0.02)


async def gone(c, pid: int, timeout: float = 60) -> None:
    with trio.fail_after(timeout):
        while str(pid) in await c.listdir("proc"):
            await trio.sleep(0.1)


def pss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Pss line")


def cpu_s(pid: int) -> float:
    stat = open(f"/proc/{pid}/stat", "rb").read()
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def qemu_of(fs, driver, pid: int) -> int:
    vm = (await fs.records.require(pid)).value.vm
    q = await trio.to_thread.run_sync(driver.qemu_pid, vm)
    if q is None:
        raise RuntimeError(f"no QEMU for pid {pid}")
    return q


async def fork_one(c, fs, driver, parent: int, mode: str) -> dict:
    driver.snapshot_boot = mode == "snapshot"
    t = time.monotonic()
    child = int(await ctl(c, parent, "fork"))
    seen: dict[str, float] = {}
    async with trio.open_nursery() as n:
        async def running():
            seen["running"] = await wait_state(c, child, "running")

        n.start_soon(running)
        with trio.fail_after(120):
            await c.read_file(f"proc/{child}/env/mounted")
        seen["mounted"] = time.monotonic()
    q = await qemu_of(fs, driver, child)
    cpu = cpu_s(q)
    console = (pathlib.Path(driver.vms_dir) / (await fs.records.require(child)).value.vm / "console.log").read_text()
    restored = "--- cloudfs: restoring" in console
    await trio.sleep(2)
    return {"mode": mode, "pid": child, "restored": restored,
            "fork_to_running_s": round(seen["running"] - t, 3),
            "fork_to_mounted_s": round(seen["mounted"] - t, 3),
            "qemu_cpu_to_mounted_s": round(cpu, 3), "pss_idle_mb": round(pss_mb(q), 1)}


async def run(forks: int, group: int, accel: str) -> dict:
    image = await trio.to_thread.run_sync(lambda: build_tiny(CACHE_DIR, progress=lambda _l: None))
    zk = ZooKeeperServer(die_with_parent=True)
    zk.launch()  # from the main thread: the server dies with this process
    await trio.to_thread.run_sync(zk.wait_ready)
    tmp = tempfile.TemporaryDirectory(prefix="fork-boot-")
    state = pathlib.Path(tmp.name)
    driver = None
    try:
        install_image(state, image)
        driver = QemuDriver(state, accel=accel, snapshot_boot=False)
        async with open_cloudfs(zk.hosts, driver, "/bench/fork-boot", resync_interval=1.0) as fs:
            driver.channel_handler = Channels(fs).serve  # the guests' 9P, as cloudfs up serves it
            async with trio.open_nursery() as nursery:
                sock = f"unix!{state}/cloudfs.sock"
                await nursery.start(Server(fs).serve, sock)
                async with open_client(sock) as c:
                    t0 = time.monotonic()
                    parent = int(await ctl(c, 1, "fork"))
                    await c.write_file(f"proc/{parent}/userdata", USERDATA)
                    await ctl(c, parent, "exec tiny")
                    with trio.fail_after(180):
                        await c.read_file(f"proc/{parent}/env/mounted")
                    parent_s = time.monotonic() - t0
                    t0 = time.monotonic()
                    await driver.prepare_template("tiny")
                    template_s = time.monotonic() - t0
                    print(f"parent up in {parent_s:.2f} s; boot template made in {template_s:.2f} s", flush=True)
                    rows = []
                    for i in range(forks):
                        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                            row = await fork_one(c, fs, driver, parent, mode)
                            rows.append(row)
                            print(f"round {i + 1} {mode:8}: pid {row['pid']} running after "
                                  f"{row['fork_to_running_s']:.2f} s, mounted after {row['fork_to_mounted_s']:.2f} s, "
                                  f"QEMU CPU {row['qemu_cpu_to_mounted_s']:.2f} s, PSS {row['pss_idle_mb']:.0f} MB",
                                  flush=True)
                            await ctl(c, row["pid"], "kill")
                            await gone(c, row["pid"])
                    groups = {}
                    for mode in MODES:
                        driver.snapshot_boot = mode == "snapshot"
                        kids = [int(await ctl(c, parent, "fork")) for _ in range(group)]
                        for k in kids:
                            with trio.fail_after(180):
                                await c.read_file(f"proc/{k}/env/mounted")
                        await trio.sleep(3)
                        total = sum([pss_mb(await qemu_of(fs, driver, k)) for k in kids])
                        groups[mode] = round(total / group, 1)
                        print(f"{group} idle {mode} VMs: PSS {total:.0f} MB, {total / group:.0f} MB each", flush=True)
                        for k in kids:
                            await ctl(c, k, "kill")
                        for k in kids:
                            await gone(c, k)
                    await ctl(c, parent, "kill")
                    await gone(c, parent)
                nursery.cancel_scope.cancel()
        out = {}
        for mode in MODES:
            mine = [r for r in rows if r["mode"] == mode]
            out[mode] = {
                "fork_to_mounted_p50_s": round(statistics.median(r["fork_to_mounted_s"] for r in mine), 3),
                "fork_to_mounted_max_s": round(max(r["fork_to_mounted_s"] for r in mine), 3),
                "qemu_cpu_to_mounted_p50_s": round(statistics.median(r["qemu_cpu_to_mounted_s"] for r in mine), 3),
                "pss_idle_alone_p50_mb": round(statistics.median(r["pss_idle_mb"] for r in mine), 1),
                f"pss_idle_per_vm_of_{group}_mb": groups[mode],
                "all_restored": all(r["restored"] for r in mine),
            }
        snap, cold = out["snapshot"], out["cold"]
        return {
            "what": "fork of a running VM until the child's /cloud is mounted (its first env write seen by a "
                    "blocked host read), one child at a time, cold boot (anchor) and snapshot boot alternated; "
                    "PSS of idle children",
            "accel": driver._accel_chosen,
            "first_boot_incl_kvm_probe_s": round(parent_s, 3),
            "template_made_s": round(template_s, 3),
            "forks": rows,
            **out,
            "snapshot_over_cold_time": round(snap["fork_to_mounted_p50_s"] / cold["fork_to_mounted_p50_s"], 3),
            "snapshot_over_cold_pss": round(snap[f"pss_idle_per_vm_of_{group}_mb"]
                                            / cold[f"pss_idle_per_vm_of_{group}_mb"], 3),
            "target_s": TARGET_S,
            "target_pss_mb": TARGET_PSS_MB,
            "meets_target": snap["fork_to_mounted_p50_s"] <= TARGET_S
                            and snap[f"pss_idle_per_vm_of_{group}_mb"] <= TARGET_PSS_MB
                            and snap["pss_idle_alone_p50_mb"] <= TARGET_PSS_MB,
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
    ap.add_argument("--forks", type=int, default=5, help="rounds of one cold and one snapshot fork")
    ap.add_argument("--group", type=int, default=4, help="idle children per mode for the PSS sum")
    ap.add_argument("--accel", default="auto", choices=["auto", "tcg", "kvm"])
    args = ap.parse_args()
    result = trio.run(run, args.forks, args.group, args.accel)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for mode in MODES:
        r = result[mode]
        print(f"{mode:8}: fork → mounted p50 {r['fork_to_mounted_p50_s']:.2f} s (max {r['fork_to_mounted_max_s']:.2f}), "
              f"PSS alone {r['pss_idle_alone_p50_mb']:.0f} MB, in a group of {args.group} "
              f"{r[f'pss_idle_per_vm_of_{args.group}_mb']:.0f} MB each")
    print(f"accel {result['accel']}: snapshot/cold time {result['snapshot_over_cold_time']:.2f}, "
          f"PSS {result['snapshot_over_cold_pss']:.2f}; targets ≤ {TARGET_S} s and ≤ {TARGET_PSS_MB:.0f} MB: "
          f"{'met' if result['meets_target'] else 'NOT met'}; results in {RESULTS}")


if __name__ == "__main__":
    main()
