"""/proc/<pid>/stats and /proc/<pid>/console through the namespace, with the
fake driver (made-up counters, a console tests write to): contents, who may
read the console, its size in stat, and how a read past what an open has
seen follows new output (tail -f)."""

from __future__ import annotations

import errno
import os

import pytest

from ninep.errors import FsError
from tests.cloudfs.fsops import cat, ctl, vm, walk


def kv(text: bytes) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in text.decode().splitlines())


async def test_stats(cfs):
    import trio

    root = await cfs.attach("", "")
    assert set(kv(await cat(root, "/proc/1/stats")).values()) == {"-"}
    pid = await vm(root)
    await trio.sleep(1.1)
    st = kv(await cat(root, f"/proc/{pid}/stats"))
    assert list(st) == ["cpu_ns", "memory_bytes", "memory_used_bytes", "block_read_bytes", "block_write_bytes",
                        "block_read_ops", "block_write_ops", "net_rx_bytes", "net_tx_bytes", "net_rx_packets",
                        "net_tx_packets", "uptime_s"]
    assert int(st["cpu_ns"]) >= 1_000_000 and st["memory_bytes"] == str(256 << 20)
    assert int(st["uptime_s"]) >= 1 and st["net_rx_bytes"] == "-" and st["memory_used_bytes"] == "-"
    later = kv(await cat(cfs.readonly_view(), f"/proc/{pid}/stats"))  # everyone reads it
    assert int(later["cpu_ns"]) >= int(st["cpu_ns"])


async def test_stats_of_a_vanished_server_are_unknown(cfs):
    root = await cfs.attach("", "")
    pid = await vm(root)
    cfs.driver.servers.pop((await cfs.records.require(pid)).value.vm)
    assert set(kv(await cat(root, f"/proc/{pid}/stats")).values()) == {"-"}


async def test_console_follows_like_tail_f(cfs, monkeypatch):
    import cloudfs.catalog

    monkeypatch.setattr(cloudfs.catalog, "SAMPLE_TTL", 0)  # no shared sample: see each change at once
    root = await cfs.attach("", "")
    pid = await vm(root)
    sid = (await cfs.records.require(pid)).value.vm
    node = await walk(root, f"/proc/{pid}/console")
    first = await cat(root, f"/proc/{pid}/console")
    assert first == b"fake console of p%d\n" % pid
    assert (await node.getattr()).size == len(first)
    f = await node.open(os.O_RDONLY)
    try:
        assert await f.read(0, 4096) == first
        assert await f.read(len(first), 4096) == b""
        cfs.driver.consoles[sid] += b"a new line\n"
        assert (await node.getattr()).size == len(first) + 11
        assert await f.read(len(first), 4096) == b"a new line\n"  # what tail -f does
    finally:
        await f.release()
    cfs.driver.consoles[sid] = b"x" * (3 << 20)
    assert len(await cat(root, f"/proc/{pid}/console", count=1 << 20)) == 2 << 20  # the last 2 MiB at most


async def test_console_is_the_ancestors_and_the_operators(cfs):
    op = await cfs.attach("", "")
    parent = await vm(op)
    kid = int(await ctl(op, parent, "fork"))
    other = await vm(op)
    assert await cat(cfs.view_for(parent), f"/proc/{kid}/console")  # an ancestor
    assert await cat(cfs.view_for(kid), f"/proc/{kid}/console")  # itself
    for view in (cfs.view_for(kid), cfs.view_for(other), cfs.readonly_view()):
        with pytest.raises(FsError) as e:
            await cat(view, f"/proc/{parent}/console")
        assert e.value.errno == errno.EACCES
        assert (await (await walk(view, f"/proc/{parent}/console")).getattr()).size == 0  # not even its length
    assert await cat(op, "/proc/1/console") == b""  # init: no VM
