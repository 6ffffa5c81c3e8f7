"""``migrate HOST`` through the namespace with the fake driver (Nova-like
live migration between compute hosts, done by the reconciler), and the
refusals of the ctl write.  QEMU moves between daemons are tested with real
guests in tests/cluster/test_qemu_cluster.py."""

import errno

import pytest
import trio

from cloudfs.drivers.fake import FakeDriver
from cloudfs.namespace import open_cloudfs
from ninep.errors import FsError
from tests.cloudfs.fsops import fails, ctl, eventually, state_is, status, vm


@pytest.fixture
async def root(cfs):
    return await cfs.attach("glenda", "")


async def test_migrate_moves_to_the_host(root, cfs):
    pid = await vm(root)
    kid = int(await ctl(root, pid, "fork"))
    sid = (await cfs.records.require(pid)).value.vm
    assert await ctl(root, pid, "migrate fake-host-2") == b""

    async def moved():
        st = await status(root, pid)
        return st if st["host"] == "fake-host-2" and st["state"] == "running" else None

    st = await eventually(moved)
    assert st["move"].startswith("from fake-host to fake-host-2 at "), st
    rec = (await cfs.records.require(pid)).value
    assert rec.vm == sid and rec.move_to == "" and ("migrate", sid) in cfs.driver.calls
    assert (await status(root, kid))["ppid"] == str(pid)  # its place in the tree is the same


async def test_migrate_refusals_change_nothing(root, cfs):
    await fails(errno.EINVAL, ctl(root, 1, "migrate fake-host-2"), "no VM")
    new = int(await ctl(root, 1, "fork"))
    await fails(errno.EINVAL, ctl(root, new, "migrate fake-host-2"), "no VM")
    pid = await vm(root)
    await fails(errno.EINVAL, ctl(root, pid, "migrate fake-host"), "already")
    await fails(errno.EINVAL, ctl(root, pid, "migrate"), "one host")
    await fails(errno.ENOENT, ctl(root, 999, "migrate fake-host-2"))
    cfs.driver.hold_migrate = trio.Event()
    await ctl(root, pid, "migrate fake-host-2")
    await state_is(root, pid, "migrating")
    assert (await status(root, pid))["move"] == "to fake-host-2"
    await fails(errno.EBUSY, ctl(root, pid, "migrate fake-host-2"), "moving to fake-host-2")
    cfs.driver.hold_migrate.set()
    await eventually(lambda: _host_is(root, pid, "fake-host-2"))


async def test_a_failed_move_leaves_it_where_it_was(root, cfs):
    pid = await vm(root)
    await ctl(root, pid, "migrate nowhere")

    async def failed():
        st = await status(root, pid)
        return st if st.get("move", "").startswith("to nowhere failed") else None

    st = await eventually(failed)
    assert st["state"] == "running" and st["host"] == "fake-host" and "no other compute host" in st["move"]
    await ctl(root, pid, "migrate fake-host-2")  # may be asked again
    await eventually(lambda: _host_is(root, pid, "fake-host-2"))


async def test_kill_while_moving(root, cfs):
    pid = await vm(root)
    cfs.driver.hold_migrate = trio.Event()
    await ctl(root, pid, "migrate fake-host-2")
    await state_is(root, pid, "migrating")
    await ctl(root, pid, "kill")
    cfs.driver.hold_migrate.set()
    await eventually(lambda: _gone(root, pid))
    assert not [s for s in cfs.driver.servers.values() if s.status != "exited"]


async def test_qemu_scoped_processes_move_between_daemons_in_hosts(zookeeper, zk_root):
    """A QEMU VM's move names a daemon in /hosts: unknown host EINVAL, a
    host whose daemon is not a QEMU one (or takes no VMs) EOPNOTSUPP."""
    drv = FakeDriver(host="h1", scope="qemu!h1!/state")
    async with open_cloudfs(zookeeper.hosts, drv, zk_root, daemon_id="daemon-q", host="h1") as fs:
        r = await fs.attach("glenda", "")
        pid = await vm(r)
        await fails(errno.EINVAL, ctl(r, pid, "migrate h9"), "no host 'h9' in /hosts")
        await fails(errno.EOPNOTSUPP, ctl(r, pid, "migrate h1"), "fake driver")
        assert "move" not in await status(r, pid)


async def test_a_driver_that_cannot_move_is_eopnotsupp(zookeeper, zk_root, tmp_path):
    from cloudfs.drivers.fakecloud import FakeCloudDriver
    async with open_cloudfs(zookeeper.hosts, FakeCloudDriver(tmp_path / "cloud"), zk_root, daemon_id="d-c") as fs:
        r = await fs.attach("glenda", "")
        pid = await vm(r)
        await fails(errno.EOPNOTSUPP, ctl(r, pid, "migrate elsewhere"), "cannot move")
        assert "move" not in await status(r, pid)


async def _host_is(root, pid, host):
    return (await status(root, pid))["host"] == host


async def _gone(root, pid):
    try:
        await status(root, pid)
    except FsError as e:
        return e.errno == errno.ENOENT
    return False
