"""Two CloudFS daemons on a real 3-server ZooKeeper ensemble (Debian's
zookeeper, three peers on loopback) with a chroot in the connect string:
the leader is killed with SIGKILL while both daemons fork, write env and
read blocked keys, and the deployment goes on (a quorum of two remains,
kazoo moves each session to a live server); the leader comes back and
rejoins.  Checked: every acknowledged fork exists afterwards with a unique
pid, no pid appears twice, every acknowledged env write reads back on both
daemons, a blocked read on one daemon is released by a write on the other
across the leader's death.  (The cluster harness of partitions and paused
daemons is issue "cluster"; this is its first part.)"""

from __future__ import annotations

import errno
import uuid

import pytest
import trio

from cloudfs.drivers.fake import FakeDriver
from cloudfs.namespace import open_cloudfs
from mountd.zkserver import ZooKeeperEnsemble
from ninep.errors import FsError
from tests.cloudfs.fsops import cat, ctl, echo, ls


@pytest.fixture
def ensemble(tmp_path):
    e = ZooKeeperEnsemble(3, tmp_path / "zk", die_with_parent=True)
    try:
        e.start()
        yield e
    finally:
        e.cleanup()


async def retrying(aw_fn, what: str, timeout: float = 30.0):
    """Run ``aw_fn()`` until it does not fail with EAGAIN/EIO (the store's
    answers while its session moves to another server)."""
    with trio.fail_after(timeout):
        while True:
            try:
                return await aw_fn()
            except FsError as e:
                if e.errno not in (errno.EAGAIN, errno.EIO):
                    raise
                await trio.sleep(0.1)


async def test_the_leader_dies_and_the_deployment_goes_on(ensemble):
    hosts = ensemble.hosts + f"/cloudfs-test-{uuid.uuid4().hex[:8]}"
    driver = FakeDriver()
    async with open_cloudfs(hosts, driver, "/cloudfs/ens", daemon_id="a") as a, \
            open_cloudfs(hosts, driver, "/cloudfs/ens", daemon_id="b") as b:
        va, vb = a.view_for(None), b.view_for(None)
        forked: list[int] = []
        written: dict[str, str] = {}
        released: dict[str, bytes] = {}

        async def forks(view, n: int) -> None:
            for _ in range(n):
                forked.append(int(await retrying(lambda: ctl(view, 1, "fork"), "fork")))
                await trio.sleep(0.05)

        async def writes(view, tag: str, n: int) -> None:
            for i in range(n):
                key, value = f"{tag}{i}", f"{tag}-{i}-{uuid.uuid4().hex[:6]}"
                await retrying(lambda: echo(view, f"/proc/1/env/{key}", value), "env write")
                written[key] = value
                await trio.sleep(0.05)

        async def blocked_read() -> None:
            released["late"] = await retrying(lambda: cat(vb, "/proc/1/env/late"), "blocked read", 60)

        async with trio.open_nursery() as n:
            n.start_soon(blocked_read)
            n.start_soon(forks, va, 15)
            n.start_soon(forks, vb, 15)
            n.start_soon(writes, va, "a", 15)
            n.start_soon(writes, vb, "b", 15)
            await trio.sleep(0.3)
            leader = await trio.to_thread.run_sync(ensemble.leader)
            ensemble.peer(leader).stop(kill=True)  # the "crash"
            await trio.sleep(1.0)
            await retrying(lambda: echo(va, "/proc/1/env/late", "after the leader died"), "release")
            await trio.to_thread.run_sync(ensemble.peer(leader).start)
            new_leader = await trio.to_thread.run_sync(ensemble.leader)

        assert new_leader in ensemble.servers
        assert released["late"] == b"after the leader died"
        assert len(forked) == 30 and len(set(forked)) == 30, forked
        for view in (va, vb):
            listed = {int(p) for p in await ls(view, "/proc")}
            assert set(forked) <= listed
            for key, value in written.items():
                assert await cat(view, f"/proc/1/env/{key}") == value.encode()
        # each daemon's session survived (the ensemble kept a quorum): no session was lost
        assert a.store.sessions_lost == 0 and b.store.sessions_lost == 0
