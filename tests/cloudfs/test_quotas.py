"""cloudfs.quotas through the tree: descendants (fork EAGAIN, exact with
concurrent forks on two daemons), env-keys and env-bytes (EDQUOT),
/proc/<pid>/limits (read, operator sets, a process only lowers), what
children inherit, counts given back when processes end (also reparented
subtrees), and ending a process too big for one ZooKeeper multi.  Real
ZooKeeper, the fake driver."""

from __future__ import annotations

import errno

import pytest
import trio

from cloudfs.quotas import Quota, charge_env, charge_note, charge_fork, child_quota, parse_setting
from ninep.errors import FsError
from tests.cloudfs.fsops import cat, ctl, echo, ls, state_is, vm, walk


async def limits(root, pid: int) -> dict[str, tuple[int, int]]:
    text = (await cat(root, f"/proc/{pid}/limits")).decode()
    return {n: (int(lim), int(used)) for n, lim, used in (line.split() for line in text.splitlines())}


async def fails(errno_: int, aw, text: str = "") -> FsError:
    with pytest.raises(FsError) as e:
        await aw
    assert e.value.errno == errno_, e.value
    assert text in e.value.message, e.value.message
    return e.value


async def test_a_fork_bomb_stops_at_its_quota_and_kill_ends_it(cfs):
    op = await cfs.attach("", "")
    root = await vm(op)
    await echo(op, f"/proc/{root}/limits", "descendants 4\n")
    guest = cfs.view_for(root)  # what the VM itself sees
    made = []
    frontier = [root]
    with pytest.raises(FsError) as e:
        while True:  # every process forks twice, as a fork bomb does
            nxt = []
            for p in frontier:
                for _ in range(2):
                    child = int(await ctl(guest, p, "fork"))
                    made.append(child)
                    nxt.append(child)
            frontier = nxt
    assert e.value.errno == errno.EAGAIN
    assert f"process {root} may have at most 4 descendants" in e.value.message
    assert len(made) == 4
    assert (await limits(op, root))["descendants"] == (4, 4)
    before = (await limits(op, 1))["descendants"][1]
    await ctl(op, root, "kill")
    assert await cat(op, "/proc/1/wait") == f"{root} p{root} killed killed\n".encode()
    assert await ls(op, "/proc") == ["1"] and not cfs.driver.servers
    assert (await limits(op, 1))["descendants"] == (256, before - 5)


async def test_concurrent_forks_on_two_daemons_are_counted_exactly(cfs, cfs2):
    a, b = await cfs.attach("", ""), await cfs2.attach("", "")
    parent = int(await ctl(a, 1, "fork"))
    await echo(a, f"/proc/{parent}/limits", "descendants 10")
    ok, refused = [], []

    async def forker(root):
        for _ in range(8):
            try:
                ok.append(int(await ctl(root, parent, "fork")))
            except FsError as e:
                assert e.errno == errno.EAGAIN
                refused.append(e)

    async with trio.open_nursery() as n:
        for root in (a, b, a, b):
            n.start_soon(forker, root)
    assert len(ok) == 10 and len(refused) == 22
    assert (await limits(b, parent))["descendants"] == (10, 10)
    assert (await limits(a, 1))["descendants"][1] == 11


async def test_env_quota(cfs):
    op = await cfs.attach("", "")
    pid = int(await ctl(op, 1, "fork"))
    await echo(op, f"/proc/{pid}/limits", "env-keys 2")
    await echo(op, f"/proc/{pid}/limits", "env-bytes 100")
    await echo(op, f"/proc/{pid}/env/a", "x" * 60)
    await fails(errno.EDQUOT, echo(op, f"/proc/{pid}/env/b", "y" * 41), "at most 100 bytes")
    await echo(op, f"/proc/{pid}/env/b", "y" * 40)
    await fails(errno.EDQUOT, echo(op, f"/proc/{pid}/env/c", "z"), "at most 2 env keys")
    assert await ls(op, f"/proc/{pid}/env") == ["a", "b"]
    assert (await limits(op, pid))["env-keys"] == (2, 2) and (await limits(op, pid))["env-bytes"] == (100, 100)
    await echo(op, f"/proc/{pid}/env/a", "short")  # smaller: fine
    assert (await limits(op, pid))["env-bytes"] == (100, 45)
    await (await walk(op, f"/proc/{pid}/env")).unlink("b", False)
    assert (await limits(op, pid))["env-keys"] == (2, 1) and (await limits(op, pid))["env-bytes"] == (100, 5)
    await echo(op, f"/proc/{pid}/env/c", "z")


