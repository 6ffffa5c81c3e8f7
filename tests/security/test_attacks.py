"""The attacks of the issue "A guest cannot exhaust the host", replayed
against ``cloudfs up`` over 9P as a guest or an anonymous client would, with
a canary reading /proc/1/status throughout (each answer within 1 s).  Each
test also checks what the attack must not change: the daemon's memory and
descriptors, ZooKeeper's watch count, and the tree beyond the quota.

The 9P-level limits (fids, tags, reply bytes, slow frames, connections)
have their replays in test_connections.py; the random-frame fuzzer is in
test_fuzz.py.
"""

from __future__ import annotations

import errno
import os

import pytest
import trio

from ninep.client import open_client
from ninep.errors import FsError
from tests.security.conftest import Canary

async def _ctl(c, pid: int | str, cmd: str) -> str:
    async with await c.walk(f"proc/{pid}/ctl") as f:
        await f.open(os.O_RDWR)
        await f.write(0, cmd.encode() + b"\n")
        return (await f.read_all()).decode().strip()


async def _vm(c) -> int:
    pid = int(await _ctl(c, 1, "fork"))
    await _ctl(c, pid, "exec tiny")
    return pid


async def _write(c, path: str, data: bytes) -> None:
    await c.write_file(path, data)


async def test_1_fork_bomb_stops_at_the_quota_and_kill_ends_it(daemon):
    canary = Canary(daemon.tcp)
    async with trio.open_nursery() as n:
        await n.start(canary.run)
        async with open_client(daemon.operator) as op:
            root = await _vm(op)
            await _write(op, f"proc/{root}/limits", b"descendants 6")
            async with open_client(daemon.operator, aname=f"proc/{root}") as guest:  # the VM's view
                made, frontier, refused = [], [root], 0
                while frontier:
                    nxt = []
                    for p in frontier:
                        for _ in range(2):
                            try:
                                nxt.append(int(await _ctl(guest, p, "fork")))
                            except FsError as e:
                                assert e.errno == errno.EAGAIN, e
                                refused += 1
                    made += nxt
                    frontier = nxt
            assert len(made) == 6 and refused == 8
            assert len(await op.listdir("proc")) == 1 + 1 + 6
            await _ctl(op, root, "kill")
            with trio.fail_after(30):
                assert (await op.read_file("proc/1/wait")).startswith(f"{root} ".encode())
            assert await op.listdir("proc") == ["1"]
        n.cancel_scope.cancel()
    canary.check()
    assert not daemon.tracebacks()


async def test_3_abandoned_blocking_reads_leave_no_watches(daemon):
    """An anonymous client loops over distinct unset env names, each read
    blocked and then flushed (or its connection dropped): the daemon's
    and ZooKeeper's watches stay where they were."""
    async with open_client(daemon.operator) as op:
        await op.read_file("proc/1/status")
    await trio.sleep(0.5)
    watches, rss = daemon.zk_watches(), daemon.rss()
    canary = Canary(daemon.tcp)
    async with trio.open_nursery() as n:
        await n.start(canary.run)
        async with open_client(daemon.tcp) as c:  # the read-only view: no credential
            for i in range(300):
                with trio.move_on_after(0.02):
                    await c.read_file(f"proc/1/env/never-{i}")  # cancelled: Tflush
        for i in range(50):  # and some whose connection drops while they wait
            async with open_client(daemon.tcp) as c:
                with trio.move_on_after(0.02):
                    await c.read_file(f"proc/1/env/dropped-{i}")
        n.cancel_scope.cancel()
    canary.check()
    await trio.sleep(0.5)
    assert daemon.zk_watches() <= watches + 3, (watches, daemon.zk_watches())
    assert daemon.rss() < rss + 32 << 20
    assert not daemon.tracebacks()


