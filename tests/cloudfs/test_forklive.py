"""``fork live`` through the namespace with the fake driver: the snapshot
is taken during the ctl write, the child is restored from it by a daemon of
the parent's scope only, and a fork that fails or a child that ends before
it is built leaves no snapshot behind (the QEMU driver's copy is tested in
tests/cloudfs/drivers/test_qemu_snapshot.py)."""

import errno

import pytest

from cloudfs.drivers.fake import FakeDriver
from cloudfs.drivers.fakecloud import FakeCloudDriver
from cloudfs.namespace import open_cloudfs
from tests.cloudfs.fsops import fails, cat, ctl, eventually, state_is, status, vm


@pytest.fixture
async def root(cfs):
    return await cfs.attach("glenda", "")


async def test_fork_live_restores_child_from_snapshot(root, cfs):
    parent = await vm(root, userdata="data")
    psid = (await cfs.records.require(parent)).value.vm
    child = int(await ctl(root, parent, "fork live name=copy"))
    assert ("snapshot", psid) in cfs.driver.calls
    st = await state_is(root, child, "running")
    assert st["ppid"] == str(parent) and st["name"] == "copy" and st["image"] == "tiny"
    assert await cat(root, f"/proc/{child}/userdata") == b"data"
    rec = (await cfs.records.require(child)).value
    assert rec.snapshot == "" and rec.scope == cfs.driver.scope and rec.vm != psid
    assert [c for c in cfs.driver.calls if c[0] == "restore"] and not cfs.driver.snapshots
    assert (await status(root, parent))["state"] == "running"


async def test_fork_live_errors_change_nothing(root, cfs):
    await fails(errno.EINVAL, ctl(root, 1, "fork live"), "no VM to copy")
    new = int(await ctl(root, 1, "fork"))
    await fails(errno.EINVAL, ctl(root, new, "fork live"), "no VM to copy")
    parent = await vm(root)
    cfs.driver.fail_next("snapshot", "cannot copy now")
    await fails(errno.EIO, ctl(root, parent, "fork live"), "cannot copy now")
    assert await cat(root, f"/proc/{parent}/children") == b""
    await fails(errno.ENOENT, ctl(root, 999, "fork live"))
    assert not cfs.driver.snapshots


async def test_fork_live_of_another_hosts_vm_is_exdev(zookeeper, zk_root, driver, root, cfs):
    parent = await vm(root)
    other = FakeDriver(host="other-host", scope="fake-other")
    async with open_cloudfs(zookeeper.hosts, other, zk_root, daemon_id="daemon-o") as fs2:
        root2 = await fs2.attach("glenda", "")
        await fails(errno.EXDEV, ctl(root2, parent, "fork live"), "fake-host")
    assert not driver.snapshots and await cat(root, f"/proc/{parent}/children") == b""


async def test_fork_live_child_waits_for_the_parents_scope(zookeeper, zk_root, driver, root, cfs):
    """Another daemon, of another scope, never takes the child's create
    (the snapshot is where the parent runs)."""
    parent = await vm(root)  # made by this daemon, before the other one is there
    other = FakeDriver(host="other-host", scope="fake-other")
    async with open_cloudfs(zookeeper.hosts, other, zk_root, daemon_id="daemon-o"):
        kids = [int(await ctl(root, parent, "fork live")) for _ in range(3)]
        for k in kids:
            await state_is(root, k, "running")
        assert not other.servers and not other.calls


async def test_fork_live_child_killed_before_built_discards_snapshot(root, cfs):
    parent = await vm(root)
    cfs.driver.fail_next("create", "no valid host was found")
    child = int(await ctl(root, parent, "fork live"))
    await state_is(root, child, "error")
    assert len(cfs.driver.snapshots) == 1  # kept while the process may be retried
    await ctl(root, child, "kill")

    async def gone():
        return not cfs.driver.snapshots and await cat(root, f"/proc/{parent}/children") == b""

    await eventually(gone)
    assert any(c[0] == "discard_snapshot" for c in cfs.driver.calls)


async def test_fork_live_where_the_driver_cannot_is_eopnotsupp(zookeeper, zk_root, tmp_path):
    drv = FakeCloudDriver(tmp_path / "cloud")
    async with open_cloudfs(zookeeper.hosts, drv, zk_root, daemon_id="daemon-c") as fs:
        r = await fs.attach("glenda", "")
        parent = await vm(r)
        await fails(errno.EOPNOTSUPP, ctl(r, parent, "fork live"), "fork live")
