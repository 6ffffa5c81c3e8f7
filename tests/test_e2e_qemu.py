"""End to end with real guests: CloudFS on a real ZooKeeper, the QEMU driver
booting "tiny" VMs under TCG, each guest mounting its own view of the
namespace with the Linux kernel's 9P client through guestfwd.

The host side talks 9P to the operator face on a unix socket (as the daemon's
``STATE/cloudfs.sock``); guests reach the public face on a loopback TCP port.
Every QEMU a test starts is killed when the test ends, pass or fail.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from cloudfs.channel import Channels
from cloudfs.drivers.qemu import QemuDriver
from cloudfs.filestore import LocalStore
from cloudfs.imagestore import install_image
from cloudfs.namespace import CloudFS, open_cloudfs
from mountd.zkserver import free_port
from ninep.client import Client, open_client
from ninep.errors import FsError
from ninep.server import Server

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "examples" / "montecarlo" / "run.sh"
BOOT_TIMEOUT = 120  # seconds, generous for TCG on a loaded 2-core host


@dataclass
class Cloud:
    fs: CloudFS
    driver: QemuDriver
    state: Path
    port: int
    operator: str  # dial string of the operator face


def _reap_vms(state: Path) -> None:
    QemuDriver(state, accel="tcg").kill_all()


@pytest.fixture
def state(tiny_image, tmp_path):
    s = tmp_path / "state"
    install_image(s, tiny_image)
    try:
        yield s
    finally:
        _reap_vms(s)


async def _serve(fs: CloudFS, state: Path, port: int, nursery: trio.Nursery) -> str:
    """Serve ``fs`` as ``cloudfs up`` does: the VMs' channels, the public
    face on ``port``, the operator socket (returned)."""
    fs.driver.channel_handler = Channels(fs).serve
    await nursery.start(Server(fs.public()).serve, f"tcp!127.0.0.1!{port}")
    sock = f"unix!{state}/cloudfs.sock"
    await nursery.start(Server(fs).serve, sock)
    return sock


@pytest.fixture
async def cloud(zookeeper, zk_root, state):
    port = free_port()
    driver = QemuDriver(state, accel="tcg")
    async with open_cloudfs(zookeeper.hosts, driver, zk_root, resync_interval=1.0,
                            files=LocalStore(state / "files")) as fs:
        async with trio.open_nursery() as nursery:
            sock = await _serve(fs, state, port, nursery)
            try:
                yield Cloud(fs, driver, state, port, sock)
            finally:
                nursery.cancel_scope.cancel()


# -- helpers -----------------------------------------------------------------

async def ctl(c: Client, pid: int | str, command: str) -> str:
    async with await c.walk(f"proc/{pid}/ctl") as f:
        await f.open(os.O_RDWR)
        await f.write(0, command.encode() + b"\n")
        return (await f.read_all()).decode().strip()


async def status(c: Client, pid: int) -> dict[str, str]:
    text = (await c.read_file(f"proc/{pid}/status")).decode()
    return dict(line.split(" ", 1) for line in text.splitlines())


async def start_vm(c: Client, userdata: str) -> int:
    pid = int(await ctl(c, 1, "fork"))
    await c.write_file(f"proc/{pid}/userdata", userdata.encode())
    await ctl(c, pid, "exec tiny")
    return pid


async def until(check, timeout: float = BOOT_TIMEOUT, what: str = "condition"):
    with trio.move_on_after(timeout):
        while True:
            v = await check()
            if v:
                return v
            await trio.sleep(0.2)
    raise AssertionError(f"{what} not met within {timeout}s")


async def env(c: Client, pid: int, key: str, timeout: float = BOOT_TIMEOUT) -> str:
    """The blocking read a host ``cat /proc/<pid>/env/<key>`` does."""
    with trio.fail_after(timeout):
        return (await c.read_file(f"proc/{pid}/env/{key}")).decode().strip()


def console(cloud: Cloud, vm: str) -> str:
    for p in (cloud.state / "vms" / vm / "console.log", cloud.state / "logs" / f"{vm}.console.log"):
        if p.exists():
            return p.read_text(errors="replace")[-3000:]
    return "(no console log)"


# -- the tests ---------------------------------------------------------------

#: The guest's side of test_guest_uses_its_namespace.  Children (ppid != 1)
#: report and wait for env/quit, then exit with its value.
DELEGATION = r"""
C=/cloud/proc
ppid=$(awk '$1 == "ppid" {print $2}' $C/self/status)
if [ "$ppid" != 1 ]; then
  echo up > $C/self/env/up
  exit $(cat $C/self/env/quit)
