"""The open files of cloudfs: one class per kind of synthetic file.

Content files are :class:`ninep.fs.SnapshotFile` subclasses: a read at offset
0 produces the content (possibly blocking), later offsets page through that
snapshot, so ``cat`` works over v9fs and FUSE direct I/O.  Blocking produce
methods honour O_NONBLOCK (EAGAIN) and are cancel-safe (ZooKeeper watch
registrations are removed when a read is cancelled).

Semantics of each file: docs/namespace.md; the table of kinds: cloudfs.tree.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from ninep.errors import FsError
from ninep.fs import DirEntry, OpenFile, SnapshotFile

from . import ctl, quotas
from .drivers.base import ServerStats
from .notes import parse_note
from .pipes import PIPE_MSG_MAX, READER, WRITER

if TYPE_CHECKING:
    from .namespace import CloudFS
    from .process import Process


class DirFile(OpenFile):
    """An open directory; ``lister()`` gives the entries of one readdir."""

    def __init__(self, lister: Callable[[], Awaitable[Sequence[DirEntry]]], flags: int = os.O_RDONLY):
        super().__init__(flags)
        self._lister = lister

    async def readdir(self) -> Sequence[DirEntry]:
        return await self._lister()


class CtlFile(OpenFile):
    """``/proc/<pid>/ctl``: each write is one command (cloudfs.ctl.parse);
    a read on the same open then returns the command's result once (for
    ``fork`` the child pid and a newline; empty for the others), then EOF.
    Reads ignore the offset (as Plan 9 ctl files do): after ``echo fork >&3``
    the shell's file position is past the command, yet ``cat <&3`` must
    still see the pid.
    Errors: EINVAL (bad command, with message), ENOENT, EPERM, ESRCH."""

    def __init__(self, fs: "CloudFS", pid: int, flags: int):
        super().__init__(flags)
        self.fs = fs
        self.pid = pid
        self.result: bytes | None = None
        self._pos = 0

    async def write(self, offset: int, data: bytes) -> int:
        cmd = ctl.parse(data)
        self.result = None
        self.result = await self.fs.run_ctl(self.pid, cmd)
        self._pos = 0
        return len(data)

    async def read(self, offset: int, count: int) -> bytes:
        if self.result is None:
            return b""
        chunk = self.result[self._pos : self._pos + count]
        self._pos += len(chunk)
        if not chunk:
            self.result = None
        return chunk


async def record_of(fs: "CloudFS", pid: int) -> "Process":
    """``pid``'s record from the watched cache; FsError(ENOENT) if it ended."""
    rec = await fs.records.cached(pid)
    if rec is None:
        raise FsError(errno.ENOENT, f"no process {pid}")
    return rec


class StatusFile(SnapshotFile):
    """``/proc/<pid>/status``: Process.status_text() of the record now."""

    def __init__(self, fs: "CloudFS", pid: int, flags: int):
        super().__init__(flags)
        self.fs, self.pid = fs, pid

    async def produce(self) -> bytes:
        return (await record_of(self.fs, self.pid)).status_text().encode()


class ChildrenFile(SnapshotFile):
    """``/proc/<pid>/children``: child pids, one per line, ascending."""

    def __init__(self, fs: "CloudFS", pid: int, flags: int):
        super().__init__(flags)
        self.fs, self.pid = fs, pid

    async def produce(self) -> bytes:
        return "".join(f"{k}\n" for k in await self.fs.records.kids(self.pid)).encode()


class UserdataFile(SnapshotFile):
    """``/proc/<pid>/userdata``: the bytes; a write at offset 0 replaces,
    later offsets extend (EFBIG above cloudfs.znodes.USERDATA_MAX)."""

    def __init__(self, fs: "CloudFS", pid: int, flags: int):
        super().__init__(flags)
        self.fs, self.pid = fs, pid

    async def produce(self) -> bytes:
        return await self.fs.data.userdata(self.pid)

    async def write(self, offset: int, data: bytes) -> int:
        self.snapshot = None
        return await self.fs.data.write_userdata(self.pid, offset, data)


#: The iounit of files whose reads may block (env keys, wait): a 9P server
#: reserves each outstanding read's reply (ninep.limits), so blocked reads
#: of a small iounit leave a connection's reply budget for the others.
BLOCKING_IOUNIT = 8192