async def test_limits_writes(cfs):
    op = await cfs.attach("", "")
    p = int(await ctl(op, 1, "fork"))
    await echo(op, f"/proc/{p}/limits", "descendants 8")
    mine = cfs.view_for(p)
    kid = int(await ctl(mine, p, "fork"))
    assert (await limits(op, kid))["descendants"] == (7, 0)  # no more than the parent has left
    await echo(mine, f"/proc/{kid}/limits", "descendants 2")  # a descendant's: lower is fine
    await echo(mine, f"/proc/{p}/limits", "env-keys 10")       # its own, lower
    await fails(errno.EPERM, echo(mine, f"/proc/{p}/limits", "env-keys 11"), "may only lower")
    other = int(await ctl(op, 1, "fork"))
    await fails(errno.EACCES, echo(mine, f"/proc/{other}/limits", "env-keys 1"))
    await fails(errno.EACCES, echo(cfs.readonly_view(), f"/proc/{p}/limits", "env-keys 1"))
    for bad in ("descendants", "nprocs 3", "descendants -1", "descendants 1e3", "descendants 99999999999",
                "descendants 3 4", "descendants ٣"):
        await fails(errno.EINVAL, echo(op, f"/proc/{p}/limits", bad))
    await echo(op, f"/proc/{p}/limits", "env-keys 1000")  # the operator may raise
    assert (await limits(cfs.readonly_view(), p))["env-keys"] == (1000, 0)  # everyone reads


async def test_children_inherit_no_more_than_the_parent_has(zookeeper, zk_root, driver):
    from cloudfs.namespace import open_cloudfs

    async with open_cloudfs(zookeeper.hosts, driver, zk_root, limits={"descendants": 5, "env-keys": 7},
                            max_processes=3) as fs:
        op = await fs.attach("", "")
        assert (await limits(op, 1))["descendants"] == (3, 0)
        a = int(await ctl(op, 1, "fork"))
        assert await limits(op, a) == {"descendants": (2, 0), "env-keys": (7, 0), "env-bytes": (1 << 20, 0),
                                       "notes": (32, 0), "pipes": (16, 0), "pipe-bytes": (1 << 20, 0),
                                       "files": (4096, 0), "file-bytes": (4 << 30, 0)}
        await echo(op, f"/proc/{a}/limits", "env-keys 3")
        b = int(await ctl(op, a, "fork"))
        assert (await limits(op, b))["env-keys"] == (3, 0) and (await limits(op, b))["descendants"] == (1, 0)
        int(await ctl(op, 1, "fork"))
        await fails(errno.EAGAIN, ctl(op, 1, "fork"), "process 1 may have at most 3 descendants")


async def test_an_exit_with_children_gives_their_counts_to_the_right_ancestors(cfs):
    """p → q → r, s: q exits by itself (its VM powers off), so r and s go to
    init: p no longer counts q, r and s; init still counts r and s."""
    op = await cfs.attach("", "")
    p = await vm(op)
    q = int(await ctl(op, p, "fork"))
    await state_is(op, q, "running")
    r, s = int(await ctl(op, q, "fork")), int(await ctl(op, q, "fork"))
    for x in (r, s):
        await state_is(op, x, "running")
    assert (await limits(op, p))["descendants"][1] == 3
    init_used = (await limits(op, 1))["descendants"][1]
    cfs.driver.exit((await cfs.records.require(q)).value.vm, "guest powered off")
    await cfs.reconciler.resync()
    assert await cat(op, f"/proc/{p}/wait") == f"{q} p{p} exited guest powered off\n".encode()
    assert (await limits(op, p))["descendants"][1] == 0
    assert (await limits(op, 1))["descendants"][1] == init_used - 1
    assert (await cat(op, "/proc/1/children")).split() == [str(p).encode(), str(r).encode(), str(s).encode()]


async def test_a_process_too_big_for_one_multi_is_killed_cleanly(cfs):
    """10,000 env keys with long names: their deletes are several MB, far
    over ZooKeeper's 1 MiB request limit; the kill ends it anyway."""
    op = await cfs.attach("", "")
    pid = int(await ctl(op, 1, "fork"))
    name = "k" * 200
    keys = [(cfs.layout.env_key(pid, f"{name}{i:05d}"), b"v") for i in range(10_000)]
    for i in range(0, len(keys), 1000):
        res = await cfs.store.many("create_async", keys[i:i + 1000])
        assert not [r for r in res if isinstance(r, Exception)]
    await ctl(op, pid, "kill")
    with trio.fail_after(60):
        assert await cat(op, "/proc/1/wait") == f"{pid} p{pid} killed killed\n".encode()
    assert await cfs.store.exists(cfs.layout.env(pid)) is None


