"""No input reaches a traceback: NUL in 9P strings (intro(5)), numbers out of
the range of the system call behind them, fifos that would block the event
loop, failing file code that would flood the log."""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
from pathlib import Path

import pytest
import trio

from ninep import messages as m
from ninep.codec import decode, encode, pack_dirent, unpack_dirents
from ninep.errors import FsError, ProtocolError
from ninep.fs import SetAttr
from ninep.limits import Limits
from ninep.localfs import LocalFS
from ninep.memfs import MemFS

from .wire import Wire, serving

L, U, P = m.Dialect.L, m.Dialect.U, m.Dialect.P2000


def _string(s: bytes) -> bytes:
    return struct.pack("<H", len(s)) + s


def _frame(type_: int, tag: int, body: bytes) -> bytes:
    return struct.pack("<IBH", 7 + len(body), type_, tag) + body


# -- 9P strings: NUL and invalid UTF-8 -------------------------------------------------


def test_decode_refuses_nul_in_strings():
    tversion = _frame(m.Tversion.TYPE, m.NOTAG, struct.pack("<I", 8192) + _string(b"9P2000\0"))
    with pytest.raises(ProtocolError, match="NUL"):
        decode(tversion, P)
    twalk = _frame(m.Twalk.TYPE, 1, struct.pack("<IIH", 1, 2, 2) + _string(b"a") + _string(b"b\0c"))
    with pytest.raises(ProtocolError, match="NUL"):
        decode(twalk, L)
    tsymlink = _frame(m.Tsymlink.TYPE, 1, struct.pack("<I", 1) + _string(b"l") + _string(b"/etc\0x")
                      + struct.pack("<I", 0))
    with pytest.raises(ProtocolError, match="NUL"):
        decode(tsymlink, L)
    bad_stat = bytearray(encode(m.Rstat(tag=1, stat=m.Stat(
        type=0, dev=0, qid=m.Qid(0, 0, 1), mode=0o644, atime=0, mtime=0, length=0,
        name="abc", uid="u", gid="g", muid="m")), P))
    i = bad_stat.index(b"abc")
    bad_stat[i + 1] = 0
    with pytest.raises(ProtocolError, match="NUL"):
        decode(bytes(bad_stat), P)
    dirent = bytearray(pack_dirent(m.Qid(0, 0, 1), 1, 8, "abc"))
    dirent[-2] = 0
    with pytest.raises(ProtocolError, match="NUL"):
        unpack_dirents(bytes(dirent))


def test_encode_refuses_nul_in_strings():
    with pytest.raises(ValueError):
        encode(m.Twalk(tag=1, fid=1, newfid=2, wnames=("a\0b",)), L)
    with pytest.raises(ValueError):
        encode(m.Tversion(tag=m.NOTAG, msize=8192, version="9P2000\0"), P)


def test_invalid_utf8_reaches_file_code_as_surrogate_escapes():
    raw = b"bad\xffname\xed\xa0\x80"  # a stray byte and a UTF-8-encoded surrogate
    twalk = _frame(m.Twalk.TYPE, 1, struct.pack("<IIH", 1, 2, 1) + _string(raw))
    msg = decode(twalk, L)
    (name,) = msg.wnames
    assert name == os.fsdecode(raw)
    assert name.encode("utf-8", "surrogateescape") == raw
    assert encode(msg, L) == twalk


async def test_a_nul_in_a_request_closes_only_that_connection():
    memfs = MemFS()
    async with serving(memfs) as (server, addr):
        good = await Wire.open(addr)
        await good.version()
        await good.attach()
        evil = await Wire.open(addr)
        await evil.send_raw(_frame(m.Tversion.TYPE, m.NOTAG, struct.pack("<I", 8192) + _string(b"9P2000\0")))
        assert await evil.closed()
        evil = await Wire.open(addr)
        await evil.version()
        await evil.attach()
        await evil.send_raw(_frame(m.Twalk.TYPE, 2, struct.pack("<IIH", 1, 2, 1) + _string(b"wait\0x")))
        assert await evil.closed()
        r = await good.rpc(m.Twalk(tag=2, fid=1, newfid=2, wnames=("wait",)))
        assert isinstance(r, m.Rwalk)


