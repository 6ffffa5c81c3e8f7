"""``cloudfs ctl``, ``cloudfs kill`` and ``cloudfs top`` as a user runs
them, against a ``cloudfs up --driver fake`` (run in the test, no mount)
over its operator socket: results and the daemon's own words on failure,
and one batch frame of ``top`` over a tree of 1,000 processes with VMs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from mountd.daemon import DaemonOptions, run
from mountd.zkserver import free_port

REPO = Path(__file__).resolve().parents[2]


async def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout):
        return await trio.run_process([sys.executable, "-m", "mountd.cli", *args], cwd=REPO, check=False,
                                      capture_stdout=True, capture_stderr=True)


@pytest.fixture
async def daemon(tmp_path, zookeeper):
    opts = DaemonOptions(listen=[f"tcp!127.0.0.1!{free_port()}"], driver="fake", state_dir=tmp_path / "state",
                         zookeeper=zookeeper.hosts, deployment=f"tools-{tmp_path.name}", max_processes=2000,
                         limits={"descendants": 2000})
    async with trio.open_nursery() as nursery:
        info = await nursery.start(run, opts)
        try:
            yield info["fs"], ["--state-dir", str(opts.state_dir)]
        finally:
            nursery.cancel_scope.cancel()


async def test_ctl_prints_results_and_the_daemons_words(daemon):
    fs, state = daemon
    ok = await cli("ctl", "1", "fork", "name=web", *state)
    assert ok.returncode == 0 and ok.stdout.strip().isdigit(), ok
    pid = ok.stdout.decode().strip()
    bad = await cli("ctl", pid, "frok", *state)
    assert bad.returncode == 1 and bad.stdout == b""
    assert "unknown ctl command 'frok'; expected one of fork, exec, kill, stop, start" in bad.stderr.decode()
    noimage = await cli("ctl", pid, "exec", "windows", *state)
    assert noimage.returncode == 1 and "unknown image 'windows'" in noimage.stderr.decode()
    assert (await cli("ctl", pid, "exec", "tiny", *state)).returncode == 0
    killed = await cli("kill", pid, "999", *state)
    assert killed.returncode == 1 and "999: no process 999" in killed.stderr.decode()
    with trio.fail_after(10):
        while str(pid) in [str(p) for p in await fs.records.pids()]:
            await trio.sleep(0.05)
    nodaemon = await cli("ctl", "1", "fork", "--state-dir", "/nonexistent")
    assert nodaemon.returncode == 1 and nodaemon.stderr.startswith(b"cloudfs ctl: 1: ")


async def test_top_batch_frame_of_a_thousand_processes(daemon):
    fs, state = daemon
    root = await fs.attach("", "")
    from tests.cloudfs.fsops import ctl

    pids = []
    for _ in range(1000):
        pid = int(await ctl(root, 1, "fork"))
        await ctl(root, pid, "exec tiny")
        pids.append(pid)
    with trio.fail_after(60):
        for p in pids[-10:]:
            while (await fs.records.cached(p)).state != "running":
                await trio.sleep(0.1)
    out = await cli("top", "-b", "-n", "1", "-s", "pid", *state, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert lines[0].startswith("cloudfs top - ") and lines[0].endswith("1001 processes")
    head = lines[1].split()
    assert head == ["PID", "PPID", "NAME", "STATE", "HOST", "%CPU", "MEM", "BLK_R/s", "BLK_W/s", "NET_RX/s",
                    "NET_TX/s"]
    rows = [line.split() for line in lines[2:] if line]
    assert len(rows) == 1001 and [r[0] for r in rows[:2]] == ["1", str(pids[0])]  # -s pid: ascending
    mine = next(r for r in rows if r[0] == str(pids[0]))
    assert mine[3] == "running" and mine[6] == "256.0M" and mine[9] == "-"
    two = await cli("top", "-b", "-n", "2", "-d", "0.2", *state, timeout=120)
    assert two.returncode == 0 and two.stdout.decode().count("cloudfs top - ") == 2
