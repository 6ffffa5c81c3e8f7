"""``cloudfs top`` benchmark (not a test): how long one frame takes with
1,000 processes with VMs, against the anchor of ``cloudfs ps`` (which reads
only each status) in the same run, over the daemon's operator socket.

Starts its own ZooKeeper (Debian's package, loopback, temporary data dir,
killed at the end) and one daemon (mountd.daemon.run, fake driver), makes
1,000 processes (fork + exec tiny), then times ``top``'s sampling of a frame
(status and stats of every process, 32 at a time) and ``ps``'s collection,
alternated, medians reported, with the client's CPU time per frame beside
the wall time.  Target: a frame well under the 1 s refresh (no lag).
Writes bench/results/top.json and prints a table.

    .venv/bin/python bench/top_bench.py [--procs 1000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mountd.daemon import DaemonOptions, run  # noqa: E402
from mountd.ps import collect  # noqa: E402
from mountd.top import rows, sample  # noqa: E402
from mountd.zkserver import free_port  # noqa: E402
from ninep.client import open_client  # noqa: E402
from tests.cloudfs.fsops import ctl  # noqa: E402
from tests.zookeeper import ZooKeeperServer  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "top.json"


async def main_async(hosts: str, procs: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        opts = DaemonOptions(listen=[f"tcp!127.0.0.1!{free_port()}"], driver="fake", state_dir=pathlib.Path(tmp),
                             zookeeper=hosts, deployment="bench-top", max_processes=procs + 10,
                             limits={"descendants": procs + 10})
        async with trio.open_nursery() as nursery:
            info = await nursery.start(run, opts)
            fs = info["fs"]
            root = await fs.attach("", "")
            for _ in range(procs):
                pid = int(await ctl(root, 1, "fork"))
                await ctl(root, pid, "exec tiny")
            while (await fs.records.cached(pid)).state != "running":  # the last one booted
                await trio.sleep(0.1)
            top_wall, top_cpu, ps_wall, ps_cpu = [], [], [], []
            async with open_client(f"unix!{opts.operator_socket}") as c:
                for _ in range(rounds):
                    t0, c0 = time.perf_counter(), time.process_time()
                    frame = rows(await sample(c.listdir, c.read_file), {})
                    top_wall.append(time.perf_counter() - t0)
                    top_cpu.append(time.process_time() - c0)
                    t0, c0 = time.perf_counter(), time.process_time()
                    listed = await collect(c.listdir, c.read_file)
                    ps_wall.append(time.perf_counter() - t0)
                    ps_cpu.append(time.process_time() - c0)
            assert len(frame) == len(listed) == procs + 1
            nursery.cancel_scope.cancel()
    med = statistics.median
    return {"processes": procs + 1, "rounds": rounds,
            "top_frame_s": round(med(top_wall), 4), "top_cpu_s": round(med(top_cpu), 4),
            "ps_anchor_s": round(med(ps_wall), 4), "ps_cpu_s": round(med(ps_cpu), 4),
            "ratio_to_ps": round(med(top_wall) / med(ps_wall), 2), "target_frame_s": 1.0}


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
    print(f"{res['processes']} processes: top frame {res['top_frame_s']:.3f}s (cpu {res['top_cpu_s']:.3f}s), "
          f"ps {res['ps_anchor_s']:.3f}s (cpu {res['ps_cpu_s']:.3f}s), ratio {res['ratio_to_ps']}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