fi
awk '$1 == "pid" {print $2}' $C/self/status > $C/self/env/whoami
echo hello from $CLOUDFS_PID > $C/self/env/greeting
exec 3<>$C/self/ctl; echo fork >&3; read child <&3; exec 3<&-
echo $child > $C/self/env/child
other=$(cat $C/self/env/other)
if echo kill 2>/tmp/err > $C/$other/ctl; then r=allowed; else r="refused: $(cat /tmp/err)"; fi
echo "$r" > $C/self/env/refused
mkdir -p /x /ro
o="trans=tcp,port=564,version=9p2000.L"
if mount -t 9p -o "$o,aname=proc/$other" 10.0.2.2 /x; then
  echo mounted > $C/self/env/asother
else
  echo refused > $C/self/env/asother
fi
if mount -t 9p -o "$o,aname=" 10.0.2.2 /x; then awk '$1 == "pid" {print $2}' /x/proc/self/status; fi > $C/self/env/noaname
for hp in $(cat $C/self/env/hostports); do
  if nc -w 3 10.0.2.2 $hp </dev/null; then echo "reached 10.0.2.2:$hp"; fi
  if nc -w 3 10.0.2.3 $hp </dev/null; then echo "reached 10.0.2.3:$hp"; fi
done > $C/self/env/otherports
echo done >> $C/self/env/otherports
cat $C/self/env/quit
"""


async def test_guest_uses_its_namespace(cloud):
    async with open_client(cloud.operator) as c:
        other = int(await ctl(c, 1, "fork"))  # not a descendant of the VM: state new, no VM
        a = await start_vm(c, DELEGATION)
        async with trio.open_nursery() as n:
            got: dict[str, str] = {}

            async def blocked_cat():  # issued before the guest has even booted
                got["greeting"] = await env(c, a, "greeting")

            n.start_soon(blocked_cat)
            await until(lambda: _running(c, a), what=f"process {a} running")
            b = int(await ctl(c, a, "fork"))  # the host forks the VM
        assert got["greeting"] == f"hello from {a}"
        assert await env(c, a, "whoami") == str(a)  # the guest read its own status over 9P
        c_pid = int(await env(c, a, "child"))       # the guest forked a child itself
        assert sorted([b, c_pid]) == sorted(int(x) for x in (await c.read_file(f"proc/{a}/children")).split())
        await c.write_file(f"proc/{a}/env/other", str(other).encode())
        # ports open on the host's loopback (the public 9P face, ZooKeeper): none may be reachable
        zk_port = int(cloud.fs.store.hosts.rsplit(":", 1)[1])
        await c.write_file(f"proc/{a}/env/hostports", f"{cloud.port} {zk_port}".encode())
        refused = await env(c, a, "refused")
        assert refused.startswith("refused") and "denied" in refused, refused
        assert (await status(c, other))["state"] == "new"  # nothing changed
        # the channel attaches as its own process only, and nothing else is reachable
        assert await env(c, a, "asother") == "refused"
        assert await env(c, a, "noaname") == str(a)
        assert await env(c, a, "otherports") == "done"
        for kid in (b, c_pid):
            assert await env(c, kid, "up") == "up"
            st = await status(c, kid)
            assert st["state"] == "running" and st["ppid"] == str(a) and st["image"] == "tiny"
        listed = (await c.listdir("proc"))
        assert sorted(int(p) for p in listed) == sorted([1, other, a, b, c_pid])
        vms = {p: (await cloud.fs.records.require(p)).value.vm for p in (a, b, c_pid)}
        pids = {p: cloud.driver.qemu_pid(v) for p, v in vms.items()}
        assert all(pids.values()) and len(set(pids.values())) == 3, pids

        # stop and start pause and resume the guest's vCPUs (QMP)
        await ctl(c, c_pid, "stop")
        await until(lambda: _state(c, c_pid, "stopped"), timeout=30, what="stopped")
        await ctl(c, c_pid, "start")
        await until(lambda: _state(c, c_pid, "running"), timeout=30, what="running again")
        assert cloud.driver.qemu_pid(vms[c_pid]) == pids[c_pid]

        # a guest that ends by itself: the exit status reaches the parent's wait
        await c.write_file(f"proc/{b}/env/quit", b"3\n")
        with trio.fail_after(60):
            rec = (await c.read_file(f"proc/{a}/wait")).decode()
        assert rec.startswith(f"{b} ") and " exited exit 3" in rec, rec + console(cloud, vms[b])
        assert cloud.driver.qemu_pid(vms[b]) is None

        # kill of the parent kills the subtree, children first; QEMUs gone
        await ctl(c, a, "kill")
        with trio.fail_after(60):
            rec = (await c.read_file("proc/1/wait")).decode()
        assert rec.startswith(f"{a} ") and "killed" in rec
        assert sorted(int(p) for p in await c.listdir("proc")) == [1, other]
        for p, pid in pids.items():
            assert not _alive(pid), (p, pid)
        assert list((cloud.state / "vms").iterdir()) == []


async def _running(c: Client, pid: int):
    st = await status(c, pid)
    assert st["state"] in ("creating", "running"), st
    return st if st["state"] == "running" else None


async def _state(c: Client, pid: int, state: str) -> bool:
    return (await status(c, pid))["state"] == state


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return False
    return s[s.rindex(b")") + 2:][:1] not in (b"Z", b"X")


async def test_montecarlo(cloud, tmp_path):
    """The demo as the README runs it: examples/montecarlo/run.sh on the
    operator's FUSE mount (plain cat, echo and a blocking cat of env/pi)."""
    from mountd.fuse import mount

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: mount(cloud.fs, str(mnt), task_status=task_status))
        try:
            with trio.fail_after(240):
                p = await trio.run_process(["sh", str(RUN), str(mnt), "3"], capture_stdout=True,
                                           capture_stderr=True, check=False)
        finally:
            nursery.cancel_scope.cancel()
    out = p.stdout.decode()
    print(out)
    assert p.returncode == 0, out + p.stderr.decode()
    lines = out.splitlines()
    pi = float(next(l for l in lines if l.startswith("pi ~")).split("~")[1])
    assert abs(pi - 3.14159) < 0.3, out
    # RACK's report, written by the coordinator VM to /files/output/result.txt, cat by run.sh
    report = dict(l.strip("| ").split(" | ") for l in lines if l.startswith("| ") and "Property" not in l)
    report = {k.strip(): v.strip() for k, v in report.items()}
    assert report["workers"] == "3" and report["trials"] == "60000", out
    assert float(report["result"]) == pytest.approx(pi) and int(report["points"]) > 0, out
    assert float(report["error"]) == pytest.approx(abs(pi - 3.14159265359), abs=1e-6), out
    coordinator = int(lines[0].split()[-1])
    tree = [l for l in lines if l.lstrip()[:1].isdigit()]
    assert tree[0].split()[:2] == ["1", "init"]
    assert tree[1].split()[:2] == [str(coordinator), "montecarlo"]
    assert len(tree) == 5 and all(l.startswith("    ") for l in tree[2:]), out  # 3 workers under it
    async with open_client(cloud.operator) as c:  # run.sh killed it, workers first
        await until(lambda: _only(c, [1]), timeout=60, what="demo processes gone")
    assert list((cloud.state / "vms").iterdir()) == []


