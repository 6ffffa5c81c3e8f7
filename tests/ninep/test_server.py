"""The 9P server on the wire: negotiation, fid checks, errors per dialect,
blocking reads, flush semantics and malformed input (intro(5), flush(5),
version(5), 9P2000.L)."""

from __future__ import annotations

import errno
import os
import random
import struct

import pytest
import trio

from ninep import memfs as memfs_module
from ninep import messages as m
from ninep.codec import encode, unpack_dirents, unpack_stats
from ninep.limits import Limits
from ninep.memfs import MemFS
from ninep.server import Server

from .wire import Wire, serving

L, U, P = m.Dialect.L, m.Dialect.U, m.Dialect.P2000


@pytest.fixture
async def memfs():
    return MemFS()


async def _walk(w: Wire, fid: int, newfid: int, *names: str, tag: int = 2):
    return await w.rpc(m.Twalk(tag=tag, fid=fid, newfid=newfid, wnames=tuple(names)))


# -- version(5) -----------------------------------------------------------------


@pytest.mark.parametrize(
    "asked,answered",
    [("9P2000.L", "9P2000.L"), ("9P2000.u", "9P2000.u"), ("9P2000", "9P2000"),
     ("9P2000.x", "9P2000"), ("9P1999", "unknown"), ("", "unknown")],
)
async def test_version_negotiation_and_downgrade(memfs, asked, answered):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr, P)
        r = await w.rpc(m.Tversion(tag=m.NOTAG, msize=8192, version=asked))
        assert (r.version, r.tag) == (answered, m.NOTAG)


async def test_msize_is_at_most_the_clients_and_at_least_min_msize(memfs):
    assert m.MIN_MSIZE == 4096  # Linux's v9fs refuses less (net/9p/client.c)
    async with serving(memfs, msize=65560) as (_, addr):
        w = await Wire.open(addr)
        assert (await w.version(msize=1 << 20)).msize == 65560
        assert (await w.version(msize=5000)).msize == 5000
        assert (await w.version(msize=m.MIN_MSIZE)).msize == m.MIN_MSIZE
        for small in (1024, m.MIN_MSIZE - 1):
            r = await w.rpc(m.Tversion(tag=m.NOTAG, msize=small, version="9P2000.L"))
            assert r.version == "unknown"


def test_server_refuses_to_offer_less_than_min_msize():
    with pytest.raises(ValueError):
        Server(MemFS(), msize=m.MIN_MSIZE - 1)


async def test_messages_before_version_are_refused(memfs):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr, P)
        r = await w.rpc(m.Tattach(tag=1, fid=1, afid=m.NOFID, uname="u", aname=""))
        assert isinstance(r, m.Rerror)


async def test_tversion_clunks_every_fid(memfs):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach(fid=1)
        await w.version()
        r = await w.rpc(m.Tclunk(tag=1, fid=1))
        assert r == m.Rlerror(tag=1, ecode=errno.EBADF)


# -- auth, attach, walk ---------------------------------------------------------


async def test_tauth_says_no_authentication_required(memfs):
    async with serving(memfs) as (_, addr):
        for dialect in (L, U, P):
            w = await Wire.open(addr, dialect)
            await w.version()
            r = await w.rpc(m.Tauth(tag=1, afid=5, uname="u", aname="", n_uname=0))
            if dialect is L:
                assert r == m.Rlerror(tag=1, ecode=errno.ENOENT)
            else:
                assert isinstance(r, m.Rerror) and "authentication" in r.ename


async def test_walk_errors_per_dialect(memfs):
    async with serving(memfs) as (_, addr):
        for dialect in (L, U, P):
            w = await Wire.open(addr, dialect)
            await w.version()
            await w.attach()
            r = await _walk(w, 1, 2, "nonexistent")
            if dialect is L:
                assert r == m.Rlerror(tag=2, ecode=errno.ENOENT)
            elif dialect is U:
                assert isinstance(r, m.Rerror) and r.errno == errno.ENOENT and "nonexistent" in r.ename
            else:
                assert isinstance(r, m.Rerror) and "nonexistent" in r.ename


