"""/files on a real ZooKeeper, each test against both backends: the local
directory and Swift (the control plane's real Swift, tests/openstack.py):
ordinary file semantics through the node interface, who may change what,
the quotas of processes and of the deployment, hostile names, and two
daemons sharing one tree (on Swift: close-to-open between them).  FUSE and
9P clients are in tests/mountd/test_files.py, guests in
tests/test_e2e_qemu.py."""

from __future__ import annotations

import errno
import os
import time
import uuid

import pytest
import trio

from cloudfs.filestore import LocalStore
from cloudfs.swiftstore import SwiftStore
from cloudfs.namespace import open_cloudfs
from cloudfs.quotas import FILE_BYTES, FILES
from cloudfs.sharedfiles import CHARGE_STEP
from ninep.errors import FsError
from ninep.fs import SetAttr
from tests.cloudfs.fsops import cat, ctl, ls, walk
from tests.openstack import openstack_cloud  # noqa: F401  (a fixture)


@pytest.fixture(params=["local", "swift"])
def backend(request, tmp_path):
    """A function giving each daemon of the test its own view of one
    backend: the same local directory, or the same Swift container."""
    if request.param == "local":
        yield lambda: LocalStore(tmp_path / "files")
        return
    cloud = request.getfixturevalue("openstack_cloud")
    conn = cloud.connect()
    container = f"cloudfs-test-{uuid.uuid4().hex[:12]}"
    n = iter(range(100))
    yield lambda: SwiftStore(conn, container, tmp_path / f"spool{next(n)}")
    try:
        for o in conn.object_store.objects(container):
            conn.object_store.delete_object(o, container=container, ignore_missing=True)
        conn.object_store.delete_container(container, ignore_missing=True)
    except Exception:
        pass


@pytest.fixture
async def fcfs(zookeeper, zk_root, driver, backend):
    async with open_cloudfs(zookeeper.hosts, driver, zk_root, daemon_id="daemon-a", files=backend()) as fs:
        yield fs


async def fails(errno_: int, aw) -> FsError:
    with pytest.raises(FsError) as e:
        await aw
    assert e.value.errno == errno_, e.value
    return e.value


