"""A guest cannot exhaust the host: every resource a 9P client can make the
server hold has a bound (ninep.limits.Limits), with a clean error where the
protocol has one (intro(5), flush(5), version(5)) and a logged close where it
has not."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from ninep import messages as m
from ninep.codec import encode
from ninep.errors import FsError
from ninep.fs import Attr, FileSystem, Node, OpenFile
from ninep.limits import SMALL_REPLY, Limits
from ninep.memfs import MemFS
from ninep.qid import QTDIR, QTFILE, Qid
from ninep.server import DEFAULT_MSIZE, Server

from .wire import Wire, serving

L, U, P = m.Dialect.L, m.Dialect.U, m.Dialect.P2000


@pytest.fixture
async def memfs():
    return MemFS()


async def _refused(w: Wire) -> bool:
    """True when the server closes a new connection at once (with a FIN, or
    with a RST when our Tversion was still unread)."""
    try:
        await w.send(m.Tversion(tag=m.NOTAG, msize=8192, version="9P2000.L"))
        return await w.closed()
    except trio.BrokenResourceError:
        return True


def _conn(server: Server):
    (conn,) = server.connections
    return conn


async def _session(addr: str, dialect=L, msize: int = 65560) -> Wire:
    w = await Wire.open(addr, dialect)
    await w.version(msize=msize)
    await w.attach()
    return w


async def _walk(w: Wire, fid: int, newfid: int, *names: str, tag: int = 2):
    return await w.rpc(m.Twalk(tag=tag, fid=fid, newfid=newfid, wnames=tuple(names)))


# -- Limits itself -----------------------------------------------------------------


def test_limits_defaults_and_validation():
    lim = Limits()
    assert (lim.max_fids, lim.max_outstanding, lim.max_queued_msizes) == (4096, 64, 8)
    assert (lim.pre_version_frame, lim.frame_timeout, lim.attach_timeout) == (8192, 30.0, 60.0)
    assert (lim.max_connections, lim.max_connections_per_peer) == (1024, 64)
    assert Server(MemFS()).limits == lim
    with pytest.raises(Exception):
        lim.max_fids = 1  # frozen
    for bad in ({"max_fids": 0}, {"max_outstanding": -1}, {"frame_timeout": 0}, {"max_connections": 1.5},
                {"pre_version_frame": 10}):
        with pytest.raises(ValueError):
            Limits(**bad)
    # the documented worst case, as a function of msize
    msize = DEFAULT_MSIZE
    assert lim.worst_case_bytes(msize) == (8 * msize + 65 * SMALL_REPLY + 64 * 7) + 64 * msize + msize + 68 * 1024
    assert lim.worst_case_bytes(msize) < 40 << 20


_SIZED_BY_REQUEST = {"Rread", "Rreaddir", "Rstat", "Rreadlink", "Rgetlock", "Rversion", "Rerror"}
_KIND_SIZE = {"u8": 1, "u16": 2, "u32": 4, "u64": 8, "qid": 13}


def test_every_other_reply_fits_small_reply():
    """SMALL_REPLY bounds every reply whose size does not depend on its
    request (the server reserves no more for those), and Rerror with the
    longest ename the server sends."""
    from ninep.codec import _wire_fields
    from ninep.limits import MAX_ENAME

    for cls in m.MESSAGE_TYPES.values():
        if not cls.__name__.startswith("R") or cls.__name__ in _SIZED_BY_REQUEST:
            continue
        for dialect in m.Dialect:
            size = m.HEADER_SIZE
            for name, kind in _wire_fields(cls, dialect):
                if kind == "qids":
                    size += 2 + 13 * m.MAXWELEM
                else:
                    size += _KIND_SIZE[kind]  # KeyError: a variable field nobody bounded
            assert size <= SMALL_REPLY, (cls.__name__, dialect, size)
    longest = m.Rerror(tag=1, ename="x" * MAX_ENAME, errno=1)
    assert len(encode(longest, U)) <= SMALL_REPLY


# -- fids --------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", [L, U, P])
async def test_max_fids_refuses_new_fids_and_changes_nothing(memfs, dialect):
    async with serving(memfs, limits=Limits(max_fids=8)) as (server, addr):
        w = await _session(addr, dialect)
        conn = _conn(server)
        for newfid in range(2, 9):
            assert isinstance(await _walk(w, 1, newfid), m.Rwalk)
        assert len(conn.fids) == 8
        refused = [
            m.Twalk(tag=3, fid=1, newfid=9, wnames=()),
            m.Tattach(tag=3, fid=9, afid=m.NOFID, uname="u", aname="", n_uname=0),
        ]
        if dialect is L:
            refused.append(m.Txattrwalk(tag=3, fid=1, newfid=9, name="user.x"))
        for msg in refused:
            r = await w.rpc(msg)
            if dialect is L:
                assert r == m.Rlerror(tag=3, ecode=errno.EMFILE), msg
            else:
                assert isinstance(r, m.Rerror) and r.ename == "too many fids", (msg, r)
                assert r.errno == (errno.EMFILE if dialect is U else 0)
        assert len(conn.fids) == 8 and 9 not in conn.fids
        # a walk onto the same fid holds no new fid: still allowed at the cap
        assert isinstance(await _walk(w, 2, 2), m.Rwalk)
        # a clunk frees a slot
        assert isinstance(await w.rpc(m.Tclunk(tag=4, fid=8)), (m.Rclunk,))
        assert isinstance(await _walk(w, 1, 9), m.Rwalk)


async def test_twenty_thousand_clones_are_not_kept(memfs):
    async with serving(memfs) as (server, addr):
        w = await _session(addr)
        conn = _conn(server)
        n = 20000
        # ~340 KB of requests sent before any reply is read: the server must
        # read on while its refusals wait in its queue (the reply budget is
        # 512 KB), even when the worker that read them blocks sending.
        with trio.fail_after(30):
            await w.send_raw(b"".join(encode(m.Twalk(tag=i % 50000, fid=1, newfid=i + 2, wnames=()), L)
                                      for i in range(n)))
        errors = 0
        for _ in range(n):
            r = await w.recv(timeout=20)
            if isinstance(r, m.Rlerror):
                assert r.ecode == errno.EMFILE
                errors += 1
        assert len(conn.fids) == server.limits.max_fids
        assert errors == n + 1 - server.limits.max_fids


# -- outstanding requests and Tflush --------------------------------------------


async def _open_wait(w: Wire, fid: int, name: str) -> None:
    assert isinstance(await _walk(w, 1, fid, "wait", name), m.Rwalk)
    assert isinstance(await w.rpc(m.Tlopen(tag=1, fid=fid, flags=0)), m.Rlopen)


@pytest.mark.parametrize("dialect", [L, U])
async def test_max_outstanding_answers_eagain_at_once_and_tflush_still_works(memfs, dialect):
    async with serving(memfs, limits=Limits(max_outstanding=4)) as (server, addr):
        w = await _session(addr, dialect)
        conn = _conn(server)
        if dialect is L:
            for i in range(4):
                await _open_wait(w, 10 + i, f"k{i}")
        else:
            for i in range(4):
                assert isinstance(await _walk(w, 1, 10 + i, "wait", f"k{i}"), m.Rwalk)
                assert isinstance(await w.rpc(m.Topen(tag=1, fid=10 + i, mode=m.OREAD)), m.Ropen)
        for i in range(4):
            await w.send(m.Tread(tag=100 + i, fid=10 + i, offset=0, count=100))
        await w.nothing_for(0.1)
        assert conn.outstanding == 4 and memfs.waiters == 4
        # a fifth request is answered at once, without reaching file code
        getattr_or_stat = (m.Tgetattr(tag=7, fid=1, request_mask=m.P9_GETATTR_BASIC) if dialect is L
                           else m.Tstat(tag=7, fid=1))
        r = await w.rpc(getattr_or_stat)
        if dialect is L:
            assert r == m.Rlerror(tag=7, ecode=errno.EAGAIN)
        else:
            assert isinstance(r, m.Rerror) and r.errno == errno.EAGAIN
            assert r.ename == "too many outstanding requests"
        r = await w.rpc(m.Tread(tag=8, fid=10, offset=0, count=100))
        assert getattr(r, "ecode", getattr(r, "errno", None)) == errno.EAGAIN
        assert memfs.waiters == 4 and conn.outstanding == 4
        # Tflush is always handled, and frees a slot
        assert await w.rpc(m.Tflush(tag=9, oldtag=100)) == m.Rflush(tag=9)
        assert conn.outstanding == 3 and memfs.waiters == 3
        r = await w.rpc(getattr_or_stat)
        assert isinstance(r, m.Rgetattr if dialect is L else m.Rstat)
        memfs.set_value("k1", b"one")
        assert await w.recv() == m.Rread(tag=101, data=b"one")
        for tag in (102, 103):
            assert await w.rpc(m.Tflush(tag=9, oldtag=tag)) == m.Rflush(tag=9)
        assert conn.outstanding == 0 and conn.pending == {}


async def test_many_tflush_of_one_blocked_read_are_all_answered(memfs):
    async with serving(memfs, limits=Limits(max_outstanding=4)) as (server, addr):
        w = await _session(addr)
        await _open_wait(w, 2, "x")
        await w.send(m.Tread(tag=1, fid=2, offset=0, count=10))
        await w.nothing_for(0.05)
        await w.send_raw(b"".join(encode(m.Tflush(tag=100 + i, oldtag=1), L) for i in range(50)))
        got = [await w.recv() for _ in range(50)]
        assert sorted(got, key=lambda r: r.tag) == [m.Rflush(tag=100 + i) for i in range(50)]
        assert _conn(server).pending == {} and memfs.waiters == 0


# -- reply bytes: the pipelined-read attack ------------------------------------------


FILE_SIZE = 256 * 1024


class _YieldingFile(OpenFile):
    def __init__(self, fs: "YieldingFS"):
        super().__init__(os.O_RDONLY)
        self.fs = fs

    async def read(self, offset: int, count: int) -> bytes:
        fs = self.fs
        fs.reading += 1
        fs.reads += 1
        fs.peak_reading = max(fs.peak_reading, fs.reading)
        try:
            await trio.sleep(0)  # yields in file code: every read is in flight at once unless bounded
            return bytes(min(count, max(0, FILE_SIZE - offset)))
        finally:
            fs.reading -= 1


class _YieldingNode(Node):
    def __init__(self, fs: "YieldingFS", is_dir: bool):
        self.fs, self.is_dir = fs, is_dir

    def qid(self) -> Qid:
        return Qid(QTDIR, 0, 1) if self.is_dir else Qid(QTFILE, 0, 2)

    async def getattr(self) -> Attr:
        return Attr(qid=self.qid(), mode=(stat.S_IFDIR | 0o755) if self.is_dir else (stat.S_IFREG | 0o644),
                    size=0 if self.is_dir else FILE_SIZE)

    async def walk(self, name: str) -> Node:
        if self.is_dir and name == "big":
            return _YieldingNode(self.fs, False)
        raise FsError(errno.ENOENT)

    async def open(self, flags: int) -> OpenFile:
        return _YieldingFile(self.fs)


class YieldingFS(FileSystem):
    """One 256 KiB file, ``/big``, whose reads yield to trio before answering."""

    def __init__(self):
        self.reading = self.peak_reading = self.reads = 0

    async def attach(self, uname, aname, n_uname=None) -> Node:
        return _YieldingNode(self, True)


async def test_pipelined_reads_whose_replies_are_never_read_stay_within_the_reply_budget():
    """2000 pipelined Treads of a 256 KiB file by a client that never reads
    its replies: today's server held ~465 MiB; the queued replies plus the
    reservations of running reads stay within B = 8 × msize (plus small
    replies), at most max_outstanding requests are outstanding, and reads run
    in file code only while their reply fits the budget."""
    fs = YieldingFS()
    limits = Limits()
    n = 2000
    async with serving(fs, limits=limits) as (server, addr):
        w = Wire(await _raw_tcp(addr))
        msize = (await w.version(msize=DEFAULT_MSIZE)).msize
        assert msize == DEFAULT_MSIZE
        await w.attach()
        assert isinstance(await _walk(w, 1, 2, "big"), m.Rwalk)
        assert isinstance(await w.rpc(m.Tlopen(tag=1, fid=2, flags=0)), m.Rlopen)
        conn = _conn(server)
        budget = limits.reply_budget(msize)
        bound = budget + (limits.max_outstanding + 1) * SMALL_REPLY + limits.max_outstanding * 7
        frames = b"".join(encode(m.Tread(tag=i, fid=2, offset=0, count=FILE_SIZE), L) for i in range(n))
        peak_held = peak_running = peak_outstanding = peak_buffered = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.send_raw, frames)  # blocks once the socket buffers are full
            deadline = trio.current_time() + 1.5
            while trio.current_time() < deadline:
                await trio.sleep(0)
                peak_held = max(peak_held, conn.reply_bytes_held)
                peak_running = max(peak_running, conn.running)
                peak_outstanding = max(peak_outstanding, conn.outstanding)
                peak_buffered = max(peak_buffered, len(conn._frames))
            nursery.cancel_scope.cancel()
        assert peak_held <= bound, (peak_held, bound)
        assert peak_outstanding <= limits.max_outstanding
        assert peak_running <= limits.max_outstanding
        # reads in file code at once: only those whose 256 KiB reply fits the budget
        assert 1 <= fs.peak_reading <= budget // (FILE_SIZE + 11) + 1, fs.peak_reading
        assert peak_buffered <= msize + 65536
        assert conn.requests_seen <= n + 4
        # the replies that were produced are well formed and in budget
        for _ in range(40):
            r = await w.recv(timeout=10)
            assert (isinstance(r, m.Rread) and len(r.data) == FILE_SIZE) or r.ecode == errno.EAGAIN, r
        await w.aclose()
        with trio.fail_after(10):
            while server.connections:
                await trio.sleep(0.01)
        assert fs.reading == 0


async def _raw_tcp(addr: str) -> trio.SocketStream:
    _, host, port = addr.split("!")
    return await trio.open_tcp_stream(host, int(port))


async def test_a_slow_reader_gets_every_reply_in_the_end():
    """The same pipeline, smaller, read at the end: nothing is lost, each tag
    gets exactly one reply (an Rread or, beyond max_outstanding, EAGAIN)."""
    fs = YieldingFS()
    n = 300
    async with serving(fs, limits=Limits(max_queued_msizes=2)) as (server, addr):
        w = await _session(addr, msize=65560)
        assert isinstance(await _walk(w, 1, 2, "big"), m.Rwalk)
        assert isinstance(await w.rpc(m.Tlopen(tag=1, fid=2, flags=0)), m.Rlopen)
        frames = b"".join(encode(m.Tread(tag=i, fid=2, offset=0, count=65536), L) for i in range(n))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.send_raw, frames)
            await trio.sleep(0.3)
            tags = set()
            reads = 0
            for _ in range(n):
                r = await w.recv(timeout=10)
                assert r.tag not in tags
                tags.add(r.tag)
                if isinstance(r, m.Rread):
                    assert len(r.data) == 65536 - 24 or len(r.data) == 65536  # capped at iounit
                    reads += 1
                else:
                    assert r.ecode == errno.EAGAIN
        assert tags == set(range(n)) and reads > 0
        assert fs.peak_reading <= 2 * 65560 // (65536 - 24 + 11) + 1


# -- framing: before Tversion, slowloris ---------------------------------------------


async def test_frames_before_tversion_are_small(memfs, caplog):
    async with serving(memfs) as (_, addr):
        w = await Wire.open(addr)
        await w.send_raw((512 * 1024).to_bytes(4, "little") + bytes([m.Tversion.TYPE]) + b"\xff\xff")
        assert await w.closed()
        # after Tversion a frame up to msize is fine
        w = await _session(addr, msize=1 << 20)
        data = b"x" * 400_000
        await w.rpc(m.Tlcreate(tag=1, fid=1, name="f", flags=m.P9_DOTL_WRONLY, mode=0o644, gid=0))
        assert (await w.rpc(m.Twrite(tag=1, fid=1, offset=0, data=data))).count == len(data)
    assert any("exceeds the limit 8192" in r.getMessage() for r in caplog.records)


async def test_a_partial_frame_must_arrive_within_frame_timeout(memfs, caplog):
    caplog.set_level(logging.INFO, logger="ninep.server")
    async with serving(memfs, limits=Limits(frame_timeout=0.5)) as (server, addr):
        w = await _session(addr)
        frame = encode(m.Tgetattr(tag=1, fid=1, request_mask=m.P9_GETATTR_BASIC), L)
        # a frame sent slowly but within the deadline is fine
        for b in (frame[:3], frame[3:9], frame[9:]):
            await w.send_raw(b)
            await trio.sleep(0.05)
        assert isinstance(await w.recv(), m.Rgetattr)
        t0 = trio.current_time()
        await w.send_raw(frame[:5])
        assert await w.closed(timeout=5)
        assert 0.45 <= trio.current_time() - t0 < 3
        with trio.fail_after(5):
            while server.connections:
                await trio.sleep(0.01)
    assert any("partial frame" in r.getMessage() for r in caplog.records)


async def test_a_frame_cut_by_eof_closes_at_once_and_large_frames_arrive_whole(memfs, caplog):
    caplog.set_level(logging.INFO, logger="ninep.server")
    async with serving(memfs, limits=Limits(frame_timeout=30)) as (server, addr):
        # a Twrite several reads long, sent in one piece and in pieces
        w = await _session(addr, msize=1 << 20)
        await w.rpc(m.Tlcreate(tag=1, fid=1, name="f", flags=m.P9_DOTL_RDWR, mode=0o644, gid=0))
        data = bytes(range(256)) * 1000
        frame = encode(m.Twrite(tag=1, fid=1, offset=0, data=data), L)
        await w.send_raw(frame)
        assert (await w.recv()).count == len(data)
        await w.send_raw(frame[:100_000])
        await trio.sleep(0.05)
        await w.send_raw(frame[100_000:])
        assert (await w.recv()).count == len(data)
        assert (await w.rpc(m.Tread(tag=1, fid=1, offset=0, count=len(data)))).data == data
        # the peer hangs up in the middle of a frame: closed now, not at frame_timeout
        await w.send_raw(frame[:70_000])
        await w.stream.send_eof()
        t0 = trio.current_time()
        assert await w.closed(timeout=5)
        assert trio.current_time() - t0 < 3
        with trio.fail_after(5):
            while server.connections:
                await trio.sleep(0.01)


#: A peer that keeps its socket full: Tversion, Tattach, a file made, then
#: Twrites of 1000 bytes (frames of 1,023 bytes: reads of READ_SIZE end
#: between two frames once in 1,023) as fast as the kernel takes them, tag
#: 1 each time (each is answered before the next is read), its replies read
#: and dropped by a thread; for 15 s.
FLOOD = r"""
import socket, sys, threading, time
sys.path.insert(0, sys.argv[2])
from ninep import messages as m
from ninep.codec import encode
L = m.Dialect.L
host, port = sys.argv[1].split("!")[1:]
s = socket.create_connection((host, int(port)))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for msg in (m.Tversion(tag=m.NOTAG, msize=65560 + 4096, version="9P2000.L"),
            m.Tattach(tag=1, fid=0, afid=m.NOFID, uname="u", aname="", n_uname=0),
            m.Twalk(tag=1, fid=0, newfid=1, wnames=()),
            m.Tlcreate(tag=1, fid=1, name="flood", flags=m.P9_DOTL_RDWR, mode=0o644, gid=0)):
    s.sendall(encode(msg, L))
    s.recv(65536)
