"""ZooKeeper going away: a clear error (EAGAIN/EIO) or a wait, never a wrong
answer, and recovery without restarting the CloudFS.  Each test has its own
ZooKeeper server (``private_zookeeper``) to kill and restart."""

import errno
import os

import pytest
import trio
from kazoo.client import KazooClient

from cloudfs.drivers.fake import FakeDriver
from cloudfs.namespace import open_cloudfs
from ninep.errors import FsError
from tests.cloudfs.fsops import cat, ctl, echo, eventually, ls, state_is, status

OPTS = dict(session_timeout=4.0, op_timeout=3.0, suspend_wait=0.5)


async def _recovered(root):
    async def check():
        try:
            return await ls(root, "/proc")
        except FsError as e:
            assert e.errno in (errno.EAGAIN, errno.EIO)
            return None

    return await eventually(check, timeout=30, interval=0.2)


async def test_server_down_errors_then_recovers(private_zookeeper):
    zk = private_zookeeper
    async with open_cloudfs(zk.hosts, FakeDriver(), "/cloudfs/t", **OPTS) as fs:
        root = await fs.attach("", "")
        pid = int(await ctl(root, 1, "fork"))
        got = []

        async def reader():
            got.append(await cat(root, f"/proc/{pid}/env/k"))

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.sleep(0.2)
            await trio.to_thread.run_sync(zk.stop)
            with pytest.raises(FsError) as e:
                with trio.fail_after(10):
                    await status(root, pid)
            assert e.value.errno in (errno.EAGAIN, errno.EIO)
            with pytest.raises(FsError) as e:
                await ctl(root, 1, "fork")
            assert e.value.errno in (errno.EAGAIN, errno.EIO)
            assert got == []  # the blocked read waits: no wrong answer
            zk.launch()  # from this (the main) thread: the server dies with the test process
            await trio.to_thread.run_sync(zk.wait_ready)
            assert str(pid) in await _recovered(root)
            assert got == []
            await echo(root, f"/proc/{pid}/env/k", "after\n")
        assert got == [b"after\n"]
        assert int(await ctl(root, 1, "fork")) == pid + 1


async def test_session_expiry_recovers(private_zookeeper):
    zk = private_zookeeper
    async with open_cloudfs(zk.hosts, FakeDriver(), "/cloudfs/t", **OPTS) as fs:
        root = await fs.attach("", "")
        pid = int(await ctl(root, 1, "fork"))
        await ctl(root, pid, "exec tiny")
        await state_is(root, pid, "running")
        assert await fs.store.exists(fs.layout.owner(pid)) is not None
        got = []

        async def reader():
            got.append(await cat(root, f"/proc/{pid}/env/k"))

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.sleep(0.2)
            # expire the session: another client with the same id closes it
            sid = fs.store.client.client_id

            def expire():
                k = KazooClient(zk.hosts, client_id=sid)
                k.start(5)
                k.stop()
                k.close()

            await trio.to_thread.run_sync(expire)
            await eventually(lambda: _lost(fs), timeout=10)
            await _recovered(root)
            assert got == []
            await echo(root, f"/proc/{pid}/env/k", "v")
        assert got == [b"v"]
        # the ephemeral owner died with the session; new work re-acquires it
        await ctl(root, pid, "stop")
        await state_is(root, pid, "stopped")
        assert await fs.store.exists(fs.layout.owner(pid)) is not None


async def _lost(fs):
    return fs.store.sessions_lost >= 1


async def test_nonblocking_read_during_outage_is_error(private_zookeeper):
    zk = private_zookeeper
    async with open_cloudfs(zk.hosts, FakeDriver(), "/cloudfs/t", **OPTS) as fs:
        root = await fs.attach("", "")
        node = await (await (await (await root.walk("proc")).walk("1")).walk("env")).walk("k")
        await trio.to_thread.run_sync(zk.stop)
        f = await _open_or_error(node)
        if f is not None:
            with pytest.raises(FsError) as e:
                await f.read(0, 100)
            assert e.value.errno in (errno.EAGAIN, errno.EIO)
        zk.launch()  # from this (the main) thread: the server dies with the test process
        await trio.to_thread.run_sync(zk.wait_ready)
        await _recovered(root)


async def _open_or_error(node):
    try:
        return await node.open(os.O_RDONLY | os.O_NONBLOCK)
    except FsError as e:
        assert e.errno in (errno.EAGAIN, errno.EIO)
        return None


async def test_a_blocked_read_woken_while_disconnected_waits_on(private_zookeeper):
    """A waiter woken while ZooKeeper cannot be reached (kazoo fires every
    watch when it declares a session lost) asks again once the session is
    back, instead of failing with EAGAIN: a blocked read waits across an
    outage, however long.  (Reads that have not blocked yet still fail.)"""
    zk = private_zookeeper
    async with open_cloudfs(zk.hosts, FakeDriver(), "/cloudfs/t", **OPTS) as fs:
        root = await fs.attach("", "")
        pid = int(await ctl(root, 1, "fork"))
        got = []

        async def reader():
            got.append(await cat(root, f"/proc/{pid}/env/k"))

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await eventually(lambda: _waiting(fs), timeout=10)
            await trio.to_thread.run_sync(zk.stop)
            await eventually(lambda: _disconnected(fs), timeout=10)
            fs.store._fire_all()  # what kazoo does to every watch when it declares the session lost
            await trio.sleep(3 * OPTS["suspend_wait"])
            assert got == []  # still waiting, no EAGAIN
            zk.launch()  # from this (the main) thread: the server dies with the test process
            await trio.to_thread.run_sync(zk.wait_ready)
            await _recovered(root)
            await echo(root, f"/proc/{pid}/env/k", "back")
        assert got == [b"back"]


async def _waiting(fs):
    # registered, and past its first look: its directory's listing is held
    return fs.store.waiter_count() >= 1 and any(lst.names is not None for lst in fs.store._listings.values())


async def _disconnected(fs):
    return fs.store.state != "CONNECTED"
