"""Two daemons (two CloudFS instances, each with its own kazoo session) on one
ZooKeeper root see one tree."""

import os

import pytest
import trio

from cloudfs.drivers.fake import FakeDriver
from cloudfs.namespace import open_cloudfs
from tests.cloudfs.fsops import cat, ctl, echo, eventually, ls, state_is, status, vm


async def test_fork_on_one_listed_on_other(cfs, cfs2):
    a, b = await cfs.attach("", ""), await cfs2.attach("", "")
    pid = int(await ctl(a, 1, "fork name=x"))
    assert str(pid) in await ls(b, "/proc")
    assert (await status(b, pid))["name"] == "x"
    assert await cat(b, "/proc/1/children") == f"{pid}\n".encode()


async def test_concurrent_forks_get_unique_pids(cfs, cfs2):
    roots = [await cfs.attach("", ""), await cfs2.attach("", "")]
    pids = []

    async def forker(root):
        for _ in range(15):
            pids.append(int(await ctl(root, 1, "fork")))

    async with trio.open_nursery() as n:
        for r in roots:
            n.start_soon(forker, r)
            n.start_soon(forker, r)
    assert len(set(pids)) == 60
    assert sorted(pids) == list(range(2, 62))
    assert await ls(roots[1], "/proc") == [str(p) for p in range(1, 62)]


async def test_blocked_env_read_released_by_other(cfs, cfs2):
    a, b = await cfs.attach("", ""), await cfs2.attach("", "")
    pid = int(await ctl(a, 1, "fork"))
    got = []

    async def reader():
        got.append(await cat(a, f"/proc/{pid}/env/result"))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.sleep(0.2)
        assert got == []
        await echo(b, f"/proc/{pid}/env/result", "done\n")
    assert got == [b"done\n"]
    assert cfs.store.waiter_count(cfs.layout.proc) == 0


async def test_wait_on_one_released_by_kill_on_other(cfs, cfs2):
    a, b = await cfs.attach("", ""), await cfs2.attach("", "")
    p = await vm(a)
    k = int(await ctl(a, p, "fork name=k"))
    await state_is(b, k, "running")
    got = []

    async def waiter():
        got.append(await cat(a, f"/proc/{p}/wait"))

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(0.1)
        await ctl(b, k, "kill")
    assert got == [f"{k} k killed killed\n".encode()]


async def test_exactly_one_daemon_acts(cfs, cfs2, driver):
    a, b = await cfs.attach("", ""), await cfs2.attach("", "")
    pids = [await vm(a if i % 2 else b) for i in range(6)]
    creates = [c for c in driver.calls if c[0] == "create"]
    assert len(creates) == 6 == len(driver.servers)
    owners = {p: (await cfs.store.get(cfs.layout.owner(p)))[0] for p in pids}
    assert set(owners.values()) <= {b"daemon-a", b"daemon-b"}


async def test_owner_gone_other_takes_over(zookeeper, zk_root, driver, cfs):
    root = await cfs.attach("", "")
    async with open_cloudfs(zookeeper.hosts, driver, zk_root, daemon_id="short-lived") as other:
        await other.close()  # its reconciler stops: it owns but will never act
        oroot = await other.attach("", "")
        pid = int(await ctl(oroot, 1, "fork"))
        await other.store.create(other.layout.owner(pid), b"short-lived", ephemeral=True)
        await ctl(oroot, pid, "exec tiny")
        await trio.sleep(0.3)
        assert (await status(root, pid))["state"] == "creating"  # daemon-a defers to the owner
        assert not driver.servers
    # the short-lived daemon's session closed: its owner znode is gone, daemon-a takes over
    await state_is(root, pid, "running")
    assert (await cfs.store.get(cfs.layout.owner(pid)))[0] == b"daemon-a"


async def test_records_survive_new_instance(zookeeper, zk_root):
    d = FakeDriver()
    async with open_cloudfs(zookeeper.hosts, d, zk_root) as first:
        r = await first.attach("", "")
        pid = await vm(r, userdata="persist")
        await echo(r, f"/proc/{pid}/env/k", "v")
    async with open_cloudfs(zookeeper.hosts, d, zk_root) as second:
        r = await second.attach("", "")
        assert await ls(r, "/proc") == ["1", str(pid)]
        st = await status(r, pid)
        assert st["state"] == "running" and st["image"] == "tiny"
        assert await cat(r, f"/proc/{pid}/userdata") == b"persist"
        assert await cat(r, f"/proc/{pid}/env/k", os.O_RDONLY | os.O_NONBLOCK) == b"v"
        assert int(await ctl(r, 1, "fork")) == pid + 1