async def test_partial_walk_returns_prefix_and_creates_no_fid(memfs):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        await w.rpc(m.Tmkdir(tag=1, dfid=1, name="d", mode=0o755, gid=0))
        r = await _walk(w, 1, 2, "d", "missing", "x")
        assert isinstance(r, m.Rwalk) and len(r.wqids) == 1 and r.wqids[0].is_dir
        assert await w.rpc(m.Tclunk(tag=1, fid=2)) == m.Rlerror(tag=1, ecode=errno.EBADF)
        # .. goes back up, and stays at the root there.
        r = await _walk(w, 1, 3, "d", "..", "..", "d")
        assert isinstance(r, m.Rwalk) and len(r.wqids) == 4
        assert r.wqids[1] == r.wqids[2] == (await w.attach(fid=9)).qid


async def test_walk_limits_and_clone(memfs):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        r = await _walk(w, 1, 2, *(["wait"] * 17))
        assert r == m.Rlerror(tag=2, ecode=errno.EINVAL)
        assert isinstance(await _walk(w, 1, 2), m.Rwalk)  # clone
        assert isinstance(await _walk(w, 2, 2, "wait"), m.Rwalk)  # newfid == fid
        r = await w.rpc(m.Tgetattr(tag=3, fid=2, request_mask=m.P9_GETATTR_BASIC))
        assert r.qid.is_dir


# -- fid, mode, offset and count checks ----------------------------------------


async def test_server_checks_fids_and_modes_before_file_code(memfs):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        assert await w.rpc(m.Tread(tag=1, fid=77, offset=0, count=10)) == m.Rlerror(tag=1, ecode=errno.EBADF)
        r = await w.rpc(m.Tlcreate(tag=1, fid=1, name="f", flags=m.P9_DOTL_WRONLY, mode=0o644, gid=0))
        assert isinstance(r, m.Rlcreate)
        # fid 1 is now the open file: reading a write-only fid fails; walking an
        # open fid onto itself fails, into a new (unopened) fid works (as diod).
        assert await w.rpc(m.Tread(tag=1, fid=1, offset=0, count=10)) == m.Rlerror(tag=1, ecode=errno.EBADF)
        assert (await _walk(w, 1, 1)).ecode == errno.EBADF
        assert isinstance(await _walk(w, 1, 5), m.Rwalk)
        assert await w.rpc(m.Tread(tag=1, fid=5, offset=0, count=10)) == m.Rlerror(tag=1, ecode=errno.EBADF)
        await w.attach(fid=2)
        await _walk(w, 2, 3, "f")
        assert await w.rpc(m.Tread(tag=1, fid=3, offset=0, count=10)) == m.Rlerror(tag=1, ecode=errno.EBADF)
        assert isinstance(await w.rpc(m.Tlopen(tag=1, fid=3, flags=0)), m.Rlopen)
        assert (await w.rpc(m.Tlopen(tag=1, fid=3, flags=0))).ecode == errno.EBADF  # open twice
        assert (await w.rpc(m.Twrite(tag=1, fid=3, offset=0, data=b"x"))).ecode == errno.EBADF
        r = await w.rpc(m.Tread(tag=1, fid=3, offset=1 << 63, count=10))
        assert r == m.Rlerror(tag=1, ecode=errno.EINVAL)


async def test_read_count_is_capped_by_msize(memfs):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr)
        msize = (await w.version(msize=4096)).msize
        await w.attach()
        await w.rpc(m.Tlcreate(tag=1, fid=1, name="big", flags=m.P9_DOTL_RDWR, mode=0o644, gid=0))
        data = bytes(range(256)) * 40
        for off in range(0, len(data), msize - m.IOHDRSZ):
            chunk = data[off : off + msize - m.IOHDRSZ]
            assert (await w.rpc(m.Twrite(tag=1, fid=1, offset=off, data=chunk))).count == len(chunk)
        r = await w.rpc(m.Tread(tag=1, fid=1, offset=0, count=1 << 20))
        assert r.data == data[: msize - m.IOHDRSZ]


