"""cloudfs.deployment and hostile ZooKeeper data: a deployment's unique id
(made with its tree, bound to the driver, stamped on its servers), and
records that are not what cloudfs writes answered with EIO, never a
traceback."""

from __future__ import annotations

import errno
import json
import re

import pytest

from cloudfs.deployment import open_deployment
from cloudfs.drivers.base import META_DEPLOYMENT, META_ROOT
from cloudfs.drivers.fake import FakeDriver
from cloudfs.namespace import open_cloudfs
from cloudfs.process import CorruptRecord, Process, WaitRecord
from ninep.errors import FsError
from tests.cloudfs.fsops import cat, ctl, ls, status, vm


async def test_the_id_is_made_once_and_bound_to_the_driver(zookeeper, zk_root):
    d = FakeDriver()
    async with open_cloudfs(zookeeper.hosts, d, zk_root) as a:
        assert re.fullmatch(r"[0-9a-f]{32}", a.deployment_id) and d.deployment == a.deployment_id
        pid = await vm(await a.attach("", ""))
        sid = (await a.records.require(pid)).value.vm
        assert d.metadata[sid][META_DEPLOYMENT] == a.deployment_id and d.metadata[sid][META_ROOT] == zk_root
        assert await open_deployment(a.store, a.layout) == a.deployment_id  # kept
    async with open_cloudfs(zookeeper.hosts, d, zk_root) as b:  # a restart: the same deployment
        assert b.deployment_id == a.deployment_id


async def test_same_name_on_two_zookeepers_two_deployments(zookeeper, private_zookeeper, zk_root):
    """Two `cloudfs up` with fresh ZooKeepers and one deployment name on one
    cloud: each gets its own id and its own servers; a kill in one leaves
    the other's VM of the same pid alone."""
    cloud = FakeDriver()
    a_drv, b_drv = FakeDriver(), FakeDriver()
    for drv in (a_drv, b_drv):  # two daemons' drivers of one cloud
        drv.servers, drv.metadata, drv.userdata, drv.secrets = \
            cloud.servers, cloud.metadata, cloud.userdata, cloud.secrets
    async with open_cloudfs(zookeeper.hosts, a_drv, zk_root) as a, \
            open_cloudfs(private_zookeeper.hosts, b_drv, zk_root) as b:
        assert a.deployment_id != b.deployment_id
        ra, rb = await a.attach("", ""), await b.attach("", "")
        pa, pb = await vm(ra), await vm(rb)
        assert pa == pb == 2
        va, vb = (await a.records.require(2)).value.vm, (await b.records.require(2)).value.vm
        assert va != vb and set(cloud.servers) == {va, vb}
        await ctl(rb, 2, "kill")
        assert await cat(rb, "/proc/1/wait") == b"2 p2 killed killed\n"
        assert set(cloud.servers) == {va} and (await status(ra, 2))["state"] == "running"


async def test_a_corrupt_id_is_eio(zookeeper, zk_root):
    async with open_cloudfs(zookeeper.hosts, FakeDriver(), zk_root) as fs:
        await fs.store.set(fs.layout.id, b"../../etc")
        with pytest.raises(FsError) as e:
            await open_deployment(fs.store, fs.layout)
        assert e.value.errno == errno.EIO


@pytest.mark.parametrize("data", [
    b"", b"not json", b"[]", b'{"pid": 7}', b'{"pid": "7", "ppid": 1, "name": "x"}',
    b'{"pid": 7, "ppid": 1, "name": "x", "state": "zombie"}', b'{"pid": 7, "ppid": 1, "name": "x", "networks": [1]}',
    b'{"pid": 7, "ppid": 1, "name": "x", "gen": true}', b'{"pid": -7, "ppid": 1, "name": "x"}', b"\xff\xfe",
])
def test_records_are_parsed_strictly(data):
    with pytest.raises(CorruptRecord) as e:
        Process.from_json(data)
    assert e.value.errno == errno.EIO


def test_wait_records_are_parsed_strictly():
    assert WaitRecord.from_json(WaitRecord(7, "x", "killed", "m").to_json()) == WaitRecord(7, "x", "killed", "m")
    for bad in (b"{}", b'{"pid": 7, "name": "x", "state": "running"}', b'{"pid": 7, "name": 1, "state": "killed"}',
                b'{"pid": 7, "name": "x", "state": ["killed"]}'):
        with pytest.raises(CorruptRecord):
            WaitRecord.from_json(bad)