threading.Thread(target=lambda: [None for _ in iter(lambda: s.recv(1 << 20), b"")], daemon=True).start()
batch = encode(m.Twrite(tag=1, fid=1, offset=0, data=b"f" * 1000), L) * 1024
print("flooding", flush=True)
end = time.monotonic() + 15
while time.monotonic() < end:
    s.sendall(batch)
"""


async def test_a_peer_that_keeps_its_socket_full_does_not_hold_the_server(memfs, monkeypatch):
    """Frames that are always there to read never make the connection
    wait; it still yields to the event loop (STEPS_BEFORE_YIELD), so other
    connections are served meanwhile.  (Writes take 100 µs of file code
    that never yields here, so that the peer outruns the server.)"""
    from ninep import memfs as memfs_module

    write = memfs_module._MemFile.write

    async def slow_write(self, offset, data):
        time.sleep(0.0001)
        return await write(self, offset, data)

    monkeypatch.setattr(memfs_module._MemFile, "write", slow_write)
    async with serving(memfs) as (server, addr):
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, addr, str(Path(__file__).resolve().parents[2])],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert await trio.to_thread.run_sync(flood.stdout.readline) == "flooding\n"
            await trio.sleep(0.5)
            [flooder] = server.connections
            before = flooder.requests_seen
            for _ in range(5):
                t0 = trio.current_time()
                w = await _session(addr)
                r = await w.rpc(m.Tgetattr(tag=1, fid=1, request_mask=m.P9_GETATTR_BASIC))
                assert isinstance(r, m.Rgetattr)
                assert trio.current_time() - t0 < 2.0
                await w.aclose()
            assert flood.poll() is None and flooder.requests_seen - before > 1000  # flooding all along
        finally:
            flood.kill()
            flood.wait()


async def test_connections_that_never_attach_are_closed(memfs, caplog):
    async with serving(memfs, limits=Limits(attach_timeout=0.3)) as (server, addr):
        idle = await Wire.open(addr)  # says nothing at all
        versioned = await Wire.open(addr)
        await versioned.version()
        attached = await _session(addr)
        t0 = trio.current_time()
        assert await idle.closed(timeout=5)
        assert await versioned.closed(timeout=5)
        assert trio.current_time() - t0 < 3
        await trio.sleep(0.3)
        assert isinstance(await _walk(attached, 1, 2), m.Rwalk)
        assert len(server.connections) == 1
    assert any("Tattach" in r.getMessage() for r in caplog.records)


# -- connections -------------------------------------------------------------------


async def _connect_from(addr: str, source: str) -> trio.SocketStream:
    _, host, port = addr.split("!")
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect((host, int(port)))
    return trio.SocketStream(sock)


async def test_max_connections_closes_the_excess_and_serves_the_rest(memfs, caplog):
    async with serving(memfs, limits=Limits(max_connections=3)) as (server, addr):
        kept = [await _session(addr) for _ in range(3)]
        for _ in range(5):
            assert await _refused(await Wire.open(addr))
        for w in kept:
            assert isinstance(await _walk(w, 1, 2), m.Rwalk)
        await kept.pop().aclose()
        with trio.fail_after(5):
            while len(server.connections) > 2:
                await trio.sleep(0.01)
        again = await _session(addr)
        assert isinstance(await _walk(again, 1, 2), m.Rwalk)
    assert any("max_connections" in r.getMessage() for r in caplog.records)


async def test_max_connections_per_peer_counts_by_ip(memfs):
    async with serving(memfs, limits=Limits(max_connections_per_peer=2)) as (server, addr):
        a = [Wire(await _connect_from(addr, "127.0.0.1")) for _ in range(2)]
        for w in a:
            await w.version()
            await w.attach()
        assert await _refused(Wire(await _connect_from(addr, "127.0.0.1")))
        other = Wire(await _connect_from(addr, "127.0.0.2"))  # another peer address
        await other.version()
        await other.attach()
        for w in a + [other]:
            assert isinstance(await _walk(w, 1, 2), m.Rwalk)


async def test_unix_socket_peers_are_not_counted_per_peer(memfs, tmp_path):
    server = Server(memfs, limits=Limits(max_connections_per_peer=1, max_connections=3))
    path = tmp_path / "9p.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, f"unix!{path}")
        ws = []
        for _ in range(3):
            w = await Wire.open(f"unix!{path}")
            await w.version()
            await w.attach()
            ws.append(w)
        assert await _refused(await Wire.open(f"unix!{path}"))  # the server-wide cap still holds
        nursery.cancel_scope.cancel()


_SERVE_WITH_FEW_FDS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[1])))
from ninep.__main__ import main
sys.exit(main(["serve", "--listen", "tcp!127.0.0.1!0", "--root", sys.argv[2]]))
"""