async def put(view, path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    """``cat > path``: create (or truncate) and write in 64 KiB pieces."""
    d, _, name = path.rpartition("/")
    f = (await (await walk(view, d)).create(name, 0o644, flags, 0, 0))[1]
    try:
        for off in range(0, len(data), 65536):
            assert await f.write(off, data[off:off + 65536]) == len(data[off:off + 65536])
    finally:
        await f.release()


async def usage(fs, pid: int | None = None) -> tuple[int, int]:
    if pid is None:
        u = await fs.files.usage()
        return u.used[FILES], u.used[FILE_BYTES]
    q = (await fs.quotas.get(pid)).value
    return q.used[FILES], q.used[FILE_BYTES]


async def test_files_is_an_ordinary_tree(fcfs):
    op = fcfs.view_for(None)
    assert "files" in await ls(op, "/")
    assert await ls(op, "/files") == []
    await (await walk(op, "/files")).mkdir("output", 0o755, 0, 0)
    await put(op, "/files/output/result.txt", b"hello\n")
    node = await walk(op, "/files/output/result.txt")
    a = await node.getattr()
    assert a.size == 6 and a.mtime_ns > 0
    assert await cat(op, "/files/output/result.txt") == b"hello\n"
    # writes at any offset, a hole reads as zeros; sizes are true
    f = await node.open(os.O_RDWR)
    await f.write(10, b"world")
    assert await f.read(0, 100) == b"hello\n\0\0\0\0world"
    await f.release()
    assert (await node.getattr()).size == 15
    await node.setattr(SetAttr(size=3))
    assert await cat(op, "/files/output/result.txt") == b"hel"
    # mv within the tree, rm, rmdir
    out = await walk(op, "/files/output")
    await out.rename("result.txt", await walk(op, "/files"), "r.txt")
    assert await ls(op, "/files") == ["output", "r.txt"]
    await put(op, "/files/output/x", b"")
    await fails(errno.ENOTEMPTY, (await walk(op, "/files")).unlink("output", True))
    await fails(errno.EISDIR, (await walk(op, "/files")).unlink("output", False))
    await fails(errno.ENOTDIR, (await walk(op, "/files")).unlink("r.txt", True))
    await out.unlink("x", False)
    await (await walk(op, "/files")).unlink("output", True)
    await fails(errno.ENOENT, walk(op, "/files/output"))
    # a directory cannot move into itself; O_EXCL on an existing file
    d = await (await walk(op, "/files")).mkdir("d", 0o755, 0, 0)
    await fails(errno.EINVAL, (await walk(op, "/files")).rename("d", d, "e"))
    await fails(errno.EEXIST, put(op, "/files/r.txt", b"x", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    # qids: unique per path, the version follows the mtime
    q1 = (await walk(op, "/files/r.txt")).qid()
    assert q1 != (await walk(op, "/files/d")).qid()
    assert q1.path == (await walk(op, "/files/r.txt")).qid().path


async def test_hostile_names_change_nothing(fcfs):
    top = await walk(fcfs.view_for(None), "/files")
    for bad, code in ((".", errno.EINVAL), ("..", errno.EINVAL), ("a\nb", errno.EINVAL), ("x" * 256, errno.ENAMETOOLONG),
                      ("\udcff", errno.EINVAL), ("", errno.EINVAL)):
        await fails(code, top.mkdir(bad, 0o755, 0, 0))
        await fails(code, top.create(bad, 0o644, os.O_WRONLY | os.O_CREAT, 0, 0))
    # deep paths stop at 1024 bytes (Swift's object name limit)
    node = top
    with pytest.raises(FsError) as e:
        for i in range(10):
            node = await node.mkdir("d" * 120 + str(i), 0o755, 0, 0)
    assert e.value.errno == errno.ENAMETOOLONG
    await fails(errno.EPERM, top.symlink("l", "/etc/passwd", 0, 0))
    assert (await usage(fcfs))[0] == len(await ls(fcfs.view_for(None), "/files")) + 7  # 8 levels made


async def test_who_may_change_what(fcfs):
    op = fcfs.view_for(None)
    a = int(await ctl(op, 1, "fork"))
    kid = int(await ctl(op, a, "fork"))
    b = int(await ctl(op, 1, "fork"))
    va, vkid, vb, ro = fcfs.view_for(a), fcfs.view_for(kid), fcfs.view_for(b), fcfs.readonly_view()
    await (await walk(op, "/files")).mkdir("shared", 0o755, 0, 0)
    # anyone with a process view makes entries anywhere, even in the operator's directories
    await put(vkid, "/files/shared/kid.txt", b"from the kid")
    await (await walk(vb, "/files/shared")).mkdir("b", 0o755, 0, 0)
    # everyone reads
    for v in (va, vb, ro, op):
        assert await cat(v, "/files/shared/kid.txt") == b"from the kid"
    # only the maker, its ancestors and the operator change it
    node = await walk(vb, "/files/shared/kid.txt")
    await fails(errno.EACCES, node.open(os.O_WRONLY))
    await fails(errno.EACCES, node.setattr(SetAttr(size=0)))
    await fails(errno.EACCES, (await walk(vb, "/files/shared")).unlink("kid.txt", False))
    await fails(errno.EACCES, (await walk(vb, "/files/shared")).rename("kid.txt", await walk(vb, "/files/shared/b"),
                                                                       "mine"))
    # nor replace it by moving something of one's own onto it
    await put(vb, "/files/shared/b/evil", b"x")
    await fails(errno.EACCES, (await walk(vb, "/files/shared/b")).rename("evil", await walk(vb, "/files/shared"),
                                                                         "kid.txt"))
    await fails(errno.EACCES, put(vb, "/files/shared/kid.txt", b"overwritten"))
    await fails(errno.EACCES, (await walk(va, "/files")).unlink("shared", True))  # the operator's
    f = await (await walk(va, "/files/shared/kid.txt")).open(os.O_WRONLY)
    await f.write(0, b"FROM")
    await f.release()
    assert await cat(op, "/files/shared/kid.txt") == b"FROM the kid"
    # the read-only view reads only
    await fails(errno.EACCES, put(ro, "/files/ro", b"x"))
    await fails(errno.EACCES, (await walk(ro, "/files")).mkdir("ro", 0o755, 0, 0))
    await fails(errno.EACCES, (await walk(ro, "/files/shared/kid.txt")).open(os.O_RDWR))
    # modes and owners are the tree's rules, not chmod's
    await fails(errno.EPERM, (await walk(op, "/files/shared/kid.txt")).setattr(SetAttr(mode=0o777)))
    # the kid's parent removes it
    await (await walk(va, "/files/shared")).unlink("kid.txt", False)
    assert await ls(op, "/files/shared") == ["b"]


async def test_quotas_of_a_process_and_of_the_deployment(fcfs):
    op = fcfs.view_for(None)
    pid = int(await ctl(op, 1, "fork"))
    v = fcfs.view_for(pid)
    await ctl(op, pid, "fork")  # its quota is a real one, made by fork
    f = await walk(op, f"/proc/{pid}/limits")
    w = await f.open(os.O_WRONLY)
    await w.write(0, b"file-bytes 100000\n")
    await w.release()
    w = await f.open(os.O_WRONLY)
    await w.write(0, b"files 3\n")
    await w.release()
    text = await cat(op, f"/proc/{pid}/limits")
    assert b"files 3 0\n" in text and b"file-bytes 100000 0\n" in text
    await put(v, "/files/a", b"x" * 60000)
    assert await usage(fcfs, pid) == (1, 60000)
    assert await usage(fcfs) == (1, 60000)
    # a write past file-bytes: EDQUOT, and the file keeps what was written before
    h = await (await walk(v, "/files/a")).open(os.O_WRONLY)
    e = await fails(errno.EDQUOT, h.write(60000, b"y" * 50000))
    assert "file-bytes" in e.message
    assert await h.write(60000, b"y" * 40000) == 40000  # exactly up to the limit
    await h.release()
    assert (await (await walk(v, "/files/a")).getattr()).size == 100000
    assert await usage(fcfs, pid) == (1, 100000)
    # files: 3 entries at most
    await (await walk(v, "/files")).mkdir("d1", 0o755, 0, 0)
    await put(v, "/files/d1/b", b"")
    await fails(errno.EDQUOT, put(v, "/files/c", b""))
    await fails(errno.EDQUOT, (await walk(v, "/files")).mkdir("d2", 0o755, 0, 0))
    assert await ls(op, "/files") == ["a", "d1"]
    # removing gives back, truncating gives back at close
    await (await walk(v, "/files")).unlink("a", False)
    assert await usage(fcfs, pid) == (2, 0)
    await put(v, "/files/c", b"z" * 1000)
    await (await walk(v, "/files/c")).setattr(SetAttr(size=10))
    assert await usage(fcfs, pid) == (3, 10)
    assert await usage(fcfs) == (3, 10)
    # the deployment's limits hold for the operator too
    fcfs.files.limits = {FILES: 4, FILE_BYTES: 1 << 20}
    await fcfs.files.prepare()
    await put(op, "/files/op", b"")
    e = await fails(errno.EDQUOT, put(op, "/files/op2", b""))
    assert "deployment" in e.message
    await fails(errno.EDQUOT, put(op, "/files/op", b"q" * ((1 << 20) + 1)))
    st = await (await walk(op, "/files")).statfs()
    assert st.files == 4 and st.ffree == 0


async def test_growth_is_charged_in_steps_and_settled_at_close(fcfs):
    op = fcfs.view_for(None)
    top = await walk(op, "/files")
    node, f = await top.create("big", 0o644, os.O_RDWR | os.O_CREAT, 0, 0)
    await f.write(0, b"a")
    assert await usage(fcfs) == (1, CHARGE_STEP)  # one step reserved
    g = await node.open(os.O_WRONLY)  # a second open shares the charge
    await g.write(CHARGE_STEP, b"b")
    assert await usage(fcfs) == (1, 2 * CHARGE_STEP)
    await f.release()
    assert await usage(fcfs) == (1, 2 * CHARGE_STEP)  # still open once
    await g.release()
    assert await usage(fcfs) == (1, CHARGE_STEP + 1)  # its true size
    # removed while open: the charge goes back at once, the rest at close
    h = await node.open(os.O_WRONLY)
    await top.unlink("big", False)
    assert await usage(fcfs) == (0, 0)
    await h.write(0, b"after")
    await h.release()
    assert await usage(fcfs) == (0, 0)


async def test_two_daemons_share_one_tree_close_to_open(zookeeper, zk_root, driver, backend, fcfs):
    async with open_cloudfs(zookeeper.hosts, driver, zk_root, daemon_id="daemon-b", files=backend()) as other:
        a, b = fcfs.view_for(None), other.view_for(None)
        await put(a, "/files/x", b"one")
        assert await cat(b, "/files/x") == b"one"
        # a file closed on one daemon is read whole on the other
        data = os.urandom(3 << 20)
        node, f = await (await walk(a, "/files")).create("y", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
        assert "y" in await ls(b, "/files")  # made at once, empty
        for off in range(0, len(data), 1 << 20):
            await f.write(off, data[off:off + (1 << 20)])
        await f.release()
        assert await cat(b, "/files/y", count=65536) == data
        assert (await (await walk(b, "/files/y")).getattr()).size == len(data)
        await (await walk(b, "/files")).unlink("x", False)
        await (await walk(b, "/files")).unlink("y", False)
        assert await usage(fcfs) == (0, 0)
        assert await ls(a, "/files") == []


async def test_no_files_backend_no_files(cfs):
    assert "files" not in await ls(cfs.view_for(None), "/")
    await fails(errno.ENOENT, walk(cfs.view_for(None), "/files"))


# -- regressions of a review (each failed before its fix) ----------------------------------------


async def test_opens_for_writing_share_one_file(fcfs):
    """Two write opens and a truncate of the node while they are open, then
    both close: one file with every write (Swift stored one spool)."""
    op = fcfs.view_for(None)
    node, f = await (await walk(op, "/files")).create("w", 0o644, os.O_RDWR | os.O_CREAT, 0, 0)
    g = await node.open(os.O_WRONLY)
    await f.write(0, b"AAAA")
    await g.write(4, b"BBBBxxxx")
    await node.setattr(SetAttr(size=8))  # ftruncate through FUSE setattr / 9P Tsetattr
    assert await f.read(0, 100) == b"AAAABBBB"
    await f.release()
    await g.release()
    assert await cat(op, "/files/w") == b"AAAABBBB"
    assert await usage(fcfs) == (1, 8)


async def test_a_write_during_a_store_is_neither_lost_nor_sent_past_it(fcfs):
    """fsync stores (Swift: a PUT of the spool) while a write appends a
    would-be HTTP request: the write waits, is kept, and never reaches the
    store's connection as a request of its own (the victim survives)."""
    op = fcfs.view_for(None)
    top = await walk(op, "/files")
    _, v = await top.create("victim", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await v.write(0, b"victim data")
    await v.release()
    _, f = await top.create("s", 0o644, os.O_RDWR | os.O_CREAT, 0, 0)
    big = 16 << 20
    for off in range(0, big, 1 << 20):
        await f.write(off, b"z" * (1 << 20))
    evil = b"DELETE /v1/victim HTTP/1.1\r\nX-Absorb: "
    async with trio.open_nursery() as n:
        n.start_soon(f.fsync)
        await trio.sleep(0.02)
        await f.write(big, evil)
    await f.release()
    assert (await (await walk(op, "/files/s")).getattr()).size == big + len(evil)
    assert await cat(op, "/files/victim") == b"victim data"


async def test_cancelled_charges_do_not_leak(fcfs):
    """A Tflush (a cancellation) while a charge's multi is in flight: the
    counts match what is there afterwards."""
    op = fcfs.view_for(None)
    top = await walk(op, "/files")
    node, f = await top.create("x", 0o644, os.O_RDWR | os.O_CREAT, 0, 0)
    for i in range(60):
        with trio.move_on_after(i * 0.0002):
            await f.write(i * CHARGE_STEP, b"a")
    await f.release()
    size = (await node.getattr()).size
    for i in range(60):
        with trio.move_on_after(i * 0.0002):
            await top.mkdir(f"d{i}", 0o755, 0, 0)
    entries = len(await ls(op, "/files"))
    assert await usage(fcfs) == (entries, size)


async def test_a_move_cannot_replace_a_file_made_meanwhile(fcfs):
    """Process A moves its file onto a name process B creates at the same
    moment: whichever comes first, B's file is never A's to replace."""
    op = fcfs.view_for(None)
    a, b = int(await ctl(op, 1, "fork")), int(await ctl(op, 1, "fork"))
    va, vb = fcfs.view_for(a), fcfs.view_for(b)
    await put(va, "/files/mine", b"EVIL")
    backend = fcfs.files.backend
    real = backend.rename

    async def slow_rename(src, dst):  # widen the gap between the check and the move
        await trio.sleep(0.05)
        return await real(src, dst)

    backend.rename = slow_rename
    outcome = {}

    async def victim():
        try:
            await put(vb, "/files/result", b"victim's result")
            outcome["b"] = "made"
        except FsError as e:
            outcome["b"] = e.errno

    async with trio.open_nursery() as n:
        n.start_soon((await walk(va, "/files")).rename, "mine", await walk(va, "/files"), "result")
        await trio.sleep(0.01)
        n.start_soon(victim)
    backend.rename = real
    info = await backend.info("result")
    # the move went first (it held the name): B may not overwrite A's file
    assert outcome["b"] == errno.EACCES and info.owner == a
    assert await cat(op, "/files/result") == b"EVIL"


async def test_a_read_racing_a_close_never_reads_another_file(tmp_path):
    """Tclunk while a Tread waits for a worker thread: the descriptor is
    closed only after the read, so its number is not reused under it."""
    s = LocalStore(tmp_path / "f", threads=1)
    h = await s.open("a", create=True, owner=7)
    await h.write(0, b"the file itself")
    other = await s.open("v", create=True, owner=9)
    await other.write(0, b"SECRET of someone else")
    await other.close()
    out = {}
    async with trio.open_nursery() as n:
        n.start_soon(s._run, time.sleep, 0.2)  # the only worker thread is busy
        await trio.sleep(0.01)

        async def read():
            out["r"] = await h.read(0, 100)

        n.start_soon(read)
        await trio.sleep(0.01)
        await h.close()
        fd = os.open(s._full("v"), os.O_RDONLY)  # any open meanwhile would take a freed number
    os.close(fd)
    assert out["r"] == b"the file itself"
    await fails(errno.EBADF, h.read(0, 1))
    await s.close()


def slow_store(handle) -> None:
    """Make the backend handle's close (its store, on Swift) take 0.2 s."""
    real = handle.close

    async def slow() -> None:
        await trio.sleep(0.2)
        await real()

    handle.close = slow


async def test_opens_and_removes_during_a_slow_last_close(fcfs):
    """The last close stores (slowly, as a Swift PUT of a big spool): an
    open for writing made meanwhile sees the stored bytes, and an rm made
    meanwhile gives back what the store left; counts stay exact."""
    op = fcfs.view_for(None)
    top = await walk(op, "/files")
    node, f = await top.create("x", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await f.write(0, b"hello")
    slow_store(fcfs.files._growth["x"].handle)
    async with trio.open_nursery() as n:
        n.start_soon(f.release)
        await trio.sleep(0.05)
        g = await node.open(os.O_WRONLY)  # waits for the store, then opens what it stored
        await g.write(5, b"!")
        await g.release()
    assert await cat(op, "/files/x") == b"hello!"
    assert await usage(fcfs) == (1, 6)
    _, f = await top.create("y", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await f.write(0, b"12345678")
    slow_store(fcfs.files._growth["y"].handle)
    async with trio.open_nursery() as n:
        n.start_soon(f.release)
        await trio.sleep(0.05)
        await top.unlink("y", False)
    assert await ls(op, "/files") == ["x"]
    assert await usage(fcfs) == (1, 6)


async def test_an_open_and_a_move_of_its_directory_do_not_overlap(fcfs):
    """The move waits for the open under way, then carries the open file
    along: its writes land at the new path (Swift stores there)."""
    op = fcfs.view_for(None)
    top = await walk(op, "/files")
    await top.mkdir("d", 0o755, 0, 0)
    await put(op, "/files/d/x", b"data")
    backend = fcfs.files.backend
    real_open = backend.open

    opening = trio.Event()

    async def slow_open(path, **kw):  # the backend opens d/x; the move is asked for before we return
        h = await real_open(path, **kw)
        opening.set()
        await trio.sleep(0.1)
        return h

    backend.open = slow_open
    got = {}

    async def opener():
        try:
            h = await (await walk(op, "/files/d/x")).open(os.O_WRONLY)
            await h.write(0, b"DATA")
            await h.release()
            got["r"] = "written"
        except FsError as e:
            got["r"] = e.errno

    async with trio.open_nursery() as n:
        n.start_soon(opener)
        await opening.wait()
        await top.rename("d", top, "e")
    backend.open = real_open
    assert got["r"] == "written"
    assert await ls(op, "/files") == ["e"]
    assert await cat(op, "/files/e/x") == b"DATA"
    assert fcfs.files._growth == {}
    # and an exclusive create beside a move is not disturbed by it
    backend.rename = real_rename = backend.rename

    async def slow_rename(src, dst):
        await trio.sleep(0.1)
        return await real_rename(src, dst)

    backend.rename = slow_rename
    async with trio.open_nursery() as n:
        n.start_soon(top.rename, "e", top, "f")
        await trio.sleep(0.03)
        _, lock = await top.create("lock", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0, 0)
        await lock.release()
    backend.rename = real_rename
    assert await ls(op, "/files") == ["f", "lock"]
    assert await usage(fcfs) == (3, 4)


async def test_concurrent_reads_of_one_open_keep_the_window_count(fcfs):
    """9P lets a client read one fid twice at once: the daemon's count of
    bytes held by read windows (Swift) comes back to zero at close."""
    op = fcfs.view_for(None)
    await put(op, "/files/r", os.urandom(5 << 20))
    f = await (await walk(op, "/files/r")).open(os.O_RDONLY)
    async with trio.open_nursery() as n:
        for off in range(0, 5 << 20, 1 << 20):
            n.start_soon(f.read, off, 4096)
    await f.release()
    assert getattr(fcfs.files.backend, "_window_bytes", 0) == 0