async def _only(c: Client, pids: list[int]) -> bool:
    return sorted(int(p) for p in await c.listdir("proc")) == sorted(pids)


# -- restart: re-adoption after the daemon's kill -9 ----------------------------

#: A daemon in its own process (so it can be killed with SIGKILL): CloudFS +
#: QemuDriver + both 9P faces, like ``cloudfs up``.
DAEMON = r"""
import sys, trio
from pathlib import Path
from cloudfs.channel import Channels
from cloudfs.drivers.qemu import QemuDriver
from cloudfs.filestore import LocalStore
from cloudfs.namespace import open_cloudfs
from ninep.server import Server
hosts, root, state, port = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
async def main():
    driver = QemuDriver(state, accel="tcg")
    async with open_cloudfs(hosts, driver, root, daemon_id="daemon-1", resync_interval=1.0) as fs:
        driver.channel_handler = Channels(fs).serve
        async with trio.open_nursery() as n:
            await n.start(Server(fs.public()).serve, f"tcp!127.0.0.1!{port}")
            await n.start(Server(fs).serve, f"unix!{state}/cloudfs.sock")
            print("ready", flush=True)
            await trio.sleep_forever()
trio.run(main)
"""

#: Idles; when its 9P connection dies with the daemon, remounts and says so.
IDLE = r"""
echo up > /cloud/proc/self/env/up
until cat /cloud/proc/self/env/quit; do
  sleep 1
  cloudfs-mount && echo again > /cloud/proc/self/env/remounted
done
"""


