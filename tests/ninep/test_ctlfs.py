"""CtlFS through the ninep.fs interface: the files diod's tools use."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest
import trio

from ninep.ctlfs import CTL_QID_BASE, VERSION, CtlFS
from ninep.errors import FsError
from ninep.fs import SetAttr
from ninep.qid import QTDIR, QTFILE

DIOD_FILES = {"version", "date", "zero", "zero100", "null", "null100", "meminfo", "net.rpc.nfs", "exports"}


async def test_listing_and_attrs():
    fs = CtlFS(exports=["/srv/x", "ctl"])
    root = await fs.attach("nobody", "ctl", 65534)
    assert root.qid().type == QTDIR and root.qid().path == CTL_QID_BASE
    a = await root.getattr()
    assert stat.S_ISDIR(a.mode) and stat.S_IMODE(a.mode) == 0o555 and a.nlink == 1
    d = await root.open(os.O_RDONLY | os.O_DIRECTORY)
    ents = await d.readdir()
    assert {e.name for e in ents} == DIOD_FILES
    assert len({e.qid.path for e in ents} | {root.qid().path}) == len(ents) + 1
    for e in ents:
        assert e.qid.type == QTFILE and e.qid.version == 0 and e.dtype == 8
        n = await root.walk(e.name)
        at = await n.getattr()
        assert at.qid == e.qid and at.size == 0 and stat.S_ISREG(at.mode) and at.uid == 0
        want = 0o666 if e.name.startswith("null") else 0o444
        assert stat.S_IMODE(at.mode) == want, e.name
    with pytest.raises(FsError) as ei:
        await root.walk("nope")
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(FsError) as ei:
        await (await root.walk("null")).walk("x")
    assert ei.value.errno == errno.ENOTDIR
    with pytest.raises(FsError) as ei:
        await root.open(os.O_WRONLY)
    assert ei.value.errno == errno.EISDIR


async def test_zero_reads_zeros_forever():
    fs = CtlFS()
    z = await (await fs.attach("u", "ctl")).walk("zero")
    f = await z.open(os.O_RDONLY)
    assert await f.read(0, 65536 - 24) == bytes(65536 - 24)
    assert await f.read(10**12, 7) == bytes(7)
    assert await f.read(0, 0) == b""
    with pytest.raises(FsError) as ei:
        await z.open(os.O_WRONLY)
    assert ei.value.errno == errno.EACCES


async def test_null_swallows_and_counts():
    fs = CtlFS()
    n = await (await fs.attach("u", "ctl")).walk("null")
    w = await n.open(os.O_WRONLY | os.O_TRUNC)
    await n.setattr(SetAttr(size=0))  # echo x > null: the truncate is accepted
    assert await w.write(0, b"x" * 1000) == 1000
    assert await w.write(0, b"yz") == 2
    assert (fs.null_bytes, fs.null_writes) == (1002, 2)
    r = await n.open(os.O_RDONLY)
    assert await r.read(0, 100) == b""
    rw = await n.open(os.O_RDWR)
    assert await rw.write(5, b"abc") == 3


async def test_delayed_variants_wait_100ms():
    fs = CtlFS()
    root = await fs.attach("u", "ctl")
    z = await (await root.walk("zero100")).open(os.O_RDONLY)
    t0 = trio.current_time()
    assert await z.read(0, 3) == b"\0\0\0"
    n = await (await root.walk("null100")).open(os.O_WRONLY)
    assert await n.write(0, b"a") == 1
    assert trio.current_time() - t0 >= 0.2


async def test_text_files():
    fs = CtlFS(exports=["/srv/x", "ctl"], providers={"connections": lambda: b"localhost 1\n"})
    root = await fs.attach("u", "ctl")

    async def cat(name: str) -> bytes:
        f = await (await root.walk(name)).open(os.O_RDONLY)
        out, off = b"", 0
        while chunk := await f.read(off, 5):
            out += chunk
            off += len(chunk)
        return out

    assert await cat("version") == f"{VERSION}\n".encode()
    assert await cat("exports") == b"/srv/x - - -\nctl - - -\n"
    assert await cat("connections") == b"localhost 1\n"
    assert (await cat("meminfo")).startswith(b"MemTotal:")
    sec, usec, tz = (await cat("date")).decode().replace(".", " ", 1).split(" ")
    assert abs(int(sec) - time.time()) < 5 and 0 <= int(usec) < 1_000_000 and tz == "0.0\n"
    with pytest.raises(FsError) as ei:
        await (await root.walk("version")).open(os.O_WRONLY)
    assert ei.value.errno == errno.EACCES
