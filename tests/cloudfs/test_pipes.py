"""Pipes (``/proc/<pid>/pipe/<name>``) on a real ZooKeeper: messages kept
whole and in each writer's order, EOF after the last writer, EPIPE after
the reader, writers on two daemons over 9P, who may do what, the quotas,
and nothing left when the owner ends.  The montecarlo guests that use them
are in tests/test_e2e_qemu.py."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from cloudfs.pipes import PIPE_MSG_MAX
from ninep.client import open_client
from ninep.errors import FsError
from ninep.server import Server
from tests.cloudfs.fsops import cat, ctl, echo, ls, walk


async def fails(errno_: int, aw) -> FsError:
    with pytest.raises(FsError) as e:
        await aw
    assert e.value.errno == errno_, e.value
    return e.value


async def mkpipe(view, pid: int, name: str = "p"):
    """Create the pipe (as ``touch`` does); returns nothing."""
    d = await walk(view, f"/proc/{pid}/pipe")
    _, f = await d.create(name, 0o660, os.O_RDONLY | os.O_CREAT, 0, 0)
    await f.release()


async def opened(view, path: str, flags: int):
    return await (await walk(view, path)).open(flags)


async def test_messages_eof_and_epipe(cfs):
    op = cfs.view_for(None)
    owner = int(await ctl(op, 1, "fork"))
    kid = int(await ctl(op, owner, "fork"))
    me, child = cfs.view_for(owner), cfs.view_for(kid)
    await mkpipe(me, owner, "counts")
    assert await ls(op, f"/proc/{owner}/pipe") == ["counts"]
    path = f"/proc/{owner}/pipe/counts"
    r = await opened(me, path, os.O_RDONLY)
    nb = await opened(me, path, os.O_RDONLY | os.O_NONBLOCK)
    await fails(errno.EAGAIN, nb.read(0, 100))
    await nb.release()
    async with trio.open_nursery() as n:
        got: list[bytes] = []

        async def reader():
            got.append(await r.read(0, PIPE_MSG_MAX))  # blocks: no writer yet (no EOF either)

        n.start_soon(reader)
        await trio.sleep(0.2)
        assert got == []
        w1 = await opened(child, path, os.O_WRONLY)
        await w1.write(0, b"first\n")
    assert got == [b"first\n"]
    w2 = await opened(me, path, os.O_WRONLY)  # the owner may write too
    await w1.write(123, b"second")               # offsets are ignored
    await w2.write(0, b"x" * PIPE_MSG_MAX)
    await fails(errno.EFBIG, w2.write(0, b"x" * (PIPE_MSG_MAX + 1)))
    assert await r.read(0, 3) == b"sec"            # one message, cut to the count (the rest dropped)
    assert await r.read(0, PIPE_MSG_MAX) == b"x" * PIPE_MSG_MAX
    await w1.release()
    with trio.move_on_after(0.3) as cs:
        await r.read(0, 100)                        # w2 is still open: no EOF
    assert cs.cancelled_caught
    await w2.release()
    assert await r.read(0, 100) == b""              # EOF: had writers, none left, nothing to read
    await r.release()                               # the reader's last close: closed for good
    await fails(errno.EPIPE, opened(child, path, os.O_WRONLY))
    await fails(errno.EPIPE, opened(me, path, os.O_RDONLY))
    d = await walk(me, f"/proc/{owner}/pipe")
    await d.unlink("counts", False)
    assert await ls(op, f"/proc/{owner}/pipe") == []


async def test_a_write_after_the_reader_closed_is_epipe(cfs):
    op = cfs.view_for(None)
    owner = int(await ctl(op, 1, "fork"))
    await mkpipe(op, owner)
    path = f"/proc/{owner}/pipe/p"
    w = await opened(op, path, os.O_WRONLY)
    r = await opened(cfs.view_for(owner), path, os.O_RDONLY)
    await w.write(0, b"a")
    await r.release()
    await fails(errno.EPIPE, w.write(0, b"b"))
    await w.release()


async def test_who_may_do_what(cfs):
    op = cfs.view_for(None)
    owner = int(await ctl(op, 1, "fork"))
    kid = int(await ctl(op, owner, "fork"))
    other = int(await ctl(op, 1, "fork"))
    me, child, stranger = cfs.view_for(owner), cfs.view_for(kid), cfs.view_for(other)
    await mkpipe(me, owner)
    path = f"/proc/{owner}/pipe/p"
    await fails(errno.EACCES, mkpipe(child, owner, "q"))                 # a descendant makes none for its parent
    await fails(errno.EACCES, opened(stranger, path, os.O_WRONLY))      # not a descendant
    await fails(errno.EACCES, opened(child, path, os.O_RDONLY))         # only the owner reads
    await fails(errno.EACCES, opened(cfs.readonly_view(), path, os.O_WRONLY))
    await fails(errno.EINVAL, mkpipe(me, owner, "bad name"))
    await fails(errno.EEXIST, mkpipe(me, owner, "p"))
    await fails(errno.ENOENT, walk(me, f"/proc/{owner}/pipe/none"))
    await (await opened(child, path, os.O_WRONLY)).release()  # allowed
    await mkpipe(op, kid, "mine")                                        # the operator makes pipes anywhere


async def test_quotas(cfs):
    op = cfs.view_for(None)
    owner = int(await ctl(op, 1, "fork"))
    await echo(op, f"/proc/{owner}/limits", "pipes 1")
    await echo(op, f"/proc/{owner}/limits", "pipe-bytes 520")  # each message counts its length + 256
    await mkpipe(op, owner, "one")
    e = await fails(errno.EAGAIN, mkpipe(op, owner, "two"))
    assert "limit pipes" in e.message
    path = f"/proc/{owner}/pipe/one"
    w = await opened(op, path, os.O_WRONLY)
    r = await opened(op, path, os.O_RDONLY)
    await w.write(0, b"12345678")
    await fails(errno.EFBIG, w.write(0, b"x" * 300))     # over the whole limit with its cost
    nb = await opened(op, path, os.O_WRONLY | os.O_NONBLOCK)
    await fails(errno.EAGAIN, nb.write(0, b"abc"))       # would pass pipe-bytes: no room now
    assert b"pipe-bytes 520 264\n" in await cat(op, f"/proc/{owner}/limits")
    async with trio.open_nursery() as n:
        done = trio.Event()

        async def blocked_writer():
            await w.write(0, b"abc")                     # waits until the reader makes room
            done.set()

        n.start_soon(blocked_writer)
        await trio.sleep(0.3)
        assert not done.is_set()
        assert await r.read(0, 100) == b"12345678"
    assert await r.read(0, 100) == b"abc"
    assert await r.read(0, 0) == b""                     # a read of 0 bytes takes nothing
    for f in (nb, w, r):
        await f.release()
    assert b"pipe-bytes 520 0\n" in await cat(op, f"/proc/{owner}/limits")


async def test_many_small_messages_and_rm(cfs):
    """Tiny messages are bounded by their znode cost, and rm deletes any
    number of them in multis under ZooKeeper's request limit."""
    op = cfs.view_for(None)
    owner = int(await ctl(op, 1, "fork"))
    await mkpipe(op, owner)
    w = await opened(op, f"/proc/{owner}/pipe/p", os.O_WRONLY | os.O_NONBLOCK)
    n = 0
    with pytest.raises(FsError) as e:
        while True:
            await w.write(0, b"x")
            n += 1
    assert e.value.errno == errno.EAGAIN and n == (1 << 20) // 257, n
    await (await walk(op, f"/proc/{owner}/pipe")).unlink("p", False)
    await fails(errno.EPIPE, w.write(0, b"x"))
    await w.release()
    assert b"pipes 16 0\npipe-bytes 1048576 0\n" in await cat(op, f"/proc/{owner}/limits")


