"""cloudfs.identity and the permissions of views, at the 9P level: our 9P
client against ninep.server.Server serving the public face (TCP, as guests
reach it) and the operator face (a unix socket), with a real ZooKeeper and
the fake driver."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from cloudfs.identity import PublicFS, new_secret, parse_attach, secret_matches
from ninep.client import open_client
from ninep.errors import FsError
from ninep.server import Server


@pytest.fixture
async def served(cfs, tmp_path):
    """(public dial, operator dial): the CloudFS's two faces served over 9P."""
    async with trio.open_nursery() as nursery:
        pub = (await nursery.start(Server(cfs.public()).serve, "tcp!127.0.0.1!0"))[0]
        op = (await nursery.start(Server(cfs).serve, f"unix!{tmp_path}/op.sock"))[0]
        try:
            yield pub, op
        finally:
            nursery.cancel_scope.cancel()


async def secret_of(cfs, pid: int) -> str:
    rec = (await cfs.records.require(pid)).value
    return rec.secret


async def fork(c, pid: int | str) -> int:
    async with await c.walk(f"proc/{pid}/ctl") as f:
        await f.open(os.O_RDWR)
        await f.write(0, b"fork\n")
        return int(await f.read_all())


async def refused(aw, errno_=errno.EACCES):
    with pytest.raises(FsError) as e:
        await aw
    assert e.value.errno == errno_, e.value


def test_parse_attach_forms():
    s = new_secret()
    assert len(s) == 32 and int(s, 16) >= 0 and s != new_secret()
    assert parse_attach("x", "") is None and parse_attach("x", "/") is None
    assert parse_attach("", f"proc/7/{s}").pid == 7 and parse_attach("", f"proc/7/{s}").secret == s
    assert parse_attach(s, "proc/7").secret == s
    assert parse_attach("", "proc/7").secret is None
    for bad in ("bogus", "proc/x/1", "proc/07/1", "proc/7/a/b"):
        with pytest.raises(FsError) as e:
            parse_attach("", bad)
        assert e.value.errno == errno.EACCES
    assert secret_matches(s, s) and not secret_matches(s, s[:-1] + "0" * (s[-1] != "0"))
    assert not secret_matches("", "") and not secret_matches(s, None)


async def test_secrets_are_made_at_fork_and_never_shown(cfs, served):
    _, op = served
    async with open_client(op) as c:
        a = await fork(c, 1)
        b = await fork(c, 1)
        sa, sb = await secret_of(cfs, a), await secret_of(cfs, b)
        assert len(sa) == 32 and sa != sb
        assert (await secret_of(cfs, 1)) == ""
        assert sa.encode() not in await c.read_file(f"proc/{a}/status")
        assert sa.encode() not in await c.read_file(f"proc/{a}/userdata")


async def test_attach_needs_the_right_secret(cfs, served):
    pub, op = served
    async with open_client(op) as c:
        pid = await fork(c, 1)
    good = await secret_of(cfs, pid)
    wrong = new_secret()
    async with open_client(pub) as c:
        await refused(c.attach("root", f"proc/{pid}"))              # missing
        await refused(c.attach("root", f"proc/{pid}/{wrong}"))      # wrong
        await refused(c.attach(wrong, f"proc/{pid}"))
        await refused(c.attach("root", f"proc/999/{good}"))         # no such pid: same answer
        await refused(c.attach("root", "proc/1/"))                  # init has no secret
        await refused(c.attach("root", "bogus"))
        await c.attach("root", f"proc/{pid}/{good}")
        await c.attach(good, f"proc/{pid}")                         # secret as uname
    async with open_client(pub, aname=f"proc/{pid}/{good}") as c:
        st = (await c.read_file("proc/self/status")).decode()
        assert f"pid {pid}\n" in st