# -- failing file code: short log lines, rate-limited tracebacks ---------------------------


async def test_failing_file_code_logs_no_request_and_one_traceback(caplog, monkeypatch):
    from ninep.memfs import MemNode

    async def broken_walk(self, name):
        raise RuntimeError("boom " + name * 10)

    monkeypatch.setattr(MemNode, "walk", broken_walk)
    caplog.set_level(logging.DEBUG, logger="ninep.server")
    memfs = MemFS()
    long_name = "n" * 26000
    async with serving(memfs, limits=Limits(traceback_interval=3600)) as (server, addr):
        w = await Wire.open(addr)
        await w.version(msize=1 << 20)
        await w.attach()
        for i in range(20):
            r = await w.rpc(m.Twalk(tag=2, fid=1, newfid=2, wnames=(long_name,) * 16))
            assert r == m.Rlerror(tag=2, ecode=errno.EIO)
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert long_name[:300] not in text  # neither the request nor the exception message is echoed whole
    assert len(text) < 30_000, len(text)
    assert text.count("Traceback") == 1
    assert "Twalk" in text and "fid 1" in text and "RuntimeError" in text


async def test_ename_is_cut(monkeypatch):
    memfs = MemFS()
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr, U)
        await w.version(msize=1 << 20)
        await w.attach()
        r = await w.rpc(m.Twalk(tag=2, fid=1, newfid=2, wnames=("é" * 30000,)))
        assert isinstance(r, m.Rerror) and r.errno == errno.ENOENT
        assert len(r.ename.encode()) <= 512


# -- LocalFS: numbers out of range, NUL, fifos ---------------------------------------


