"""The cluster with real guests: two daemon hosts (network namespaces) with
the QEMU driver on a 3-server ZooKeeper ensemble, a guest on each.  The
guest on d1 writes a rising counter into its env every 0.2 s; the guest on
d2 reads it in a loop and reports any value that is not a number or goes
back.  d1 is killed with SIGKILL while its guest writes, and started again:
the guest's QEMU is re-adopted (same QEMU, still running), its ``/cloud``
comes back (``cloudfs-mount`` again), the counter goes on rising, and the
guest on the other host never saw a wrong value."""

import os
import shutil
import signal

import pytest
import trio

from cloudfs.drivers.qemu import QemuDriver
from cloudfs.imagestore import install_image
from ninep.client import Client, open_client
from ninep.errors import FsError
from tests.cluster.hosts import Cluster

pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("java") is None,
                                 reason="needs root (network namespaces) and Debian's zookeeper")]

BOOT = 180  # s, TCG on a loaded 2-core host

#: Writes 1, 2, 3 … to its env key n; when /cloud dies with its daemon,
#: mounts it again (and says so once) and writes the same number again.
WRITER = r"""
i=0
while :; do
  i=$((i+1))
  until echo $i > /cloud/proc/self/env/n 2>/dev/null; do
    sleep 0.5
    cloudfs-mount 2>/dev/null && echo again > /cloud/proc/self/env/remounted
  done
  sleep 0.2
done
"""

#: Reads the writer's n in a loop; any value that is not a number or is below
#: the last one read goes to env wrong; every 10 reads "<reads> <last>" to env seen.
READER = r"""
last=0; n=0
while :; do
  v=$(cat /cloud/proc/WRITER/env/n 2>/dev/null) || { sleep 0.2; cloudfs-mount 2>/dev/null; continue; }
  case "$v" in
    ''|*[!0-9]*) echo "not a number: $v" > /cloud/proc/self/env/wrong; sleep 0.2; continue;;
  esac
  [ "$v" -lt "$last" ] && echo "went back: $last then $v" > /cloud/proc/self/env/wrong
  last=$v; n=$((n+1))
  [ $((n % 10)) = 0 ] && echo "$n $last" > /cloud/proc/self/env/seen
  sleep 0.1
done
"""


async def ctl(c: Client, pid: int, command: str) -> str:
    async with await c.walk(f"proc/{pid}/ctl") as f:
        await f.open(os.O_RDWR)
        await f.write(0, command.encode() + b"\n")
        return (await f.read_all()).decode().strip()


async def value(cluster: Cluster, daemon: int, pid: int, key: str) -> str | None:
    """The env value, or None if unset or the daemon cannot answer now."""
    try:
        async with open_client(cluster.socket(daemon)) as c:
            async with await c.walk(f"proc/{pid}/env/{key}") as f:
                await f.open(os.O_RDONLY | os.O_NONBLOCK)
                return (await f.read_all()).decode().strip()
    except (FsError, OSError):
        return None


async def until(check, what: str, timeout: float = BOOT):
    with trio.move_on_after(timeout):
        while True:
            got = await check()
            if got:
                return got
            await trio.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout}s")


def vms(cluster: Cluster, daemon: int) -> list[str]:
    d = cluster.state_dir(daemon) / "vms"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


