"""Shell-like helpers for tests: path operations through the ninep.fs interface
(what the 9P server and FUSE do for ``cat``, ``echo >``, ``ls``)."""

from __future__ import annotations

import os

import pytest

from ninep.errors import FsError
from ninep.fs import Node, SetAttr


async def walk(root: Node, path: str) -> Node:
    """Walk ``path`` (``/proc/1/ctl``) one element at a time from ``root``."""
    node = root
    for name in [p for p in path.split("/") if p]:
        node = await node.walk(name)
    return node


async def cat(root: Node, path: str, flags: int = os.O_RDONLY, count: int = 8192) -> bytes:
    """Read the whole file like v9fs does: until a read returns 0 bytes."""
    f = await (await walk(root, path)).open(flags)
    try:
        out, off = b"", 0
        while True:
            chunk = await f.read(off, count)
            if not chunk:
                return out
            out += chunk
            off += len(chunk)
    finally:
        await f.release()


async def echo(root: Node, path: str, data: bytes | str) -> int:
    """``echo data > path``: open O_WRONLY|O_TRUNC (a truncate setattr), one write."""
    if isinstance(data, str):
        data = data.encode()
    node = await walk(root, path)
    await node.setattr(SetAttr(size=0))
    f = await node.open(os.O_WRONLY | os.O_TRUNC)
    try:
        return await f.write(0, data)
    finally:
        await f.release()


async def ls(root: Node, path: str) -> list[str]:
    """Names of a directory's entries, in the order readdir gives them."""
    f = await (await walk(root, path)).open(os.O_RDONLY)
    try:
        return [e.name for e in await f.readdir()]
    finally:
        await f.release()


async def ctl(root: Node, pid: int | str, command: str) -> bytes:
    """Write ``command`` to /proc/<pid>/ctl and read the result from the same open."""
    f = await (await walk(root, f"/proc/{pid}/ctl")).open(os.O_RDWR)
    try:
        await f.write(0, command.encode() + b"\n")
        out, off = b"", 0
        while chunk := await f.read(off, 4096):
            out += chunk
            off += len(chunk)
        return out
    finally:
        await f.release()


async def status(root: Node, pid: int | str) -> dict[str, str]:
    """/proc/<pid>/status as a dict."""
    text = (await cat(root, f"/proc/{pid}/status")).decode()
    return dict(line.split(" ", 1) for line in text.splitlines())


async def eventually(check, timeout: float = 5.0, interval: float = 0.01):
    """Await ``check()`` until it returns a truthy value (returned) or fail.
    For asserting on the reconciler's asynchronous work in tests only."""
    import trio

    with trio.move_on_after(timeout):
        while True:
            v = await check()
            if v:
                return v
            await trio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


async def state_is(root: Node, pid: int, state: str, timeout: float = 5.0) -> dict[str, str]:
    """Wait until /proc/<pid>/status says ``state``; returns the status."""

    async def check():
        st = await status(root, pid)
        return st if st["state"] == state else None

    return await eventually(check, timeout)


async def vm(root: Node, image: str = "tiny", userdata: str = "#cloud-config\n") -> int:
    """Start a VM the documented way: fork init, write userdata, exec; wait running."""
    pid = int(await ctl(root, 1, "fork"))
    await echo(root, f"/proc/{pid}/userdata", userdata)
    await ctl(root, pid, f"exec {image}")
    await state_is(root, pid, "running")
    return pid


async def fails(errno_: int, aw, fragment: str = ""):
    """Await ``aw``, which must raise FsError ``errno_`` whose message
    holds ``fragment``; returns the error."""
    with pytest.raises(FsError) as e:
        await aw
    assert e.value.errno == errno_, e.value
    assert fragment in e.value.message, e.value.message
    return e.value