async def test_4_env_is_bounded_by_the_quota(daemon):
    async with open_client(daemon.operator) as op:
        pid = await _vm(op)
        async with open_client(daemon.operator, aname=f"proc/{pid}") as guest:
            for i in range(256):
                await _write(guest, f"proc/self/env/k{i}", b"v")
            with pytest.raises(FsError) as e:
                await _write(guest, "proc/self/env/one-too-many", b"v")
            assert e.value.errno == errno.EDQUOT
            big = b"x" * (256 * 1024)
            await guest.walk("proc/self/env")
            for i in range(3):
                await _write(guest, f"proc/self/env/k{i}", big)
            with pytest.raises(FsError) as e:
                await _write(guest, "proc/self/env/k3", big)  # 1 MiB of values in all
            assert e.value.errno == errno.EDQUOT
        text = (await op.read_file(f"proc/{pid}/limits")).decode()
        assert "env-keys 256 256\n" in text and "env-bytes 1048576 " in text
        assert len(await op.listdir(f"proc/{pid}/env")) == 256
    assert not daemon.tracebacks()


async def test_5_a_process_with_ten_thousand_env_keys_is_killed(daemon):
    """The keys' deletes are far over ZooKeeper's 1 MiB request limit; the
    kill still ends the process, and the daemon keeps its session."""
    from kazoo.client import KazooClient

    async with open_client(daemon.operator) as op:
        pid = int(await _ctl(op, 1, "fork"))
    root = daemon.root
    from kazoo.security import make_digest_acl

    cred = (daemon.state / "zookeeper.auth").read_text().strip()  # the tree is the daemons' alone
    user, _, password = cred.partition(":")
    zk = KazooClient(hosts=daemon.zk.hosts, auth_data=[("digest", cred)],
                     default_acl=[make_digest_acl(user, password, all=True)])
    zk.start(timeout=10)
    try:
        t = None
        for i in range(10_000):
            if i % 1000 == 0:
                if t is not None:
                    t.commit()
                t = zk.transaction()
            t.create(f"{root}/proc/{pid}/env/{'k' * 200}{i:05d}", b"v")
        t.commit()
    finally:
        zk.stop()
        zk.close()
    canary = Canary(daemon.tcp)
    async with trio.open_nursery() as n:
        await n.start(canary.run)
        async with open_client(daemon.operator) as op:
            await _ctl(op, pid, "kill")
            with trio.fail_after(60):
                assert (await op.read_file("proc/1/wait")) == f"{pid} p{pid} killed killed\n".encode()
            assert await op.listdir("proc") == ["1"]
        n.cancel_scope.cancel()
    canary.check()
    assert "Session has expired" not in daemon.log.read_text() and not daemon.tracebacks()


@pytest.mark.parametrize("aname", ["proc/²", "proc/٠", "proc/" + "9" * 5000, "proc/1/\udcff", "proc/01/x"])
async def test_7_bad_anames_are_eacces(daemon, aname):
    async with open_client(daemon.tcp) as c:
        with pytest.raises(FsError) as e:
            await c.attach("root", aname)
    assert e.value.errno == errno.EACCES
    assert not daemon.tracebacks()


async def test_7_bad_names_are_errnos_not_tracebacks(daemon):
    async with open_client(daemon.tcp) as c:
        for parent, name, err in (("proc", "٠", errno.ENOENT), ("proc", "١", errno.ENOENT),
                                  ("proc", "²", errno.ENOENT), ("proc", "1" * 5000, errno.ENOENT),
                                  ("proc/1/env", "\udcff", errno.EINVAL),
                                  ("proc/1/env", "k" * 300, errno.ENAMETOOLONG)):
            async with await c.walk(parent) as d:  # one name per Twalk: its own error comes back
                with pytest.raises(FsError) as e:
                    await d.walk(name)
            assert e.value.errno == err, (parent, name, e.value)
    text = daemon.log.read_text(errors="replace")
    assert not daemon.tracebacks() and len(text) < 100_000
