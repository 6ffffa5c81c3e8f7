"""The 9P-level attacks of the issue "A guest cannot exhaust the host",
replayed against ``cloudfs up``'s public face by an anonymous client: reply
backpressure bypassed with pipelined reads, fid and tag floods, a huge frame
before Tversion, a connection flood from one address, and descriptors
running out.  A canary (from another loopback address where it matters)
reads /proc/1/status throughout; the daemon's memory and descriptors stay
bounded.  ninep's own tests (tests/ninep/test_limits.py) prove each bound
in detail with short timeouts."""

from __future__ import annotations

import errno
import resource
import socket
import struct

import trio

from ninep import messages as m
from ninep.client import open_client
from ninep.codec import encode
from ninep.errors import FsError
from tests.security.conftest import Canary

L = m.Dialect.L


async def _raw(daemon) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", daemon.port)


async def _from(address: str, daemon) -> trio.SocketStream:
    """A TCP connection to the daemon from loopback ``address``."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((address, 0))
    await sock.connect(("127.0.0.1", daemon.port))
    return trio.SocketStream(sock)


class OtherPeerCanary(Canary):
    """The canary, connecting from 127.0.0.2 (another peer address)."""

    def __init__(self, daemon):
        super().__init__(daemon.tcp)
        self.daemon = daemon

    async def target(self) -> trio.abc.Stream:
        return await _from("127.0.0.2", self.daemon)


def _open_frames(path: list[str], fid: int = 2) -> bytes:
    return b"".join([
        encode(m.Tversion(tag=m.NOTAG, msize=128 * 1024 + 24, version="9P2000.L"), L),
        encode(m.Tattach(tag=0, fid=1, afid=m.NOFID, uname="x", aname="", n_uname=0), L),
        encode(m.Twalk(tag=1, fid=1, newfid=fid, wnames=path), L),
        encode(m.Tlopen(tag=2, fid=fid, flags=0), L),
    ])


async def test_2_pipelined_reads_of_a_large_value_never_read(daemon):
    """2000 Treads of a 256 KiB env value in one burst, replies never read:
    the daemon holds its reply budget, not 465 MiB."""
    async with open_client(daemon.operator) as op:
        await op.write_file("proc/1/env/big", b"x" * (256 * 1024))
    rss = daemon.rss()
    canary = OtherPeerCanary(daemon)
    async with trio.open_nursery() as n:
        await n.start(canary.run)
        s = await _raw(daemon)
        burst = _open_frames(["proc", "1", "env", "big"]) + b"".join(
            encode(m.Tread(tag=10 + i, fid=2, offset=0, count=256 * 1024), L) for i in range(2000))
        with trio.move_on_after(10):
            await s.send_all(burst)  # stops when the server stops reading
        await trio.sleep(3)
        grown = daemon.rss() - rss
        n.cancel_scope.cancel()
    await s.aclose()
    canary.check()
    assert grown < 48 << 20, f"the daemon grew by {grown >> 20} MiB"
    assert not daemon.tracebacks()


async def test_6_fid_and_tag_floods_are_refused(daemon):
    async with open_client(daemon.tcp) as c:
        root = await c.root()
        clones, refused = [], 0
        for _ in range(4200):
            try:
                clones.append(await root.walk())
            except FsError as e:
                assert e.errno == errno.EMFILE, e
                refused += 1
        assert len(clones) < 4096 and refused > 100
    # tags: 300 blocked reads on one connection; 256 stay outstanding, the
    # rest (or their walk or open) are refused at once
    s = await _raw(daemon)
    replies: dict[int, tuple[int, int | None]] = {}
    buf = b""

    async def collect(until) -> None:
        nonlocal buf
        with trio.move_on_after(10):
            while not until():
                data = await s.receive_some(65536)
                if not data:
                    break
                buf += data
                while len(buf) >= 7 and len(buf) >= struct.unpack_from("<I", buf)[0]:
                    size = struct.unpack_from("<I", buf)[0]
                    replies[struct.unpack_from("<H", buf, 5)[0]] = \
                        (buf[4], struct.unpack_from("<I", buf, 7)[0] if buf[4] == m.Rlerror.TYPE else None)
                    buf = buf[size:]

    await s.send_all(encode(m.Tversion(tag=m.NOTAG, msize=65560, version="9P2000.L"), L)
                     + encode(m.Tattach(tag=0, fid=1, afid=m.NOFID, uname="x", aname="", n_uname=0), L))
    for first in range(0, 300, 50):  # walks, then opens, 50 at a time (each must follow the previous reply)
        batch = range(first, first + 50)
        for tag0, make in ((10000, lambda i: m.Twalk(tag=10000 + i, fid=1, newfid=100 + i,
                                                     wnames=["proc", "1", "env", f"never{i}"])),
                           (20000, lambda i: m.Tlopen(tag=20000 + i, fid=100 + i, flags=0))):
            await s.send_all(b"".join(encode(make(i), L) for i in batch))
            await collect(lambda: all(tag0 + i in replies for i in batch))
    assert all(replies[20000 + i][0] == m.Rlopen.TYPE for i in range(300))
    await s.send_all(b"".join(encode(m.Tread(tag=1000 + i, fid=100 + i, offset=0, count=8192), L)
                              for i in range(300)))
    await collect(lambda: False)  # a few seconds of whatever comes back
    await s.aclose()
    reads = {t: r for t, r in replies.items() if 1000 <= t < 1300}
    assert 300 - len(reads) == 256, (len(reads), sorted(reads.items())[:5])  # blocked, outstanding
    assert set(reads.values()) == {(m.Rlerror.TYPE, errno.EAGAIN)}
    assert not daemon.tracebacks()


async def test_6_a_huge_frame_before_tversion_closes_the_connection(daemon):
    s = await _raw(daemon)
    await s.send_all(struct.pack("<IBH", 512 * 1024, m.Tversion.TYPE, m.NOTAG) + b"\0" * 4096)
    with trio.fail_after(5):
        assert await s.receive_some(100) == b""
    await s.aclose()


async def test_6_connections_from_one_address_are_capped(daemon):
    fds = daemon.fds()
    canary = OtherPeerCanary(daemon)
    conns = []
    async with trio.open_nursery() as n:
        await n.start(canary.run)
        for _ in range(300):
            conns.append(await _raw(daemon))
        await trio.sleep(1)
        alive = 0
        for s in conns:  # a refused one is closed by the daemon at once
            try:
                with trio.move_on_after(0.05):
                    if await s.receive_some(1) == b"":
                        continue
                alive += 1
            except trio.BrokenResourceError:
                continue
        assert alive == 256, alive
        assert daemon.fds() <= fds + 256 + 16
        n.cancel_scope.cancel()
    for s in conns:
        await s.aclose()
    canary.check()
    assert not daemon.tracebacks()


async def test_6_running_out_of_descriptors(daemon):
    """The daemon's descriptor limit lowered to just above what it uses:
    new connections fail (it logs that briefly), an old one keeps being
    served (ZooKeeper answers through it), and once descriptors are free
    again new ones work."""
    old = resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE)
    async with open_client(daemon.tcp) as kept:
        await kept.read_file("proc/1/children")
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE, (daemon.fds() + 2, old[1]))
        try:
            flood = []
            for _ in range(40):
                try:
                    flood.append(await _raw(daemon))
                except OSError:
                    pass
            await trio.sleep(1)
            for _ in range(5):
                assert await kept.read_file("proc/1/children") == b""  # a ZooKeeper read each time
                await trio.sleep(0.2)
            for s in flood:
                await s.aclose()
        finally:
            resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE, old)
    await trio.sleep(0.5)
    async with open_client(daemon.tcp) as c:
        assert (await c.read_file("proc/1/status")).startswith(b"pid 1\n")
    log = daemon.log.read_text()
    assert daemon.alive() and "Session has expired" not in log and not daemon.tracebacks()
    assert 0 < log.count("accept failed") < 20  # it did run out, and said so briefly
