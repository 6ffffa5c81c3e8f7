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
        got.append(await store.wait_set(p, zk_root, "k"))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.sleep(0.1)
        assert got == [] and store.waiter_count() == 1
        await store.create(p, b"hello")
    assert got == [b"hello"]
    assert store.waiter_count() == 0


async def test_wait_set_nonblocking(store, zk_root):
    with pytest.raises(FsError) as e:
        await store.wait_set(f"{zk_root}/nope", zk_root, "nope", nonblocking=True)
    assert e.value.errno == errno.EAGAIN
    assert store.waiter_count() == 0


async def test_cancelled_wait_leaves_no_waiter(store, zk_root):
    with trio.move_on_after(0.2):
        await store.wait_set(f"{zk_root}/never", zk_root, "never")
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


async def test_cached_get_follows_changes_made_by_another_session(store, zookeeper, zk_root):
    p = f"{zk_root}/cached"
    await store.create(p, b"v1")
    other = Store(zookeeper.hosts)  # another daemon's session
    await other.start()
    try:
        assert (await store.cached_get(p))[0] == b"v1"
        calls = 0
        real_get = store.get

        async def counting_get(*a, **kw):
            nonlocal calls
            calls += 1
            return await real_get(*a, **kw)

        store.get = counting_get
        for _ in range(50):
            assert (await store.cached_get(p))[0] == b"v1"
        assert calls == 0  # served from memory while nothing changed
        await other.set(p, b"v2")
        with trio.fail_after(1.0):  # well under CACHE_TTL: the watch did it
            while (await store.cached_get(p))[0] != b"v2":
                await trio.sleep(0.005)
        await other.delete(p)
        with trio.fail_after(1.0):
            while await store.cached_get(p) is not None:
                await trio.sleep(0.005)
    finally:
        await other.close()


async def test_cached_get_never_answers_from_memory_without_zookeeper(private_zookeeper):
    zk = private_zookeeper
    s = Store(zk.hosts, session_timeout=4.0, op_timeout=3.0, suspend_wait=0.5)
    await s.start()
    try:
        await s.create("/c", b"old")
        assert (await s.cached_get("/c"))[0] == b"old"
        await trio.to_thread.run_sync(zk.stop)
        with pytest.raises(FsError) as e:
            with trio.fail_after(10):
                while True:  # the cached value may be answered until kazoo sees the drop
                    await s.cached_get("/c")
                    await trio.sleep(0.05)
        assert e.value.errno in (errno.EAGAIN, errno.EIO)
    finally:
        await s.close()


async def test_cached_get_always_sees_this_stores_own_writes(store, zk_root):
    """kazoo may hand a write's completion to trio before its watch event:
    the store's own writes must still never be answered from an old copy."""
    p = f"{zk_root}/own"
    await store.create(p, b"0")
    for i in range(1, 501):
        assert (await store.cached_get(p))[0] == b"%d" % (i - 1)
        await store.set(p, b"%d" % i)
        assert (await store.cached_get(p))[0] == b"%d" % i
    t = store.transaction()
    t.set_data(p, b"multi")
    await store.commit(t)
    assert (await store.cached_get(p))[0] == b"multi"
    await store.delete(p)
    assert await store.cached_get(p) is None