async def test_a_vm_is_acted_on_only_by_a_daemon_that_reaches_it(zookeeper, zk_root):
    """Two hosts (drivers of different scopes, as QEMU drivers are): while
    host a's daemon is away, host b's neither takes its VM processes over
    (its driver cannot see them: they would look vanished and end) nor acts
    on their work; host a's daemon, back, does both."""
    host_a, host_b = FakeDriver("host-a", scope="fake!host-a"), FakeDriver("host-b", scope="fake!host-b")
    async with open_cloudfs(zookeeper.hosts, host_b, zk_root, daemon_id="b", resync_interval=0.2) as b:
        broot = await b.attach("", "")
        async with open_cloudfs(zookeeper.hosts, host_a, zk_root, daemon_id="a", resync_interval=0.2) as a:
            aroot = await a.attach("", "")
            pid = int(await ctl(aroot, 1, "fork"))
            await a.store.create(a.layout.owner(pid), b"a", ephemeral=True)  # a boots it, not b
            await ctl(aroot, pid, "exec tiny")
            await state_is(aroot, pid, "running")
            assert len(host_a.servers) == 1 and not host_b.servers
        # a's session is gone; b resyncs several times meanwhile
        await trio.sleep(1.0)
        assert (await status(broot, pid))["state"] == "running"
        assert await b.store.get(b.layout.owner(pid)) is None
        await ctl(broot, pid, "kill")  # queued, not done: only a can
        await trio.sleep(1.0)
        assert str(pid) in await ls(broot, "/proc")
        assert len(host_a.servers) == 1 and not host_b.calls
        async with open_cloudfs(zookeeper.hosts, host_a, zk_root, daemon_id="a2", resync_interval=0.2):
            async def gone():
                return str(pid) not in await ls(broot, "/proc")

            await eventually(gone, timeout=10)
        assert not host_a.servers and not host_b.calls


def _slow_creates(driver: FakeDriver) -> tuple[trio.Event, trio.Event]:
    """Make ``driver.create`` wait: it sets the first event on entry and
    boots once the second is set."""
    entered, go = trio.Event(), trio.Event()
    create = driver.create

    async def slow_create(*args, **kw):
        entered.set()
        await go.wait()
        return await create(*args, **kw)

    driver.create = slow_create
    return entered, go


def _expire_session(hosts: str, client_id) -> None:
    """End a kazoo client's ZooKeeper session from outside, the standard
    way: attach to it with its id and password, then close it."""
    from kazoo.client import KazooClient

    thief = KazooClient(hosts=hosts, client_id=client_id)
    thief.start(timeout=10)
    thief.stop()
    thief.close()


@pytest.mark.parametrize("meanwhile", ["running", "killed", "a's boot fails"])
async def test_a_create_that_outlives_its_owner_session_leaves_no_duplicate(zookeeper, zk_root, meanwhile):
    """Daemon a's session expires while its driver boots a VM; daemon b
    (another host) takes the process over and boots it there (and, in the
    second case, kills it).  When a's boot finishes, a finds b's server
    recorded (or the process gone) and deletes its own: one VM, or none."""
    host_a, host_b = FakeDriver("host-a", scope="fake!host-a"), FakeDriver("host-b", scope="fake!host-b")
    entered, go = _slow_creates(host_a)
    async with open_cloudfs(zookeeper.hosts, host_a, zk_root, daemon_id="a", resync_interval=0.2) as a, \
            open_cloudfs(zookeeper.hosts, host_b, zk_root, daemon_id="b", resync_interval=0.2) as b:
        aroot, broot = await a.attach("", ""), await b.attach("", "")
        pid = int(await ctl(aroot, 1, "fork"))
        await a.store.create(a.layout.owner(pid), b"a", ephemeral=True)  # a boots it
        await ctl(aroot, pid, "exec tiny")
        with trio.fail_after(10):
            await entered.wait()
        await trio.to_thread.run_sync(_expire_session, zookeeper.hosts, a.store.client.client_id)
        st = await state_is(broot, pid, "running", timeout=30)  # b took over
        assert st["host"] == "host-b" and len(host_b.servers) == 1
        if meanwhile == "killed":
            await ctl(broot, pid, "kill")
            assert await cat(broot, "/proc/1/wait") == f"{pid} {st['name']} killed killed\n".encode()
        if meanwhile == "a's boot fails":
            host_a.fail_next("create", "boot timed out")
            go.set()
            await trio.sleep(1.0)  # a's failure is not written over b's running process
            st = await status(broot, pid)
            assert st["state"] == "running" and st["host"] == "host-b" and "error" not in st
            assert not host_a.servers and len(host_b.servers) == 1
            return
        go.set()

        async def a_dropped_its_duplicate():
            made = [sid for call, sid in host_a.calls if call == "create"]
            return made and ("delete", made[0]) in host_a.calls and not host_a.servers

        await eventually(a_dropped_its_duplicate, timeout=20)
        if meanwhile == "killed":
            assert not host_b.servers and str(pid) not in await ls(aroot, "/proc")
            return
        rec = (await b.records.get(pid)).value
        assert rec.vm == next(iter(host_b.servers)) and rec.scope == "fake!host-b"
        await trio.sleep(0.6)  # a few resyncs: nothing changes
        assert (await status(aroot, pid))["state"] == "running" and len(host_b.servers) == 1
        assert (await b.store.get(b.layout.owner(pid)))[0] == b"b"


async def test_kill_while_the_vm_boots_leaves_no_server(cfs, driver):
    """The kill's own converge runs after the boot; the booted server is
    deleted rather than recorded, and the process ends."""
    root = await cfs.attach("", "")
    entered, go = _slow_creates(driver)
    pid = int(await ctl(root, 1, "fork name=k"))
    await ctl(root, pid, "exec tiny")
    with trio.fail_after(10):
        await entered.wait()
    await ctl(root, pid, "kill")
    go.set()
    assert await cat(root, "/proc/1/wait") == f"{pid} k killed killed\n".encode()
    made = [sid for call, sid in driver.calls if call == "create"]
    assert len(made) == 1 and ("delete", made[0]) in driver.calls and not driver.servers