async def test_restart_readopts_running_vms(zookeeper, zk_root, state):
    port = free_port()
    sock = f"unix!{state}/cloudfs.sock"
    proc = subprocess.Popen([sys.executable, "-c", DAEMON, zookeeper.hosts, zk_root, str(state), str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        assert line == b"ready\n", proc.stderr.read().decode() if proc.poll() is not None else line
        async with open_client(sock) as c:
            a = await start_vm(c, IDLE)
            b = int(await ctl(c, a, "fork"))
            for p in (a, b):
                assert await env(c, p, "up") == "up"
        # the operator's view of the two real VMs, as `cloudfs ps` prints it
        ps = await trio.run_process([sys.executable, "-m", "mountd.cli", "ps", "--tree", "--state-dir", str(state)],
                                    capture_stdout=True, cwd=REPO)
        assert ps.stdout.decode().splitlines() == [
            "1 init [running]", f"└─ {a} p{a} [running] tiny", f"   └─ {b} p{a} [running] tiny"], ps.stdout
        vms_before = sorted(d.name for d in (state / "vms").iterdir())
        driver = QemuDriver(state, accel="tcg")
        qpids = {v: driver.qemu_pid(v) for v in vms_before}
        assert len(vms_before) == 2 and all(qpids.values())
        proc.send_signal(signal.SIGKILL)  # the daemon dies without any cleanup
        await trio.to_thread.run_sync(proc.wait)
        os.unlink(state / "cloudfs.sock")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # a new daemon on the same ZooKeeper root and state dir
    async with open_cloudfs(zookeeper.hosts, driver, zk_root, daemon_id="daemon-2", resync_interval=1.0) as fs:
        async with trio.open_nursery() as nursery:
            await _serve(fs, state, port, nursery)
            async with open_client(sock) as c:
                await trio.sleep(3)  # several resyncs: nothing may change
                for p in (a, b):
                    st = await status(c, p)
                    assert st["state"] == "running", st
                assert sorted(d.name for d in (state / "vms").iterdir()) == vms_before  # none started twice
                assert {v: driver.qemu_pid(v) for v in vms_before} == qpids         # none lost
                for p in (a, b):  # the guests mount the new daemon's namespace again
                    assert await env(c, p, "remounted", timeout=60) == "again"
                # the new daemon drives the adopted VMs (once the dead daemon's
                # ZooKeeper session has expired and its ownership with it)
                await ctl(c, a, "kill")
                with trio.fail_after(60):
                    rec = (await c.read_file("proc/1/wait")).decode()
                assert rec.startswith(f"{a} ") and "killed" in rec
            for pid in qpids.values():
                assert not _alive(pid)
            nursery.cancel_scope.cancel()


#: A fork bomb: every process forks twice, records how its forks went, and
#: stays up.  (Forks of a VM boot with the same user-data.)
FORK_BOMB = r"""
for i in 1 2; do
  if echo fork 2>/tmp/err > /cloud/proc/self/ctl; then r=ok; else r="refused: $(cat /tmp/err)"; fi
  echo "$r" > /cloud/proc/self/env/fork$i
done
sleep 100000
"""


async def test_a_guest_fork_bomb_stops_at_its_quota(cloud):
    """descendants 4 on the root: exactly 4 VMs more come up, the fifth
    fork fails with EAGAIN inside the guest, and the operator's kill of the
    root leaves no QEMU behind."""
    async with open_client(cloud.operator) as c:
        root = int(await ctl(c, 1, "fork"))
        await c.write_file(f"proc/{root}/userdata", FORK_BOMB.encode())
        await c.write_file(f"proc/{root}/limits", b"descendants 4\n")
        await ctl(c, root, "exec tiny")

        async def descendants() -> list[int]:
            out, todo = [], [root]
            while todo:
                kids = [int(k) for k in (await c.read_file(f"proc/{todo.pop()}/children")).split()]
                out += kids
                todo += kids
            return out

        async def all_forked():
            ps = await descendants()
            if len(ps) < 4:
                return None
            results = {}
            for p in [root] + ps:
                for i in (1, 2):
                    results[(p, i)] = await env(c, p, f"fork{i}")
            return ps, results

        ps, results = await until(all_forked, 4 * BOOT_TIMEOUT, "the fork bomb's forks")
        assert len(ps) == 4 and len(await descendants()) == 4
        refused = [v for v in results.values() if v.startswith("refused")]
        assert len(refused) == 10 - 4, results
        assert all("Resource temporarily unavailable" in v for v in refused), refused
        assert (await c.read_file(f"proc/{root}/limits")).startswith(b"descendants 4 4\n")
        vms = [(await status(c, p))["pid"] for p in [root] + ps]
        assert len(vms) == 5
        await ctl(c, root, "kill")
        with trio.fail_after(BOOT_TIMEOUT):
            assert (await c.read_file("proc/1/wait")).startswith(f"{root} ".encode())
        assert await c.listdir("proc") == ["1"]
    assert not [s for s in await trio.to_thread.run_sync(cloud.driver.servers) if s.status != "exited"]
    assert not list((cloud.state / "vms").iterdir())


#: Writes to its console, fills 16 MiB of its scratch disk, burns CPU for
#: 3 s, then echoes what the host asks for to its console, for ever.
WATCHED = r"""
echo console-marker-one
dd if=/dev/zero of=/dev/vda bs=1M count=16 2>/dev/null; sync
echo done > /cloud/proc/self/env/disk
end=$(( $(date +%s) + 3 )); while [ $(date +%s) -lt $end ]; do :; done
echo done > /cloud/proc/self/env/cpu
n=0
while true; do
  echo "said: $(cat /cloud/proc/self/env/say$n)"
  n=$((n + 1))
done
"""

#: Tries to read another process's console.
PEEKER = r"""
other=$(cat /cloud/proc/self/env/other)
if cat /cloud/proc/$other/console >/dev/null 2>/tmp/err; then r=read; else r="refused: $(cat /tmp/err)"; fi
echo "$r" > /cloud/proc/self/env/peek
sleep 100000
"""


def _kv(text: bytes) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in text.decode().splitlines())


async def test_stats_and_console_of_a_real_guest(cloud, tmp_path):
    """vCPU time and block counters grow as the guest burns CPU and disk;
    its console shows what it printed; ``tail -f console`` on a FUSE mount
    sees a line written after it started; a sibling guest may not read it."""
    from mountd.fuse import mount

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    async with open_client(cloud.operator) as c, trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: mount(cloud.fs, str(mnt), task_status=task_status))
        try:
            pid = await start_vm(c, WATCHED)
            assert await env(c, pid, "disk") == "done"
            first = _kv(await c.read_file(f"proc/{pid}/stats"))
            assert int(first["block_write_bytes"]) >= 16 << 20 and int(first["block_write_ops"]) > 0
            assert first["memory_bytes"] == str(256 << 20) and first["net_rx_bytes"] == "-"
            assert await env(c, pid, "cpu") == "done"
            second = _kv(await c.read_file(f"proc/{pid}/stats"))
            assert int(second["cpu_ns"]) - int(first["cpu_ns"]) >= 1_500_000_000, (first, second)
            assert int(second["uptime_s"]) >= 3
            text = await c.read_file(f"proc/{pid}/console")
            assert b"console-marker-one" in text
            size = (await (await c.walk(f"proc/{pid}/console")).getattr()).size
            assert size >= len(text) > 0

            tail = await trio.lowlevel.open_process(["tail", "-n", "0", "-f", str(mnt / f"proc/{pid}/console")],
                                                    stdout=subprocess.PIPE)
            try:
                await trio.sleep(2)  # tail has read to the end and follows
                await c.write_file(f"proc/{pid}/env/say0", b"after-tail-started")
                seen = b""
                with trio.fail_after(60):
                    while b"said: after-tail-started" not in seen:
                        seen += await tail.stdout.receive_some(4096)
            finally:
                tail.kill()
                await tail.wait()

            peeker = await start_vm(c, PEEKER)
            await c.write_file(f"proc/{peeker}/env/other", str(pid).encode())
            assert (await env(c, peeker, "peek")).startswith("refused: ")
            assert "ermission denied" in await env(c, peeker, "peek")
        finally:
            nursery.cancel_scope.cancel()


