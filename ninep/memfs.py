"""An in-memory filesystem with blocking "rendezvous" files, for tests and demos.

The tree holds ordinary directories and files (create, write, read, mkdir,
rename, remove) and one special directory, ``/wait``: every name under it can be
looked up; reading ``/wait/NAME`` at offset 0 blocks until some client writes
NAME (``echo v > /wait/NAME``), then returns the value.  With O_NONBLOCK a read
of an unset name fails with EAGAIN.  This is the blocking-read shape of
cloudfs's ``/proc/<pid>/env/<key>``, without ZooKeeper, so the 9P server can be
proven against real clients on its own.

Every waiter is removed when its read returns or is cancelled (Tflush), which
:attr:`MemFS.waiters` lets tests check.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from collections.abc import Sequence

import trio

from .errors import FsError
from .fs import Attr, DirEntry, FileSystem, Node, OpenFile, SetAttr, SnapshotFile, qid_type_for_mode
from .qid import Qid

_paths = itertools.count(1)


class _Inode:
    def __init__(self, mode: int):
        self.qid = Qid(qid_type_for_mode(mode), 0, next(_paths))
        self.mode = mode
        self.mtime_ns = time.time_ns()
        self.data = bytearray()
        self.children: dict[str, _Inode] = {}


class MemFS(FileSystem):
    """An in-memory tree; ``attach`` ignores uname/aname and gives the root.

    ``waiters`` counts readers currently blocked in ``/wait``.
    """

    def __init__(self) -> None:
        self.root = _Inode(stat.S_IFDIR | 0o777)
        self.wait_dir = _Inode(stat.S_IFDIR | 0o777)
        self.root.children["wait"] = self.wait_dir
        self.values: dict[str, bytes] = {}
        self.value_qids: dict[str, Qid] = {}
        self.changed = trio.Event()
        self.waiters = 0

    async def attach(self, uname: str, aname: str, n_uname: int | None = None) -> Node:
        return MemNode(self, self.root)

    def set_value(self, name: str, value: bytes) -> None:
        """Set ``/wait/NAME`` and wake every reader blocked on it."""
        self.values[name] = value
        self.changed.set()
        self.changed = trio.Event()


class MemNode(Node):
    """A node of a :class:`MemFS`: an ordinary file or directory."""

    def __init__(self, fs: MemFS, inode: _Inode):
        self.fs = fs
        self.inode = inode

    def qid(self) -> Qid:
        return self.inode.qid

    async def getattr(self) -> Attr:
        i = self.inode
        return Attr(qid=i.qid, mode=i.mode, size=len(i.data), nlink=2 if stat.S_ISDIR(i.mode) else 1,
                    atime_ns=i.mtime_ns, mtime_ns=i.mtime_ns, ctime_ns=i.mtime_ns,
                    uname="none", gname="none", muid="none")

    async def walk(self, name: str) -> Node:
        i = self.inode
        if not stat.S_ISDIR(i.mode):
            raise FsError(errno.ENOTDIR, "not a directory")
        if i is self.fs.wait_dir:
            return WaitNode(self.fs, name)
        try:
            return MemNode(self.fs, i.children[name])
        except KeyError:
            raise FsError(errno.ENOENT, f"{name}: no such file") from None

    async def open(self, flags: int) -> OpenFile:
        if stat.S_ISDIR(self.inode.mode):
            return _MemDir(self, flags)
        if flags & os.O_TRUNC:
            self.inode.data.clear()
        return _MemFile(self.inode, flags)

    async def setattr(self, change: SetAttr) -> None:
        i = self.inode
        if change.size is not None:
            if stat.S_ISDIR(i.mode):
                raise FsError(errno.EISDIR, "is a directory")
            del i.data[change.size :]
            i.data.extend(bytes(change.size - len(i.data)))
        if change.mode is not None:
            i.mode = stat.S_IFMT(i.mode) | (change.mode & 0o7777)
        if change.mtime_ns is not None:
            i.mtime_ns = change.mtime_ns

    def _dir(self) -> _Inode:
        if not stat.S_ISDIR(self.inode.mode):
            raise FsError(errno.ENOTDIR, "not a directory")
        if self.inode is self.fs.wait_dir:
            raise FsError(errno.EACCES, "write /wait/NAME to create it")
        return self.inode

    def _new(self, name: str, mode: int) -> _Inode:
        d = self._dir()
        if name in d.children:
            raise FsError(errno.EEXIST, f"{name} exists")
        d.children[name] = child = _Inode(mode)
        return child

    async def create(self, name: str, mode: int, flags: int, uid: int, gid: int) -> tuple[Node, OpenFile]:
        child = self._new(name, stat.S_IFREG | (mode & 0o7777))
        return MemNode(self.fs, child), _MemFile(child, flags)

    async def mkdir(self, name: str, mode: int, uid: int, gid: int) -> Node:
        return MemNode(self.fs, self._new(name, stat.S_IFDIR | (mode & 0o7777)))

    async def unlink(self, name: str, is_dir: bool) -> None:
        if self.inode is self.fs.wait_dir:
            if self.fs.values.pop(name, None) is None:
                raise FsError(errno.ENOENT, f"{name} is not set")
            return
        d = self._dir()
        child = d.children.get(name)
        if child is None:
            raise FsError(errno.ENOENT, f"{name}: no such file")
        if stat.S_ISDIR(child.mode):
            if not is_dir:
                raise FsError(errno.EISDIR, f"{name} is a directory")
            if child.children:
                raise FsError(errno.ENOTEMPTY, f"{name} is not empty")
        elif is_dir:
            raise FsError(errno.ENOTDIR, f"{name} is not a directory")
        del d.children[name]

    async def rename(self, name: str, newdir: Node, newname: str) -> None:
        d = self._dir()
        if not isinstance(newdir, MemNode):
            raise FsError(errno.EXDEV, "cross-device rename")
        nd = newdir._dir()
        if name not in d.children:
            raise FsError(errno.ENOENT, f"{name}: no such file")
        nd.children[newname] = d.children.pop(name)


class _MemFile(OpenFile):
    def __init__(self, inode: _Inode, flags: int):
        super().__init__(flags)
        self.inode = inode

    async def read(self, offset: int, count: int) -> bytes:
        return bytes(self.inode.data[offset : offset + count])

    async def write(self, offset: int, data: bytes) -> int:
        buf = self.inode.data
        if self.flags & os.O_APPEND:
            offset = len(buf)
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset : offset + len(data)] = data
        self.inode.mtime_ns = time.time_ns()
        return len(data)


class _MemDir(OpenFile):
    def __init__(self, node: MemNode, flags: int):
        super().__init__(flags)
        self.node = node

    async def readdir(self) -> Sequence[DirEntry]:
        i = self.node.inode
        if i is self.node.fs.wait_dir:
            fs = self.node.fs
            return [DirEntry(n, _value_qid(fs, n), stat.S_IFREG | 0o666) for n in sorted(fs.values)]
        return [DirEntry(n, c.qid, c.mode) for n, c in i.children.items()]


def _value_qid(fs: MemFS, name: str) -> Qid:
    q = fs.value_qids.get(name)
    if q is None:
        q = fs.value_qids[name] = Qid(0, 0, next(_paths))
    return q


class WaitNode(Node):
    """``/wait/NAME``: reads at offset 0 block until NAME is written."""

    def __init__(self, fs: MemFS, name: str):
        self.fs = fs
        self.name = name

    def qid(self) -> Qid:
        return _value_qid(self.fs, self.name)

    async def getattr(self) -> Attr:
        return Attr(qid=self.qid(), mode=stat.S_IFREG | 0o666)

    async def open(self, flags: int) -> OpenFile:
        return _WaitFile(self, flags)


class _WaitFile(SnapshotFile):
    def __init__(self, node: WaitNode, flags: int):
        super().__init__(flags)
        self.node = node

    async def produce(self) -> bytes:
        fs = self.node.fs
        while (v := fs.values.get(self.node.name)) is None:
            if self.nonblocking:
                raise FsError(errno.EAGAIN, f"{self.node.name} is not set yet")
            fs.waiters += 1
            try:
                await fs.changed.wait()
            finally:
                fs.waiters -= 1
        return v

    def readable(self) -> bool:
        return self.node.name in self.node.fs.values

    async def wait_readable(self) -> None:
        fs = self.node.fs
        while self.node.name not in fs.values:
            await fs.changed.wait()

    async def write(self, offset: int, data: bytes) -> int:
        self.node.fs.set_value(self.node.name, bytes(data))
        return len(data)