async def test_a_corrupt_record_in_zookeeper_is_eio_not_a_traceback(cfs, caplog):
    root = await cfs.attach("", "")
    pid = int(await ctl(root, 1, "fork"))
    good = await cfs.store.get(cfs.layout.record(pid))
    await cfs.store.set(cfs.layout.record(pid), json.dumps({"pid": pid, "ppid": 1, "name": 5}).encode())
    for op in (status(root, pid), ctl(root, pid, "exec tiny"), cfs.attach("", f"proc/{pid}")):
        with pytest.raises(FsError) as e:
            await op
        assert e.value.errno == errno.EIO and "corrupt" in e.value.message
    assert await ls(root, "/proc") == ["1", str(pid)]
    await cfs.store.set(cfs.layout.record(pid), good[0])
    assert (await status(root, pid))["name"] == f"p{pid}"
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_tree_from_before_ids_keeps_its_servers(zookeeper, zk_root):
    """Its servers carry its root path (what cloudfs-deployment held then):
    that becomes its id, so they are still its own after the upgrade."""
    d = FakeDriver()
    async with open_cloudfs(zookeeper.hosts, d, zk_root) as fs:
        pid = await vm(await fs.attach("", ""))
        sid = (await fs.records.require(pid)).value.vm
        await fs.store.delete(fs.layout.id)  # as the old code left the tree
        d.metadata[sid][META_DEPLOYMENT] = zk_root  # and tagged its servers
    d.deployment = None
    async with open_cloudfs(zookeeper.hosts, d, zk_root, resync_interval=None) as fs:
        assert fs.deployment_id == zk_root
        root = await fs.attach("", "")
        assert await fs.reconciler.converge(pid) is False  # not owned by this new daemon yet
        await fs.reconciler.resync()
        assert (await status(root, pid))["state"] == "running" and sid in d.servers
        await ctl(root, pid, "kill")
        assert await cat(root, "/proc/1/wait") == f"{pid} p{pid} killed killed\n".encode()
        assert sid not in d.servers


async def test_a_record_under_another_pid_is_corrupt(cfs):
    root = await cfs.attach("", "")
    a, b = int(await ctl(root, 1, "fork")), int(await ctl(root, 1, "fork"))
    theirs = await cfs.store.get(cfs.layout.record(b))
    await cfs.store.set(cfs.layout.record(a), theirs[0])  # proc/a says it is b
    with pytest.raises(FsError) as e:
        await ctl(root, a, "kill")
    assert e.value.errno == errno.EIO and f"says it is process {b}" in e.value.message
    assert (await status(root, b))["desired"] == "new"  # b untouched


async def test_the_tree_is_closed_to_clients_without_the_credential(zookeeper, zk_root):
    """A tree made open (before ACLs, or by anyone: the shared parent is
    open) is refused until it is adopted on purpose; then every znode has
    the deployment's digest ACL, a client without it gets NoAuth, and one
    with another credential cannot even start."""
    from kazoo.client import KazooClient
    from kazoo.exceptions import NoAuthError

    zk_root = f"/cloudfs-test{zk_root}"  # under a shared parent, as /cloudfs/<name>
    async with open_cloudfs(zookeeper.hosts, FakeDriver(), zk_root) as fs:
        pid = int(await ctl(await fs.attach("", ""), 1, "fork"))
    with pytest.raises(FsError) as e:
        async with open_cloudfs(zookeeper.hosts, FakeDriver(), zk_root, zk_auth="cloudfs:s3cret"):
            pass
    assert e.value.errno == errno.EACCES and "--adopt-open-tree" in e.value.message
    async with open_cloudfs(zookeeper.hosts, FakeDriver(), zk_root, zk_auth="cloudfs:s3cret", adopt_open=True) as fs:
        root = await fs.attach("", "")
        kid = int(await ctl(root, pid, "fork"))  # made with the ACL
        assert await ls(root, "/proc") == ["1", str(pid), str(kid)]
    zk = KazooClient(hosts=zookeeper.hosts)
    zk.start(timeout=10)
    try:
        for path in (f"{zk_root}/proc/{pid}", f"{zk_root}/proc/{kid}", f"{zk_root}/id"):
            with pytest.raises(NoAuthError):
                zk.get(path)
        assert zk.get_children("/cloudfs-test")  # the shared parent stays open: names only
    finally:
        zk.stop()
        zk.close()
    with pytest.raises(FsError) as e:
        async with open_cloudfs(zookeeper.hosts, FakeDriver(), zk_root, zk_auth="cloudfs:wrong"):
            pass
    assert e.value.errno == errno.EACCES and "credential" in e.value.message


async def test_a_cut_short_securing_is_finished_at_the_next_start(zookeeper, zk_root):
    """The root gets the ACL last: a walk cut short leaves it open, and the
    next start (still adopting) closes what is left."""
    from kazoo.client import KazooClient
    from kazoo.exceptions import NoAuthError

    from cloudfs.store import Store

    async with open_cloudfs(zookeeper.hosts, FakeDriver(), zk_root) as fs:
        pid = int(await ctl(await fs.attach("", ""), 1, "fork"))
    store = Store(zookeeper.hosts, auth="cloudfs:s3cret")
    await store.start()
    calls = 0
    real = store.client.set_acls_async

    def failing(*a, **kw):
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("connection lost")
        return real(*a, **kw)

    store.client.set_acls_async = failing
    with pytest.raises(RuntimeError):
        await store.secure(zk_root)
    assert await store.is_secured(zk_root) is False
    await store.close()
    async with open_cloudfs(zookeeper.hosts, FakeDriver(), zk_root, zk_auth="cloudfs:s3cret", adopt_open=True):
        pass
    zk = KazooClient(hosts=zookeeper.hosts)
    zk.start(timeout=10)
    try:
        for path in (zk_root, f"{zk_root}/proc", f"{zk_root}/proc/{pid}", f"{zk_root}/proc/{pid}/env"):
            with pytest.raises(NoAuthError):
                zk.get_children(path)
    finally:
        zk.stop()
        zk.close()
