"""``cloudfs top`` benchmark (not a test): how long one frame takes with
1,000 processes with VMs, against the anchor of ``cloudfs ps`` (which reads
only each status) in the same run, over the daemon's operator socket.

Starts its own ZooKeeper (Debian's package, loopback, temporary data dir,
killed at the end) and one ``cloudfs up --driver fake`` (its own process,
as in use), makes 1,000 processes (fork + exec tiny) over the operator
socket, then times ``top``'s sampling of a frame (status and stats of every
process, 64 at a time) and ``ps``'s collection, alternated, medians
reported, with the client's CPU time per frame beside the wall time.  Target: a frame well under the 1 s refresh (no lag).
Writes bench/results/top.json and prints a table.

    .venv/bin/python bench/top_bench.py [--procs 1000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mountd.ps import collect  # noqa: E402
from mountd.top import rows, sample  # noqa: E402
from mountd.zkserver import free_port  # noqa: E402
from ninep.client import open_client  # noqa: E402
from tests.zookeeper import ZooKeeperServer  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "top.json"


async def main_async(hosts: str, procs: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        state = pathlib.Path(tmp)
        log = open(state / "daemon.log", "wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "mountd.cli", "up", "--driver", "fake", "--zookeeper", hosts,
             "--deployment", "bench-top", "--state-dir", str(state), "--listen", f"tcp!127.0.0.1!{free_port()}",
             "--max-processes", str(procs + 10), "--limit", f"descendants={procs + 10}"],
            cwd=pathlib.Path(__file__).resolve().parents[1], stdout=log, stderr=subprocess.STDOUT)
        try:
            sock = f"unix!{state / 'cloudfs.sock'}"
            while b"cloudfs up:" not in (state / "daemon.log").read_bytes():
                if daemon.poll() is not None:
                    raise RuntimeError((state / "daemon.log").read_text())
                await trio.sleep(0.1)
            async with open_client(sock) as c:
                for _ in range(procs):
                    pid = await ctl(c, 1, "fork")
                    await ctl(c, pid, "exec tiny")
                while b"state running" not in await c.read_file(f"proc/{pid}/status"):
                    await trio.sleep(0.1)
                top_wall, top_cpu, ps_wall, ps_cpu = [], [], [], []
                for _ in range(rounds):  # alternated; the client's CPU beside the wall time
                    t0, c0 = time.perf_counter(), time.process_time()
                    frame = rows(await sample(c.listdir, c.read_file), {})
                    top_wall.append(time.perf_counter() - t0)
                    top_cpu.append(time.process_time() - c0)
                    t0, c0 = time.perf_counter(), time.process_time()
                    listed = await collect(c.listdir, c.read_file)
                    ps_wall.append(time.perf_counter() - t0)
                    ps_cpu.append(time.process_time() - c0)
            assert len(frame) == len(listed) == procs + 1
        finally:
            daemon.terminate()
            daemon.wait(30)
            log.close()
    med = statistics.median
    return {"processes": procs + 1, "rounds": rounds,
            "top_frame_s": round(med(top_wall), 4), "top_client_cpu_s": round(med(top_cpu), 4),
            "ps_anchor_s": round(med(ps_wall), 4), "ps_client_cpu_s": round(med(ps_cpu), 4),
            "ratio_to_ps": round(med(top_wall) / med(ps_wall), 2), "target_frame_s": 1.0}


async def ctl(c, pid, cmd: str) -> str:
    async with await c.walk(f"proc/{pid}/ctl") as f:
        await f.open(os.O_RDWR)
        await f.write(0, cmd.encode() + b"\n")
        return (await f.read_all()).decode().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    zk = ZooKeeperServer(die_with_parent=True)
    zk.start()
    try:
        res = trio.run(main_async, zk.hosts, args.procs, args.rounds)
    finally:
        zk.cleanup()
    out = {"host": platform.node(), "python": platform.python_version(),
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **res}
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{res['processes']} processes: top frame {res['top_frame_s']:.3f}s (client cpu {res['top_client_cpu_s']:.3f}s), "
          f"ps {res['ps_anchor_s']:.3f}s (client cpu {res['ps_client_cpu_s']:.3f}s), ratio {res['ratio_to_ps']}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