# -- notes ---------------------------------------------------------------------

#: Names a note handler (custom notes land in env/custom), traps SIGHUP
#: (env/hup), says it is ready and loops until a note ends it.
NOTED = r"""
mkdir -p /run/cloudfs
printf '#!/bin/sh\necho "$1" > /cloud/proc/self/env/custom\n' > /run/cloudfs/note-handler
chmod +x /run/cloudfs/note-handler
trap 'echo hup > /cloud/proc/self/env/hup' HUP
echo ready > /cloud/proc/self/env/ready
while :; do sleep 0.2; done
"""


async def _env_is(c: Client, pid: int, key: str, value: str) -> bool:
    try:
        return (await c.read_file(f"proc/{pid}/env/{key}")).decode().strip() == value
    except FsError:
        return False


async def test_notes_reach_the_guest(cloud):
    async with open_client(cloud.operator) as c:
        p = await start_vm(c, NOTED)
        k = int(await ctl(c, p, "fork"))  # same image and user-data, p's child
        for pid in (p, k):
            assert await env(c, pid, "ready") == "ready", console(cloud, (await cloud.fs.records.require(pid)).value.vm)
        await c.write_file(f"proc/{p}/note", b"hello there\n")            # a custom note: the handler
        await until(lambda: _env_is(c, p, "custom", "hello there"), timeout=30, what="custom note")
        await c.write_file(f"proc/{p}/notepg", b"everyone\n")              # the subtree
        for pid in (p, k):
            await until(lambda: _env_is(c, pid, "custom", "everyone"), timeout=30, what=f"notepg at {pid}")
        await c.write_file(f"proc/{k}/note", b"hangup\n")                  # SIGHUP to its process group
        await until(lambda: _env_is(c, k, "hup", "hup"), timeout=30, what="hangup")
        await c.write_file(f"proc/{k}/note", b"interrupt\n")               # SIGINT ends the user-data loop
        with trio.fail_after(60):
            rec = (await c.read_file(f"proc/{p}/wait")).decode()
        assert rec.startswith(f"{k} ") and "exit 130: user-data exited with status 130" in rec, rec
        await c.write_file(f"proc/{p}/note", b"kill\n")                    # powers off at once
        with trio.fail_after(60):
            rec = (await c.read_file("proc/1/wait")).decode()
        assert rec.startswith(f"{p} ") and "exit 137: note kill" in rec, rec
    assert list((cloud.state / "vms").iterdir()) == []


