"""cloudfs.channel: a VM's channel attaches as its process only, and holds at
most CHANNEL_LIMITS.max_connections connections (the others go on).

Served here on a loopback listener (the transport does not matter to the
face); the QEMU guests that use it for real are in tests/test_e2e_qemu.py
and tests/security/test_channels.py."""

from __future__ import annotations

import errno

import pytest
import trio

from cloudfs.channel import CHANNEL_LIMITS, Channels
from ninep.client import open_client
from ninep.errors import FsError

from .fsops import cat, ctl


@pytest.fixture
async def channel(cfs):
    """(pid of a forked process, dial string of its channel, the Channels)."""
    pid = int(await ctl(cfs.view_for(None), 1, "fork"))
    channels = Channels(cfs)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channels.serve, pid, listeners[0])
        yield pid, f"tcp!127.0.0.1!{port}", channels
        nursery.cancel_scope.cancel()


async def test_attaches_as_its_process_only(channel, cfs):
    pid, dial, _ = channel
    other = int(await ctl(cfs.view_for(None), 1, "fork"))
    for aname in (f"proc/{pid}", "", f"/proc/{pid}/"):
        async with open_client(dial, aname=aname) as c:
            assert (await c.read_file("proc/self/status")).startswith(f"pid {pid}\n".encode())
            await c.write_file("proc/self/env/k", b"v")  # the process's own rights
            with pytest.raises(FsError) as e:
                await c.write_file(f"proc/{other}/ctl", b"kill")  # not a descendant
            assert e.value.errno == errno.EACCES
    for aname in ("proc/1", f"proc/{pid}/0123456789abcdef0123456789abcdef", f"proc/{pid + 1}", "x", "proc"):
        async with open_client(dial) as c:
            with pytest.raises(FsError) as e:
                await c.attach(aname=aname)
        assert e.value.errno == errno.EACCES, aname
    op = cfs.view_for(None)
    await ctl(op, pid, "kill")
    await cat(op, "proc/1/wait")
    async with open_client(dial) as c:
        with pytest.raises(FsError) as e:
            await c.attach(aname=f"proc/{pid}")
    assert e.value.errno == errno.ENOENT  # the process is gone


async def test_connections_are_capped_per_vm(channel):
    pid, dial, channels = channel
    n = CHANNEL_LIMITS.max_connections
    assert n == 4
    async with trio.open_nursery() as nursery:
        clients = []
        for _ in range(n):
            clients.append(await nursery.start(_held, dial, pid))
        host, port = dial.split("!")[1:]
        extra = await trio.open_tcp_stream(host, int(port))  # accepted, then closed at once
        with trio.fail_after(5):
            assert await extra.receive_some(100) == b""
        await extra.aclose()
        assert len(channels.servers[pid].connections) == n
        for c in clients:  # the first four go on
            assert (await c.read_file("proc/self/status")).startswith(f"pid {pid}\n".encode())
        nursery.cancel_scope.cancel()


async def _held(dial: str, pid: int, task_status=trio.TASK_STATUS_IGNORED):
    async with open_client(dial, aname=f"proc/{pid}") as c:
        task_status.started(c)
        await trio.sleep_forever()
