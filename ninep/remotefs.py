"""A :class:`ninep.fs.FileSystem` whose files live on a remote 9P server.

:class:`RemoteFS` turns the fid API of :mod:`ninep.client` back into the
shared filesystem interface, so anything that serves a ``FileSystem`` (the
FUSE adapter :mod:`mountd.fuse`, our own 9P server) can re-export a remote
namespace: ``cloudfs import`` is ``mount(RemoteFS(client), dir)``.

Shapes
------
- A :class:`RemoteNode` owns one *unopened* fid (from Tattach or Twalk).  The
  fid is clunked in the background when the node is garbage collected (the
  interface has no "node released" call; front ends drop nodes when the
  kernel forgets them).
- :meth:`RemoteNode.open` clones the node's fid and opens the clone (walk(5),
  open(5)), so every :class:`RemoteFile` is one remote open with its own
  offset-0 snapshot on the server side; :meth:`RemoteFile.release` clunks it.
- Reads and writes are single calls of :meth:`ninep.client.Fid.read` /
  :meth:`~ninep.client.Fid.write` (Tread/Twrite of at most iounit bytes each),
  so one ``write(2)`` of a ctl command up to iounit bytes is one Twrite.
- Cancelling a blocked read (e.g. the FUSE adapter noticing the reader died)
  makes the client send Tflush and wait for Rflush (flush(5)), which removes
  the waiter on the server.

Readiness: 9P has no poll.  :meth:`RemoteFile.wait_readable` performs the
next read at offset 0 early (a Tread that blocks until the server answers)
and keeps its answer for that read; :meth:`RemoteFile.readable` says whether
such an answer is waiting.  The FUSE adapter's ``poll`` uses both.

Errors are the client's :class:`ninep.errors.FsError` (the server's errno,
EIO when the connection is gone).
"""

from __future__ import annotations

import errno
import weakref
from collections.abc import Sequence

import trio

from .client import Client, Fid
from .errors import FsError
from .fs import Attr, DirEntry, FileSystem, Node, OpenFile, SetAttr, StatFs
from .messages import AT_REMOVEDIR
from .qid import Qid

__all__ = ["RemoteFS", "RemoteNode", "RemoteFile"]


def _clunk_later(client: Client, fid: Fid) -> None:
    """Finalizer of a node's fid: clunk it in the client's nursery (never raises)."""
    if fid.clunked or client.closed:
        return
    fid.clunked = True
    try:
        client._clunk_soon(fid.fid)
    except RuntimeError:  # nursery closed or not in the trio thread: the connection's end clunks it
        pass


class RemoteFS(FileSystem):
    """The tree a 9P server serves, seen through a connected :class:`Client`.

    ``RemoteFS(client)``: :meth:`attach` sends Tattach (attach(5)) with the
    given ``uname``/``aname``/``n_uname`` (``n_uname`` None → 0, root, as
    Linux's v9fs does for the mounting user) and returns the remote root.
    The client is owned by the caller; :meth:`close` does not close it.
    """

    def __init__(self, client: Client):
        self.client = client

    async def attach(self, uname: str, aname: str, n_uname: int | None = None) -> Node:
        fid = await self.client.attach(uname, aname, 0 if n_uname is None else n_uname)
        return RemoteNode(self.client, fid)


class RemoteNode(Node):
    """A remote file or directory, held by one unopened fid (``self.fid``)."""

    def __init__(self, client: Client, fid: Fid):
        self.client = client
        self.fid = fid
        self._qid = fid.qid
        weakref.finalize(self, _clunk_later, client, fid)

    def __repr__(self) -> str:
        return f"<RemoteNode fid={self.fid.fid} qid={self._qid}>"

    def qid(self) -> Qid:
        return self._qid

    async def getattr(self) -> Attr:
        """Tgetattr (9P2000.L) or Tstat (9P2000/.u) of the node's fid."""
        return await self.fid.getattr()

    async def walk(self, name: str) -> Node:
        """Twalk of one element to a new fid; ENOENT/ENOTDIR as the server says."""
        return RemoteNode(self.client, await self.fid.walk(name))

    async def open(self, flags: int) -> OpenFile:
        """Clone the fid and Tlopen/Topen the clone with ``flags`` (O_* bits)."""
        f = await self.fid.walk()
        try:
            await f.open(flags)
        except BaseException:
            await f.aclose_on_error()
            raise
        return RemoteFile(self, f, flags)

    async def setattr(self, change: SetAttr) -> None:
        """Tsetattr (9P2000.L) or Twstat (9P2000/.u); the server decides what
        is allowed (synthetic files accept a bare truncate to 0)."""
        await self.fid.setattr(change)

    async def create(self, name: str, mode: int, flags: int, uid: int, gid: int) -> tuple[Node, OpenFile]:
        """Tlcreate/Tcreate ``name`` opened with ``flags``, plus a Twalk for
        the new file's node.  ``uid`` is the attaching user's on 9P."""
        f = await self.fid.create(name, flags, mode, gid)
        try:
            node = await self.walk(name)
        except BaseException:
            await f.aclose_on_error()
            raise
        return node, RemoteFile(node, f, flags)  # type: ignore[arg-type]

    async def mkdir(self, name: str, mode: int, uid: int, gid: int) -> Node:
        """Tmkdir (9P2000.L) or Tcreate with DMDIR, then a Twalk to the new directory."""
        await self.fid.mkdir(name, mode, gid)
        return await self.walk(name)

    async def unlink(self, name: str, is_dir: bool) -> None:
        """Tunlinkat (9P2000.L, AT_REMOVEDIR for directories) or walk + Tremove."""
        await self.fid.unlinkat(name, AT_REMOVEDIR if is_dir else 0)

    async def rename(self, name: str, newdir: Node, newname: str) -> None:
        """Trenameat (9P2000.L) or Twstat of the name (same directory only,
        EXDEV otherwise).  EXDEV when ``newdir`` is not on this connection."""
        if not isinstance(newdir, RemoteNode) or newdir.client is not self.client:
            raise FsError(errno.EXDEV, "rename across 9P connections")
        await self.fid.renameat(name, newdir.fid, newname)

    async def readlink(self) -> str:
        """Treadlink (9P2000.L) or the 9P2000.u stat extension."""
        return await self.fid.readlink()

    async def statfs(self) -> StatFs:
        """Tstatfs (9P2000.L); ENOSYS on other dialects."""
        return await self.fid.statfs()