# -- networks in /net ----------------------------------------------------------

#: Serves one TCP connection on port 7777 (a line naming itself), says
#: ready, then pings and connects to the address written to env/target.
PINGER = r"""
echo "hello from $CLOUDFS_PID" | nc -l -p 7777 >/dev/null 2>&1 &
echo ready > /cloud/proc/self/env/ready
t=$(cat /cloud/proc/self/env/target)
if ping -c 2 -W 3 "$t" >/dev/null 2>&1; then echo yes; else echo no; fi > /cloud/proc/self/env/reach
(nc -w 3 "$t" 7777 </dev/null || echo refused) > /cloud/proc/self/env/talk 2>/dev/null
cat /cloud/proc/self/env/quit
"""


async def test_vms_on_a_network_reach_each_other_and_no_one_else(cloud):
    async with open_client(cloud.operator) as c:
        root = await c.root()
        async with await root.walk("net") as net:  # touch /net/lab, /net/other
            for name in ("lab", "other"):
                f = await net.create(name, os.O_RDONLY, 0o644)
                await f.clunk()
        info = {n: dict(line.split(" ", 1) for line in (await c.read_file(f"net/{n}")).decode().splitlines())
                for n in ("lab", "other")}
        assert info["lab"]["cidr"] != info["other"]["cidr"] and info["lab"]["status"] == "active"
        pids = {}
        for name, nets in (("a", "lab"), ("b", "lab"), ("c", "other")):
            pid = int(await ctl(c, 1, "fork"))
            await c.write_file(f"proc/{pid}/userdata", PINGER.encode())
            await ctl(c, pid, f"exec tiny net=user,{nets}")
            pids[name] = pid
        for pid in pids.values():
            assert await env(c, pid, "ready") == "ready"
        addrs = {n: (await status(c, p))["addresses"].split() for n, p in pids.items()}
        assert addrs["a"][0] == "10.0.2.15" and len(addrs["a"]) == 2, addrs
        lab, other = (ipaddress.ip_network(info[n]["cidr"]) for n in ("lab", "other"))
        assert ipaddress.ip_address(addrs["a"][1]) in lab and ipaddress.ip_address(addrs["c"][1]) in other
        await c.write_file(f"proc/{pids['a']}/env/target", addrs["b"][1].encode())   # same network
        await c.write_file(f"proc/{pids['c']}/env/target", addrs["a"][1].encode())   # another network
        await c.write_file(f"proc/{pids['b']}/env/target", addrs["c"][1].encode())
        assert await env(c, pids["a"], "reach") == "yes"
        assert await env(c, pids["c"], "reach") == "no"
        assert await env(c, pids["b"], "reach") == "no"
        assert await env(c, pids["a"], "talk") == f"hello from {pids['b']}"  # TCP across the network
        assert await env(c, pids["c"], "talk") == "refused"
        with pytest.raises(FsError) as e:  # rm /net/lab while a VM is on it
            await c.remove("net/lab")
        assert e.value.errno == errno.EBUSY
        for pid in pids.values():
            await ctl(c, pid, "kill")
        with trio.fail_after(60):
            for _ in pids:
                await c.read_file("proc/1/wait")
        await c.remove("net/lab")
        await c.remove("net/other")
        assert await c.listdir("net") == ["user"]
    assert not list((cloud.state / "nets").iterdir())