@pytest.fixture
async def tree(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_bytes(b"hello\n")
    fs = LocalFS(root)
    try:
        yield fs, root
    finally:
        await fs.close()


async def _expect(errno_: int, coro):
    with pytest.raises(FsError) as ei:
        await coro
    assert ei.value.errno == errno_, ei.value


async def test_localfs_range_checks_numbers_before_the_os(tree):
    fs, root = tree
    r = await fs.attach("u", "")
    f = await r.walk("a.txt")
    await _expect(errno.EINVAL, f.setattr(SetAttr(size=-1)))
    await _expect(errno.EINVAL, f.setattr(SetAttr(size=1 << 63)))
    await _expect(errno.EINVAL, f.setattr(SetAttr(size=1 << 64)))
    await _expect(errno.EINVAL, f.setattr(SetAttr(mode=1 << 40)))
    await _expect(errno.EINVAL, f.setattr(SetAttr(uid=1 << 32)))
    await _expect(errno.EINVAL, f.setattr(SetAttr(mtime_ns=10**40)))
    await _expect(errno.EINVAL, f.setattr(SetAttr(atime_ns=-(10**40))))
    await _expect(errno.EINVAL, r.mknod("p", stat.S_IFIFO | 0o600, 1 << 64, 0, 0))
    await _expect(errno.EINVAL, r.mknod("p", 1 << 31, 0, 0, 0))
    await _expect(errno.EINVAL, r.mknod("p", 0o170000 | 0o600, 0, 0, 0))  # no such file type
    await _expect(errno.EPERM, r.mknod("p", stat.S_IFDIR | 0o700, 0, 0, 0))
    await _expect(errno.EINVAL, r.mkdir("d", 1 << 40, 0, 0))
    await _expect(errno.EINVAL, r.create("c", stat.S_IFREG | (1 << 40), os.O_RDWR, 0, 0))
    assert sorted(os.listdir(root)) == ["a.txt"]
    # in range: a time before 1970 and a regular file made by mknod with type 0
    await f.setattr(SetAttr(mtime_ns=-1_500_000_000))
    assert os.stat(root / "a.txt").st_mtime_ns == -1_500_000_000
    await r.mknod("plain", 0o600, 0, 0, 0)
    assert stat.S_ISREG(os.stat(root / "plain").st_mode)


async def test_localfs_refuses_nul_in_aname_and_symlink_targets(tree):
    fs, root = tree
    await _expect(errno.EINVAL, fs.attach("u", str(root) + "\0/x"))
    r = await fs.attach("u", "")
    await _expect(errno.EINVAL, r.symlink("l", "/etc\0passwd", 0, 0))
    await _expect(errno.ENOENT, r.walk("a\0b"))  # no such name can exist
    assert not os.path.lexists(root / "l")


async def test_out_of_range_numbers_over_9p_get_clean_errors(tree):
    fs, root = tree
    async with serving(fs) as (_, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        for major, minor in ((1 << 31, 0), (0xFFFFFFFF, 0), (4096, 0), (0, 1 << 20)):
            r = await w.rpc(m.Tmknod(tag=1, dfid=1, name="dev", mode=stat.S_IFCHR | 0o600,
                                     major=major, minor=minor, gid=0))
            assert r == m.Rlerror(tag=1, ecode=errno.EINVAL), (major, minor, r)
        r = await w.rpc(m.Tmknod(tag=1, dfid=1, name="dev", mode=0xFFFFFFFF, major=0, minor=0, gid=0))
        assert r == m.Rlerror(tag=1, ecode=errno.EINVAL)
        assert await w.rpc(m.Twalk(tag=1, fid=1, newfid=2, wnames=("a.txt",)))
        for size in (1 << 63, (1 << 64) - 1):
            r = await w.rpc(m.Tsetattr(tag=1, fid=2, valid=m.P9_SETATTR_SIZE, mode=0, uid=0, gid=0, size=size,
                                       atime_sec=0, atime_nsec=0, mtime_sec=0, mtime_nsec=0))
            assert r == m.Rlerror(tag=1, ecode=errno.EINVAL), size
        timebits = m.P9_SETATTR_MTIME | m.P9_SETATTR_MTIME_SET
        r = await w.rpc(m.Tsetattr(tag=1, fid=2, valid=timebits, mode=0, uid=0, gid=0, size=0,
                                   atime_sec=0, atime_nsec=0, mtime_sec=5, mtime_nsec=10**9))
        assert r == m.Rlerror(tag=1, ecode=errno.EINVAL)
        r = await w.rpc(m.Tsetattr(tag=1, fid=2, valid=timebits, mode=0, uid=0, gid=0, size=0,
                                   atime_sec=0, atime_nsec=0, mtime_sec=(1 << 64) - 2, mtime_nsec=(1 << 64) - 1))
        assert r == m.Rlerror(tag=1, ecode=errno.EINVAL)
        # a u64 second count is a signed time_t, as Linux's v9fs sends it: 2 s before 1970
        r = await w.rpc(m.Tsetattr(tag=1, fid=2, valid=timebits, mode=0, uid=0, gid=0, size=0,
                                   atime_sec=0, atime_nsec=0, mtime_sec=(1 << 64) - 2, mtime_nsec=0))
        assert r == m.Rsetattr(tag=1)
        assert os.stat(root / "a.txt").st_mtime_ns == -2_000_000_000
        assert os.path.getsize(root / "a.txt") == 6
    # the same through 9P2000.u's Twstat (u64 length)
    async with serving(fs) as (_, addr):
        w = await Wire.open(addr, U)
        await w.version()
        await w.attach()
        assert await w.rpc(m.Twalk(tag=1, fid=1, newfid=2, wnames=("a.txt",)))
        keep = m.Stat(type=0xFFFF, dev=0xFFFFFFFF, qid=m.Qid(0xFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF),
                      mode=0xFFFFFFFF, atime=0xFFFFFFFF, mtime=0xFFFFFFFF, length=1 << 63, name="", uid="",
                      gid="", muid="", extension="", n_uid=0xFFFFFFFF, n_gid=0xFFFFFFFF, n_muid=0xFFFFFFFF)
        r = await w.rpc(m.Twstat(tag=1, fid=2, stat=keep))
        assert isinstance(r, m.Rerror) and r.errno == errno.EINVAL


class _Unblocker:
    """If the event loop ever blocks in open(2) on ``fifo``, open it O_RDWR
    from another thread after ``after`` seconds (which unblocks any open of a
    fifo) and remember that it had to."""

    def __init__(self, fifo: Path, after: float = 3.0):
        self.fired = False
        self._timer = threading.Timer(after, self._fire, args=(fifo,))

    def _fire(self, fifo: Path) -> None:
        self.fired = True
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        threading.Timer(1.0, os.close, args=(fd,)).start()

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()


async def test_create_of_an_existing_fifo_never_blocks_the_loop(tree):
    fs, root = tree
    os.mkfifo(root / "fifo")
    r = await fs.attach("u", "")
    with _Unblocker(root / "fifo") as guard:
        await _expect(errno.ENXIO, r.create("fifo", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0))
        node, rd = await r.create("fifo", stat.S_IFREG | 0o644, os.O_RDONLY, 0, 0)
        assert stat.S_ISFIFO((await node.getattr()).mode)
        node, wr = await r.create("fifo", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
        assert await wr.write(0, b"hi") == 2
        assert await rd.read(0, 10) == b"hi"
        for f in (rd, wr):
            await f.release()
    assert not guard.fired


async def test_serving_a_fifo_over_9p_never_blocks_other_clients(tree):
    fs, root = tree
    os.mkfifo(root / "fifo")
    async with serving(fs) as (_, addr):
        w = await Wire.open(addr)
        await w.version()
        await w.attach()
        other = await Wire.open(addr)
        await other.version()
        await other.attach()
        with _Unblocker(root / "fifo") as guard:
            r = await w.rpc(m.Tlcreate(tag=1, fid=1, name="fifo", flags=m.P9_DOTL_WRONLY, mode=0o644, gid=0))
            assert r == m.Rlerror(tag=1, ecode=errno.ENXIO)
            r = await w.rpc(m.Tlcreate(tag=1, fid=1, name="fifo", flags=m.P9_DOTL_RDONLY, mode=0o644, gid=0))
            assert isinstance(r, m.Rlcreate)
            assert isinstance(await other.rpc(m.Twalk(tag=1, fid=1, newfid=2, wnames=("fifo",))), m.Rwalk)
            assert isinstance(await other.rpc(m.Tlopen(tag=1, fid=2, flags=m.P9_DOTL_WRONLY)), m.Rlopen)
            # two pipelined reads of one fifo fid: served one after the other, no EIO
            await w.send(m.Tread(tag=5, fid=1, offset=0, count=100))
            await w.send(m.Tread(tag=6, fid=1, offset=0, count=100))
            await w.nothing_for(0.2)
            assert (await other.rpc(m.Twrite(tag=1, fid=2, offset=0, data=b"one"))).count == 3
            first = await w.recv()
            assert first == m.Rread(tag=5, data=b"one")
            await w.nothing_for(0.1)
            assert (await other.rpc(m.Twrite(tag=1, fid=2, offset=0, data=b"two"))).count == 3
            assert await w.recv() == m.Rread(tag=6, data=b"two")
            # a third read waiting behind the lock can be flushed
            await w.send(m.Tread(tag=7, fid=1, offset=0, count=100))
            await w.send(m.Tread(tag=8, fid=1, offset=0, count=100))
            assert await w.rpc(m.Tflush(tag=9, oldtag=8)) == m.Rflush(tag=9)
            assert await w.rpc(m.Tflush(tag=9, oldtag=7)) == m.Rflush(tag=9)
        assert not guard.fired


async def test_localfs_two_concurrent_reads_of_one_fifo_file(tree):
    fs, root = tree
    r = await fs.attach("u", "")
    await r.mknod("fifo", stat.S_IFIFO | 0o600, 0, 0, 0)
    node = await r.walk("fifo")
    rd = await node.open(os.O_RDONLY)
    wr = await node.open(os.O_WRONLY)
    got = []

    async def reader():
        got.append(await rd.read(0, 3))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        n.start_soon(reader)
        await trio.sleep(0.05)
        assert await wr.write(0, b"abc") == 3
        await trio.sleep(0.05)
        assert await wr.write(0, b"def") == 3
    assert sorted(got) == [b"abc", b"def"]
    for f in (rd, wr):
        await f.release()
