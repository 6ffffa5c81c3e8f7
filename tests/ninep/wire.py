"""A raw 9P peer for server tests: sends exact frames, reads exact replies.

No client library in between, so tests see precisely what the server put on
the wire (ordering around Tflush, errors, connection closes).
"""

from __future__ import annotations

import contextlib
import math

import trio

from ninep import messages as m
from ninep.codec import FrameReader, decode, encode
from ninep.dial import dial
from ninep.server import Server


class Wire:
    """One TCP connection speaking raw 9P to a server under test."""

    def __init__(self, stream: trio.abc.Stream, dialect: m.Dialect = m.Dialect.L):
        self.stream = stream
        self.dialect = dialect
        self.reader = FrameReader(1 << 24)
        self.queue: list = []

    @classmethod
    async def open(cls, addr: str, dialect: m.Dialect = m.Dialect.L) -> "Wire":
        return cls(await dial(addr), dialect)

    async def send(self, msg) -> None:
        await self.stream.send_all(encode(msg, self.dialect))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self, timeout: float = 5.0):
        """The next reply; raises EOFError when the server closed the connection."""
        with trio.fail_after(timeout):
            while not self.queue:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("server closed the connection")
                self.reader.feed(data)
                self.queue.extend(decode(f, self.dialect) for f in self.reader.frames())
        return self.queue.pop(0)

    async def nothing_for(self, seconds: float) -> None:
        """Assert that no reply arrives within ``seconds``."""
        with trio.move_on_after(seconds):
            reply = await self.recv(timeout=math.inf)
            raise AssertionError(f"unexpected reply {reply!r}")

    async def rpc(self, msg):
        await self.send(msg)
        return await self.recv()

    async def version(self, msize: int = 65560) -> m.Rversion:
        r = await self.rpc(m.Tversion(tag=m.NOTAG, msize=msize, version=self.dialect.value))
        assert r.version == self.dialect.value, r
        return r

    async def attach(self, fid: int = 1, aname: str = "") -> m.Rattach:
        r = await self.rpc(m.Tattach(tag=1, fid=fid, afid=m.NOFID, uname="root", aname=aname, n_uname=0))
        assert isinstance(r, m.Rattach), r
        return r

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (replies are drained)."""
        try:
            while True:
                await self.recv(timeout)
        except EOFError:
            return True

    async def aclose(self) -> None:
        await self.stream.aclose()


@contextlib.asynccontextmanager
async def serving(fs, **kw):
    """Run a Server for ``fs`` on a free loopback port; yields (server, dialstring)."""
    server = Server(fs, **kw)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(server.serve, "tcp!127.0.0.1!0")
        try:
            yield server, addrs[0]
        finally:
            nursery.cancel_scope.cancel()