async def test_open_with_truncate_and_setattr_size_zero_as_echo_does(memfs):
    # `echo x > file` on Linux v9fs: Tlopen(WRONLY|TRUNC), Tsetattr(size 0), Twrite.
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        await _walk(w, 1, 2, "wait", "k")
        flags = m.P9_DOTL_WRONLY | m.P9_DOTL_TRUNC | m.P9_DOTL_DIRECT
        assert isinstance(await w.rpc(m.Tlopen(tag=1, fid=2, flags=flags)), m.Rlopen)
        r = await w.rpc(m.Tsetattr(tag=1, fid=2, valid=m.P9_SETATTR_SIZE, mode=0, uid=0, gid=0, size=0,
                                   atime_sec=0, atime_nsec=0, mtime_sec=0, mtime_nsec=0))
        assert r == m.Rsetattr(tag=1)
        assert (await w.rpc(m.Twrite(tag=1, fid=2, offset=0, data=b"x\n"))).count == 2
        assert memfs.values["k"] == b"x\n"


async def test_dotl_open_flags_reach_file_code_as_os_flags(memfs, monkeypatch):
    """Tlopen/Tlcreate flags are P9_DOTL_* values; file code gets this host's
    O_* flags, with the access mode, CREAT/EXCL (create only), TRUNC, APPEND,
    NONBLOCK and DIRECTORY kept and every other bit masked."""
    from ninep.memfs import MemNode

    seen: list[tuple[str, int]] = []
    open_, create = MemNode.open, MemNode.create

    async def recording_open(self, flags):
        seen.append(("open", flags))
        return await open_(self, flags)

    async def recording_create(self, name, mode, flags, uid, gid):
        seen.append(("create", flags))
        return await create(self, name, mode, flags, uid, gid)

    monkeypatch.setattr(MemNode, "open", recording_open)
    monkeypatch.setattr(MemNode, "create", recording_create)
    extras = m.P9_DOTL_DIRECT | m.P9_DOTL_NOATIME | m.P9_DOTL_CLOEXEC | m.P9_DOTL_LARGEFILE | 1 << 30
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        await _walk(w, 1, 2)
        flags = m.P9_DOTL_RDWR | m.P9_DOTL_EXCL | m.P9_DOTL_APPEND | m.P9_DOTL_SYNC | extras
        assert isinstance(await w.rpc(m.Tlcreate(tag=1, fid=2, name="f", flags=flags, mode=0o644, gid=0)),
                          m.Rlcreate)
        await _walk(w, 1, 3, "f")
        flags = m.P9_DOTL_WRONLY | m.P9_DOTL_TRUNC | m.P9_DOTL_NONBLOCK | m.P9_DOTL_EXCL | extras
        assert isinstance(await w.rpc(m.Tlopen(tag=1, fid=3, flags=flags)), m.Rlopen)
    assert seen == [
        ("create", os.O_RDWR | os.O_EXCL | os.O_APPEND | os.O_CREAT),
        ("open", os.O_WRONLY | os.O_TRUNC | os.O_NONBLOCK),
    ]


# -- files and directories, per dialect -----------------------------------------


async def test_dotl_readdir_cookies(memfs):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        names = [f"file{i:03d}" for i in range(200)]
        for n in names:
            await _walk(w, 1, 2)
            await w.rpc(m.Tlcreate(tag=1, fid=2, name=n, flags=m.P9_DOTL_WRONLY, mode=0o644, gid=0))
            await w.rpc(m.Tclunk(tag=1, fid=2))
        await _walk(w, 1, 3)
        await w.rpc(m.Tlopen(tag=1, fid=3, flags=0))
        seen, offset = [], 0
        while True:
            r = await w.rpc(m.Treaddir(tag=1, fid=3, offset=offset, count=600))
            ents = unpack_dirents(r.data)
            if not ents:
                break
            seen += [e[3] for e in ents]
            offset = ents[-1][1]
        assert sorted(seen) == sorted(names + ["wait"])


