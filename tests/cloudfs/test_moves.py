"""The move listener (``cloudfs up --migrate-listen``, cloudfs.moves) against
hostile and broken peers: every request it cannot take is answered
``failed <why>``, a copy it started for one is removed, and it goes on
taking moves.  A real ZooKeeper and the real QEMU driver (an incoming copy
is a real paused QEMU); whole moves between two daemons are tested with
real guests in tests/cluster/test_qemu_cluster.py."""

from __future__ import annotations

import functools
import json
import socket
import struct

import pytest
import trio

from cloudfs import imagestore, moves
from cloudfs.drivers.base import ServerSpec
from cloudfs.drivers.qemu import FLAVORS, SCRATCH_GIB, QemuDriver
from cloudfs.hosts import Host
from cloudfs.namespace import open_cloudfs
from tests.cloudfs.fsops import ctl, eventually, status, vm

pytestmark = pytest.mark.guest  # an incoming copy is a real (paused) QEMU

TOKEN = "ab" * 16
LOAD_FAILED = b"loading the moved VM failed"


@pytest.fixture
def state(tiny_image, tmp_path):
    s = tmp_path / "state"
    imagestore.install_image(s, tiny_image)
    try:
        yield s
    finally:
        QemuDriver(s, accel="tcg").kill_all()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _header(pid_: int, **over) -> bytes:
    h = {"v": moves.PROTOCOL, "pid": pid_, "ppid": 1, "token": TOKEN, "image": "tiny", "flavor": "m1.tiny",
         "accel": "tcg", "name": "moved", **over}
    return json.dumps(h).encode() + b"\n"