def _wait_for_line(proc: subprocess.Popen, needle: str, lines: list[str], timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} in server output: {''.join(lines)}")


def _rpc_blocking(sock: socket.socket, msg, timeout: float = 10.0):
    from ninep.codec import FrameReader, decode

    sock.settimeout(timeout)
    sock.sendall(encode(msg, L))
    reader = FrameReader(1 << 24)
    while True:
        data = sock.recv(65536)
        if not data:
            raise EOFError
        reader.feed(data)
        for f in reader.frames():
            return decode(f, L)


def test_server_survives_running_out_of_file_descriptors(tmp_path):
    """``python -m ninep serve`` with RLIMIT_NOFILE lowered: a flood of
    connections exhausts its descriptors; the accept loop backs off and logs
    (rate-limited), the attached client keeps being served, and once the
    flood is gone new clients are accepted again."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"hello")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", _SERVE_WITH_FEW_FDS, "48", str(root)], cwd=repo,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    lines: list[str] = []
    flood: list[socket.socket] = []
    try:
        line = _wait_for_line(proc, "listening on tcp!", lines, 30)
        port = int(line.rsplit("!", 1)[1])

        def session() -> socket.socket:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            assert _rpc_blocking(s, m.Tversion(tag=m.NOTAG, msize=65560, version="9P2000.L")).msize == 65560
            assert isinstance(_rpc_blocking(s, m.Tattach(tag=1, fid=1, afid=m.NOFID, uname="u", aname="",
                                                         n_uname=0)), m.Rattach)
            return s

        a = session()
        for _ in range(80):
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(1.0)
        # the attached client is still served (its walk may meet EMFILE in file code)
        r = _rpc_blocking(a, m.Twalk(tag=2, fid=1, newfid=2, wnames=("f",)))
        assert isinstance(r, m.Rwalk) or r == m.Rlerror(tag=2, ecode=errno.EMFILE), r
        for s in flood:
            s.close()
        flood.clear()
        time.sleep(1.0)
        r = _rpc_blocking(a, m.Twalk(tag=2, fid=1, newfid=3, wnames=("f",)))
        assert isinstance(r, m.Rwalk), r
        b = session()  # accepted again
        assert isinstance(_rpc_blocking(b, m.Tgetattr(tag=1, fid=1, request_mask=m.P9_GETATTR_BASIC)), m.Rgetattr)
        a.close()
        b.close()
        assert proc.poll() is None
    finally:
        for s in flood:
            s.close()
        proc.terminate()
        try:
            _, rest = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, rest = proc.communicate()
        lines.append(rest)
    out = "".join(lines)
    assert "accept failed" in out
    assert "Traceback" not in out
    assert out.count("accept failed") < 5  # rate-limited, not one line per retry