@pytest.mark.parametrize("dialect", [U, P])
async def test_legacy_directory_read_and_stat(memfs, dialect):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr, dialect)
        await w.version()
        await w.attach()
        for i in range(50):
            await _walk(w, 1, 2)
            r = await w.rpc(m.Tcreate(tag=1, fid=2, name=f"n{i}", perm=0o644, mode=m.OWRITE, extension=""))
            assert isinstance(r, m.Rcreate)
            assert (await w.rpc(m.Twrite(tag=1, fid=2, offset=0, data=b"abc"))).count == 3
            await w.rpc(m.Tclunk(tag=1, fid=2))
        await _walk(w, 1, 3)
        await w.rpc(m.Topen(tag=1, fid=3, mode=m.OREAD))
        stats, offset = [], 0
        while True:
            r = await w.rpc(m.Tread(tag=1, fid=3, offset=offset, count=500))
            if not r.data:
                break
            stats += unpack_stats(r.data, dialect)
            offset += len(r.data)
        files = {s.name: s for s in stats}
        assert len(files) == 51 and files["n7"].length == 3 and files["wait"].mode & m.DMDIR
        # an offset that is neither 0 nor the end of the previous read is refused
        r = await w.rpc(m.Tread(tag=1, fid=3, offset=7, count=500))
        assert isinstance(r, m.Rerror)
        # Twstat with length 0 (O_TRUNC from a .u client) is accepted
        await _walk(w, 1, 4, "n1")
        dont = m.Stat(type=0xFFFF, dev=0xFFFFFFFF, qid=m.Qid(0xFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF),
                      mode=0xFFFFFFFF, atime=0xFFFFFFFF, mtime=0xFFFFFFFF, length=0, name="", uid="",
                      gid="", muid="")
        assert isinstance(await w.rpc(m.Twstat(tag=1, fid=4, stat=dont)), m.Rwstat)
        s = (await w.rpc(m.Tstat(tag=1, fid=4))).stat
        assert (s.name, s.length) == ("n1", 0)
        assert isinstance(await w.rpc(m.Tremove(tag=1, fid=4)), m.Rremove)
        assert isinstance(await _walk(w, 1, 5, "n1"), m.Rerror)


async def test_dotl_only_messages_refused_on_legacy_dialects(memfs):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr, P)
        await w.version()
        await w.attach()
        r = await w.rpc(m.Tgetattr(tag=1, fid=1, request_mask=m.P9_GETATTR_BASIC))
        assert isinstance(r, m.Rerror)


async def test_statfs_xattr_lock_answered_cleanly(memfs):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        assert (await w.rpc(m.Tstatfs(tag=1, fid=1))).ecode == errno.ENOSYS
        r = await w.rpc(m.Txattrwalk(tag=1, fid=1, newfid=2, name="security.selinux"))
        assert r.ecode == errno.ENODATA
        r = await w.rpc(m.Tlock(tag=1, fid=1, type=m.P9_LOCK_TYPE_WRLCK, flags=0, start=0, length=0,
                                proc_id=1, client_id="c"))
        assert r == m.Rlock(tag=1, status=m.P9_LOCK_SUCCESS)
        r = await w.rpc(m.Tgetlock(tag=1, fid=1, type=m.P9_LOCK_TYPE_WRLCK, start=0, length=0,
                                   proc_id=1, client_id="c"))
        assert r.type == m.P9_LOCK_TYPE_UNLCK
        await w.rpc(m.Tlopen(tag=1, fid=1, flags=0))
        assert await w.rpc(m.Tfsync(tag=1, fid=1, datasync=0)) == m.Rfsync(tag=1)


# -- blocking reads and flush(5) ------------------------------------------------


