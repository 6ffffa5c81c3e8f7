"""cloudfs.store: kazoo from trio, against a real ZooKeeper."""

import errno

import pytest
import trio

from cloudfs.store import BadVersionError, NodeExistsError, Store
from ninep.errors import FsError


@pytest.fixture
async def store(zookeeper, zk_root):
    s = Store(zookeeper.hosts)
    await s.start()
    try:
        await s.ensure_path(zk_root)
        yield s
    finally:
        await s.close()


async def test_crud(store, zk_root):
    p = f"{zk_root}/a"
    assert await store.get(p) is None
    assert await store.children(p) is None
    assert await store.create(p, b"1") == p
    data, stat = await store.get(p)
    assert data == b"1" and stat.version == 0
    await store.set(p, b"2", version=0)
    with pytest.raises(BadVersionError):
        await store.set(p, b"3", version=0)
    with pytest.raises(NodeExistsError):
        await store.create(p)
    seq = await store.create(f"{p}/s-", sequence=True)
    assert seq.startswith(f"{p}/s-00")
    assert await store.children(p) == [seq.rsplit("/", 1)[1]]


async def test_transaction_is_atomic(store, zk_root):
    t = store.transaction()
    t.create(f"{zk_root}/x", b"")
    t.create(f"{zk_root}/x", b"")  # fails: the first create is rolled back
    with pytest.raises(NodeExistsError):
        await store.commit(t)
    assert await store.exists(f"{zk_root}/x") is None


async def test_many_pipelines(store, zk_root):
    res = await store.many("create_async", [(f"{zk_root}/m{i}", b"v") for i in range(200)])
    assert len(res) == 200
    assert len(await store.children(zk_root)) == 200


async def test_wait_set_woken_by_watch(store, zk_root):
    p = f"{zk_root}/k"
    got = []

    async def reader():
        got.append(await store.wait_set(p))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.sleep(0.1)
        assert got == [] and store.waiter_count() == 1
        await store.create(p, b"hello")
    assert got == [b"hello"]
    assert store.waiter_count() == 0


async def test_wait_set_nonblocking(store, zk_root):
    with pytest.raises(FsError) as e:
        await store.wait_set(f"{zk_root}/nope", nonblocking=True)
    assert e.value.errno == errno.EAGAIN
    assert store.waiter_count() == 0


async def test_cancelled_wait_leaves_no_waiter(store, zk_root):
    with trio.move_on_after(0.2):
        await store.wait_set(f"{zk_root}/never")
    with trio.move_on_after(0.2):
        await store.wait_children(zk_root)
    assert store.waiter_count() == 0


async def test_wait_children(store, zk_root):
    p = f"{zk_root}/q"
    await store.create(p)
    async with trio.open_nursery() as n:
        got = []

        async def reader():
            got.append(await store.wait_children(p))

        n.start_soon(reader)
        await trio.sleep(0.05)
        await store.create(f"{p}/one")
    assert got == [["one"]]
    with pytest.raises(FsError) as e:
        await store.wait_children(f"{zk_root}/missing")
    assert e.value.errno == errno.ENOENT


async def test_connect_failure_is_eio():
    from mountd.zkserver import free_port

    s = Store(f"127.0.0.1:{free_port()}")
    with pytest.raises(FsError) as e:
        await s.start(timeout=1)
    assert e.value.errno == errno.EIO
    await s.close()