async def test_opens_act_on_the_pipe_they_opened(cfs):
    op = cfs.view_for(None)
    owner = int(await ctl(op, 1, "fork"))
    await mkpipe(op, owner)
    path = f"/proc/{owner}/pipe/p"
    old_w, old_r = await opened(op, path, os.O_WRONLY), await opened(op, path, os.O_RDONLY)
    await (await walk(op, f"/proc/{owner}/pipe")).unlink("p", False)
    await mkpipe(op, owner)  # the same name again
    new_w, new_r = await opened(op, path, os.O_WRONLY), await opened(op, path, os.O_RDONLY)
    await fails(errno.EPIPE, old_w.write(0, b"stale"))
    await fails(errno.ENOENT, old_r.read(0, 100))
    await old_r.release()  # closing an old reader does not close the new pipe
    await old_w.release()
    await new_w.write(0, b"fresh")
    assert await new_r.read(0, 100) == b"fresh"
    await new_w.release()
    assert await new_r.read(0, 100) == b""
    await new_r.release()


async def test_a_reader_gone_with_its_daemon_closes_the_pipe(cfs):
    op = cfs.view_for(None)
    owner = int(await ctl(op, 1, "fork"))
    await mkpipe(op, owner)
    path = f"/proc/{owner}/pipe/p"
    w = await opened(op, path, os.O_WRONLY)
    r = await opened(op, path, os.O_RDONLY)
    [(end, _)] = r.ends
    await cfs.store.delete(end)  # what the expiry of the reader's daemon's session does
    await fails(errno.EPIPE, w.write(0, b"nobody reads"))
    await w.release()


