"""The async filesystem interface that every front end calls.

One small interface serves both the 9P server (:mod:`ninep.server`) and the
FUSE adapter (:mod:`mountd.fuse`), so a tree is written once and looks the same,
byte for byte, through either.

Shapes
------
- A :class:`FileSystem` hands out a root :class:`Node` per attach.  The root may
  depend on who attaches (``uname``, ``aname``), so one served tree can give
  each client its own view (Plan 9's per-process namespace).
- A :class:`Node` is a file or directory.  Directories answer :meth:`Node.walk`
  for one path element at a time; names are never ``"."`` or ``".."`` (front ends
  resolve those themselves) and never contain ``"/"``.  Over 9P no string
  (name, aname, uname, symlink target) contains NUL (the codec refuses it,
  intro(5)), and bytes that are not UTF-8 arrive as lone surrogates
  U+DC80…U+DCFF (``surrogateescape``, as ``os.fsdecode`` gives them), so
  ``name.encode("utf-8", "surrogateescape")`` is exactly what the client
  sent; code that needs real text must check (``name.encode()`` raises).
- :meth:`Node.open` returns an :class:`OpenFile`, the state of one open (one
  9P fid after Tlopen/Topen, one FUSE file handle).  Reads and writes carry an
  explicit offset; directory listings come whole from :meth:`OpenFile.readdir`
  and front ends page through that snapshot with their own cookies.

Errors: every method raises :class:`ninep.errors.FsError` with a Linux errno.
The defaults below refuse with the errno a Linux filesystem would use.

Flags and modes are Linux's: ``open`` gets ``os.O_*`` flags (9P2000 open modes
are converted by the server), ``mode`` values are ``st_mode`` bits including
``stat.S_IFDIR``/``S_IFREG``, times are integer nanoseconds since the epoch.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from .errors import FsError
from .frozen import frozen
from .qid import QTDIR, QTFILE, QTSYMLINK, Qid

__all__ = [
    "Attr",
    "SetAttr",
    "DirEntry",
    "StatFs",
    "FileSystem",
    "Node",
    "OpenFile",
    "SnapshotFile",
    "qid_type_for_mode",
    "dirent_type_for_mode",
]


def qid_type_for_mode(mode: int) -> int:
    """The QT* qid type bits for a Linux ``st_mode``."""
    if stat.S_ISDIR(mode):
        return QTDIR
    if stat.S_ISLNK(mode):
        return QTSYMLINK
    return QTFILE


def dirent_type_for_mode(mode: int) -> int:
    """The ``d_type`` (DT_DIR=4, DT_REG=8, DT_LNK=10 …) for a Linux ``st_mode``."""
    return stat.S_IFMT(mode) >> 12


@frozen
class Attr:
    """A file's attributes, the union of what Rgetattr (9P2000.L), the 9P2000/.u
    stat(5) record and FUSE's EntryAttributes carry.

    ``mode`` is a full ``st_mode`` (type bits and permissions); ``size`` in
    bytes (0 for synthetic files whose size is unknown until read); times in
    ns since the epoch; ``uname``/``gname``/``muid`` are the names 9P2000 stat
    carries; ``extension`` is 9P2000.u's (symlink target, device spec).
    """

    qid: Qid
    mode: int
    size: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    rdev: int = 0
    blksize: int = 4096
    blocks: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    uname: str = "none"
    gname: str = "none"
    muid: str = ""
    extension: str = ""


@frozen
class SetAttr:
    """The attribute changes of one Tsetattr/Twstat/FUSE setattr; ``None`` = keep.

    ``size`` set by ``open(O_TRUNC)`` arrives here (Linux's v9fs sends Tsetattr
    with the size bit, 9P2000 clients a Twstat with length 0).
    """

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None

    def only_truncate_to_zero(self) -> bool:
        """True when the change is just "size 0" (perhaps with times): ``echo x > f``."""
        return self.size == 0 and self.mode is None and self.uid is None and self.gid is None


@frozen
class DirEntry:
    """One directory entry: ``name`` (no ``/``), the child's ``qid`` and ``mode``."""

    name: str
    qid: Qid
    mode: int

    @property
    def dtype(self) -> int:
        return dirent_type_for_mode(self.mode)


@frozen
class StatFs:
    """statfs(2) numbers for Rstatfs (9P2000.L) and FUSE statfs."""

    type: int = 0x01021997  # V9FS_MAGIC
    bsize: int = 4096
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    fsid: int = 0
    namelen: int = 255


class OpenFile:
    """One open of a file or directory: a 9P fid after open, a FUSE file handle.

    ``iounit`` (bytes, 0 = let the server choose) is the most a single read or
    write should move.  Subclasses override what they support; the defaults fail
    the way Linux does for a file that lacks the operation.
    """

    iounit: int = 0

    def __init__(self, flags: int = os.O_RDONLY):
        self.flags = flags

    @property
    def nonblocking(self) -> bool:
        """True when opened with O_NONBLOCK: reads that would wait fail with EAGAIN."""
        return bool(self.flags & os.O_NONBLOCK)

    async def read(self, offset: int, count: int) -> bytes:
        """At most ``count`` bytes at ``offset``; ``b""`` is end of file.  May block."""
        raise FsError(errno.EINVAL, "file is not readable")

    async def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset``; returns the byte count taken (> 0)."""
        raise FsError(errno.EINVAL, "file is not writable")

    async def readdir(self) -> Sequence[DirEntry]:
        """The directory's entries (without ``.`` and ``..``) as one snapshot."""
        raise FsError(errno.ENOTDIR, "not a directory")

    def readable(self) -> bool:
        """Whether a read at offset 0 is known to answer now (poll(2)'s
        POLLIN).  Synchronous, so it reports what the file already knows;
        a file whose readiness needs I/O says False until :meth:`wait_readable`
        has seen it."""
        return True

    async def wait_readable(self) -> None:
        """Return once a read at offset 0 would not block (without consuming
        anything); after it returns, :meth:`readable` is True.  Front ends
        call it to implement poll/select; cancellation must leave no waiter."""

    async def fsync(self) -> None:
        """Flush to stable storage; synthetic files have nothing to flush."""

    async def flush(self) -> None:
        """A descriptor of this open was closed (FUSE flush, on every
        close(2), which returns its error): a file that stores at close
        (cloudfs's /files on Swift) stores here, so the next open, anywhere,
        sees the bytes.  Nothing by default."""

    async def release(self) -> None:
        """The last reference is gone (Tclunk, FUSE release).  Must not raise."""