async def test_a_daemon_killed_under_its_writing_guest(tmp_path, tiny_image):
    cluster = Cluster(tmp_path / "cluster", n_daemons=2, session_timeout=10.0, driver="qemu")
    try:
        await trio.to_thread.run_sync(cluster.up)
        for i in (1, 2):
            install_image(cluster.state_dir(i), tiny_image)
        await cluster.start_daemons("qemu")
        async with open_client(cluster.socket(1)) as c:
            writer, reader = int(await ctl(c, 1, "fork")), int(await ctl(c, 1, "fork"))
            await c.write_file(f"proc/{writer}/userdata", WRITER.encode())
            await c.write_file(f"proc/{reader}/userdata", READER.replace("WRITER", str(writer)).encode())
        # place the writer on d1 and the reader on d2: the other daemon is
        # paused while one takes the exec (any daemon may make a new VM)
        for pid, host, other in ((writer, 1, 2), (reader, 2, 1)):
            cluster.daemon_signal(other, signal.SIGSTOP)
            try:
                async with open_client(cluster.socket(host)) as c:
                    await ctl(c, pid, "exec tiny")
                await until(lambda: trio.to_thread.run_sync(vms, cluster, host), f"a VM on d{host}", 60)
            finally:
                cluster.daemon_signal(other, signal.SIGCONT)
        assert len(vms(cluster, 1)) == 1 and len(vms(cluster, 2)) == 1
        await until(lambda: _at_least(cluster, 2, writer, "n", 5), "the writer's counter")
        await until(lambda: value(cluster, 2, reader, "seen"), "the reader's first reads")
        vm = vms(cluster, 1)[0]
        qemu_pid = QemuDriver(cluster.state_dir(1), accel="tcg").qemu_pid(vm)
        assert qemu_pid
        before = await host_entry(cluster, "d1")
        assert before["driver"] == "qemu" and before["processes"].split() == [str(writer)]
        assert (await host_entry(cluster, "d2"))["processes"].split() == [str(reader)]

        await trio.to_thread.run_sync(cluster.daemon_kill, 1)  # with the guest writing
        at_kill = int(await value(cluster, 2, writer, "n"))
        await trio.sleep(5)
        stalled = int(await value(cluster, 2, writer, "n"))
        assert stalled <= at_kill + 1  # its /cloud died with d1
        cluster.daemon_start(1)
        await cluster.wait_daemon(1)

        assert await until(lambda: value(cluster, 1, writer, "remounted"), "the writer's remount", 120) == "again"
        await until(lambda: _at_least(cluster, 1, writer, "n", stalled + 20), "the counter rising again", 120)
        assert vms(cluster, 1) == [vm]  # re-adopted, not made again
        assert QemuDriver(cluster.state_dir(1), accel="tcg").qemu_pid(vm) == qemu_pid
        async with open_client(cluster.socket(2)) as c:
            st = dict(line.split(" ", 1) for line in (await c.read_file(f"proc/{writer}/status")).decode().splitlines())
        assert st["state"] == "running", st
        seen = await until(lambda: _seen_after(cluster, reader, stalled + 20), "the reader following", 120)
        # the restarted daemon is host d1 once the killed one's session expired, and runs the writer
        after = await until(lambda: _new_d1(cluster, before["daemon"]), "the new d1 in /hosts", 60)
        assert after["processes"].split() == [str(writer)]
        assert await value(cluster, 2, reader, "wrong") is None
        assert int(seen.split()[1]) <= int(await value(cluster, 2, writer, "n"))
        async with open_client(cluster.socket(1)) as c:
            for pid in (reader, writer):
                await ctl(c, pid, "kill")
    finally:
        await trio.to_thread.run_sync(cluster.down)
        for i in (1, 2):
            await trio.to_thread.run_sync(lambda: QemuDriver(cluster.state_dir(i), accel="tcg").kill_all())


async def _at_least(cluster: Cluster, daemon: int, pid: int, key: str, n: int) -> bool:
    v = await value(cluster, daemon, pid, key)
    return v is not None and v.isdigit() and int(v) >= n


async def _seen_after(cluster: Cluster, reader: int, n: int) -> str | None:
    v = await value(cluster, 2, reader, "seen")
    return v if v and int(v.split()[1]) >= n else None


async def host_entry(cluster: Cluster, name: str) -> dict[str, str]:
    async with open_client(cluster.socket(2)) as c:
        text = (await c.read_file(f"hosts/{name}")).decode()
    return dict(line.split(" ", 1) for line in text.splitlines())


async def _new_d1(cluster: Cluster, old_daemon: str) -> dict[str, str] | None:
    try:
        h = await host_entry(cluster, "d1")
    except FsError:
        return None
    return h if h["daemon"] != old_daemon and h["processes"] != "-" else None
