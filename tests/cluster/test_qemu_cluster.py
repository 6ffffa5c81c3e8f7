"""The cluster with real guests: two daemon hosts (network namespaces) with
the QEMU driver on a 3-server ZooKeeper ensemble, a guest on each.  The
guest on d1 writes a rising counter into its env every 0.2 s; the guest on
d2 reads it in a loop and reports any value that is not a number or goes
back.  d1 is killed with SIGKILL while its guest writes, and started again:
the guest's QEMU is re-adopted (same QEMU, still running), its ``/cloud``
comes back (``cloudfs-mount`` again), the counter goes on rising, and the
guest on the other host never saw a wrong value."""

import contextlib
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


# -- migrate: a VM moves to the other host's daemon ----------------------------------

#: Writes DISK_MARK on its scratch disk (at 1 MiB: a move must carry it),
#: then 1, 2, 3 … into its env key n every 0.1 s; a write that fails (its
#: /cloud went with a move, until cloudfs-watch mounts it again) is tried
#: again with the same number, so no number is skipped.
DISK_MARK = b"cloudfs-moved-disk\n"
COUNTER = r"""
echo cloudfs-moved-disk | dd of=/dev/vda bs=512 seek=2048 conv=fsync 2>/dev/null
i=0
while :; do
  i=$((i+1))
  until echo $i > /cloud/proc/self/env/n 2>/dev/null; do sleep 0.1; done
  sleep 0.1
done
"""


def disk_mark(cluster: Cluster, daemon: int) -> bytes:
    """What the one VM on ``daemon``'s host has at 1 MiB of its scratch disk."""
    [name] = vms(cluster, daemon)
    with open(cluster.state_dir(daemon) / "vms" / name / "scratch.img", "rb") as f:
        f.seek(1 << 20)
        return f.read(len(DISK_MARK))


async def status_of(cluster: Cluster, daemon: int, pid: int) -> dict[str, str]:
    async with open_client(cluster.socket(daemon)) as c:
        text = (await c.read_file(f"proc/{pid}/status")).decode()
    return dict(line.split(" ", 1) for line in text.splitlines())