class RemoteFile(OpenFile):
    """One remote open: an opened fid (``self.fid``) of ``node``.

    ``iounit`` is the server's (0 = msize − IOHDRSZ).  The remote server keeps
    the offset-0 snapshot of synthetic files per open, so reads at later
    offsets continue the same snapshot, as over Linux's v9fs.

    Readiness (:meth:`wait_readable`) is the first read itself: a blocking
    Tread at offset 0 of one iounit on this same fid, whose answer is kept and
    handed to the next read at offset 0.  So a poll never costs an extra read
    on the server (which matters for files whose reads consume something,
    such as a process's ``wait`` file).  Reads and the probe are serialised
    per open file.
    """

    def __init__(self, node: RemoteNode, fid: Fid, flags: int):
        super().__init__(flags)
        self.node = node
        self.fid = fid
        self.iounit = fid.iounit
        self._lock = trio.Lock()
        self._pre: bytes | None = None  # answer of the probe read at offset 0
        self._pre_err: FsError | None = None
        self._pre_served = False  # a read at offset 0 has taken _pre

    def _chunk(self) -> int:
        cap = self.fid.client.max_payload
        return min(self.iounit, cap) if self.iounit else cap

    async def read(self, offset: int, count: int) -> bytes:
        """Tread(s) at ``offset`` (read(5)); blocks as long as the server does.
        Cancellation sends Tflush.  Served from the readiness probe's answer
        when one is pending."""
        async with self._lock:
            if self._pre_err is not None and offset == 0:
                err, self._pre_err = self._pre_err, None
                raise err
            pre = self._pre
            if pre is not None:
                if offset == 0 and not self._pre_served:
                    self._pre_served = True
                    return pre[:count]
                if offset > 0 and (offset + count <= len(pre) or len(pre) < self._chunk()):
                    return pre[offset : offset + count]  # the server's snapshot ends where pre ends
                if offset == 0:
                    self._pre = None  # a fresh read: the probe's answer was used
            return await self.fid.read(offset, count)

    async def write(self, offset: int, data: bytes) -> int:
        """Twrite(s) of ``data`` at ``offset`` (one Twrite when ≤ iounit)."""
        self._pre = None
        return await self.fid.write(offset, data)

    async def readdir(self) -> Sequence[DirEntry]:
        """The remote directory's entries (Treaddir or stat(5) reads)."""
        return await self.fid.readdir()

    def readable(self) -> bool:
        """True when a probe's answer (or error) waits for the next read at
        offset 0 (9P has no poll; see :meth:`wait_readable`)."""
        return self._pre_err is not None or (self._pre is not None and not self._pre_served)

    async def wait_readable(self) -> None:
        """Return once a read at offset 0 has an answer: performs that read
        (one Tread of iounit bytes, blocking like any read) and keeps the
        answer, or the FsError, for the next read at offset 0.  Cancellation
        flushes the Tread.  Not an :class:`OpenFile` method of the interface:
        the FUSE adapter uses it when present."""
        async with self._lock:
            if self.readable():
                return
            try:
                data = await self.fid.read(0, self._chunk())
            except FsError as e:
                self._pre_err = e
                return
            self._pre, self._pre_served = data, False

    async def fsync(self) -> None:
        """Tfsync on 9P2000.L; nothing elsewhere."""
        await self.fid.fsync()

    async def release(self) -> None:
        """Tclunk the open fid; errors (e.g. a dead connection) are swallowed."""
        try:
            with trio.CancelScope(shield=True):
                await self.fid.clunk()
        except FsError:
            pass
