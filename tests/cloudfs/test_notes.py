"""Notes (proc(3) ``note`` and ``notepg``) on a real ZooKeeper: posted by
the operator, the process or an ancestor through any daemon, taken in order
by the process itself, bounded by the ``notes`` quota, gone with the
process.  The guests that act on them are in tests/test_e2e_qemu.py."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from cloudfs.notes import NOTE_MAX, parse_note
from ninep.errors import FsError
from tests.cloudfs.fsops import cat, ctl, echo, ls



async def fails(errno_: int, aw) -> FsError:
    with pytest.raises(FsError) as e:
        await aw
    assert e.value.errno == errno_, e.value
    return e.value


def test_parse_note():
    assert parse_note(b"interrupt\n") == b"interrupt" and parse_note(b"x") == b"x"
    assert parse_note(b"a" * NOTE_MAX) == b"a" * NOTE_MAX
    for bad in (b"", b"\n", b"a" * (NOTE_MAX + 1), b"two\nlines", b"nul\0", b"x\n\n"):
        with pytest.raises(FsError) as e:
            parse_note(bad)
        assert e.value.errno == errno.EINVAL


async def test_notes_are_taken_in_order_through_any_daemon(cfs, cfs2):
    op, op2 = cfs.view_for(None), cfs2.view_for(None)
    pid = int(await ctl(op, 1, "fork"))
    me = cfs2.view_for(pid)  # the process itself, on the other daemon
    await fails(errno.EAGAIN, cat(me, "/proc/self/note", flags=os.O_RDONLY | os.O_NONBLOCK))
    async with trio.open_nursery() as n:
        got: list[bytes] = []

        async def reader():
            got.append(await cat(me, "/proc/self/note"))  # blocks until the first note

        n.start_soon(reader)
        await trio.sleep(0.2)
        assert got == []
        await echo(op, f"/proc/{pid}/note", "interrupt\n")
    assert got == [b"interrupt\n"]
    for note in ("one", "two", "three"):
        await echo(op2 if note == "two" else op, f"/proc/{pid}/note", note)
    assert [await cat(me, "/proc/self/note") for _ in range(3)] == [b"one\n", b"two\n", b"three\n"]
    await fails(errno.EINVAL, echo(op, f"/proc/{pid}/note", "a" * 200))
    await fails(errno.ENOENT, echo(op, "/proc/99/note", "x"))


async def test_who_may_post_and_take(cfs):
    op = cfs.view_for(None)
    a = int(await ctl(op, 1, "fork"))
    b = int(await ctl(cfs.view_for(a), a, "fork"))  # a's child
    other = int(await ctl(op, 1, "fork"))
    va, vb = cfs.view_for(a), cfs.view_for(b)
    await echo(va, f"/proc/{b}/note", "from-parent")       # an ancestor posts
    await echo(vb, "/proc/self/note", "to-self")            # the process itself posts
    await fails(errno.EACCES, echo(vb, f"/proc/{a}/note", "up"))       # not to its parent
    await fails(errno.EACCES, echo(va, f"/proc/{other}/note", "x"))    # nor to a stranger
    await fails(errno.EACCES, cat(va, f"/proc/{b}/note"))  # only b itself (or the operator) takes b's notes
    await fails(errno.EACCES, echo(cfs.readonly_view(), f"/proc/{a}/note", "x"))
    assert await cat(vb, "/proc/self/note") == b"from-parent\n"
    assert await cat(op, f"/proc/{b}/note") == b"to-self\n"  # the operator may take them too
    await fails(errno.EACCES, cat(va, f"/proc/{a}/notepg"))  # write-only


async def test_notepg_reaches_the_subtree(cfs):
    op = cfs.view_for(None)
    a = int(await ctl(op, 1, "fork"))
    b = int(await ctl(op, a, "fork"))
    c = int(await ctl(op, b, "fork"))
    other = int(await ctl(op, 1, "fork"))
    await echo(cfs.view_for(a), f"/proc/{a}/notepg", "hangup")
    for p in (a, b, c):
        assert await cat(op, f"/proc/{p}/note") == b"hangup\n"
    await fails(errno.EAGAIN, cat(op, f"/proc/{other}/note", flags=os.O_RDONLY | os.O_NONBLOCK))
    await fails(errno.EACCES, echo(cfs.view_for(b), f"/proc/{a}/notepg", "x"))


async def test_pending_notes_are_bounded_and_go_with_the_process(cfs):
    op = cfs.view_for(None)
    pid = int(await ctl(op, 1, "fork"))
    await echo(op, f"/proc/{pid}/limits", "notes 3")
    for i in range(3):
        await echo(op, f"/proc/{pid}/note", f"n{i}")
    e = await fails(errno.EAGAIN, echo(op, f"/proc/{pid}/note", "one-too-many"))
    assert "limit notes" in e.message
    assert b"notes 3 3\n" in await cat(op, f"/proc/{pid}/limits")
    assert await cat(op, f"/proc/{pid}/note") == b"n0\n"
    assert b"notes 3 2\n" in await cat(op, f"/proc/{pid}/limits")
    await echo(op, f"/proc/{pid}/note", "room-again")
    await ctl(op, pid, "kill")
    with trio.fail_after(30):
        await cat(op, "/proc/1/wait")
    assert await cfs.store.exists(cfs.layout.notes(pid)) is None
    assert str(pid) not in await ls(op, "/proc")


async def test_a_blocked_note_read_ends_with_the_process(cfs):
    op = cfs.view_for(None)
    pid = int(await ctl(op, 1, "fork"))
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(lambda: fails(errno.ENOENT, cat(cfs.view_for(pid), "/proc/self/note")))
            await trio.sleep(0.2)
            await ctl(op, pid, "kill")