def running_copies(cluster: Cluster, pid: int) -> list[str]:
    """The QEMUs tagged with ``pid`` that run (QMP says ``running``), on both hosts."""
    import json as _json

    from cloudfs.drivers.qmp import QmpError, qmp_command
    out = []
    for i in (1, 2):
        for name in vms(cluster, i):
            d = cluster.state_dir(i) / "vms" / name
            try:
                meta = _json.loads((d / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if meta["metadata"].get("cloudfs-pid") != str(pid):
                continue
            try:
                st = qmp_command(d / "qmp.sock", "query-status", timeout=2.0)
            except QmpError:
                continue
            if st.get("status") == "running":
                out.append(f"d{i}/{name}")
    return out


class Sampler:
    """Reads the counter through d2's operator socket every 50 ms:
    (monotonic time, value) pairs."""

    def __init__(self, cluster: Cluster, pid: int):
        self.cluster, self.pid, self.samples = cluster, pid, []

    async def run(self):
        while True:
            v = await value(self.cluster, 2, self.pid, "n")
            if v is not None and v.isdigit():
                self.samples.append((trio.current_time(), int(v)))
            await trio.sleep(0.05)

    def went_back(self) -> list[tuple[int, int]]:
        return [(a[1], b[1]) for a, b in zip(self.samples, self.samples[1:]) if b[1] < a[1]]

    def longest_stall(self) -> float:
        """Seconds of the longest time the value did not change."""
        longest, since = 0.0, None
        for (t0, v0), (t1, v1) in zip(self.samples, self.samples[1:]):
            since = t0 if since is None else since
            if v1 != v0:
                longest, since = max(longest, t1 - since), None
        return longest


async def _up_with_counter(cluster: Cluster, tiny_image, disk_mib: int = 0) -> int:
    """The cluster up, and a COUNTER guest on d1 (which first writes
    ``disk_mib`` MiB of random data on its scratch disk, from 2 MiB on)."""
    userdata = COUNTER if not disk_mib else \
        f"dd if=/dev/urandom of=/dev/vda bs=1M seek=2 count={disk_mib} conv=fsync 2>/dev/null\n" + COUNTER
    await trio.to_thread.run_sync(cluster.up)
    for i in (1, 2):
        install_image(cluster.state_dir(i), tiny_image)
    await cluster.start_daemons("qemu")
    cluster.daemon_signal(2, signal.SIGSTOP)  # the VM goes to d1
    try:
        async with open_client(cluster.socket(1)) as c:
            pid = int(await ctl(c, 1, "fork"))
            await c.write_file(f"proc/{pid}/userdata", userdata.encode())
            await ctl(c, pid, "exec tiny")
        await until(lambda: trio.to_thread.run_sync(vms, cluster, 1), "a VM on d1", 60)
    finally:
        cluster.daemon_signal(2, signal.SIGCONT)
    await until(lambda: _at_least(cluster, 1, pid, "n", 5), "the counter", 60 + disk_mib)
    return pid


async def test_migrate_a_counting_guest(tmp_path, tiny_image):
    cluster = Cluster(tmp_path / "cluster", n_daemons=2, session_timeout=10.0, driver="qemu")
    try:
        pid = await _up_with_counter(cluster, tiny_image)
        [vm1] = vms(cluster, 1)
        assert (await host_entry(cluster, "d2"))["migrate"].endswith("!5640")
        async with open_client(cluster.socket(2)) as c:
            for bad, err in (("migrate d9", "EINVAL"), ("migrate d1", "EINVAL"), ("migrate a/b", "EINVAL")):
                with pytest.raises(FsError) as e:
                    await ctl(c, pid, bad)
                assert e.value.errno == __import__("errno").EINVAL, (bad, e.value)
        sampler = Sampler(cluster, pid)
        async with trio.open_nursery() as n:
            n.start_soon(sampler.run)
            await trio.sleep(1)
            before = int(await value(cluster, 2, pid, "n"))
            t0 = trio.current_time()
            async with open_client(cluster.socket(2)) as c:  # written on the other daemon
                await ctl(c, pid, "migrate d2")
                with pytest.raises(FsError) as e:
                    await ctl(c, pid, "migrate d2")  # already moving
                assert e.value.errno == __import__("errno").EBUSY
            st = await until(lambda: _moved(cluster, pid, "d2"), "the VM on d2", 120)
            moved_s = trio.current_time() - t0
            assert st["state"] == "running" and st["move"].startswith("from d1 to d2 at "), st
            await until(lambda: _at_least(cluster, 2, pid, "n", before + 30), "the counter rising on d2", 120)
            n.cancel_scope.cancel()
        assert sampler.went_back() == []
        assert vms(cluster, 1) == [] and len(vms(cluster, 2)) == 1 and vms(cluster, 2) != [vm1]
        assert running_copies(cluster, pid) == [f"d2/{vms(cluster, 2)[0]}"]
        assert disk_mark(cluster, 2) == DISK_MARK  # the scratch disk came along
        assert (await host_entry(cluster, "d2"))["processes"].split() == [str(pid)]
        await until(lambda: _owned_by(cluster, "d2", pid), "d2 owning the pid", 30)
        print(f"moved in {moved_s:.2f} s; the counter stood still for {sampler.longest_stall():.2f} s at most")
        # and back, written on the host it is on
        async with open_client(cluster.socket(2)) as c:
            await ctl(c, pid, "migrate d1")
        await until(lambda: _moved(cluster, pid, "d1"), "the VM back on d1", 120)
        n_now = int(await value(cluster, 1, pid, "n"))
        await until(lambda: _at_least(cluster, 1, pid, "n", n_now + 10), "the counter rising on d1", 120)
        assert disk_mark(cluster, 1) == DISK_MARK
        async with open_client(cluster.socket(1)) as c:
            await ctl(c, pid, "kill")
    finally:
        await trio.to_thread.run_sync(cluster.down)
        for i in (1, 2):
            await trio.to_thread.run_sync(lambda: QemuDriver(cluster.state_dir(i), accel="tcg").kill_all())


async def _moved(cluster: Cluster, pid: int, host: str) -> dict[str, str] | None:
    try:
        st = await status_of(cluster, 2, pid)
    except FsError:
        return None
    return st if st.get("host") == host and st.get("state") == "running" and "move" in st \
        and st["move"].startswith("from") and f"to {host} at" in st["move"] else None


async def _owned_by(cluster: Cluster, host: str, pid: int) -> bool:
    return str(pid) in (await host_entry(cluster, host))["processes"].split()


def _copy_disk_bytes(cluster: Cluster) -> int:
    """Bytes allocated in the scratch disk of the incoming copy on d2 (0 if none)."""
    most = 0
    for name in vms(cluster, 2):
        with contextlib.suppress(OSError):
            most = max(most, (cluster.state_dir(2) / "vms" / name / "scratch.img").stat().st_blocks * 512)
    return most


@pytest.mark.parametrize("killed, phase", [(1, "stream"), (2, "stream"), (1, "disk"), (2, "disk")],
                         ids=["source-stream", "destination-stream", "source-disk", "destination-disk"])
async def test_daemon_killed_mid_move(tmp_path, tiny_image, killed, phase):
    """SIGKILL of the source or the destination daemon while the VM moves
    (during QEMU's stream; or while the disk is copied, the source paused
    and the copy's disk half written): never two running copies; once it
    is back, exactly one, with its disk, and the counter rises on."""
    cluster = Cluster(tmp_path / "cluster", n_daemons=2, session_timeout=4.0, driver="qemu")
    live = 3 - killed
    try:
        pid = await _up_with_counter(cluster, tiny_image, 128 if phase == "disk" else 0)
        async with open_client(cluster.socket(live)) as c:
            await ctl(c, pid, "migrate d2")
        with trio.fail_after(30):
            while (await status_of(cluster, live, pid))["state"] != "migrating":
                await trio.sleep(0.01)
        if phase == "stream":
            await trio.sleep(0.2)  # in the middle of the transfer, or just after it
        else:
            with trio.fail_after(60):  # the copy's disk begins to fill: 128 MiB are on their way
                while _copy_disk_bytes(cluster) < 4 << 20:
                    await trio.sleep(0.005)
        await trio.to_thread.run_sync(cluster.daemon_kill, killed)
        most = 0
        for _ in range(20):  # the killed daemon's session expires meanwhile
            most = max(most, len(await trio.to_thread.run_sync(running_copies, cluster, pid)))
            await trio.sleep(0.5)
        cluster.daemon_start(killed)
        await cluster.wait_daemon(killed)
        for _ in range(20):
            most = max(most, len(await trio.to_thread.run_sync(running_copies, cluster, pid)))
            await trio.sleep(0.5)
        st = await until(lambda: _settled(cluster, pid), "the VM running on one host", 120)
        assert most <= 1, most
        host = int(st["host"][1:])
        n_now = int(await value(cluster, host, pid, "n"))
        await until(lambda: _at_least(cluster, host, pid, "n", n_now + 10), "the counter rising", 120)
        copies = await trio.to_thread.run_sync(running_copies, cluster, pid)
        assert len(copies) == 1 and copies[0].startswith(st["host"] + "/"), (copies, st)
        assert sum(len(vms(cluster, i)) for i in (1, 2)) == 1, (vms(cluster, 1), vms(cluster, 2))
        assert disk_mark(cluster, host) == DISK_MARK  # wherever it ended, with its disk
        async with open_client(cluster.socket(2)) as c:
            await ctl(c, pid, "kill")
    finally:
        await trio.to_thread.run_sync(cluster.down)
        for i in (1, 2):
            await trio.to_thread.run_sync(lambda: QemuDriver(cluster.state_dir(i), accel="tcg").kill_all())


async def _settled(cluster: Cluster, pid: int) -> dict[str, str] | None:
    try:
        st = await status_of(cluster, 2, pid)
    except FsError:
        return None
    if st.get("state") != "running" or "move" in st and st["move"].startswith("to ") and "failed" not in st["move"]:
        return None
    if len(await trio.to_thread.run_sync(running_copies, cluster, pid)) != 1:
        return None
    return st
