"""Who can read what on the daemon's host (issue "Guest channels and
secrets"): another local user (``nobody``, through runuser) reads no
secret and no user-data from the state dir, the embedded-style ZooKeeper
data dir, the console logs or the ZooKeeper tree (every znode carries the
deployment's digest ACL); a client without the credential gets NoAuth;
secrets rotate at exec and never reach the 9P trace log; a record whose
image is a path boots nothing."""

from __future__ import annotations

import os
import subprocess

import pytest
import trio
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError

from ninep.client import open_client

SECRET_DATA = b"TOPSECRET-USERDATA-0xC0FFEE"


async def _ctl(c, pid, cmd: str) -> str:
    async with await c.walk(f"proc/{pid}/ctl") as f:
        await f.open(os.O_RDWR)
        await f.write(0, cmd.encode() + b"\n")
        return (await f.read_all()).decode().strip()


def _zk(daemon, cred: str | None = None) -> KazooClient:
    zk = KazooClient(hosts=daemon.zk.hosts, auth_data=[("digest", cred)] if cred else None)
    zk.start(timeout=10)
    return zk


def _record(daemon, pid: int) -> bytes:
    cred = (daemon.state / "zookeeper.auth").read_text().strip()
    zk = _zk(daemon, cred)
    try:
        return zk.get(f"{daemon.root}/proc/{pid}")[0]
    finally:
        zk.stop()
        zk.close()


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *argv], capture_output=True, timeout=120)


async def test_another_local_user_reads_no_secret(daemon):
    async with open_client(daemon.operator) as op:
        pid = await _ctl(op, 1, "fork")
        await op.write_file(f"proc/{pid}/userdata", SECRET_DATA)
        await _ctl(op, pid, "exec tiny")
    import json

    secret = json.loads(_record(daemon, int(pid)))["secret"].encode()
    assert len(secret) == 32
    # files: the state dir, the ZooKeeper data dir (snapshots and logs)
    for d in (daemon.state, daemon.zk.dir):
        assert os.stat(d).st_mode & 0o077 == 0, d
        got = _as_nobody("sh", "-c", f"find {d} -type f -exec cat {{}} + 2>/dev/null; ls -R {d} 2>&1")
        assert secret not in got.stdout and SECRET_DATA not in got.stdout
    # the ZooKeeper tree: nobody, as any client without the credential, gets NoAuth
    zkcli = _as_nobody("/usr/share/zookeeper/bin/zkCli.sh", "-server", daemon.zk.hosts,
                       "get", f"{daemon.root}/proc/{pid}")
    out = zkcli.stdout + zkcli.stderr
    assert secret not in out and (b"Insufficient permission" in out or b"NoAuth" in out), out[-2000:]
    zk = _zk(daemon)
    try:
        for op in (lambda: zk.get(f"{daemon.root}/proc/{pid}"), lambda: zk.get(f"{daemon.root}/proc/{pid}/userdata"),
                   lambda: zk.get_children(f"{daemon.root}/proc")):
            with pytest.raises(NoAuthError):
                op()
    finally:
        zk.stop()
        zk.close()


async def test_exec_rotates_the_secret(daemon):
    import json

    async def rebuilt(gen: int) -> str:
        with trio.fail_after(10):
            while True:
                rec = json.loads(_record(daemon, int(pid)))
                if rec["built_gen"] >= gen and rec["state"] == "running":
                    return rec["secret"]
                await trio.sleep(0.05)

    async with open_client(daemon.operator) as op:
        pid = await _ctl(op, 1, "fork")
        await _ctl(op, pid, "exec tiny")
        first = await rebuilt(1)
        async with open_client(daemon.tcp, aname=f"proc/{pid}/{first}") as guest:
            assert (await guest.read_file("proc/self/status")).startswith(f"pid {pid}\n".encode())
        await _ctl(op, pid, "exec tiny")  # a rebuild: a new program, a new credential
        second = await rebuilt(2)
    assert second != first
    from ninep.errors import FsError

    async with open_client(daemon.tcp) as c:
        with pytest.raises(FsError):
            await c.attach("root", f"proc/{pid}/{first}")  # the old credential attaches no more
        await c.attach("root", f"proc/{pid}/{second}")


def test_anames_are_redacted_in_traces():
    from ninep import messages as m
    from ninep.server import redacted

    t = m.Tattach(tag=1, fid=1, afid=m.NOFID, uname="0123abcd" * 4, aname="proc/7/" + "f" * 32, n_uname=0)
    r = redacted(t)
    assert r.aname == "proc/7/…" and "f" * 32 not in repr(r) and "0123abcd" not in repr(r)
    assert redacted(m.Tclunk(tag=1, fid=2)) == m.Tclunk(tag=1, fid=2)


async def test_an_image_name_that_is_a_path_boots_nothing(tmp_path):
    """A record (any ZooKeeper writer) naming image ``../../../tmp/x``, or a
    manifest naming files outside its directory: nothing is booted."""
    from cloudfs import imagestore

    state = tmp_path / "state"
    evil = tmp_path / "x"
    evil.mkdir()
    (evil / "manifest.json").write_text('{"name": "x", "id": "x", "size": 1, "format": "f", "checksum": "c", '
                                        '"created": "t", "kernel": "/etc/shadow", "initramfs": "/etc/passwd"}')
    assert imagestore.get_image(state, "../../x") is None and imagestore.get_image(state, "/etc") is None
    store = imagestore.images_dir(state)
    store.mkdir(parents=True)
    os.symlink(evil, store / "linked")
    (store / "outside").mkdir()
    (store / "outside" / "manifest.json").write_text((evil / "manifest.json").read_text())
    (store / "dots").mkdir()
    (store / "dots" / "manifest.json").write_text((evil / "manifest.json").read_text().replace(
        "/etc/shadow", "../../../etc/shadow"))
    for name in ("linked", "outside", "dots"):
        assert imagestore.get_image(state, name) is None, name
    assert imagestore.list_images(state) == []
