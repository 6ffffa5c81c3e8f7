"""ninep.remotefs.RemoteFS against our 9P server serving a MemFS, in all dialects.

Real server, real client, loopback TCP: every FileSystem call becomes 9P
messages and back.  Also covers the client's Fid.renameat.
"""

from __future__ import annotations

import errno
import gc
import os
import stat

import pytest
import trio

from ninep.client import open_client
from ninep.errors import FsError
from ninep.fs import SetAttr
from ninep.memfs import MemFS
from ninep.remotefs import RemoteFS, RemoteNode
from tests.ninep.wire import serving

DIALECTS = ["9P2000.L", "9P2000.u", "9P2000"]


@pytest.fixture(params=DIALECTS)
def dialect(request):
    return request.param


async def test_tree_operations(dialect):
    fs = MemFS()
    async with serving(fs) as (_, addr), open_client(addr, version=dialect) as c:
        root = await RemoteFS(c).attach("root", "")
        assert root.qid().is_dir and root.qid().path == fs.root.qid.path
        d = await root.mkdir("dir", stat.S_IFDIR | 0o755, 0, 0)
        assert d.qid().is_dir and "dir" in fs.root.children
        node, f = await d.create("a", 0o644, os.O_RDWR, 0, 0)
        assert await f.write(0, b"hello world") == 11
        assert await f.read(6, 100) == b"world"
        await f.release()
        assert (await node.getattr()).size == 11
        await node.setattr(SetAttr(size=5))
        g = await (await d.walk("a")).open(os.O_RDONLY)
        assert await g.read(0, 100) == b"hello"
        await g.release()
        names = [e.name for e in await (await root.open(os.O_RDONLY | os.O_DIRECTORY)).readdir()]
        assert sorted(names) == ["dir", "wait"]
        with pytest.raises(FsError) as e:
            await root.walk("nope")
        assert e.value.errno == errno.ENOENT
        with pytest.raises(FsError) as e:
            await root.unlink("dir", True)
        # 9P2000 carries only the message ("dir is not empty"), which maps to EIO
        assert e.value.errno == (errno.EIO if dialect == "9P2000" else errno.ENOTEMPTY)
        await d.rename("a", d, "b")  # same directory: every dialect
        assert list(fs.root.children["dir"].children) == ["b"]
        if dialect == "9P2000.L":
            await d.rename("b", root, "c")
            assert "c" in fs.root.children
            await root.unlink("c", False)
        else:
            with pytest.raises(FsError) as e:
                await d.rename("b", root, "c")
            assert e.value.errno == errno.EXDEV
            await d.unlink("b", False)
        await root.unlink("dir", True)
        assert sorted(fs.root.children) == ["wait"]


async def test_blocked_read_cancel_flushes_and_readiness():
    fs = MemFS()
    async with serving(fs) as (_, addr), open_client(addr) as c:
        root = await RemoteFS(c).attach("root", "")
        w = await (await root.walk("wait")).walk("k")
        f = await w.open(os.O_RDONLY)
        assert not f.readable()
        with trio.move_on_after(0.3) as scope:
            await f.read(0, 100)
        assert scope.cancelled_caught
        assert fs.waiters == 0  # Tflush removed the waiter on the server
        with pytest.raises(FsError) as e:
            await (await w.open(os.O_RDONLY | os.O_NONBLOCK)).read(0, 100)
        assert e.value.errno == errno.EAGAIN
        async with trio.open_nursery() as n:
            n.start_soon(f.wait_readable)
            await trio.sleep(0.2)
            assert fs.waiters == 1 and not f.readable()
            fs.set_value("k", b"v")
        assert f.readable()
        fs.set_value("k", b"newer")  # the probe's answer is the read's: no second Tread
        assert await f.read(0, 1) == b"v"
        assert await f.read(1, 100) == b""
        assert not f.readable()  # the next poll probes again
        assert await f.read(0, 100) == b"newer"
        await f.release()


async def test_node_fid_clunked_when_collected():
    fs = MemFS()
    async with serving(fs) as (_, addr), open_client(addr) as c:
        root = await RemoteFS(c).attach("root", "")
        n = await root.walk("wait")
        assert isinstance(n, RemoteNode)
        number = n.fid.fid
        del n
        gc.collect()
        await trio.sleep(0.2)
        again = await root.walk("wait")
        assert again.fid.fid == number  # the fid was clunked and its number freed
