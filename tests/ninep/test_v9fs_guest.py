"""The Linux kernel's 9P client (v9fs, Debian's 6.1 kernel in a QEMU TCG guest)
against our server.

One guest boots per module; it reaches the host only through user-mode
networking's guestfwd (10.0.2.100:564 → 127.0.0.1:PORT).  Each test runs our
server (serving a MemFS) in-process on PORT, mounts it in the guest with
``mount -t 9p -o trans=tcp,version=...`` and unmounts at the end.
"""

from __future__ import annotations

import pytest
import trio

from ninep.client import open_client
from ninep.memfs import MemFS
from ninep.server import Server
from tests.guest import booted_guest
from mountd.zkserver import free_port

pytestmark = pytest.mark.guest

MNT = "/mnt/9"


@pytest.fixture(scope="module")
def port():
    return free_port()


@pytest.fixture(scope="module")
def guest(tiny_image, port, tmp_path_factory):
    with booted_guest(tiny_image, tmp_path_factory.mktemp("v9fs") / "console.log",
                      forwards={564: port}) as g:
        g.check(f"mkdir -p {MNT}")
        yield g


class Served:
    def __init__(self, fs: MemFS, server: Server, dial: str):
        self.fs, self.server, self.dial = fs, server, dial


@pytest.fixture
async def served(port, guest):
    fs = MemFS()
    server = Server(fs)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, f"tcp!127.0.0.1!{port}")
        try:
            yield Served(fs, server, f"tcp!127.0.0.1!{port}")
        finally:
            # never leave the guest with a mount of a server that is going away
            await guest.arun(f"umount -l {MNT} 2>/dev/null; true", timeout=30)
            nursery.cancel_scope.cancel()


async def _mount(guest, version: str) -> None:
    status, out = await guest.arun(
        f"mount -t 9p -o trans=tcp,port=564,version={version},uname=root,access=any 10.0.2.100 {MNT}",
        timeout=60)
    assert status == 0, out


async def _wait_for(cond, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.05)


@pytest.mark.parametrize("version", ["9p2000.L", "9p2000.u"])
async def test_shell_tools_on_a_v9fs_mount(guest, served, version):
    await _mount(guest, version)
    g = guest
    assert (await g.arun(f"echo hello > {MNT}/greeting"))[0] == 0
    assert (await g.arun(f"cat {MNT}/greeting")) == (0, "hello\n")
    assert (await g.arun(f"echo again > {MNT}/greeting && cat {MNT}/greeting")) == (0, "again\n")
    assert (await g.arun(f"mkdir {MNT}/dir && echo x > {MNT}/dir/inner"))[0] == 0
    status, out = await g.arun(f"ls -la {MNT}")
    assert status == 0, out
    names = {line.split()[-1] for line in out.splitlines() if line and not line.startswith("total")}
    assert {"greeting", "dir", "wait"} <= names
    assert any(line.startswith("d") and line.endswith(" dir") for line in out.splitlines())
    assert any(line.startswith("-") and " 6 " in line and line.endswith(" greeting") for line in out.splitlines())
    # the server saw it all
    root = served.fs.root
    assert bytes(root.children["greeting"].data) == b"again\n"
    assert bytes(root.children["dir"].children["inner"].data) == b"x\n"
    assert (await g.arun(f"rm {MNT}/dir/inner && rmdir {MNT}/dir && rm {MNT}/greeting"))[0] == 0
    assert set(root.children) == {"wait"}
    status, out = await g.arun(f"cat {MNT}/nonexistent")
    assert status != 0 and "No such file" in out


@pytest.mark.parametrize("version", ["9p2000.L", "9p2000.u"])
async def test_blocking_read_released_by_a_write_from_another_connection(guest, served, version):
    await _mount(guest, version)
    pending = guest.begin(f"cat {MNT}/wait/answer")
    await _wait_for(lambda: served.fs.waiters == 1)
    # the writer is a different 9P connection: our client on the host
    async with open_client(served.dial) as c:
        await c.write_file("wait/answer", b"42\n")
    status, out = await guest.await_pending(pending, 30)
    assert (status, out) == (0, "42\n")
    assert served.fs.waiters == 0
    # echo from the guest releases a reader on the host too
    async with trio.open_nursery() as nursery:
        got = {}

        async def host_reader():
            async with open_client(served.dial) as c:
                got["v"] = await c.read_file("wait/from-guest")

        nursery.start_soon(host_reader)
        await _wait_for(lambda: served.fs.waiters == 1)
        assert (await guest.arun(f"echo from guest > {MNT}/wait/from-guest"))[0] == 0
    assert got["v"] == b"from guest\n"


@pytest.mark.parametrize("version", ["9p2000.L", "9p2000.u"])
async def test_blocked_cat_killed_with_sigint_returns_and_server_stays_healthy(guest, served, version):
    await _mount(guest, version)
    pending = guest.begin(f"cat {MNT}/wait/never")
    await _wait_for(lambda: served.fs.waiters == 1)
    t0 = trio.current_time()
    guest.interrupt()
    status, _ = await guest.await_pending(pending, 10)
    assert status == 130  # 128 + SIGINT
    assert trio.current_time() - t0 < 5
    # Linux sent Tflush; the server cancelled the read: no waiter, no pending tag
    await _wait_for(lambda: served.fs.waiters == 0, timeout=5)
    for conn in served.server.connections:
        assert conn.pending == {}
    # and the mount (the same connection) still works
    assert (await guest.arun(f"echo ok > {MNT}/wait/never && cat {MNT}/wait/never")) == (0, "ok\n")
    status, out = await guest.arun(f"ls {MNT}")
    assert status == 0 and "wait" in out