class EnvKeyFile(SnapshotFile):
    """``/proc/<pid>/env/<key>``: reading blocks until the key is set (by any
    daemon; woken by a ZooKeeper watch), EAGAIN with O_NONBLOCK; a write at
    offset 0 sets the value, later offsets extend it.  An open for reading
    only has an iounit of BLOCKING_IOUNIT (its reads may block); one that
    writes keeps the full msize (Linux's v9fs splits writes by the iounit,
    and a blocked reader would see the first piece alone)."""

    def __init__(self, fs: "CloudFS", pid: int, key: str, flags: int):
        super().__init__(flags)
        self.fs, self.pid, self.key = fs, pid, key
        if flags & os.O_ACCMODE == os.O_RDONLY:
            self.iounit = BLOCKING_IOUNIT
        self._seen_set = False  # a key once set stays readable until unset; poll re-checks via wait_readable

    async def produce(self) -> bytes:
        value = await self.fs.data.env_wait(self.pid, self.key, self.nonblocking)
        self._seen_set = True
        return value

    def readable(self) -> bool:
        return self._seen_set

    async def wait_readable(self) -> None:
        """Until the key is set (the same ZooKeeper watch a blocking read uses)."""
        await self.fs.data.env_wait(self.pid, self.key, False)
        self._seen_set = True

    async def write(self, offset: int, data: bytes) -> int:
        self.snapshot = None
        return await self.fs.data.env_write(self.pid, self.key, offset, data)


class WaitFile(SnapshotFile):
    """``/proc/<pid>/wait``: each read at offset 0 blocks until a child has
    ended and consumes the oldest record: ``<pid> <name> <state> <message>\\n``."""

    iounit = BLOCKING_IOUNIT

    def __init__(self, fs: "CloudFS", pid: int, flags: int):
        super().__init__(flags)
        self.fs, self.pid = fs, pid
        self._pending = False  # a record was there when last looked at

    async def produce(self) -> bytes:
        rec = await self.fs.waits.next(self.pid, self.nonblocking)
        self._pending = False  # consumed; the next one is not known yet
        return rec.line().encode()

    def readable(self) -> bool:
        return self._pending

    async def wait_readable(self) -> None:
        """Until a wait record exists (a child watch); consumes nothing."""
        await self.fs.waits.ready(self.pid)
        self._pending = True


class NoteFile(SnapshotFile):
    """``/proc/<pid>/note`` (proc(3)): each write posts one note
    (cloudfs.notes.parse_note; the offset is ignored); each read at offset
    0 blocks until a note is pending, takes the oldest and returns it with a
    newline (EAGAIN with O_NONBLOCK)."""

    def __init__(self, fs: "CloudFS", pid: int, flags: int):
        super().__init__(flags)
        self.fs, self.pid = fs, pid
        if flags & os.O_ACCMODE == os.O_RDONLY:
            self.iounit = BLOCKING_IOUNIT
        self._pending = False

    async def produce(self) -> bytes:
        note = await self.fs.notes.next(self.pid, self.nonblocking)
        self._pending = False
        return note + b"\n"

    def readable(self) -> bool:
        return self._pending

    async def wait_readable(self) -> None:
        """Until a note is pending; takes nothing."""
        await self.fs.notes.ready(self.pid)
        self._pending = True

    async def write(self, offset: int, data: bytes) -> int:
        await self.fs.notes.post(self.pid, parse_note(data))
        return len(data)


class NotepgFile(OpenFile):
    """``/proc/<pid>/notepg`` (proc(3)): write-only; each write posts the
    note to the process and every descendant (cloudfs.notes.Notes.post_group)."""

    def __init__(self, fs: "CloudFS", pid: int, flags: int):
        super().__init__(flags)
        self.fs, self.pid = fs, pid

    async def write(self, offset: int, data: bytes) -> int:
        await self.fs.notes.post_group(self.pid, parse_note(data))
        return len(data)