async def _open_wait(w: Wire, fid: int, name: str, flags: int = 0) -> None:
    assert isinstance(await _walk(w, 1, fid, "wait", name), m.Rwalk)
    assert isinstance(await w.rpc(m.Tlopen(tag=1, fid=fid, flags=flags)), m.Rlopen)


async def test_blocking_read_released_by_another_connection(memfs):
    async with serving(memfs) as (_, addr):
        a, b = await Wire.open(addr), await Wire.open(addr)
        for w in (a, b):
            await w.version()
            await w.attach()
        await _open_wait(a, 2, "result")
        await a.send(m.Tread(tag=9, fid=2, offset=0, count=4096))
        await a.nothing_for(0.2)
        assert memfs.waiters == 1
        await _open_wait(b, 2, "result", os.O_WRONLY)
        assert (await b.rpc(m.Twrite(tag=1, fid=2, offset=0, data=b"42\n"))).count == 3
        assert await a.recv() == m.Rread(tag=9, data=b"42\n")
        # later offsets come from the snapshot, end of file is an empty read
        assert await a.rpc(m.Tread(tag=9, fid=2, offset=3, count=4096)) == m.Rread(tag=9, data=b"")
        assert memfs.waiters == 0


async def test_nonblocking_read_of_unset_value_is_eagain(memfs):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        await _open_wait(w, 2, "unset", os.O_NONBLOCK)
        assert await w.rpc(m.Tread(tag=1, fid=2, offset=0, count=10)) == m.Rlerror(tag=1, ecode=errno.EAGAIN)


