"""LocalFS through the ninep.fs interface, against a real temporary directory."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from ninep.errors import FsError
from ninep.fs import SetAttr
from ninep.localfs import INLINE_IO_LIMIT, LocalFS
from ninep.qid import QTDIR, QTFILE, QTSYMLINK


@pytest.fixture
async def tree(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_bytes(b"bee")
    fs = LocalFS(root)
    try:
        yield fs, root
    finally:
        await fs.close()


async def walk(node, path: str):
    for name in path.split("/"):
        node = await node.walk(name)
    return node


async def test_attach_names(tree, tmp_path):
    fs, root = tree
    r = await fs.attach("u", "")
    assert r.qid().type & QTDIR
    assert r.qid().path == os.stat(root).st_ino
    r2 = await fs.attach("u", str(root))
    assert r2.qid() == r.qid()
    sub = await fs.attach("u", str(root / "sub"))
    assert sub.qid().path == os.stat(root / "sub").st_ino
    assert [e.name for e in await (await sub.open(os.O_RDONLY)).readdir()] == ["b.txt"]
    for bad in [str(tmp_path), "/", "/etc", "sub", str(root / "sub" / ".." / ".."), str(root / "nope")]:
        with pytest.raises(FsError) as ei:
            await fs.attach("u", bad)
        assert ei.value.errno == errno.ENOENT, bad
    with pytest.raises(FsError) as ei:
        await fs.attach("u", str(root / "a.txt"))
    assert ei.value.errno == errno.ENOTDIR


async def test_walk_getattr(tree):
    fs, root = tree
    r = await fs.attach("u", "")
    f = await walk(r, "sub/b.txt")
    st = os.lstat(root / "sub" / "b.txt")
    a = await f.getattr()
    assert a.qid == f.qid() and a.qid.type == QTFILE and a.qid.path == st.st_ino
    assert a.size == 3 and stat.S_ISREG(a.mode) and a.mtime_ns == st.st_mtime_ns
    assert a.uid == st.st_uid and a.nlink == 1
    with pytest.raises(FsError) as ei:
        await r.walk("missing")
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(FsError) as ei:
        await f.walk("x")
    assert ei.value.errno == errno.ENOTDIR
    for bad in ["..", ".", "", "a/b"]:
        with pytest.raises(FsError) as ei:
            await r.walk(bad)
        assert ei.value.errno == errno.ENOENT


async def test_qid_version_follows_mtime(tree):
    fs, root = tree
    f = await (await fs.attach("u", "")).walk("a.txt")
    v1 = (await f.getattr()).qid.version
    os.utime(root / "a.txt", ns=(1, 123_456_789_000))
    v2 = (await f.getattr()).qid.version
    assert v1 != v2 and f.qid().version == v2


async def test_create_write_read_readdir_rename_unlink(tree):
    fs, root = tree
    r = await fs.attach("u", "")
    node, of = await r.create("new", 0o640, os.O_RDWR, os.getuid(), os.getgid())
    assert await of.write(0, b"0123456789") == 10
    assert await of.write(4, b"xy") == 2
    assert await of.read(0, 100) == b"0123xy6789"
    assert await of.read(8, 100) == b"89"
    assert await of.read(10, 100) == b""
    await of.release()
    assert stat.S_IMODE(os.stat(root / "new").st_mode) == 0o640
    assert (await node.getattr()).size == 10

    d = await r.open(os.O_RDONLY | os.O_DIRECTORY)
    ents = {e.name: e for e in await d.readdir()}
    assert set(ents) == {"a.txt", "sub", "new"}
    assert ents["sub"].qid.type & QTDIR and ents["sub"].dtype == 4
    assert ents["new"].qid == node.qid()
    await d.release()

    sub = await r.walk("sub")
    await r.rename("new", sub, "moved")
    assert (root / "sub" / "moved").read_bytes() == b"0123xy6789"
    # the node walked before the rename still names the file
    assert (await node.getattr()).size == 10
    o = await node.open(os.O_RDONLY)
    assert await o.read(0, 4) == b"0123"
    await o.release()

    await sub.unlink("moved", False)
    assert not (root / "sub" / "moved").exists()
    with pytest.raises(FsError) as ei:
        await sub.unlink("moved", False)
    assert ei.value.errno == errno.ENOENT

    with pytest.raises(FsError) as ei:
        await r.create("a.txt", 0o644, os.O_WRONLY | os.O_EXCL, 0, 0)
    assert ei.value.errno == errno.EEXIST


async def test_rename_dir_moves_nodes_below(tree):
    fs, root = tree
    r = await fs.attach("u", "")
    b = await walk(r, "sub/b.txt")
    await r.rename("sub", r, "sub2")
    assert (await b.getattr()).size == 3
    assert b.parts == ("sub2", "b.txt")


async def test_open_flags(tree):
    fs, root = tree
    r = await fs.attach("u", "")
    f = await r.walk("a.txt")
    ro = await f.open(os.O_RDONLY | os.O_DIRECT | os.O_NOATIME | os.O_CREAT)  # unknown bits masked
    with pytest.raises(FsError) as ei:
        await ro.write(0, b"x")
    assert ei.value.errno == errno.EBADF
    await ro.release()
    ap = await f.open(os.O_WRONLY | os.O_APPEND)
    await ap.write(0, b"more\n")
    await ap.release()
    assert (root / "a.txt").read_bytes() == b"hello\nmore\n"
    tr = await f.open(os.O_WRONLY | os.O_TRUNC)
    await tr.release()
    assert (root / "a.txt").read_bytes() == b""
    with pytest.raises(FsError) as ei:
        await r.open(os.O_WRONLY)
    assert ei.value.errno == errno.EISDIR
    with pytest.raises(FsError) as ei:
        await (await f.open(os.O_RDONLY)).readdir()
    assert ei.value.errno == errno.ENOTDIR


async def test_large_io_in_thread(tree):
    fs, root = tree
    r = await fs.attach("u", "")
    node, of = await r.create("big", 0o600, os.O_RDWR, 0, 0)
    data = os.urandom(INLINE_IO_LIMIT * 3 + 7)
    assert await of.write(0, data) == len(data)
    await of.fsync()
    assert await of.read(0, len(data) + 10) == data
    await of.release()


async def test_setattr(tree):
    fs, root = tree
    r = await fs.attach("u", "")
    f = await r.walk("a.txt")
    await f.setattr(SetAttr(size=2))
    assert (root / "a.txt").read_bytes() == b"he"
    await f.setattr(SetAttr(size=0))
    assert (await f.getattr()).size == 0
    await f.setattr(SetAttr(mode=stat.S_IFREG | 0o600))
    assert stat.S_IMODE(os.stat(root / "a.txt").st_mode) == 0o600
    await f.setattr(SetAttr(mtime_ns=1_000_000_000_123))
    st = os.stat(root / "a.txt")
    assert st.st_mtime_ns == 1_000_000_000_123
    await f.setattr(SetAttr(atime_ns=2_000_000_000_000, mtime_ns=3_000_000_000_000))
    st = os.stat(root / "a.txt")
    assert (st.st_atime_ns, st.st_mtime_ns) == (2_000_000_000_000, 3_000_000_000_000)
    await f.setattr(SetAttr(uid=os.getuid(), gid=os.getgid()))
    with pytest.raises(FsError) as ei:
        await r.setattr(SetAttr(size=0))
    assert ei.value.errno == errno.EISDIR


async def test_mkdir_symlink_link_mknod_readlink_statfs(tree):
    fs, root = tree
    r = await fs.attach("u", "")
    d = await r.mkdir("dir", 0o750, 0, 0)
    assert d.qid().type & QTDIR and stat.S_IMODE(os.stat(root / "dir").st_mode) == 0o750
    ln = await d.symlink("ln", "../a.txt", 0, 0)
    assert ln.qid().type == QTSYMLINK
    assert await ln.readlink() == "../a.txt"
    assert (await ln.getattr()).extension == "../a.txt"
    a = await r.walk("a.txt")
    await d.link("hard", a)
    assert os.stat(root / "dir" / "hard").st_ino == os.stat(root / "a.txt").st_ino
    fifo = await d.mknod("fifo", stat.S_IFIFO | 0o600, 0, 0, 0)
    assert stat.S_ISFIFO((await fifo.getattr()).mode)
    with pytest.raises(FsError) as ei:
        await d.mknod("dev", stat.S_IFCHR | 0o600, os.makedev(1, 3), 0, 0)
    assert ei.value.errno == errno.EPERM
    with pytest.raises(FsError) as ei:
        await r.unlink("dir", True)
    assert ei.value.errno == errno.ENOTEMPTY
    for name in ["ln", "hard", "fifo"]:
        await d.unlink(name, False)
    await r.unlink("dir", True)
    assert not (root / "dir").exists()
    sf = await r.statfs()
    sv = os.statvfs(root)
    assert sf.blocks == sv.f_blocks and sf.bsize == sv.f_bsize and sf.namelen == sv.f_namemax
    for bad in ["..", "x/y", ""]:
        with pytest.raises(FsError) as ei:
            await r.mkdir(bad, 0o755, 0, 0)
        assert ei.value.errno == errno.EINVAL


async def test_symlinks_do_not_escape(tree, tmp_path):
    fs, root = tree
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_bytes(b"s3cret")
    os.symlink(secret, root / "out")
    os.symlink(secret / "key", root / "keylink")
    r = await fs.attach("u", "")
    out = await r.walk("out")
    assert out.qid().type == QTSYMLINK
    with pytest.raises(FsError) as ei:
        await out.walk("key")
    assert ei.value.errno == errno.ENOTDIR
    with pytest.raises(FsError) as ei:
        await out.open(os.O_RDONLY)
    assert ei.value.errno in (errno.ELOOP, errno.ENOTDIR)
    with pytest.raises(FsError) as ei:
        await (await r.walk("keylink")).open(os.O_RDONLY)
    assert ei.value.errno == errno.ELOOP
    with pytest.raises(FsError) as ei:
        await out.create("x", 0o644, os.O_WRONLY, 0, 0)
    assert ei.value.errno == errno.ENOTDIR
    assert not (secret / "x").exists()
    with pytest.raises(FsError) as ei:
        await fs.attach("u", str(root / "out"))
    assert ei.value.errno == errno.ENOENT
    # a directory swapped for a link after the walk is not followed either
    sub = await r.walk("sub")
    os.rename(root / "sub", root / "sub.old")
    os.symlink(secret, root / "sub")
    with pytest.raises(FsError) as ei:
        await sub.walk("key")
    assert ei.value.errno == errno.ENOTDIR
    with pytest.raises(FsError) as ei:
        await (await r.walk("sub")).setattr(SetAttr(mode=0o777))
    assert ei.value.errno == errno.EOPNOTSUPP
    assert stat.S_IMODE(os.stat(secret).st_mode) != 0o777


async def test_prune_keeps_live_nodes(tree):
    fs, root = tree
    r = await fs.attach("u", "")
    keep = await r.walk("a.txt")
    fs._live_min = fs._live_limit = 3
    for i in range(20):
        (root / f"f{i}").write_bytes(b"")
        await r.walk(f"f{i}")  # dropped at once
    assert len(fs._live) < 10
    await r.rename("a.txt", r, "b.txt")
    assert keep.parts == ("b.txt",)


async def test_undecodable_names_round_trip(tree):
    fs, root = tree
    (root / os.fsdecode(b"bad\xffname")).write_bytes(b"ok")
    r = await fs.attach("u", "")
    d = await r.open(os.O_RDONLY)
    names = [e.name for e in await d.readdir()]
    assert "bad\udcffname" in names
    f = await (await r.walk("bad\udcffname")).open(os.O_RDONLY)
    assert await f.read(0, 10) == b"ok"


async def test_fifo_never_blocks_the_loop(tree):
    import trio

    fs, root = tree
    r = await fs.attach("u", "")
    await r.mknod("fifo", stat.S_IFIFO | 0o600, 0, 0, 0)
    node = await r.walk("fifo")
    with pytest.raises(FsError) as ei:  # no reader yet: ENXIO rather than a stalled loop
        await node.open(os.O_WRONLY)
    assert ei.value.errno == errno.ENXIO
    rd = await node.open(os.O_RDONLY)
    wr = await node.open(os.O_WRONLY)
    got = []

    async def reader():
        got.append(await rd.read(12345, 100))  # offsets are ignored on a fifo

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.sleep(0.05)
        assert got == []  # waiting in trio, not in a blocking read(2)
        assert await wr.write(7, b"ping") == 4
    assert got == [b"ping"]
    nb = await node.open(os.O_RDONLY | os.O_NONBLOCK)
    with pytest.raises(FsError) as ei:
        await nb.read(0, 10)
    assert ei.value.errno == errno.EAGAIN
    # a read waiting when the fid is clunked ends instead of hanging
    async with trio.open_nursery() as n:
        async def waiting():
            with pytest.raises(FsError):
                await rd.read(0, 10)
        n.start_soon(waiting)
        await trio.sleep(0.05)
        await rd.release()
    for f in (wr, nb):
        await f.release()