def test_the_pure_rules():
    q = Quota({"descendants": 1, "env-keys": 1, "env-bytes": 10}, {"descendants": 0, "env-keys": 0, "env-bytes": 0})
    [charged] = charge_fork([(7, q)])
    assert charged.used["descendants"] == 1 and q.used["descendants"] == 0
    with pytest.raises(FsError) as e:
        charge_fork([(3, charged), (1, q)])
    assert e.value.errno == errno.EAGAIN and "process 3" in e.value.message
    assert child_quota(charged, {"descendants": 16, "env-keys": 256, "env-bytes": 99}).limits == \
        {"descendants": 0, "env-keys": 1, "env-bytes": 10}
    assert child_quota(None, {"descendants": 16, "env-keys": 2, "env-bytes": 3}).limits["descendants"] == 16
    assert charge_env(7, q, None, 10).used == {"descendants": 0, "env-keys": 1, "env-bytes": 10}
    with pytest.raises(FsError):
        charge_env(7, q, None, 11)
    over = Quota({"descendants": 1, "env-keys": 1, "env-bytes": 10}, {"descendants": 0, "env-keys": 1, "env-bytes": 50})
    assert charge_env(7, over, 50, 20).used["env-bytes"] == 20  # shrinking is always fine
    assert parse_setting(b"env-bytes 4096\n") == ("env-bytes", 4096)
    for bad in (b"", b"x 1", b"descendants", b"descendants +1", b"\xff 1"):
        with pytest.raises(FsError):
            parse_setting(bad)
    for bad in (b"{}", b'{"limits": {}, "used": {}}', b'{"limits": {"descendants": -1}, "used": {}}', b"[]"):
        with pytest.raises(FsError):
            Quota.from_json(bad)
    # notes: a quota znode from before notes gets the default limit and counts none
    old = Quota.from_json(b'{"limits": {"descendants": 1, "env-keys": 1, "env-bytes": 10}, '
                          b'"used": {"descendants": 0, "env-keys": 0, "env-bytes": 0}}')
    assert (old.limits["notes"], old.used["notes"]) == (32, 0)
    full = Quota({**old.limits, "notes": 1}, dict(old.used))
    assert charge_note(7, full).used["notes"] == 1
    with pytest.raises(FsError) as e:
        charge_note(7, charge_note(7, full))
    assert e.value.errno == errno.EAGAIN and "limit notes" in e.value.message


async def test_a_fork_racing_the_end_of_an_ancestor_counts_right(cfs):
    """a → g → p; p forks while g ends by itself (its children go to init):
    the fork's multi must not charge a and g for a child that is no longer
    theirs, whichever happens first."""
    from cloudfs.process import State

    op = await cfs.attach("", "")
    a = await vm(op)
    g = int(await ctl(op, a, "fork"))
    p = int(await ctl(op, g, "fork"))
    entered, go = trio.Event(), trio.Event()
    real = cfs.records.chain

    async def slow_chain(pid):
        got = await real(pid)
        if pid == p and not go.is_set():
            entered.set()
            await go.wait()
        return got

    cfs.records.chain = slow_chain
    forked = []
    async with trio.open_nursery() as n:
        async def fork():
            forked.append(int(await ctl(op, p, "fork")))

        n.start_soon(fork)
        await entered.wait()  # the fork read a → g → p
        assert await cfs.exits.end(g, State.EXITED, "gone", reparent=True)
        go.set()
    assert forked
    assert (await limits(op, a))["descendants"][1] == 0
    assert (await limits(op, p))["descendants"][1] == 1


async def test_a_fork_while_a_process_ends_with_children_moves_that_child_too(cfs):
    from cloudfs.process import State

    op = await cfs.attach("", "")
    g = await vm(op)
    k = int(await ctl(op, g, "fork"))
    real = cfs.exits._remove
    raced = []

    async def remove_after_a_fork(pid, *args):
        if not raced:
            raced.append(int(await ctl(op, g, "fork")))  # a child appears after the others moved
        return await real(pid, *args)

    cfs.exits._remove = remove_after_a_fork
    assert await cfs.exits.end(g, State.EXITED, "gone", reparent=True)
    kids = (await cat(op, "/proc/1/children")).split()
    assert str(k).encode() in kids and str(raced[0]).encode() in kids