async def test_an_ancestor_makes_a_pipe_for_its_child(cfs):
    op = cfs.view_for(None)
    parent = int(await ctl(op, 1, "fork"))
    kid = int(await ctl(op, parent, "fork"))
    await mkpipe(cfs.view_for(parent), kid, "fromparent")  # touch: no error, nothing counted
    assert await ls(op, f"/proc/{kid}/pipe") == ["fromparent"]
    d = await walk(cfs.view_for(parent), f"/proc/{kid}/pipe")
    _, f = await d.create("another", 0o660, os.O_RDWR | os.O_CREAT, 0, 0)
    await fails(errno.EACCES, f.read(0, 10))   # the parent may not read its child's pipe
    await fails(errno.EACCES, f.write(0, b"x"))  # nor write it (it is no descendant of its child)
    await f.release()


def test_a_v9fs_read_loop_gets_one_message():
    """The read sequence Linux's v9fs sends for one read(2) of 65536 bytes:
    the continuation right after a message gets 0 bytes."""
    from cloudfs.files import PipeFile

    class FakePipes:
        def __init__(self):
            self.msgs = [b"join 3\n", b"12 20\n"]

        async def read(self, pid, name, end, count, nonblocking):
            return self.msgs.pop(0)[:count] if self.msgs else b""

    class FakeFs:
        pipes = FakePipes()

    async def main():
        f = PipeFile(FakeFs(), 2, "p", os.O_RDONLY, [("r-1", "r")])
        assert await f.read(0, 65536) == b"join 3\n"
        assert await f.read(7, 65536 - 7) == b""       # v9fs continuing: the read(2) ends here
        assert await f.read(7, 65536) == b"12 20\n"     # the next read(2)
        assert await f.read(13, 65536 - 6) == b""
        assert await f.read(13, 65536) == b""            # EOF

    trio.run(main)


async def test_writers_on_two_daemons_keep_their_order(cfs, cfs2, tmp_path):
    op = cfs.view_for(None)
    owner = int(await ctl(op, 1, "fork"))
    a = int(await ctl(op, owner, "fork"))
    b = int(await ctl(op, owner, "fork"))
    await mkpipe(op, owner)
    async with trio.open_nursery() as n:
        dials = []
        for fs in (cfs, cfs2):
            dials += await n.start(Server(fs).serve, f"tcp!127.0.0.1!0")
        got: list[bytes] = []
        async with open_client(dials[0], aname=f"proc/{owner}") as rc:
            rf = await rc.walk(f"proc/{owner}/pipe/p")
            await rf.open(os.O_RDONLY)

            async def writer(dial: str, pid: int):
                async with open_client(dial, aname=f"proc/{pid}") as c:
                    f = await c.walk(f"proc/{owner}/pipe/p")
                    await f.open(os.O_WRONLY)
                    for i in range(30):
                        await f.write(0, f"{pid} {i}".encode())
                    await f.clunk()

            async with trio.open_nursery() as w:
                w.start_soon(writer, dials[0], a)
                w.start_soon(writer, dials[1], b)  # the other daemon
                while True:
                    m = await rf.read(0, 100)
                    if not m:
                        break  # EOF: both writers closed
                    got.append(m)
        n.cancel_scope.cancel()
    for pid in (a, b):
        mine = [int(m.split()[1]) for m in got if m.split()[0] == str(pid).encode()]
        assert mine == list(range(30)), (pid, mine)


async def test_a_dropped_connection_stops_counting_as_a_writer(cfs):
    op = cfs.view_for(None)
    owner = int(await ctl(op, 1, "fork"))
    await mkpipe(op, owner)
    r = await opened(op, f"/proc/{owner}/pipe/p", os.O_RDONLY)
    async with trio.open_nursery() as n:
        dial = (await n.start(Server(cfs).serve, "tcp!127.0.0.1!0"))[0]
        async with open_client(dial) as c:
            f = await c.walk(f"proc/{owner}/pipe/p")
            await f.open(os.O_WRONLY)
            await f.write(0, b"last words")
        # the connection closed with the fid open: the server clunked it
        with trio.fail_after(10):
            assert await r.read(0, 100) == b"last words"
            assert await r.read(0, 100) == b""
        n.cancel_scope.cancel()
    await r.release()


async def test_pipes_go_with_their_owner(cfs):
    op = cfs.view_for(None)
    owner = int(await ctl(op, 1, "fork"))
    await mkpipe(op, owner)
    w = await opened(op, f"/proc/{owner}/pipe/p", os.O_WRONLY)
    await w.write(0, b"unread")
    r = await opened(op, f"/proc/{owner}/pipe/p", os.O_RDONLY)
    await ctl(op, owner, "kill")
    with trio.fail_after(30):
        await cat(op, "/proc/1/wait")
    assert await cfs.store.exists(cfs.layout.pipes(owner)) is None
    await fails(errno.EPIPE, w.write(0, b"more"))
    await w.release()
    await r.release()