WRITER = """#!/bin/sh
dd if=/dev/urandom of=/cloud/files/shared.bin bs=1048576 count=50 2>/dev/null
md5sum /cloud/files/shared.bin | cut -d' ' -f1 > /cloud/proc/self/env/md5
exec cat /cloud/proc/self/env/quit
"""

READER = """#!/bin/sh
a=$(cat /cloud/proc/self/env/a)
cat /cloud/proc/$a/env/md5 > /dev/null
md5sum /cloud/files/shared.bin | cut -d' ' -f1 > /cloud/proc/self/env/md5
if echo x > /cloud/files/shared.bin 2>/dev/null; then echo changed; else echo refused; fi > /cloud/proc/self/env/clobber
if rm /cloud/files/shared.bin 2>/dev/null; then echo removed; else echo refused; fi > /cloud/proc/self/env/rm
mkdir -p /cloud/files/b && echo mine > /cloud/files/b/note && cat /cloud/files/b/note > /cloud/proc/self/env/own
exec cat /cloud/proc/self/env/quit
"""


async def test_guests_share_files(cloud):
    """/cloud/files: a 50 MB file one VM writes is read byte-identical by
    another VM and by the operator; the other VM may not change or remove
    it, and keeps files of its own."""
    import hashlib

    async with open_client(cloud.operator) as c:
        a = await start_vm(c, WRITER)
        b = int(await ctl(c, 1, "fork"))
        await c.write_file(f"proc/{b}/env/a", str(a).encode())
        await c.write_file(f"proc/{b}/userdata", READER.encode())
        await ctl(c, b, "exec tiny")
        md5_a = await env(c, a, "md5", timeout=BOOT_TIMEOUT + 240)
        md5_b = await env(c, b, "md5", timeout=240)
        h = hashlib.md5()
        async with await c.walk("files/shared.bin") as f:
            await f.open(os.O_RDONLY)
            off = 0
            while chunk := await f.read(off, 65536):
                h.update(chunk)
                off += len(chunk)
        assert off == 50 << 20
        assert md5_a == md5_b == h.hexdigest()
        assert await env(c, b, "clobber") == "refused"
        assert await env(c, b, "rm") == "refused"
        assert await env(c, b, "own") == "mine"
        q = (await cloud.fs.quotas.get(a)).value
        assert (q.used["files"], q.used["file-bytes"]) == (1, 50 << 20)
        for p in (a, b):
            await ctl(c, p, "kill")