async def test_flush_cancels_a_blocked_read_and_nothing_follows_rflush(memfs):
    async with serving(memfs) as (server, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        await _open_wait(w, 2, "never")
        await w.send(m.Tread(tag=5, fid=2, offset=0, count=100))
        await w.nothing_for(0.1)
        assert memfs.waiters == 1
        assert await w.rpc(m.Tflush(tag=6, oldtag=5)) == m.Rflush(tag=6)
        assert memfs.waiters == 0
        memfs.set_value("never", b"late")
        await w.nothing_for(0.2)
        conn = next(iter(server.connections))
        assert conn.pending == {}
        # the tag is free again and the fid still usable
        assert await w.rpc(m.Tread(tag=5, fid=2, offset=0, count=100)) == m.Rread(tag=5, data=b"late")


class _ScopedWaitFile(memfs_module._WaitFile):
    """A /wait read whose file code opens a cancel scope of its own (a
    deadline, as cloudfs's nodes have) before it first suspends, and may
    finish a last shielded step after it is cancelled."""

    async def produce(self) -> bytes:
        with trio.move_on_after(3600):
            try:
                return await super().produce()
            finally:
                if self.node.name.startswith("shielded"):
                    with trio.CancelScope(shield=True):
                        await trio.sleep(0.05)
        raise AssertionError("not reached")


async def test_flush_of_file_code_holding_its_own_cancel_scope(memfs, monkeypatch):
    """The request's cancel scope is its worker's, entered before the file
    code runs: scopes the file code opens nest inside it, a Tflush cancels
    the blocked read, and the worker goes on serving (many times over)."""
    monkeypatch.setattr(memfs_module, "_WaitFile", _ScopedWaitFile)
    async with serving(memfs) as (server, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        await _open_wait(w, 2, "never")
        await _open_wait(w, 3, "shielded")
        for i in range(20):
            fid = 2 if i % 2 else 3
            await w.send(m.Tread(tag=5, fid=fid, offset=0, count=100))
            await w.send(m.Tread(tag=6, fid=fid, offset=0, count=100))
            await w.nothing_for(0.02)
            assert memfs.waiters == 2
            assert await w.rpc(m.Tflush(tag=7, oldtag=5)) == m.Rflush(tag=7)
            assert await w.rpc(m.Tflush(tag=8, oldtag=6)) == m.Rflush(tag=8)
            assert memfs.waiters == 0
            assert isinstance(await w.rpc(m.Tgetattr(tag=9, fid=1, request_mask=m.P9_GETATTR_BASIC)), m.Rgetattr)
        conn = next(iter(server.connections))
        assert conn.pending == {} and conn.running == 0
        memfs.set_value("never", b"now")
        assert await w.rpc(m.Tread(tag=5, fid=2, offset=0, count=100)) == m.Rread(tag=5, data=b"now")
        await w.nothing_for(0.1)


async def test_flush_of_unknown_tag_gets_rflush(memfs):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr)
        await w.version()
        assert await w.rpc(m.Tflush(tag=3, oldtag=1234)) == m.Rflush(tag=3)


async def test_flush_races(memfs):
    """Many blocking reads, flushed at random moments while values are set at
    random moments: every tag gets at most one reply, never after its Rflush;
    no waiter, tag or fid is left behind; the connection stays usable."""
    rng = random.Random(1234)
    n = 150
    # more blocked reads than the default max_outstanding (64) allows
    async with serving(memfs, limits=Limits(max_outstanding=256)) as (server, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        for i in range(n):
            await _open_wait(w, 100 + i, f"k{i}")
        for i in range(n):
            await w.send(m.Tread(tag=i, fid=100 + i, offset=0, count=64))
        order = list(range(n))
        rng.shuffle(order)
        for i in order:
            if rng.random() < 0.5:
                memfs.set_value(f"k{i}", b"v%d" % i)
            await w.send(m.Tflush(tag=1000 + i, oldtag=i))
            if rng.random() < 0.3:
                await trio.sleep(0)
        got_read: dict[int, int] = {}
        got_flush: dict[int, int] = {}
        for pos in range(10**6):
            if len(got_flush) == n:
                break
            r = await w.recv()
            if isinstance(r, m.Rflush):
                got_flush[r.tag - 1000] = pos
            else:
                assert isinstance(r, m.Rread) and r.tag not in got_read, r
                assert r.data == b"v%d" % r.tag
                got_read[r.tag] = pos
        for tag, pos in got_read.items():
            assert pos < got_flush[tag], f"Rread for tag {tag} after its Rflush"
        # both outcomes happened: some reads answered before their flush, some cancelled
        assert 0 < len(got_read) < n
        await w.nothing_for(0.2)
        conn = next(iter(server.connections))
        assert conn.pending == {} and memfs.waiters == 0
        for i in range(n):
            assert await w.rpc(m.Tclunk(tag=1, fid=100 + i)) == m.Rclunk(tag=1)
        assert set(conn.fids) == {1}


# -- malformed input --------------------------------------------------------------


def _frame(type_: int, tag: int, body: bytes) -> bytes:
    return struct.pack("<IBH", 7 + len(body), type_, tag) + body


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(struct.pack("<IBH", 3, 100, 0), id="size-below-header"),
        pytest.param(_frame(99, 1, b""), id="unknown-type"),
        pytest.param(_frame(110, 1, struct.pack("<IIH", 1, 2, 1) + struct.pack("<H", 50) + b"ab"), id="truncated-string"),
        pytest.param(struct.pack("<IBH", 1 << 30, 118, 1), id="msize-overflow"),
        pytest.param(_frame(105, 1, b"\0" * 13), id="r-message-from-client"),
        pytest.param("fid-reuse", id="fid-reuse"),
        pytest.param("tag-reuse", id="tag-reuse"),
    ],
)
async def test_malformed_input_closes_only_that_connection(memfs, bad):
    async with serving(memfs) as (_, addr):
        good = await Wire.open(addr)
        await good.version()
        await good.attach()
        evil = await Wire.open(addr)
        await evil.version()
        await evil.attach()
        if bad == "fid-reuse":
            await evil.send(m.Tattach(tag=2, fid=1, afid=m.NOFID, uname="u", aname="", n_uname=0))
        elif bad == "tag-reuse":
            await _open_wait(evil, 2, "x")
            await evil.send(m.Tread(tag=7, fid=2, offset=0, count=10))
            await evil.send(m.Tread(tag=7, fid=2, offset=0, count=10))
        else:
            await evil.send_raw(bad)
        assert await evil.closed()
        assert memfs.waiters == 0
        r = await _walk(good, 1, 2, "wait")
        assert isinstance(r, m.Rwalk) and len(r.wqids) == 1