class SnapshotFile(OpenFile):
    """A synthetic file whose whole content is made by :meth:`produce`.

    A read at offset 0 calls :meth:`produce` (which may block, e.g. until a
    value appears) and keeps the result as this open's snapshot; reads at later
    offsets are served from that snapshot without producing again.  This is what
    makes ``cat`` work over Linux's v9fs, which keeps issuing reads until one
    returns 0 bytes, and over FUSE with direct I/O.  A read at offset > 0 with no
    snapshot yet produces one.  Subclasses implement :meth:`produce` and,
    if writable, :meth:`write`.
    """

    def __init__(self, flags: int = os.O_RDONLY):
        super().__init__(flags)
        self.snapshot: bytes | None = None

    async def produce(self) -> bytes:
        """The file's content now.  May block; raise FsError(EAGAIN) when
        ``self.nonblocking`` and it would block."""
        raise NotImplementedError

    async def read(self, offset: int, count: int) -> bytes:
        if offset == 0 or self.snapshot is None:
            self.snapshot = await self.produce()
        return self.snapshot[offset : offset + count]


class Node:
    """A file or directory of a served tree.

    Implementations must make :meth:`qid` cheap and its ``path`` unique and
    stable across the whole filesystem.  All other methods may await.
    """

    def qid(self) -> Qid:
        """This node's qid; ``qid().type & QTDIR`` iff it is a directory."""
        raise NotImplementedError

    async def getattr(self) -> Attr:
        """The node's current attributes.  ENOENT if it vanished."""
        raise NotImplementedError

    async def walk(self, name: str) -> Node:
        """The child called ``name`` (one element, never ``.``/``..``).

        Raises FsError(ENOENT) if there is none, ENOTDIR on a file.
        """
        raise FsError(errno.ENOTDIR, "not a directory")

    async def open(self, flags: int) -> OpenFile:
        """Open with Linux ``os.O_*`` flags.  EACCES when the mode is not allowed."""
        raise FsError(errno.EACCES, "cannot open")

    async def setattr(self, change: SetAttr) -> None:
        """Apply ``change``.  Synthetic files accept a bare truncate to 0 as a
        no-op (``echo x > file`` must work); anything else is EPERM by default."""
        if change.only_truncate_to_zero() or change == SetAttr(
            atime_ns=change.atime_ns, mtime_ns=change.mtime_ns
        ):
            return
        raise FsError(errno.EPERM, "attributes cannot be changed")

    async def create(self, name: str, mode: int, flags: int, uid: int, gid: int) -> tuple[Node, OpenFile]:
        """Create and open the regular file ``name`` in this directory."""
        raise FsError(errno.EACCES, "cannot create files here")

    async def mkdir(self, name: str, mode: int, uid: int, gid: int) -> Node:
        """Create the directory ``name`` in this directory."""
        raise FsError(errno.EACCES, "cannot create directories here")

    async def symlink(self, name: str, target: str, uid: int, gid: int) -> Node:
        """Create the symbolic link ``name`` → ``target`` in this directory."""
        raise FsError(errno.EPERM, "cannot create symbolic links here")

    async def mknod(self, name: str, mode: int, rdev: int, uid: int, gid: int) -> Node:
        """Create a device, fifo or socket node ``name`` in this directory."""
        raise FsError(errno.EPERM, "cannot create device nodes here")

    async def link(self, name: str, target: Node) -> None:
        """Make ``name`` in this directory a hard link to ``target``."""
        raise FsError(errno.EPERM, "cannot create hard links here")

    async def unlink(self, name: str, is_dir: bool) -> None:
        """Remove the entry ``name`` of this directory (rmdir if ``is_dir``)."""
        raise FsError(errno.EACCES, "cannot remove entries here")

    async def rename(self, name: str, newdir: Node, newname: str) -> None:
        """Move this directory's entry ``name`` to ``newdir``/``newname``."""
        raise FsError(errno.EXDEV, "cannot rename here")

    async def readlink(self) -> str:
        """The target of a symbolic link."""
        raise FsError(errno.EINVAL, "not a symbolic link")

    async def statfs(self) -> StatFs:
        """Filesystem numbers; ENOSYS makes Linux's v9fs fall back to defaults."""
        raise FsError(errno.ENOSYS, "statfs not supported")


class FileSystem:
    """A served tree.  :meth:`attach` gives the root a client sees.

    ``uname`` and ``n_uname`` identify the user (9P2000.u/.L ``n_uname`` is a
    numeric uid or ``None``), ``aname`` selects the tree; credentials that are
    not accepted raise FsError(EACCES) or EPERM.

    ``needs_flush``: some of its files store at close (OpenFile.flush), so
    the FUSE adapter asks on every close(2); when False it tells the kernel
    once that there is no flush, and closes cost no request.
    """

    needs_flush = False

    async def attach(self, uname: str, aname: str, n_uname: int | None = None) -> Node:
        raise NotImplementedError

    async def close(self) -> None:
        """Release resources; called once when the server shuts down."""