# -- fork live ----------------------------------------------------------------------

FORKLIVE = REPO / "examples" / "forklive" / "userdata.sh"


async def test_fork_live_children_use_the_parents_memory(cloud):
    """examples/forklive: a parent computes a table in memory, forks live
    children with cloudfs-fork; each child is a copy that takes its own pid
    and mount, uses the table without computing it, and the parent runs on."""
    async with open_client(cloud.operator) as c:
        pid = int(await ctl(c, 1, "fork"))
        await c.write_file(f"proc/{pid}/userdata", FORKLIVE.read_bytes())
        await c.write_file(f"proc/{pid}/env/n", b"2")
        await ctl(c, pid, "exec tiny")
        table = await env(c, pid, "table")
        assert table.startswith("125 primes"), table
        parent = await status(c, pid)
        try:
            answer = await env(c, pid, "answer", timeout=BOOT_TIMEOUT * 2)
        except BaseException:
            print(console(cloud, parent["host"] and (await cloud.fs.records.require(pid)).value.vm))
            raise
        assert answer == "125", answer
        kids = (await env(c, pid, "children")).split()
        assert len(kids) == 2 and all(int(k) > pid for k in kids)
        # the parent's VM ran on in the same QEMU
        rec = (await cloud.fs.records.require(pid)).value
        assert (await status(c, pid))["state"] == "running" and rec.vm == (await cloud.fs.records.require(pid)).value.vm
        # (the parent writes env/answer first, then its console line: wait for that)
        with trio.move_on_after(60):
            while "primes counted by" not in (text := console(cloud, rec.vm)):
                await trio.sleep(0.5)
        assert "forklive parent" in text and "primes counted by" in text, text
        # each child wrote its share from the copied table, as its own process
        waits = []
        with trio.fail_after(60):
            while len(waits) < 2:
                line = (await c.read_file(f"proc/{pid}/wait")).decode()
                waits += line.splitlines()
        assert sorted(w.split()[0] for w in waits) == sorted(kids), waits
        # the children were restored from copies, and said so on their consoles
        logs = [p.read_text(errors="replace") for p in (cloud.state / "logs").glob("*.console.log")]
        children = [t for t in logs if "forklive child" in t]
        assert len(children) == 2 and all("--- cloudfs: restoring" in t for t in children), logs
        assert not (cloud.state / "snapshots").exists() or not list((cloud.state / "snapshots").iterdir())
        await ctl(c, pid, "kill")
        await until(lambda: _only(c, [1]), timeout=60, what="demo processes gone")