async def test_process_view_delegation(cfs, served):
    pub, op = served
    async with open_client(op) as c:
        me = await fork(c, 1)
        other = await fork(c, 1)
        await c.write_file(f"proc/{other}/env/k", b"other's")
        await c.write_file(f"proc/{other}/userdata", b"private")
    cred = f"proc/{me}/{await secret_of(cfs, me)}"
    async with open_client(pub, aname=cred) as c:
        # itself: ctl (fork), userdata, env
        kid = await fork(c, "self")
        grandkid = await fork(c, kid)
        await c.write_file("proc/self/userdata", b"mine")
        assert await c.read_file(f"proc/{me}/userdata") == b"mine"
        await c.write_file("proc/self/env/x", b"1")
        # descendants: env, userdata, ctl
        await c.write_file(f"proc/{grandkid}/env/y", b"2")
        await c.write_file(f"proc/{kid}/userdata", b"kid's")
        # the whole deployment is readable: status, children, env
        assert b"pid 1\n" in await c.read_file("proc/1/status")
        assert f"{me}\n".encode() in await c.read_file("proc/1/children")
        assert await c.read_file(f"proc/{other}/env/k") == b"other's"
        assert "k" in await c.listdir(f"proc/{other}/env")
        assert await c.listdir("images") == ["tiny", "alpine"]
        # anything else: EACCES, nothing changes
        for path in (f"proc/{other}/ctl", "proc/1/ctl", f"proc/{other}/userdata", f"proc/{other}/env/k"):
            await refused(c.write_file(path, b"kill\n"))
        await refused(c.write_file(f"proc/{other}/env/new", b"v"))
        await refused(c.remove(f"proc/{other}/env/k"))
        await refused(c.read_file(f"proc/{other}/userdata"))
        await refused(c.read_file(f"proc/{other}/wait"))
        async with await c.walk("net") as d:
            await refused(d.create("lab", os.O_RDONLY))
        async with await c.walk(f"proc/{other}/ctl") as f:  # opening for reading is harmless
            await f.open(os.O_RDONLY)
            assert await f.read_all() == b""
    async with open_client(op) as c:
        assert await c.read_file(f"proc/{other}/env/k") == b"other's"
        assert await c.listdir(f"proc/{other}/env") == ["k"]
        assert await c.read_file(f"proc/{other}/userdata") == b"private"
        assert await c.listdir("proc") == sorted(str(p) for p in (1, me, other, kid, grandkid))
        assert "lab" not in await c.listdir("net")
        assert (await c.read_file(f"proc/{grandkid}/env/y")) == b"2"


async def test_anonymous_view_is_read_only(cfs, served):
    pub, op = served
    async with open_client(op) as c:
        pid = await fork(c, 1)
        await c.write_file(f"proc/{pid}/env/k", b"v")
    async with open_client(pub) as c:  # aname ""
        assert await c.listdir("proc") == ["1", str(pid)]
        assert b"state new" in await c.read_file(f"proc/{pid}/status")
        assert await c.read_file(f"proc/{pid}/env/k") == b"v"
        await refused(c.walk("proc/self"), errno.ENOENT)
        for path in ("proc/1/ctl", f"proc/{pid}/ctl", f"proc/{pid}/env/k", f"proc/{pid}/userdata"):
            await refused(c.write_file(path, b"fork\n"))
        await refused(c.read_file(f"proc/{pid}/userdata"))
        await refused(c.read_file(f"proc/{pid}/wait"))
        await refused(c.remove(f"proc/{pid}/env/k"))
    async with open_client(op) as c:
        assert await c.listdir("proc") == ["1", str(pid)]
        assert await c.read_file(f"proc/{pid}/env/k") == b"v"


async def test_operator_face_has_full_rights_and_can_act_as_a_process(cfs, served):
    _, op = served
    async with open_client(op) as c:
        a = await fork(c, 1)
        b = await fork(c, 1)
        await c.write_file(f"proc/{b}/env/k", b"op")
    async with open_client(op, aname=f"proc/{a}") as c:  # the process's view and rights
        assert b"pid %d\n" % a in await c.read_file("proc/self/status")
        await refused(c.write_file(f"proc/{b}/env/k", b"x"))
    async with open_client(op, aname=f"proc/{a}/{await secret_of(cfs, a)}") as c:  # a guest's aname works here too
        assert b"pid %d\n" % a in await c.read_file("proc/self/status")
    async with open_client(op) as c:
        await refused(c.attach("root", f"proc/{a}/{new_secret()}"))
    assert isinstance(cfs.public(), PublicFS) and cfs.public() is cfs.public()
