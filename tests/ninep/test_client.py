"""ninep.client against real 9P servers on loopback.

- py9p's server (PyPI p9fs, ``python -m py9p``, a local-directory server) in a
  child process, speaking 9P2000 and 9P2000.u: attach, walk, read, write,
  readdir, stat, errors and version downgrade.
- A deliberately slow server written here with the codec, to pin down the
  client side of flush(5): a cancelled read sends Tflush, the cancellation
  completes only after Rflush, the tag is not reused before Rflush, a reply
  that beats the Rflush is dropped, and many requests can be in flight.
- Our own server (ninep.server with LocalFS) in all three dialects.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from ninep import messages as m
from ninep.client import Client, errno_for_ename, open_client, split_path
from ninep.codec import FrameReader, decode, encode
from ninep.errors import FsError
from ninep.fs import SetAttr
from ninep.messages import Dialect
from ninep.qid import QTDIR, QTFILE, Qid

# --------------------------------------------------------------------------
# py9p's server in a child process
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Py9pServer:
    """``python -m py9p -w [-D]`` serving ``root`` on 127.0.0.1 (stopped in a finally)."""

    def __init__(self, root: Path, dotu: bool):
        self.root = root
        self.port = _free_port()
        args = [sys.executable, "-m", "py9p", "-w", "-a", "127.0.0.1", "-p", str(self.port), "-r", str(root)]
        if dotu:
            args.append("-D")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"py9p server did not start: {self.proc.stderr.read()!r}")
                time.sleep(0.05)

    @property
    def addr(self) -> str:
        return f"tcp!127.0.0.1!{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()


def _populate(root: Path) -> None:
    (root / "hello.txt").write_bytes(b"hello, world\n")
    (root / "sub").mkdir()
    (root / "sub" / "inner.txt").write_bytes(b"inner")
    os.chmod(root / "hello.txt", 0o644)


@pytest.fixture(params=[False, True], ids=["9P2000", "9P2000.u"])
def py9p(request, tmp_path):
    """A py9p server over a populated temporary directory: yields (server, dialect)."""
    root = tmp_path / "root"
    root.mkdir()
    _populate(root)
    server = Py9pServer(root, dotu=request.param)
    try:
        yield server, (Dialect.U if request.param else Dialect.P2000)
    finally:
        server.stop()


async def test_py9p_version_downgrade(tmp_path):
    """py9p answers 9P2000.u only to a .u request on a -D server, else 9P2000."""
    root = tmp_path / "r"
    root.mkdir()
    for dotu, ask, want in [
        (False, Dialect.L, Dialect.P2000),
        (True, Dialect.L, Dialect.P2000),
        (True, Dialect.U, Dialect.U),
        (False, Dialect.U, Dialect.P2000),
        (True, Dialect.P2000, Dialect.P2000),
    ]:
        server = Py9pServer(root, dotu)
        try:
            async with Client.connect(server.addr, version=ask, msize=65560) as c:
                assert c.dialect is want
                assert c.msize == 8192  # py9p's fixed msize, below what we asked
                assert await c.listdir("/") == []
        finally:
            server.stop()


async def test_py9p_attach_walk_read(py9p):
    server, dialect = py9p
    async with open_client(server.addr, version=dialect) as c:
        assert c.dialect is dialect
        root = await c.attach("tester")
        assert root.qid.is_dir
        f = await root.walk("sub", "inner.txt")
        assert f.fid != root.fid and f.qid.type == QTFILE
        await f.open(os.O_RDONLY)
        assert f.iounit == 8192 - m.IOHDRSZ
        assert await f.read(0, 100) == b"inner"
        assert await f.read(2, 2) == b"ne"
        assert await f.read(5, 10) == b""
        await f.clunk()
        await f.clunk()  # twice is a no-op
        with pytest.raises(FsError) as ei:
            await f.read(0, 1)
        assert ei.value.errno == errno.EBADF
        clone = await root.walk()
        assert clone.qid == root.qid and clone.fid != root.fid
        up = await (await root.walk("sub")).walk("..", "hello.txt")
        await up.open()
        assert await up.read_all() == b"hello, world\n"
        assert await c.read_file("/hello.txt") == b"hello, world\n"
        assert await c.read_file("sub//inner.txt") == b"inner"


async def test_py9p_walk_errors_and_long_walks(py9p):
    server, dialect = py9p
    deep = server.root.joinpath(*[f"d{i}" for i in range(20)])
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"deep")
    async with open_client(server.addr, version=dialect) as c:
        root = await c.attach()
        names = [f"d{i}" for i in range(20)] + ["leaf"]
        leaf = await root.walk(*names)  # 21 names: two Twalks
        await leaf.open()
        assert await leaf.read_all() == b"deep"
        assert await c.read_file("/".join(names)) == b"deep"
        for path in ["nope", "sub/nope", "sub/nope/deeper", "/".join(names[:17] + ["x"])]:
            with pytest.raises(FsError) as ei:
                await c.walk(path)
            assert ei.value.errno == errno.ENOENT, path
        with pytest.raises(FsError) as ei:
            await root.walk("a/b")
        assert ei.value.errno == errno.EINVAL
        # Fid numbers of failed walks are given back: the pool stays small.
        f = await root.walk("sub")
        assert f.fid < 10


async def test_py9p_write(py9p):
    server, dialect = py9p
    async with open_client(server.addr, version=dialect) as c:
        big = bytes(range(256)) * 100  # 25600 bytes: several Twrites at msize 8192
        assert await c.write_file("new.bin", big) == len(big)
        assert (server.root / "new.bin").read_bytes() == big
        assert await c.read_file("new.bin") == big
        await c.write_file("hello.txt", b"bye")  # existing file: truncated
        assert (server.root / "hello.txt").read_bytes() == b"bye"
        root = await c.attach()
        sub = await root.walk("sub")
        f = await sub.create("made.txt", os.O_WRONLY, 0o600)
        assert sub.qid.is_dir and not f.qid.is_dir
        assert await f.write(0, b"abcdef") == 6
        assert await f.write(3, b"XY") == 2
        assert await f.write(0, b"") == 0
        await f.clunk()
        assert (server.root / "sub" / "made.txt").read_bytes() == b"abcXYf"
        w = await sub.walk("inner.txt")
        await w.open(os.O_WRONLY)
        await w.write(5, b"!")
        await w.clunk()
        assert (server.root / "sub" / "inner.txt").read_bytes() == b"inner!"


async def test_py9p_readdir_and_mkdir(py9p):
    server, dialect = py9p
    many = server.root / "many"
    many.mkdir()
    names = {f"file-with-a-rather-long-name-{i:04d}" for i in range(300)}  # > one 8 KiB Tread of stats
    for n in names:
        (many / n).write_bytes(b"")
    async with open_client(server.addr, version=dialect) as c:
        assert sorted(await c.listdir("")) == ["hello.txt", "many", "sub"]
        assert set(await c.listdir("many")) == names
        root = await c.attach()
        entries = {e.name: e for e in await root.readdir()}
        assert stat.S_ISDIR(entries["sub"].mode) and entries["sub"].qid.type & QTDIR
        assert stat.S_ISREG(entries["hello.txt"].mode) and entries["hello.txt"].dtype == 8
        qid = await c.mkdir("sub/newdir", 0o750)
        assert qid.is_dir
        assert (server.root / "sub" / "newdir").is_dir()
        assert sorted(await c.listdir("sub")) == ["inner.txt", "newdir"]
        with pytest.raises(FsError) as ei:
            await c.mkdir("sub/newdir")
        assert ei.value.errno == errno.EEXIST  # .u: Rerror errno; 9P2000: "File exists" mapped


async def test_py9p_stat_and_remove(py9p):
    server, dialect = py9p
    async with open_client(server.addr, version=dialect) as c:
        a = await c.stat("hello.txt")
        st = os.stat(server.root / "hello.txt")
        assert a.mode == stat.S_IFREG | 0o644
        assert a.size == 13
        assert a.mtime_ns == int(st.st_mtime) * 1_000_000_000
        assert a.qid.type == QTFILE
        if dialect is Dialect.U:
            assert (a.uid, a.gid) == (st.st_uid, st.st_gid)
        d = await c.stat("sub")
        assert stat.S_ISDIR(d.mode) and d.qid.is_dir
        root = await c.attach()
        with pytest.raises(FsError) as ei:
            await root.statfs()
        assert ei.value.errno == errno.ENOSYS
        await c.remove("sub/inner.txt")
        assert not (server.root / "sub" / "inner.txt").exists()
        with pytest.raises(FsError) as ei:
            await c.stat("sub/inner.txt")
        assert ei.value.errno == errno.ENOENT
        sub = await root.walk("sub")
        await sub.remove()
        assert not (server.root / "sub").exists()


async def test_py9p_concurrent_requests(py9p):
    """Many tasks share one connection; each gets its own answer."""
    server, dialect = py9p
    for i in range(20):
        (server.root / f"f{i}").write_bytes(f"content {i}".encode() * (i + 1))
    results: dict[int, bytes] = {}
    async with open_client(server.addr, version=dialect) as c:

        async def one(i: int) -> None:
            results[i] = await c.read_file(f"f{i}")

        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(one, i)
    assert results == {i: f"content {i}".encode() * (i + 1) for i in range(20)}


# --------------------------------------------------------------------------
# A slow server built from the codec: flush(5) seen from the client
# --------------------------------------------------------------------------

HOLD = 1_000_000  #: Treads at this offset are never answered on their own.


class SlowServer:
    """A 9P2000.L server of one file, ``x``, whose reads answer with their
    offset as ASCII after ``delay(offset)`` seconds.  Treads at offset HOLD
    and Twalks of the single name ``hold`` are only ended by a Tflush.

    ``log`` holds every message received.  Flush behaviour: Rflush waits for
    ``flush_gate`` (if set); with ``late_reply`` the flushed read's Rread is
    sent before the Rflush; with ``reply_after_flush`` after it (a bug);
    ``answer_flush=False`` never answers Tflush.
    """

    def __init__(self, *, version_reply: str | None = None, msize_reply: int | None = None):
        self.log: list[m.Message] = []
        self.version_reply = version_reply
        self.msize_reply = msize_reply
        self.delay = lambda offset: 0.0
        self.flush_gate: trio.Event | None = None
        self.late_reply = False
        self.reply_after_flush = False
        self.answer_flush = True
        self.flush_seen = trio.Event()
        self.rflush_sent = trio.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        self._reads: dict[int, tuple[trio.CancelScope, m.Tread]] = {}

    async def serve(self, stream: trio.abc.Stream) -> None:
        lock = trio.Lock()
        dialect = Dialect.L

        async def send(msg: m.Message) -> None:
            async with lock:
                await stream.send_all(encode(msg, dialect))

        async def read(msg: m.Tread, scope: trio.CancelScope) -> None:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                with scope:
                    if msg.offset == HOLD:
                        await trio.sleep_forever()
                    await trio.sleep(self.delay(msg.offset))
                    await send(m.Rread(msg.tag, str(msg.offset).encode()))
            finally:
                self.in_flight -= 1
                self._reads.pop(msg.tag, None)

        async def hold(msg: m.Message, scope: trio.CancelScope) -> None:
            try:
                with scope:
                    await trio.sleep_forever()
            finally:
                self._reads.pop(msg.tag, None)

        def late(msg: m.Message) -> m.Message:
            if isinstance(msg, m.Twalk):
                return m.Rwalk(msg.tag, (Qid(QTFILE, 0, 3),))
            return m.Rread(msg.tag, b"late")

        async def flush(msg: m.Tflush) -> None:
            self.flush_seen.set()
            if not self.answer_flush:
                return
            if self.flush_gate is not None:
                await self.flush_gate.wait()
            held = self._reads.get(msg.oldtag)
            if held is not None:
                held[0].cancel()
                if self.late_reply:
                    await send(late(held[1]))
            await send(m.Rflush(msg.tag))
            self.rflush_sent.set()
            if self.reply_after_flush:
                await send(m.Rread(msg.oldtag, b"too late"))

        reader = FrameReader(1 << 20)
        async with trio.open_nursery() as nursery:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    nursery.cancel_scope.cancel()
                    return
                reader.feed(data)
                for frame in reader.frames():
                    msg = decode(frame, dialect)
                    self.log.append(msg)
                    if isinstance(msg, m.Tversion):
                        await send(
                            m.Rversion(
                                m.NOTAG,
                                self.msize_reply or min(msg.msize, 8192),
                                self.version_reply or msg.version,
                            )
                        )
                    elif isinstance(msg, m.Tattach):
                        await send(m.Rattach(msg.tag, Qid(QTDIR, 0, 1)))
                    elif isinstance(msg, m.Twalk) and msg.wnames == ("hold",):
                        scope = trio.CancelScope()
                        self._reads[msg.tag] = (scope, msg)
                        nursery.start_soon(hold, msg, scope)
                    elif isinstance(msg, m.Twalk):
                        await send(m.Rwalk(msg.tag, tuple(Qid(QTFILE, 0, 2) for _ in msg.wnames)))
                    elif isinstance(msg, m.Tlopen):
                        await send(m.Rlopen(msg.tag, Qid(QTFILE, 0, 2), 0))
                    elif isinstance(msg, m.Tlcreate):
                        await send(m.Rlcreate(msg.tag, Qid(QTFILE, 0, 4), 0))
                    elif isinstance(msg, m.Tclunk):
                        await send(m.Rclunk(msg.tag))
                    elif isinstance(msg, m.Tread):
                        scope = trio.CancelScope()
                        self._reads[msg.tag] = (scope, msg)
                        nursery.start_soon(read, msg, scope)
                    elif isinstance(msg, m.Tflush):
                        nursery.start_soon(flush, msg)
                    else:
                        await send(m.Rlerror(msg.tag, errno.ENOSYS))

    def sent(self, cls: type) -> list:
        return [x for x in self.log if isinstance(x, cls)]


@pytest.fixture
async def slow(nursery):
    """A SlowServer on a loopback port: yields (server, dialstring)."""
    server = SlowServer()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    serve_scope = trio.CancelScope()

    async def run() -> None:
        with serve_scope:
            await trio.serve_listeners(server.serve, listeners)

    nursery.start_soon(run)
    try:
        yield server, f"tcp!127.0.0.1!{port}"
    finally:
        serve_scope.cancel()


async def _open_x(c: Client):
    root = await c.attach()
    f = await root.walk("x")
    await f.open(os.O_RDONLY)
    return f


async def test_concurrent_outstanding_requests(slow):
    server, addr = slow
    server.delay = lambda offset: (40 - offset) * 0.005  # later requests answer first
    async with open_client(addr) as c:
        f = await _open_x(c)
        got: dict[int, bytes] = {}

        async def one(i: int) -> None:
            got[i] = await f.read(i, 100)

        async with trio.open_nursery() as n:
            for i in range(40):
                n.start_soon(one, i)
        assert got == {i: str(i).encode() for i in range(40)}
        assert server.max_in_flight > 20
        tags = [x.tag for x in server.sent(m.Tread)]
        assert len(set(tags)) > 20 and m.NOTAG not in tags


async def test_cancel_sends_tflush_and_waits_for_rflush(slow):
    server, addr = slow
    server.flush_gate = trio.Event()
    async with open_client(addr) as c:
        f = await _open_x(c)
        done = trio.Event()
        scope = trio.CancelScope()
        outcome = []

        async def held_read() -> None:
            with scope:
                await f.read(HOLD, 10)
            outcome.append(scope.cancelled_caught)
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(held_read)
            while not server.sent(m.Tread):
                await trio.sleep(0.01)
            (held,) = server.sent(m.Tread)
            scope.cancel()
            with trio.fail_after(5):
                await server.flush_seen.wait()
            (tflush,) = server.sent(m.Tflush)
            assert tflush.oldtag == held.tag and tflush.tag != held.tag
            # The cancellation waits for Rflush ...
            await trio.sleep(0.1)
            assert not done.is_set()
            # ... and meanwhile new requests get other tags.
            assert await f.read(7, 10) == b"7"
            assert server.sent(m.Tread)[-1].tag not in (held.tag, tflush.tag)
            server.flush_gate.set()
            with trio.fail_after(5):
                await done.wait()
        assert outcome == [True]
        # After Rflush the old tag is free again (lowest free tag first).
        assert await f.read(8, 10) == b"8"
        assert server.sent(m.Tread)[-1].tag == held.tag
        assert not c.closed


async def test_a_scope_around_the_whole_client_cancels_a_blocked_read(slow):
    """The cancellation reaches the request and the client's reader at
    once: the request's shielded wait for Rflush must not outlive the
    reader (it would wait forever)."""
    server, addr = slow
    server.flush_gate = trio.Event()  # Rflush comes late, if ever
    with trio.fail_after(5):
        with trio.move_on_after(0.3) as scope:
            async with open_client(addr) as c:
                f = await _open_x(c)
                await f.read(HOLD, 10)
    assert scope.cancelled_caught
    server.flush_gate.set()


async def test_reply_before_rflush_is_dropped(slow):
    server, addr = slow
    server.late_reply = True
    async with open_client(addr) as c:
        f = await _open_x(c)
        with trio.move_on_after(0.1) as scope:
            await f.read(HOLD, 10)
        assert scope.cancelled_caught
        with trio.fail_after(5):
            await server.rflush_sent.wait()
        assert len(server.sent(m.Tflush)) == 1
        # The late Rread was consumed: the connection is still in step.
        assert await f.read(3, 10) == b"3"
        assert not c.closed


async def test_reply_after_rflush_kills_the_connection(slow):
    server, addr = slow
    server.reply_after_flush = True
    async with open_client(addr) as c:
        f = await _open_x(c)
        with trio.move_on_after(0.1):
            await f.read(HOLD, 10)
        with trio.fail_after(5):
            while not c.closed:
                await trio.sleep(0.01)
        with pytest.raises(FsError) as ei:
            await f.read(0, 10)
        assert ei.value.errno == errno.EIO


async def test_flush_timeout_gives_up_on_a_silent_server(slow):
    server, addr = slow
    server.answer_flush = False
    async with open_client(addr, flush_timeout=0.2) as c:
        f = await _open_x(c)
        with trio.fail_after(5):
            with trio.move_on_after(0.1) as scope:
                await f.read(HOLD, 10)
        assert scope.cancelled_caught and c.closed


async def test_cancelled_walks_give_back_their_fids(slow):
    """flush(5): a Twalk whose Rwalk beat the Rflush made a fid; the client
    clunks it.  A walk flushed without reply made none; its number is reused."""
    server, addr = slow
    async with open_client(addr) as c:
        root = await c.attach()
        with trio.move_on_after(0.1):
            await root.walk("hold")
        (held,) = [w for w in server.sent(m.Twalk) if w.wnames == ("hold",)]
        assert server.sent(m.Tflush)[-1].oldtag == held.tag
        assert not server.sent(m.Tclunk)
        f = await root.walk("x")
        assert f.fid == held.newfid  # never created, so given back
        server.late_reply = True
        with trio.move_on_after(0.1):
            await root.walk("hold")
        held2 = [w for w in server.sent(m.Twalk) if w.wnames == ("hold",)][-1]
        with trio.fail_after(5):
            while not server.sent(m.Tclunk):
                await trio.sleep(0.01)
        assert [x.fid for x in server.sent(m.Tclunk)] == [held2.newfid]
        # Cancelled before anything was sent: the number comes straight back.
        with trio.CancelScope() as scope:
            scope.cancel()
            await root.walk("x")
        g = await root.walk("x")
        assert g.fid not in (root.fid, f.fid)
        assert not c.closed


async def test_version_refusals(slow):
    server, addr = slow
    for reply, msize, word in [
        ("unknown", None, "no version we know"),
        ("9P2000.L", None, "newer"),
        ("9P2000", 1 << 20, "msize"),
        ("9P2000.L", m.MIN_MSIZE - 1, "msize"),
    ]:
        server.version_reply, server.msize_reply = reply, msize
        ask = Dialect.U if word == "newer" else Dialect.L
        with pytest.raises(FsError) as ei:
            async with open_client(addr, version=ask):
                pass
        assert ei.value.errno == errno.EREMOTEIO and word in ei.value.message


async def test_rversion_msize_of_exactly_min_msize_is_accepted(slow):
    server, addr = slow
    server.msize_reply = m.MIN_MSIZE
    async with open_client(addr) as c:
        assert c.msize == m.MIN_MSIZE


# Tlopen/Tlcreate flags are 9P2000.L's P9_DOTL_* values (Linux
# include/net/9p/9p.h), whatever this host's O_* values are.
_WRONLY_TRUNC_NONBLOCK = m.P9_DOTL_WRONLY | m.P9_DOTL_TRUNC | m.P9_DOTL_NONBLOCK
assert _WRONLY_TRUNC_NONBLOCK == 0o1 | 0o1000 | 0o4000


async def test_open_and_create_send_dotl_flags_without_cloexec(slow):
    server, addr = slow
    async with open_client(addr) as c:
        root = await c.attach()
        f = await root.walk("x")
        await f.open(os.O_WRONLY | os.O_TRUNC | os.O_NONBLOCK | os.O_CLOEXEC)
        await root.create("y", os.O_WRONLY | os.O_TRUNC | os.O_NONBLOCK | os.O_CLOEXEC)
    assert [x.flags for x in server.sent(m.Tlopen)] == [_WRONLY_TRUNC_NONBLOCK]
    assert [x.flags for x in server.sent(m.Tlcreate)] == [_WRONLY_TRUNC_NONBLOCK]


async def test_open_translates_another_ports_o_values(slow, monkeypatch):
    # alpha's O_TRUNC is the generic O_APPEND and its O_NONBLOCK 0o4
    # (arch/alpha/include/uapi/asm/fcntl.h): sent raw they would mean
    # something else to the server.
    alpha = dict(O_TRUNC=0o2000, O_NONBLOCK=0o4, O_APPEND=0o10, O_DIRECTORY=0o100000)
    monkeypatch.setattr(m, "_DOTL_OS_PAIRS", m._dotl_os_pairs(SimpleNamespace(**alpha)))
    server, addr = slow
    async with open_client(addr) as c:
        f = await (await c.attach()).walk("x")
        await f.open(os.O_WRONLY | alpha["O_TRUNC"] | alpha["O_NONBLOCK"])
    assert [x.flags for x in server.sent(m.Tlopen)] == [_WRONLY_TRUNC_NONBLOCK]


async def test_body_exceptions_are_not_wrapped(slow):
    _, addr = slow
    with pytest.raises(FsError) as ei:
        async with open_client(addr) as c:
            await (await c.attach()).statfs()  # SlowServer answers ENOSYS
    assert ei.value.errno == errno.ENOSYS


def test_errno_for_ename():
    assert errno_for_ename("file not found") == errno.ENOENT
    assert errno_for_ename("No such file or directory") == errno.ENOENT
    assert errno_for_ename("'/a/b': file does not exist") == errno.ENOENT
    assert errno_for_ename("permission denied") == errno.EACCES
    assert errno_for_ename("File exists") == errno.EEXIST
    assert errno_for_ename("read-only file server") == errno.EROFS
    assert errno_for_ename("walk in non-directory") == errno.ENOTDIR
    assert errno_for_ename("the moon is made of cheese") == errno.EIO
    assert split_path("/a//b/./c/") == ["a", "b", "c"] and split_path("/") == []


# --------------------------------------------------------------------------
# Our own server (ninep.server) in all three dialects
# --------------------------------------------------------------------------

ALL_DIALECTS = pytest.mark.parametrize("dialect", [Dialect.P2000, Dialect.U, Dialect.L], ids=lambda d: d.value)


@pytest.fixture
async def local(tmp_path):
    """ninep.server serving a LocalFS over a populated directory: yields (root path, dialstring)."""
    from ninep.localfs import LocalFS

    from .wire import serving

    root = tmp_path / "root"
    root.mkdir()
    _populate(root)
    fs = LocalFS(root)
    try:
        async with serving(fs, msize=16384 + m.IOHDRSZ) as (_, addr):
            yield root, addr
    finally:
        await fs.close()


@ALL_DIALECTS
async def test_server_roundtrip(local, dialect):
    root_path, addr = local
    async with open_client(addr, version=dialect, msize=65560) as c:
        assert c.dialect is dialect and c.msize == 16384 + m.IOHDRSZ
        assert await c.read_file("hello.txt") == b"hello, world\n"
        big = os.urandom(100_000)  # several Twrites and Treads at this msize
        await c.write_file("sub/big", big)
        assert (root_path / "sub" / "big").read_bytes() == big
        assert await c.read_file("sub/big") == big
        await c.write_file("hello.txt", b"short")
        assert (root_path / "hello.txt").read_bytes() == b"short"
        assert sorted(await c.listdir("/")) == ["hello.txt", "sub"]
        assert sorted(await c.listdir("sub")) == ["big", "inner.txt"]
        a = await c.stat("sub/big")
        st = os.stat(root_path / "sub" / "big")
        assert a.size == len(big) and a.mode == st.st_mode
        assert a.mtime_ns // 1_000_000_000 == int(st.st_mtime)
        if dialect is not Dialect.P2000:
            assert (a.uid, a.gid) == (st.st_uid, st.st_gid)
        qid = await c.mkdir("sub/d", 0o700)
        assert qid.is_dir and stat.S_IMODE(os.stat(root_path / "sub" / "d").st_mode) == 0o700
        with pytest.raises(FsError) as ei:
            await c.mkdir("sub/d")
        assert ei.value.errno == errno.EEXIST
        with pytest.raises(FsError) as ei:
            await c.read_file("sub/none")
        assert ei.value.errno == errno.ENOENT
        with pytest.raises(FsError) as ei:
            await c.remove("sub")
        assert ei.value.errno == errno.ENOTEMPTY
        await c.remove("sub/d")
        assert not (root_path / "sub" / "d").exists()


@ALL_DIALECTS
async def test_server_fid_operations(local, dialect):
    root_path, addr = local
    deep = root_path.joinpath(*["n"] * 18)
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"leaf")
    async with open_client(addr, version=dialect) as c:
        root = await c.attach("root")
        leaf = await root.walk(*["n"] * 18, "leaf")
        await leaf.open()
        assert await leaf.read(0, 100) == b"leaf"
        await leaf.clunk()
        sub = await root.walk("sub")
        f = await sub.create("made", os.O_RDWR, 0o640)
        assert await f.write(0, b"0123456789") == 10
        assert await f.read(2, 3) == b"234"
        await f.setattr(SetAttr(size=4))
        await f.clunk()
        assert (root_path / "sub" / "made").read_bytes() == b"0123"
        g = await sub.walk("made")
        await g.setattr(SetAttr(mode=0o600, mtime_ns=1_000_000_000 * 1_600_000_000))
        st = os.stat(root_path / "sub" / "made")
        assert stat.S_IMODE(st.st_mode) == 0o600 and int(st.st_mtime) == 1_600_000_000
        a = await g.getattr()
        assert a.mode == stat.S_IFREG | 0o600 and a.size == 4
        await g.clunk()
        entries = {e.name: e for e in await sub.readdir()}
        assert set(entries) == {"inner.txt", "made"}
        assert stat.S_ISREG(entries["made"].mode) and entries["made"].qid.path == st.st_ino
        if dialect is Dialect.L:
            sfs = await root.statfs()
            assert sfs.bsize > 0 and sfs.namelen > 0
            await sub.unlinkat("made")
            os.symlink("inner.txt", root_path / "sub" / "ln")
            ln = await sub.walk("ln")
            assert await ln.readlink() == "inner.txt"
        else:
            await sub.unlinkat("made")
        assert not (root_path / "sub" / "made").exists()
        await sub.clunk()
        await root.clunk()


@ALL_DIALECTS
async def test_server_blocking_read_flushed(dialect):
    """A read blocked in the server (MemFS /wait) is flushed by cancelling the
    caller; the server's waiter goes away and the connection stays usable."""
    from ninep.memfs import MemFS

    from .wire import serving

    fs = MemFS()
    async with serving(fs) as (_, addr), open_client(addr, version=dialect) as c:
        w = await (await c.attach()).walk("wait", "k")
        await w.open(os.O_RDONLY)
        with trio.move_on_after(0.2) as scope:
            await w.read(0, 100)
        assert scope.cancelled_caught
        assert fs.waiters == 0 and not c.closed
        got = []

        async def reader() -> None:
            got.append(await c.read_file("wait/k"))

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            with trio.fail_after(5):
                while fs.waiters == 0:
                    await trio.sleep(0.01)
            await c.write_file("wait/k", b"value")
        assert got == [b"value"]