class PipeFile(OpenFile):
    """An open of ``/proc/<pid>/pipe/<name>`` (cloudfs.pipes): each write
    is one message; each read takes one message (its first ``count``
    bytes), blocking until one arrives, 0 bytes at EOF; offsets are
    ignored (a stream).  ``ends``: the open's ``(znode, kind)`` writer and
    reader znodes, dropped at release (clunk, close, or the connection's
    end).  ``check``: for the open that made the pipe (``touch``), which
    counts as a reader or writer only from its first read or write: an
    async function of the kind that raises FsError(EACCES) unless that
    use is allowed."""

    iounit = PIPE_MSG_MAX

    def __init__(self, fs: "CloudFS", pid: int, name: str, flags: int, ends: list[tuple[str, str]],
                 check: Callable[[str], Awaitable[None]] | None = None):
        super().__init__(flags)
        self.fs, self.pid, self.name, self.ends = fs, pid, name, ends
        self.check = check
        self._lock = trio.Lock()
        self._continues: tuple[int, int] | None = None

    async def _end(self, kind: str) -> str:
        async with self._lock:
            for end, k in self.ends:
                if k == kind:
                    return end
            if self.check is None:
                raise FsError(errno.EBADF, "pipe not open for that")
            await self.check(kind)
            end = await self.fs.pipes.open_end(self.pid, self.name, kind)
            self.ends.append((end, kind))
            return end

    async def read(self, offset: int, count: int) -> bytes:
        if count == 0:
            return b""
        # Linux's v9fs repeats a read(2) until it has the count asked for
        # (p9_client_read), which would join messages: the read that
        # continues one (this open, where that message ended, for what was
        # left of the count) gets 0 bytes, so read(2) returns one message.
        if self._continues is not None and self._continues == (offset, count):
            self._continues = None
            return b""
        end = await self._end(READER)
        data = await self.fs.pipes.read(self.pid, self.name, end, count, self.nonblocking)
        self._continues = (offset + len(data), count - len(data)) if 0 < len(data) < count else None
        return data

    async def write(self, offset: int, data: bytes) -> int:
        end = await self._end(WRITER)
        return await self.fs.pipes.write(self.pid, self.name, end, data, self.nonblocking)

    async def release(self) -> None:
        ends, self.ends = self.ends, []
        for end, _kind in ends:
            await self.fs.pipes.close_end(end)


class LimitsFile(SnapshotFile):
    """``/proc/<pid>/limits``: ``name limit used`` lines (cloudfs.quotas);
    each write is one ``name value`` setting.  ``only_lower``: the writer
    may only lower a limit (a process's view); EPERM otherwise.  EINVAL for
    a malformed write or a process made before limits existed."""

    def __init__(self, fs: "CloudFS", pid: int, flags: int, only_lower: bool):
        super().__init__(flags)
        self.fs, self.pid, self.only_lower = fs, pid, only_lower

    async def produce(self) -> bytes:
        got = await self.fs.quotas.get(self.pid)
        if got is None:
            if not await self.fs.records.exists(self.pid):
                raise FsError(errno.ENOENT, f"no process {self.pid}")
            return b""  # made before limits existed: none
        return got.value.text()

    async def write(self, offset: int, data: bytes) -> int:
        name, value = quotas.parse_setting(data)
        self.snapshot = None
        await self.fs.quotas.set_limit(self.pid, name, value, only_lower=self.only_lower)
        return len(data)


class StatsFile(SnapshotFile):
    """``/proc/<pid>/stats``: one sample of the VM's counters per read at
    offset 0 (ServerStats.text; all ``-`` for a process without a VM)."""

    def __init__(self, fs: "CloudFS", pid: int, flags: int):
        super().__init__(flags)
        self.fs, self.pid = fs, pid

    async def produce(self) -> bytes:
        rec = await record_of(self.fs, self.pid)
        return (await self.fs.catalog.stats(rec.vm) if rec.vm else ServerStats()).text()


#: The most console bytes ``/proc/<pid>/console`` shows (its last part; the
#: QEMU driver keeps about 1.5 MiB).
CONSOLE_LIMIT = 2 << 20


async def console_of(fs: "CloudFS", pid: int) -> bytes:
    """The last CONSOLE_LIMIT bytes of ``pid``'s VM console (empty without a VM)."""
    rec = await record_of(fs, pid)
    return await fs.catalog.console(rec.vm, CONSOLE_LIMIT) if rec.vm else b""


class ConsoleFile(SnapshotFile):
    """``/proc/<pid>/console``: a read at offset 0, or past what this open
    has seen, takes the console as it is now; other reads page through that
    copy.  So ``cat`` sees one consistent text and ``tail -f`` (which reads
    from the last size it saw) gets what was written since."""

    def __init__(self, fs: "CloudFS", pid: int, flags: int):
        super().__init__(flags)
        self.fs, self.pid = fs, pid

    async def produce(self) -> bytes:
        return await console_of(self.fs, self.pid)

    async def read(self, offset: int, count: int) -> bytes:
        if offset == 0 or self.snapshot is None or offset >= len(self.snapshot):
            self.snapshot = await self.produce()
        return self.snapshot[offset:offset + count]


class InfoFile(SnapshotFile):
    """A read-only ``key value`` file made by ``producer()`` (images, networks)."""

    def __init__(self, producer: Callable[[], Awaitable[bytes]], flags: int):
        super().__init__(flags)
        self._producer = producer

    async def produce(self) -> bytes:
        return await self._producer()


def kv_text(rows: Sequence[tuple[str, object]]) -> bytes:
    """``key value\\n`` lines; empty values are ``-``."""
    return "".join(f"{k} {v if v not in (None, '') else '-'}\n" for k, v in rows).encode()
