"""py9p's client (the Python 3 port PyPI's p9fs ships) against our server.

py9p is a synchronous, one-RPC-at-a-time client written by others; it runs in a
worker thread while our server runs on trio in the test.
"""

from __future__ import annotations

import socket

import pytest
import trio
from py9p import py9p

from ninep.dial import parse_dial
from ninep.memfs import MemFS

from .wire import serving


def _connect(addr: str, version: py9p.Version) -> py9p.Client:
    d = parse_dial(addr)
    sock = socket.create_connection((d.host, d.port))
    return py9p.Client(sock, py9p.Credentials("root"), ver=version, msize=8192)


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _ls(c: py9p.Client) -> list[str]:
    """List the cwd with py9p's own stat decoder.  (py9p's Client.lsdir builds
    its Marshal9P without ``dotu``, so it cannot parse 9P2000.u directory reads
    from any server; we pass the dialect it negotiated.)"""
    c.open("", py9p.OREAD)
    names = []
    try:
        while buf := c.read(c.msize):
            p9 = py9p.Marshal9P(dotu=c.dotu)
            p9.setBuffer(buf)
            p9.buf.seek(0)
            stats: list = []
            p9.decstat(stats, 0)
            names += [_s(st.name) for st in stats]
    finally:
        c.close()
    return sorted(names)


def _session(addr: str, version: py9p.Version) -> dict:
    """A py9p session doing what a user of it would; returns what it saw."""
    c = _connect(addr, version)
    seen = {}
    try:
        c.create("hello.txt", perm=0o644, mode=py9p.OWRITE)
        c.write(b"hello from py9p\n")
        c.close()
        c.open("hello.txt", py9p.OREAD)
        seen["read"] = c.read(4096)
        c.close()
        c._walk(c.ROOT, c.F, [])
        c._create(c.F, "sub", py9p.DMDIR | 0o755, py9p.OREAD)
        c.close()
        seen["ls"] = _ls(c)
        stat = c.stat("hello.txt")[0]
        seen["stat"] = (_s(stat.name), stat.length, bool(stat.mode & py9p.DMDIR))
        seen["dotu_uid"] = getattr(stat, "uidnum", None)
        c.rm("hello.txt")
        seen["ls_after_rm"] = _ls(c)
        try:
            c.open("nonexistent")
        except py9p.RpcError as e:
            seen["error"] = _s(e.args[0])
    finally:
        c._fullclose()
    return seen


@pytest.mark.parametrize("version", [py9p.Version.v9P2000, py9p.Version.v9P2000u])
async def test_py9p_client_session(version):
    fs = MemFS()
    async with serving(fs) as (_, addr):
        seen = await trio.to_thread.run_sync(_session, addr, version)
    assert seen["read"] == b"hello from py9p\n"
    assert seen["ls"] == ["hello.txt", "sub", "wait"]
    assert seen["stat"] == ("hello.txt", 16, False)
    assert seen["ls_after_rm"] == ["sub", "wait"]
    assert "nonexistent" in seen["error"]
    if version is py9p.Version.v9P2000u:
        assert seen["dotu_uid"] == 0


@pytest.mark.parametrize("version", [py9p.Version.v9P2000, py9p.Version.v9P2000u])
async def test_py9p_blocking_read_released_by_a_write_from_another_connection(version):
    fs = MemFS()

    def reader(addr):
        c = _connect(addr, version)
        try:
            c.open("/wait/answer", py9p.OREAD)
            data = c.read(100)
            rest = c.read(100)
            c.close()
            return data, rest
        finally:
            c._fullclose()

    def writer(addr):
        c = _connect(addr, version)
        try:
            c.open("/wait/answer", py9p.OWRITE | py9p.OTRUNC)
            c.write(b"42\n")
            c.close()
        finally:
            c._fullclose()

    async with serving(fs) as (_, addr):
        async with trio.open_nursery() as nursery:
            result = {}

            async def run_reader():
                result["r"] = await trio.to_thread.run_sync(reader, addr)

            nursery.start_soon(run_reader)
            with trio.fail_after(5):
                while fs.waiters == 0:
                    await trio.sleep(0.01)
            assert "r" not in result
            await trio.to_thread.run_sync(writer, addr)
    assert result["r"] == (b"42\n", b"")
    assert fs.waiters == 0


async def test_py9p_dotl_calls():
    """py9p's client also has 9P2000.L calls (Tlopen, Tgetattr, Treaddir)."""
    fs = MemFS()

    def session(addr):
        c = _connect(addr, py9p.Version.v9P2000L)
        try:
            c._walk(c.ROOT, c.F, ["wait"])
            attr = c._getattr(c.F)
            c._lopen(c.F, 0)
            entries = c._readdir(c.F, 0, 4096)
            c.close()
            return attr, entries
        finally:
            c._fullclose()

    fs.set_value("k", b"v")
    async with serving(fs) as (_, addr):
        attr, entries = await trio.to_thread.run_sync(session, addr)
    assert attr.qid.type & py9p.QTDIR
    assert [_s(e.name) for e in entries.stat] == ["k"]