async def test_debug_trace_logs_every_t_and_r_message(memfs, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="ninep.trace")
    async with serving(memfs, trace=True) as (_, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        await _walk(w, 1, 2, "nope")
    lines = [r.getMessage() for r in caplog.records if r.name == "ninep.trace"]
    assert any("<- Tversion(" in line for line in lines)
    assert any("-> Rversion(" in line for line in lines)
    assert any("<- Twalk(" in line and "'nope'" in line for line in lines)
    assert any("-> Rlerror(" in line and "ecode=2" in line for line in lines)


async def test_a_peer_that_does_not_read_replies_cannot_grow_the_queue(memfs):
    from ninep.server import MAX_QUEUED_MSIZES

    n = 20000
    async with serving(memfs) as (server, addr):
        w = await Wire.open(addr)
        msize = (await w.version(msize=8192)).msize
        await w.attach()
        conn = next(iter(server.connections))
        frames = b"".join(encode(m.Tgetattr(tag=i % 60000, fid=1, request_mask=m.P9_GETATTR_BASIC), m.Dialect.L)
                          for i in range(n))
        peak = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.send_raw, frames)  # blocks once the socket buffers are full
            for _ in range(40):
                await trio.sleep(0.025)
                peak = max(peak, conn._outq_bytes)
            got = 0
            while got < n:  # now read everything: nothing was lost
                r = await w.recv(timeout=10)
                assert isinstance(r, m.Rgetattr)
                got += 1
        assert peak <= MAX_QUEUED_MSIZES * msize + msize, peak


async def test_file_code_failing_during_teardown_does_not_stop_the_server(memfs, monkeypatch):
    """A bug in file code at teardown (an ORCLOSE remove raising something
    other than FsError after the client hung up) closes nothing else."""
    from ninep.memfs import MemNode

    async def broken_unlink(self, name, is_dir):
        raise RuntimeError("file code bug")

    async with serving(memfs) as (server, addr):
        w = await Wire.open(addr, U)
        await w.version()
        await w.attach()
        r = await w.rpc(m.Tcreate(tag=1, fid=1, name="tmp", perm=0o644, mode=m.OWRITE | m.ORCLOSE, extension=""))
        assert isinstance(r, m.Rcreate)
        monkeypatch.setattr(MemNode, "unlink", broken_unlink)
        await w.aclose()  # teardown releases the ORCLOSE fid: its remove fails
        with trio.fail_after(5):
            while server.connections:
                await trio.sleep(0.02)
        other = await Wire.open(addr)  # the server still serves
        await other.version()
        await other.attach()
        assert isinstance(await _walk(other, 1, 2, "wait"), m.Rwalk)


# -- a misbehaving client racing requests on one fid -------------------------------


@pytest.fixture
def gate(monkeypatch):
    """Makes MemNode.walk and MemNode.open wait until ``gate.open.set()``
    once ``gate.armed`` is true; counts releases of opened files."""
    from ninep.memfs import MemNode, _MemFile

    class Gate:
        armed = False
        open = trio.Event()
        entered = trio.Event()
        released = 0

    walk, open_ = MemNode.walk, MemNode.open
    release = _MemFile.release

    async def slow_walk(self, name):
        if Gate.armed:
            Gate.entered.set()
            await Gate.open.wait()
        return await walk(self, name)

    async def slow_open(self, flags):
        if Gate.armed:
            Gate.entered.set()
            await Gate.open.wait()
        return await open_(self, flags)

    async def counted_release(self):
        Gate.released += 1
        await release(self)

    monkeypatch.setattr(MemNode, "walk", slow_walk)
    monkeypatch.setattr(MemNode, "open", slow_open)
    monkeypatch.setattr(_MemFile, "release", counted_release)
    return Gate