async def test_connect_on_a_given_stream(local):
    root_path, addr = local
    _, host, port = addr.split("!")
    stream = await trio.open_tcp_stream(host, int(port))
    async with Client.connect(stream, version="9P2000.L") as c:
        assert c.dialect is Dialect.L
        with pytest.raises(FsError) as ei:
            await c.listdir("hello.txt")
        assert ei.value.errno == errno.ENOTDIR
        root = await c.attach()
        assert (await root.getattr()).qid.path == os.stat(root_path).st_ino


@ALL_DIALECTS
async def test_server_many_concurrent_clients_and_requests(local, dialect):
    root_path, addr = local
    for i in range(30):
        (root_path / f"f{i}").write_bytes(str(i).encode() * 1000)
    results = {}
    async with open_client(addr, version=dialect) as c1, open_client(addr, version=dialect) as c2:

        async def one(c: Client, i: int) -> None:
            results[i] = await c.read_file(f"f{i}")

        async with trio.open_nursery() as n:
            for i in range(30):
                n.start_soon(one, c1 if i % 2 else c2, i)
    assert results == {i: str(i).encode() * 1000 for i in range(30)}


@ALL_DIALECTS
async def test_a_walk_stopped_short_brings_the_servers_error_back(dialect):
    """walk(5) answers a walk failing after its first name with a short
    Rwalk and no error; the client asks for that name alone, so a server
    that cannot tell now (EAGAIN, as cloudfs during a ZooKeeper outage) is
    not reported as "no such file"."""
    from ninep.memfs import MemFS, MemNode, _Inode

    from .wire import serving

    class Busy(MemNode):
        async def walk(self, name):
            if name == "busy" or (name == "e" and fs.outage):
                raise FsError(errno.EAGAIN, "cannot tell now; try again")
            if name == "x":  # an outage that spreads: from now on d/e cannot be walked either
                fs.outage = True
                raise FsError(errno.EAGAIN, "cannot tell now; try again")
            if name == "vanish":  # its directory goes meanwhile (a process that ended)
                fs.root.children["d"].children.pop("e2", None)
                raise FsError(errno.EAGAIN, "cannot tell now; try again")
            node = await super().walk(name)
            return Busy(node.fs, node.inode) if isinstance(node, MemNode) else node

    class BusyFS(MemFS):
        async def attach(self, uname, aname, n_uname=None):
            return Busy(self, self.root)

    fs = BusyFS()
    fs.outage = False
    fs.root.children["d"] = _Inode(stat.S_IFDIR | 0o777)
    fs.root.children["d"].children["e"] = _Inode(stat.S_IFDIR | 0o777)
    async with serving(fs) as (_, addr), open_client(addr, version=dialect) as c:
        for path, want in [("d/busy", errno.EAGAIN), ("d/e/busy", errno.EAGAIN), ("busy", errno.EAGAIN),
                           ("d/nope", errno.ENOENT), ("d/e/nope/x", errno.ENOENT)]:
            with pytest.raises(FsError) as ei:
                await c.walk(path)
            assert ei.value.errno == want or (  # 9P2000's Rerror carries a message, no errno
                dialect == Dialect.P2000 and want != errno.ENOENT and "cannot tell now" in ei.value.message), path
        with pytest.raises(FsError) as ei:
            await c.read_file("d/e/busy")
        assert ei.value.errno != errno.ENOENT

        # the outage reaches d/e between the walk and the client's probe
        fs.root.children["d"].children["e"].children["x"] = _Inode(stat.S_IFDIR | 0o777)
        with pytest.raises(FsError) as ei:
            await c.walk("d/e/x/y")
        assert ei.value.errno == errno.EAGAIN or dialect == Dialect.P2000, ei.value
        assert ei.value.errno != errno.ENOENT, ei.value
        fs.outage = False
        # the way to the failing name is gone by the time the client asks: that is ENOENT
        fs.root.children["d"].children["e2"] = _Inode(stat.S_IFDIR | 0o777)
        with pytest.raises(FsError) as ei:
            await c.walk("d/e2/vanish/z")
        assert ei.value.errno == errno.ENOENT, ei.value
        await trio.sleep(0.2)  # background clunks of the probes' fids
        f = await c.walk("d/e")  # the fids of the failed walks were given back
        assert f.fid < 10