async def _ask(port: int, request: bytes, after_ready: bytes | None = None) -> list[bytes]:
    """Send ``request``; once the daemon says ``ready``, ``after_ready``;
    the lines it answers until it hangs up."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    lines: list[bytes] = []
    buf = b""
    async with stream:
        await stream.send_all(request)
        with trio.fail_after(60):
            while True:
                try:
                    more = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not more:
                    break
                buf += more
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    lines.append(line)
                    if line == b"ready 2" and after_ready is not None:
                        try:
                            await stream.send_all(after_ready)
                            await stream.send_eof()
                        except trio.BrokenResourceError:
                            pass
    return lines


async def _a_saved_state(tiny_image, where) -> bytes:
    """A migration stream of a running m1.tiny VM (a fork live copy's
    state) made by a driver of its own state dir ``where``, whose VMs are
    gone on return."""
    imagestore.install_image(where, tiny_image)
    src = QemuDriver(where, accel="tcg", snapshot_boot=False)
    src.bind("s" * 32, "/test/source")
    try:
        vm = await src.create(ServerSpec(pid=2, ppid=1, name="source", image="tiny", flavor="m1.tiny",
                                         networks=("user",), userdata=b""))
        copy = await src.snapshot(vm.id)
        return (where / "snapshots" / copy / "state").read_bytes()
    finally:
        await trio.to_thread.run_sync(src.kill_all)


async def _until_ready(s: trio.SocketStream, pid_: int) -> None:
    """Ask ``s`` to take ``pid_`` and read its ``ready 2`` (within 60 s)."""
    await s.send_all(_header(pid_))
    got = b""
    with trio.fail_after(60):
        while b"\n" not in got:
            got += await s.receive_some(100)
    assert got == b"ready 2\n", got


def _vms(state) -> list[str]:
    d = state / "vms"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


async def _no_vms(state) -> bool:
    return _vms(state) == []


async def test_hostile_move_requests_are_refused_and_leave_nothing(zookeeper, zk_root, state, monkeypatch, tiny_image,
                                                                   tmp_path):
    monkeypatch.setattr(moves, "HEADER_TIMEOUT", 1.0)
    # the migration stream may hold 100 bytes (the RAM of m1.tiny, less itself, plus 100)
    monkeypatch.setattr(moves, "STREAM_SLACK", 100 - (FLAVORS["m1.tiny"][0] << 20))
    disk_end = SCRATCH_GIB.get("m1.tiny", 1) << 30
    port = _port()
    driver = QemuDriver(state, accel="tcg")
    async with open_cloudfs(zookeeper.hosts, driver, zk_root, host="h2",
                            migrate_listen=f"tcp!127.0.0.1!{port}") as cfs:
        root = await cfs.attach("glenda", "")
        pid = int(await ctl(root, 1, "fork"))

        # before any move is announced: the request itself
        for request, why in (
            (b"hello\n", b"not a move request"),
            (b"[1, 2]\n", b"not a move request"),
            (b"x" * 5000, b"line too long"),
            (_header(pid, v=1), b"move protocol 1 not spoken here"),
            (_header(-1), b"not a move request"),
            (_header(pid, pid=True), b"not a move request"),
            (_header(pid, token=7), b"not a move request"),
            (_header(pid), b"no move of process"),
        ):
            [answer] = await _ask(port, request)
            assert answer.startswith(b"failed ") and why in answer, (request[:40], answer)

        # a move announced to another host, or with another token
        path = cfs.layout.move(pid)
        await cfs.store.create(path, json.dumps({"to": "h3", "token": TOKEN, "vm": "vm-x"}).encode(),
                               ephemeral=True)
        assert b"no move of process" in (await _ask(port, _header(pid)))[0]
        await cfs.store.set(path, json.dumps({"to": "h2", "token": TOKEN, "vm": "vm-x"}).encode())
        assert b"no move of process" in (await _ask(port, _header(pid, token="cd" * 16)))[0]
        assert b"no move of process" in (await _ask(port, _header(pid, token="é" * 32)))[0]

        # announced and right: a paused copy is started, then the stream is hostile
        big = struct.pack("<cI", b"M", moves.CHUNK + 1) + b"\0" * 16
        m60 = struct.pack("<cI", b"M", 60) + b"\0" * 60
        disk = struct.pack("<cQI", b"D", 0, 4) + b"disk"
        cases = (
            (b"X", b"unknown frame"),
            (big, b"a frame of 65537 bytes"),
            (struct.pack("<cI", b"M", 0), b"a frame of 0 bytes"),
            (m60 + m60, b"the stream passed 100 bytes"),
            (struct.pack("<cQI", b"D", 1 << 40, 10) + b"0123456789", b"disk data of 10 bytes"),
            (struct.pack("<cQI", b"D", disk_end - 3, 4) + b"disk", b"disk data of 4 bytes"),
            (struct.pack("<cQI", b"D", 0, 0), b"disk data of 0 bytes"),
            (struct.pack("<cQI", b"D", 0, moves.DISK_CHUNK + 1), b"disk data of"),
            # (after the stream, the copy's QEMU, which has no state to load,
            # ends soon: a refusal may come first from that)
            (disk + struct.pack("<cI", b"M", 4) + b"junk", (b"unknown frame b'M'", LOAD_FAILED)),
            (struct.pack("<cI", b"M", 4) + b"junk" + b"E", b"loading the moved VM"),  # QEMU cannot load it
            (disk, (b"closed the connection", LOAD_FAILED)),  # taken, then it hangs up
            (struct.pack("<cQI", b"D", disk_end - 4, 4) + b"disk", (b"closed the connection", LOAD_FAILED)),
        )
        for body, why in cases:
            lines = await _ask(port, _header(pid), body)
            assert lines[0] == b"ready 2" and len(lines) == 2, (body[:20], lines)
            assert lines[1].startswith(b"failed ") and any(w in lines[1] for w in (why if isinstance(why, tuple)
                                                                                    else (why,))), (body[:20], lines)
            await eventually(lambda: _no_vms(state), timeout=30)

        # a stream the copy cannot load: refused while the disk data comes, before the end
        async with await trio.open_tcp_stream("127.0.0.1", port) as s:
            await _until_ready(s, pid)
            with trio.fail_after(60):
                await s.send_all(struct.pack("<cI", b"M", 4) + b"junk")
                sent = 0
                answer = b""
                while b"\n" not in answer:
                    try:
                        await s.send_all(struct.pack("<cQI", b"D", sent % (1 << 20), 4096) + bytes(4096))
                        sent += 4096
                    except trio.BrokenResourceError:
                        pass
                    with trio.move_on_after(0.2):
                        more = await s.receive_some(1000)
                        if not more:
                            break
                        answer += more
        assert answer.startswith(b"failed ") and LOAD_FAILED in answer, answer
        await eventually(lambda: _no_vms(state), timeout=30)

        # frames within the disk, but more than its size in all (a peer
        # writing the same MiB over and over), after a stream its QEMU loads
        # (a fork live copy's state of a VM in another state dir)
        monkeypatch.setattr(moves, "STREAM_SLACK", 64 << 20)
        loadable = await _a_saved_state(tiny_image, tmp_path / "source")
        frame = struct.pack("<cQI", b"D", 0, moves.DISK_CHUNK) + bytes(moves.DISK_CHUNK)
        async with await trio.open_tcp_stream("127.0.0.1", port) as s:
            await _until_ready(s, pid)
            with trio.fail_after(120):
                try:
                    for at in range(0, len(loadable), moves.CHUNK):
                        piece = loadable[at:at + moves.CHUNK]
                        await s.send_all(struct.pack("<cI", b"M", len(piece)) + piece)
                    for _ in range(disk_end // moves.DISK_CHUNK + 1):
                        await s.send_all(frame)
                except trio.BrokenResourceError:
                    pass
                got = await s.receive_some(1000)
        assert got.startswith(b"failed move: disk data of 1048576 bytes at 0") and b"so far" in got, got
        await eventually(lambda: _no_vms(state), timeout=30)

        # two silent peers hold both slots; a third is busy; the silence ends at HEADER_TIMEOUT
        async with await trio.open_tcp_stream("127.0.0.1", port) as s1, \
                await trio.open_tcp_stream("127.0.0.1", port) as s2:
            await trio.sleep(0.2)
            [answer] = await _ask(port, _header(pid))
            assert answer.startswith(b"failed busy"), answer
            with trio.fail_after(10):
                assert b"failed" in await s1.receive_some(1000)
                assert b"failed" in await s2.receive_some(1000)
        # and it still takes requests
        assert b"no move of process" in (await _ask(port, _header(pid, token="cd" * 16)))[0]
        assert _vms(state) == []


async def _frames_until_end(stream: trio.SocketStream, buf: bytearray) -> int:
    """Read a sender's ``M``/``D`` frames up to ``E``; the frames read."""
    async def exactly(n: int) -> bytes:
        while len(buf) < n:
            more = await stream.receive_some(1 << 20)
            assert more, "the sender hung up before E"
            buf.extend(more)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    frames = 0
    while True:
        kind = await exactly(1)
        if kind == b"E":
            return frames
        if kind == b"M":
            (n,) = struct.unpack("<I", await exactly(4))
        else:
            assert kind == b"D", kind
            _, n = struct.unpack("<QI", await exactly(12))
        await exactly(n)
        frames += 1