async def _with_file_f(addr: str) -> Wire:
    """A 9P2000.L session with file ``f`` made (its open released) and fid 1
    attached to the root."""
    w = await Wire.open(addr)
    await w.version()
    await w.attach()
    await w.rpc(m.Tlcreate(tag=1, fid=1, name="f", flags=m.P9_DOTL_RDWR, mode=0o644, gid=0))
    await w.rpc(m.Tclunk(tag=1, fid=1))
    await w.attach(fid=1)
    return w


async def test_clunk_during_a_walk_onto_the_same_fid_does_not_revive_it(memfs, gate):
    async with serving(memfs) as (_, addr):
        w = await _with_file_f(addr)
        gate.armed = True
        await w.send(m.Twalk(tag=5, fid=1, newfid=1, wnames=("f",)))
        with trio.fail_after(5):
            await gate.entered.wait()
        assert await w.rpc(m.Tclunk(tag=6, fid=1)) == m.Rclunk(tag=6)
        gate.open.set()
        assert await w.recv() == m.Rlerror(tag=5, ecode=errno.EBADF)
        # fid 1 stays clunked: it can be attached afresh, and nothing else uses it
        assert await w.rpc(m.Tclunk(tag=7, fid=1)) == m.Rlerror(tag=7, ecode=errno.EBADF)
        assert isinstance(await w.attach(fid=1), m.Rattach)


@pytest.mark.parametrize("second", ["Tclunk", "Tremove", "Tlopen"])
async def test_an_open_that_loses_a_race_on_its_fid_leaves_no_open_file(memfs, gate, second):
    async with serving(memfs) as (_, addr):
        w = await _with_file_f(addr)
        assert gate.released == 1
        assert isinstance(await _walk(w, 1, 2, "f"), m.Rwalk)
        gate.armed = True
        await w.send(m.Tlopen(tag=5, fid=2, flags=m.P9_DOTL_RDWR))
        with trio.fail_after(5):
            await gate.entered.wait()
        gate.armed = False
        if second == "Tlopen":  # the second open wins (it does not wait)
            assert isinstance(await w.rpc(m.Tlopen(tag=6, fid=2, flags=m.P9_DOTL_RDONLY)), m.Rlopen)
        elif second == "Tremove":
            assert await w.rpc(m.Tremove(tag=6, fid=2)) == m.Rremove(tag=6)
        else:
            assert await w.rpc(m.Tclunk(tag=6, fid=2)) == m.Rclunk(tag=6)
        gate.open.set()
        assert await w.recv() == m.Rlerror(tag=5, ecode=errno.EBADF)
        assert gate.released == 2  # the losing open's file, released at once
        if second == "Tlopen":
            assert await w.rpc(m.Tclunk(tag=7, fid=2)) == m.Rclunk(tag=7)
            assert gate.released == 3
        else:
            assert await w.rpc(m.Tclunk(tag=7, fid=2)) == m.Rlerror(tag=7, ecode=errno.EBADF)


async def test_an_open_during_a_walk_onto_the_same_fid_keeps_its_file(memfs, gate):
    async with serving(memfs) as (_, addr):
        w = await _with_file_f(addr)
        assert isinstance(await _walk(w, 1, 2, "f"), m.Rwalk)
        gate.armed = True
        await w.send(m.Twalk(tag=5, fid=1, newfid=1, wnames=("f",)))
        with trio.fail_after(5):
            await gate.entered.wait()
        gate.armed = False
        assert isinstance(await w.rpc(m.Tlopen(tag=6, fid=1, flags=m.P9_DOTL_RDONLY)), m.Rlopen)
        gate.open.set()
        assert await w.recv() == m.Rlerror(tag=5, ecode=errno.EBADF)
        # the open stands: fid 1 is still the opened root directory
        r = await w.rpc(m.Treaddir(tag=7, fid=1, offset=0, count=4096))
        assert isinstance(r, m.Rreaddir) and b"f" in r.data
        assert await w.rpc(m.Tclunk(tag=8, fid=1)) == m.Rclunk(tag=8)