async def test_a_hostile_destination_leaves_the_vm_running_here(zookeeper, zk_root, state, monkeypatch):
    """The sending side against a daemon that misbehaves at each step: it
    refuses mid-stream (its reason is what ``move`` says, terminal
    escapes and all control bytes made harmless), hangs up, answers
    another protocol, a line too long, no ``loaded`` or a copy id that is
    none, or goes silent
    (MOVE_TIMEOUT).  Each time the VM goes on running here, paused no
    more, and ``moves/<pid>`` goes."""
    port = _port()
    driver = QemuDriver(state, accel="tcg")
    script: dict = {}

    async def destination(stream: trio.SocketStream):
        buf = bytearray()
        async with stream:
            while b"\n" not in buf:
                more = await stream.receive_some(65536)
                if not more:
                    return
                buf.extend(more)
            header = json.loads(bytes(buf).split(b"\n", 1)[0])
            del buf[:bytes(buf).index(b"\n") + 1]
            script["header"] = header
            how = script["how"]
            if how in ("ready 1", "long"):
                await stream.send_all(b"ready 1\n" if how == "ready 1" else b"x" * (moves.HEADER_MAX + 10))
                await trio.sleep(5)  # the sender gives up, not us
                return
            await stream.send_all(moves.READY)
            if how == "silent":
                await trio.sleep(60)  # reads nothing: the sender's QEMU stream stalls
                return
            if how in ("refuse", "hang up"):
                got = len(buf)
                while got < 3 * moves.CHUNK:  # some of the stream: QEMU is migrating
                    more = await stream.receive_some(65536)
                    if not more:
                        return
                    got += len(more)
                if how == "refuse":
                    await stream.send_all(b"failed move: no room\x1b[2J\x00\x07 here\n")
                return  # hangs up with the sender's bytes unread: it sees a reset
            script["frames"] = await _frames_until_end(stream, buf)
            await stream.send_all(b"nope \xff\n" if how == "no loaded" else b"loaded ../x\x1b\n")

    async with open_cloudfs(zookeeper.hosts, driver, zk_root, host="h1") as cfs, trio.open_nursery() as n:
        await n.start(functools.partial(trio.serve_tcp, destination, port, host="127.0.0.1"))
        await cfs.store.create(f"{cfs.layout.hosts}/h3", Host(
            "h3", "daemon-h3", "qemu", "qemu!h3!/elsewhere", "2026-12-01T00:00:00Z",
            f"tcp!127.0.0.1!{port}").to_json(), ephemeral=True)
        root = await cfs.attach("glenda", "")
        pid = await vm(root)
        sid = (await cfs.records.require(pid)).value.vm
        host = (await status(root, pid))["host"]
        for how, why in (
            ("refuse", "the other daemon refused: failed move: no room?[2J?? here"),
            ("hang up", "to h3 failed: the other daemon hung up mid-move (socket connection broken: "),
            ("ready 1", "the other daemon refused: ready 1"),
            ("long", "move: line too long"),
            ("silent", "took more than 6 s"),
            ("no loaded", "the other daemon could not load the VM: nope \ufffd"),
            ("bad id", "the other daemon named its copy ../x?, which is no VM id"),
        ):
            script.clear()
            script["how"] = how
            monkeypatch.setattr(moves, "MOVE_TIMEOUT", 6.0 if how == "silent" else 60.0)
            await ctl(root, pid, "migrate h3")

            async def failed():
                st = await status(root, pid)
                return st if st.get("move", "").startswith("to h3 failed") else None

            st = await eventually(failed, timeout=90)
            assert why in st["move"], (how, st["move"])
            assert "\x1b" not in st["move"] and "\x00" not in st["move"], st["move"]
            assert st["state"] == "running" and st["host"] == host, (how, st)
            assert script["header"]["pid"] == pid and script["header"]["v"] == moves.PROTOCOL
            if how in ("no loaded", "bad id"):
                assert script["frames"] > 0
            rec = (await cfs.records.require(pid)).value
            assert rec.vm == sid and rec.move_to == "", (how, rec)
            assert (await driver.status(sid)).status == "running", how  # resumed, not left paused
            await eventually(lambda: _gone_znode(cfs, cfs.layout.move(pid)))
        n.cancel_scope.cancel()


async def _gone_znode(cfs, path: str) -> bool:
    return await cfs.store.exists(path) is None
