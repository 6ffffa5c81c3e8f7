"""A local directory tree served through the :mod:`ninep.fs` interface.

:class:`LocalFS` is what ``python -m ninep serve --root DIR`` exports: the files
under one directory, with the semantics of the Linux system calls behind each
9P2000.L request (the same mapping diod makes: Tlopen → openat(2), Treaddir →
getdents(2), Tsetattr → fchmodat/fchownat/truncate/utimensat, Tstatfs →
statvfs(2) …).

Confinement
-----------
Every operation starts from a file descriptor of the root and descends one
path element at a time with ``openat(O_PATH|O_DIRECTORY|O_NOFOLLOW)``, then
acts on the last element relative to that directory descriptor with
"no follow" semantics.  So neither ``..`` (refused as a name) nor a symbolic
link (a link is a leaf: walking through one fails with ENOTDIR, opening one
fails with ELOOP) nor a directory swapped for a link between two requests can
reach outside the root.  Links are still served as links (readlink, symlink):
clients resolve them on their side, as Linux's v9fs does.

Identity
--------
``qid.path`` is the inode number (mixed with the device number for files on
another filesystem mounted inside the root), ``qid.version`` the low 32 bits of
the modification time in ns, so Linux's cache notices changed files.  A node is
a path below the root; renames update the paths of live nodes below the moved
name, so fids stay valid across ``mv`` as they do with diod.  Names are ``str``
in Python's file-name convention (undecodable bytes as surrogate escapes, like
``os.listdir``), so the codec must encode them with ``surrogateescape``.

Blocking: metadata system calls are fast and run inline on the event loop;
reads and writes of more than :data:`INLINE_IO_LIMIT` bytes, ``fsync`` and
directory listings go through ``trio.to_thread.run_sync``.  Every open(2)
(Tlopen, Tlcreate of an existing name) is non-blocking, so a fifo never stalls
the loop: a fifo opened for reading with no writer reads as end of file, one
opened for writing with no reader fails with ENXIO.  Reads (and writes) of one
open fifo or character device are served one at a time, in arrival order; a
Tflush cancels a waiting one.

Hostile numbers: every number is range-checked before it reaches the system
call, with the errno Linux gives for it: modes beyond ``S_IFMT | 0o7777``,
a file type mknod(2) does not know, a device number that does not fit the
kernel's dev_t, a uid/gid beyond 32 bits, a negative size or one beyond
2^63 − 1, times whose seconds do not fit a time_t → EINVAL; sizes beyond
what the filesystem takes → EFBIG (from the system call).  A NUL in an
aname or a symlink target → EINVAL (the 9P codec already refuses NUL; this
is for other callers).  Whatever slips through (ValueError, OverflowError
from Python's ``os`` wrappers) becomes EINVAL/EOVERFLOW, never a traceback.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import stat
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import trio

from .errors import FsError
from .fs import Attr, DirEntry, FileSystem, Node, OpenFile, SetAttr, StatFs, qid_type_for_mode
from .qid import Qid

__all__ = ["LocalFS", "LocalNode", "LocalFile", "INLINE_IO_LIMIT", "OPEN_FLAGS_KEPT"]

#: Reads and writes up to this many bytes run inline; larger ones in a thread.
INLINE_IO_LIMIT = 64 * 1024

#: The open(2) flags a client may pass through; all others (O_CREAT, O_EXCL,
#: O_DIRECT, O_NOATIME, O_NOCTTY, FASYNC, O_LARGEFILE …) are masked off.
OPEN_FLAGS_KEPT = (
    os.O_ACCMODE | os.O_TRUNC | os.O_APPEND | os.O_NONBLOCK | os.O_DIRECTORY | os.O_SYNC | os.O_DSYNC
)

_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_MAX_OFF = (1 << 63) - 1  # loff_t
_NS = 1_000_000_000
_TIME_NS_MIN, _TIME_NS_MAX = -(1 << 63) * _NS, ((1 << 63) - 1) * _NS + _NS - 1  # time_t seconds
#: the file types mknod(2) knows (0 means a regular file)
_MKNOD_TYPES = (0, stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)

T = TypeVar("T")


def _oserror(e: OSError) -> FsError:
    """The FsError for an OSError (same errno, strerror as the message)."""
    return FsError(e.errno or errno.EIO, e.strerror)


@contextmanager
def _errors() -> Iterator[None]:
    """OSError → FsError with its errno; the ValueError (an embedded NUL) and
    OverflowError (a number beyond a C type) of Python's ``os`` wrappers →
    EINVAL and EOVERFLOW, should one slip past the explicit checks."""
    try:
        yield
    except OSError as e:
        raise _oserror(e) from None
    except OverflowError as e:
        raise FsError(errno.EOVERFLOW, str(e)) from None
    except ValueError as e:
        raise FsError(errno.EINVAL, str(e)) from None


def _check_mode(mode: int) -> None:
    """EINVAL unless ``mode`` fits a umode_t's type and permission bits."""
    if not 0 <= mode <= 0o177777:
        raise FsError(errno.EINVAL, f"mode {mode:#o} out of range")


def _check_id(v: int | None, what: str) -> None:
    """EINVAL unless ``v`` is None, -1 (no change) or a 32-bit uid/gid."""
    if v is not None and not -1 <= v <= _U32:
        raise FsError(errno.EINVAL, f"{what} {v} out of range")


def _check_time_ns(v: int | None) -> None:
    if v is not None and not _TIME_NS_MIN <= v <= _TIME_NS_MAX:
        raise FsError(errno.EINVAL, "time out of range")


def _settle_nonblocking(fd: int, flags: int) -> os.stat_result:
    """After a non-blocking open of ``fd`` (closed on error): its fstat; for
    anything but a fifo, socket or character device, O_NONBLOCK is cleared
    again unless the client's ``flags`` ask for it."""
    try:
        with _errors():
            st = os.fstat(fd)
            if not _is_stream(st.st_mode) and not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return st


def _is_stream(mode: int) -> bool:
    """Fifos, sockets and character devices: no offsets, may not be ready."""
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)


def _check_name(name: str, err: int = errno.ENOENT) -> None:
    """Refuse names that are not one plain path element (with errno ``err``)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise FsError(err, f"bad file name {name!r}")


@lru_cache(maxsize=256)
def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@lru_cache(maxsize=256)
def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


async def _maybe_thread(nbytes: int, fn: Callable[..., T], *args) -> T:
    """Run ``fn(*args)`` inline when it moves at most INLINE_IO_LIMIT bytes, else in a thread."""
    if nbytes <= INLINE_IO_LIMIT:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


class LocalFS(FileSystem):
    """The directory tree under ``root`` as a :class:`~ninep.fs.FileSystem`.

    ``attach(uname, aname)`` gives the root for aname ``""``, or the directory
    named by aname when it is the root's path or a directory inside it (diod's
    convention: the aname is the exported path); any other aname raises
    FsError(ENOENT), a non-directory ENOTDIR.  ``uname``/``n_uname`` are not
    checked: all access happens with the server process's credentials (diod's
    ``--no-userdb``/non-root behaviour).  Files created by a server running as
    root are given the requesting uid/gid.

    Raises FileNotFoundError/NotADirectoryError at construction when ``root``
    is not an existing directory.
    """

    def __init__(self, root: Path | str):
        self.root = Path(os.path.realpath(root))
        if not self.root.is_dir():
            raise NotADirectoryError(f"{root}: not a directory")
        st = os.stat(self.root)
        self.root_dev = st.st_dev
        self._root_fd: int | None = None
        self._as_root = os.geteuid() == 0
        # live nodes by path parts, so that rename can move them
        self._live: dict[tuple[str, ...], weakref.WeakSet[LocalNode]] = {}
        self._live_min = self._live_limit = 4096

    # -- plumbing ---------------------------------------------------------

    def root_fd(self) -> int:
        """An O_PATH descriptor of the root directory, opened once."""
        if self._root_fd is None:
            with _errors():
                self._root_fd = os.open(self.root, _O_PATH_DIR)
        return self._root_fd

    @contextmanager
    def open_dir(self, parts: Sequence[str]) -> Iterator[int]:
        """An O_PATH descriptor of the directory ``root/parts…``, reached
        element by element without following links; closed on exit.

        Raises FsError(ENOTDIR) when an element is a link or a file, ENOENT
        when it is gone.
        """
        with _errors():
            fd = os.dup(self.root_fd())
        try:
            with _errors():
                for p in parts:
                    nfd = os.open(p, _O_PATH_DIR, dir_fd=fd)
                    os.close(fd)
                    fd = nfd
            yield fd
        finally:
            os.close(fd)

    def qid_for(self, st: os.stat_result) -> Qid:
        """The qid of a file from its lstat: inode, mtime, type bits."""
        path = st.st_ino
        if st.st_dev != self.root_dev:
            path = (path ^ (st.st_dev << 44) ^ (1 << 63)) & _U64
        mt = st.st_mtime_ns
        return Qid(qid_type_for_mode(st.st_mode), (mt ^ (mt >> 32)) & _U32, path)

    def node(self, parts: tuple[str, ...], st: os.stat_result) -> LocalNode:
        """The node for ``root/parts…`` with its current lstat ``st``."""
        n = LocalNode(self, parts, st)
        live = self._live
        bucket = live.get(parts)
        if bucket is None:
            if len(live) >= self._live_limit:
                self._prune()
            bucket = live[parts] = weakref.WeakSet()
        bucket.add(n)
        return n

    def _prune(self) -> None:
        """Forget paths with no live node; amortised O(1) per node made."""
        for p in [p for p, s in self._live.items() if not s]:
            del self._live[p]
        self._live_limit = max(self._live_min, 2 * len(self._live))

    def moved(self, old: tuple[str, ...], new: tuple[str, ...]) -> None:
        """After a rename of ``old`` to ``new``: repoint live nodes at or below ``old``."""
        k = len(old)
        for parts in [p for p in self._live if p[:k] == old]:
            nodes = self._live.pop(parts)
            dest = new + parts[k:]
            bucket = self._live.setdefault(dest, weakref.WeakSet())
            for n in list(nodes):
                n.parts = dest
                bucket.add(n)

    # -- FileSystem -------------------------------------------------------

    async def attach(self, uname: str, aname: str, n_uname: int | None = None) -> Node:
        """The directory named by ``aname`` (see the class doc)."""
        if "\0" in aname:
            raise FsError(errno.EINVAL, "NUL in aname")
        if aname == "":
            parts: tuple[str, ...] = ()
        else:
            if not aname.startswith("/"):
                raise FsError(errno.ENOENT, f"no export {aname!r}")
            real = Path(os.path.realpath(aname))
            if real != self.root and self.root not in real.parents:
                raise FsError(errno.ENOENT, f"no export {aname!r}")
            parts = real.relative_to(self.root).parts
        if parts:
            with self.open_dir(parts[:-1]) as dfd, _errors():
                st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        else:
            with _errors():
                st = os.stat(self.root_fd())
        if not stat.S_ISDIR(st.st_mode):
            raise FsError(errno.ENOTDIR, f"{aname}: not a directory")
        return self.node(tuple(parts), st)

    async def close(self) -> None:
        """Close the root descriptor (it reopens if the tree is used again)."""
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None


class LocalNode(Node):
    """A file, directory, link or special file at ``fs.root/parts…``.

    ``parts`` is the path below the root as a tuple of names (``()`` for the
    root).  The qid is cached from the last lstat (walk, getattr, create).
    """

    def __init__(self, fs: LocalFS, parts: tuple[str, ...], st: os.stat_result):
        self.fs = fs
        self.parts = parts
        self._qid = fs.qid_for(st)
        self._mode = st.st_mode

    def __repr__(self) -> str:
        return f"LocalNode({'/'.join(self.parts) or '.'})"

    # -- helpers ----------------------------------------------------------

    @contextmanager
    def _at(self) -> Iterator[tuple[int, str]]:
        """``(dir_fd, name)`` naming this node without following links (``"."`` for the root)."""
        if not self.parts:
            with self.fs.open_dir(()) as dfd:
                yield dfd, "."
        else:
            with self.fs.open_dir(self.parts[:-1]) as dfd:
                yield dfd, self.parts[-1]

    @contextmanager
    def _dir(self) -> Iterator[int]:
        """An O_PATH descriptor of this node as a directory (ENOTDIR otherwise)."""
        with self.fs.open_dir(self.parts) as dfd:
            yield dfd

    @contextmanager
    def _opath(self) -> Iterator[int]:
        """An O_PATH descriptor of this very inode (a link itself, not its target)."""
        with self._at() as (dfd, name), _errors():
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            yield fd
        finally:
            os.close(fd)

    def _lstat(self) -> os.stat_result:
        with self._at() as (dfd, name), _errors():
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        self._qid = self.fs.qid_for(st)
        self._mode = st.st_mode
        return st

    def _child(self, dfd: int, name: str) -> LocalNode:
        with _errors():
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return self.fs.node(self.parts + (name,), st)

    def _chown_new(self, dfd: int, name: str, uid: int | None, gid: int | None) -> None:
        """Give a newly made entry the requester's ids when serving as root."""
        if not self.fs._as_root:
            return
        u = -1 if uid is None or uid < 0 else uid
        g = -1 if gid is None or gid < 0 else gid
        if u != -1 or g != -1:
            with _errors():
                os.chown(name, u, g, dir_fd=dfd, follow_symlinks=False)

    # -- Node -------------------------------------------------------------

    def qid(self) -> Qid:
        """The qid from the last lstat of this node (walk, getattr, open…)."""
        return self._qid

    async def getattr(self) -> Attr:
        """lstat(2) of the node as an Attr; 9P2000.u's extension carries a
        link's target or a device's ``"c MAJOR MINOR"``."""
        st = self._lstat()
        ext = ""
        if stat.S_ISLNK(st.st_mode):
            ext = await self.readlink()
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
            ext = f"{kind} {os.major(st.st_rdev)} {os.minor(st.st_rdev)}"
        return Attr(
            qid=self._qid,
            mode=st.st_mode,
            size=st.st_size,
            uid=st.st_uid,
            gid=st.st_gid,
            nlink=st.st_nlink,
            rdev=st.st_rdev,
            blksize=st.st_blksize,
            blocks=st.st_blocks,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            uname=_user_name(st.st_uid),
            gname=_group_name(st.st_gid),
            muid=_user_name(st.st_uid),
            extension=ext,
        )

    async def walk(self, name: str) -> Node:
        """fstatat(AT_SYMLINK_NOFOLLOW) of ``name``: ENOENT if absent or not
        one plain element, ENOTDIR on a file or link."""
        _check_name(name)
        if not stat.S_ISDIR(self._mode):
            raise FsError(errno.ENOTDIR, "not a directory")
        with self._dir() as dfd:
            return self._child(dfd, name)

    async def open(self, flags: int) -> OpenFile:
        """openat(2) with the flags in OPEN_FLAGS_KEPT, never following a link
        (ELOOP on a link), EISDIR when writing a directory.

        The descriptor is always opened O_NONBLOCK so that opening a fifo never
        stalls the event loop: a fifo opened for reading with no writer reads as
        end of file, one opened for writing with no reader fails with ENXIO
        (open(2)'s non-blocking fifo rules).  Fifos, sockets and character
        devices keep O_NONBLOCK (their I/O waits in trio); other files have it
        cleared again unless the client asked for it."""
        flags &= OPEN_FLAGS_KEPT
        with self._at() as (dfd, name), _errors():
            fd = os.open(name, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        st = _settle_nonblocking(fd, flags)
        self._qid = self.fs.qid_for(st)
        self._mode = st.st_mode
        return LocalFile(self.fs, self.parts, fd, flags, is_dir=stat.S_ISDIR(st.st_mode),
                         stream=_is_stream(st.st_mode))

    async def setattr(self, change: SetAttr) -> None:
        """chmod, chown, truncate and utimes, in that order (like diod's
        Tsetattr); a link's mode cannot change (EOPNOTSUPP, as fchmodat).
        Every number is checked first (EINVAL, nothing changed): mode within
        0o177777, uid/gid within 32 bits (or -1), size within 0 … 2^63 − 1,
        times within a time_t."""
        if change.mode is not None:
            _check_mode(change.mode)
        _check_id(change.uid, "uid")
        _check_id(change.gid, "gid")
        if change.size is not None and not 0 <= change.size <= _MAX_OFF:
            raise FsError(errno.EINVAL, f"size {change.size} out of range")
        _check_time_ns(change.atime_ns)
        _check_time_ns(change.mtime_ns)
        if change.mode is not None:
            with self._opath() as fd, _errors():
                if stat.S_ISLNK(os.fstat(fd).st_mode):
                    raise FsError(errno.EOPNOTSUPP, "cannot chmod a symbolic link")
                os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(change.mode))
        if change.uid is not None or change.gid is not None:
            u = -1 if change.uid is None else change.uid
            g = -1 if change.gid is None else change.gid
            with self._at() as (dfd, name), _errors():
                os.chown(name, u, g, dir_fd=dfd, follow_symlinks=False)
        if change.size is not None:
            with self._opath() as fd, _errors():
                fmt = os.fstat(fd).st_mode
                if not stat.S_ISREG(fmt):
                    raise FsError(errno.EISDIR if stat.S_ISDIR(fmt) else errno.EINVAL,
                                  "can only truncate regular files")
                os.truncate(f"/proc/self/fd/{fd}", change.size)
        if change.atime_ns is not None or change.mtime_ns is not None:
            with self._at() as (dfd, name), _errors():
                a, m = change.atime_ns, change.mtime_ns
                if a is None or m is None:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    a = st.st_atime_ns if a is None else a
                    m = st.st_mtime_ns if m is None else m
                os.utime(name, ns=(a, m), dir_fd=dfd, follow_symlinks=False)
        self._lstat()

    async def create(self, name: str, mode: int, flags: int, uid: int, gid: int) -> tuple[Node, OpenFile]:
        """openat(O_CREAT | the client's flags, mode & 0o7777); O_EXCL is
        honoured (EEXIST), so is O_TRUNC on an existing file.  Opened
        non-blocking like :meth:`open`: an existing fifo of that name opens
        at once (ENXIO for writing with no reader) and is served as a stream."""
        _check_name(name, errno.EINVAL)
        _check_mode(mode)
        client_flags = flags & OPEN_FLAGS_KEPT
        flags = (flags & (OPEN_FLAGS_KEPT | os.O_EXCL)) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with self._dir() as dfd:
            with _errors():
                fd = os.open(name, flags | os.O_NONBLOCK, stat.S_IMODE(mode), dir_fd=dfd)
            st = _settle_nonblocking(fd, client_flags)  # closes fd on error
            try:
                self._chown_new(dfd, name, uid, gid)
            except BaseException:
                os.close(fd)
                raise
            node = self.fs.node(self.parts + (name,), st)
        return node, LocalFile(self.fs, node.parts, fd, client_flags, is_dir=stat.S_ISDIR(st.st_mode),
                               stream=_is_stream(st.st_mode))

    async def mkdir(self, name: str, mode: int, uid: int, gid: int) -> Node:
        """mkdirat(2) with ``mode & 0o7777`` (less the umask); EEXIST if present."""
        _check_name(name, errno.EINVAL)
        _check_mode(mode)
        with self._dir() as dfd:
            with _errors():
                os.mkdir(name, stat.S_IMODE(mode), dir_fd=dfd)
            self._chown_new(dfd, name, uid, gid)
            return self._child(dfd, name)

    async def symlink(self, name: str, target: str, uid: int, gid: int) -> Node:
        """symlinkat(2); ``target`` is stored as given (clients resolve it);
        EINVAL for a NUL in it, ENOENT for an empty one (as symlink(2))."""
        _check_name(name, errno.EINVAL)
        if "\0" in target:
            raise FsError(errno.EINVAL, "NUL in symlink target")
        with self._dir() as dfd:
            with _errors():
                os.symlink(target, name, dir_fd=dfd)
            self._chown_new(dfd, name, uid, gid)
            return self._child(dfd, name)

    async def mknod(self, name: str, mode: int, rdev: int, uid: int, gid: int) -> Node:
        """mknodat(2) for fifos, sockets and regular files (file type 0 is a
        regular file, as in mknod(2)); device nodes and directories are EPERM,
        an unknown file type, a mode beyond 0o177777 or an ``rdev`` that does
        not fit the kernel's 32-bit dev_t EINVAL (glibc's check)."""
        _check_name(name, errno.EINVAL)
        _check_mode(mode)
        if not 0 <= rdev <= _U32:
            raise FsError(errno.EINVAL, "device number out of range")
        fmt = stat.S_IFMT(mode)
        if fmt == stat.S_IFDIR:
            raise FsError(errno.EPERM, "mknod cannot make directories")
        if fmt not in _MKNOD_TYPES:
            raise FsError(errno.EINVAL, f"unknown file type {fmt:#o}")
        if fmt == 0:
            mode |= stat.S_IFREG
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode)):
            raise FsError(errno.EPERM, "only fifos, sockets and regular files can be made")
        with self._dir() as dfd:
            with _errors():
                os.mknod(name, mode, 0, dir_fd=dfd)
            self._chown_new(dfd, name, uid, gid)
            return self._child(dfd, name)

    async def link(self, name: str, target: Node) -> None:
        """linkat(2) ``target`` as ``name`` here; EXDEV for a node of another tree."""
        _check_name(name, errno.EINVAL)
        if not isinstance(target, LocalNode) or target.fs is not self.fs:
            raise FsError(errno.EXDEV, "hard link across file systems")
        if not target.parts:
            raise FsError(errno.EPERM, "cannot link a directory")
        with self._dir() as dfd, target._at() as (tdfd, tname), _errors():
            os.link(tname, name, src_dir_fd=tdfd, dst_dir_fd=dfd, follow_symlinks=False)

    async def unlink(self, name: str, is_dir: bool) -> None:
        """unlinkat(2), with AT_REMOVEDIR when ``is_dir`` (ENOTEMPTY, ENOTDIR…)."""
        _check_name(name)
        with self._dir() as dfd, _errors():
            if is_dir:
                os.rmdir(name, dir_fd=dfd)
            else:
                os.unlink(name, dir_fd=dfd)

    async def rename(self, name: str, newdir: Node, newname: str) -> None:
        """renameat(2); EXDEV when ``newdir`` is not a directory of this tree."""
        _check_name(name)
        _check_name(newname, errno.EINVAL)
        if not isinstance(newdir, LocalNode) or newdir.fs is not self.fs:
            raise FsError(errno.EXDEV, "rename across file systems")
        old = self.parts + (name,)
        new = newdir.parts + (newname,)
        if old == new:
            return
        with self._dir() as sdfd, newdir._dir() as ddfd, _errors():
            os.rename(name, newname, src_dir_fd=sdfd, dst_dir_fd=ddfd)
        self.fs.moved(old, new)

    async def readlink(self) -> str:
        """readlinkat(2); EINVAL when the node is not a link."""
        with self._at() as (dfd, name), _errors():
            return os.readlink(name, dir_fd=dfd)

    async def statfs(self) -> StatFs:
        """fstatvfs(2) of the filesystem holding this node."""
        with self._opath() as fd, _errors():
            sv = os.statvfs(fd)
        return StatFs(
            bsize=sv.f_bsize,
            blocks=sv.f_blocks,
            bfree=sv.f_bfree,
            bavail=sv.f_bavail,
            files=sv.f_files,
            ffree=sv.f_ffree,
            fsid=sv.f_fsid & _U64,
            namelen=sv.f_namemax,
        )


class LocalFile(OpenFile):
    """An open local file or directory: one descriptor, pread/pwrite at offsets.

    Reads and writes above INLINE_IO_LIMIT bytes run in a worker thread.  With
    O_APPEND, Linux's pwrite(2) appends whatever the offset.  Directories list
    through os.scandir; entries that vanish while being listed are skipped.

    ``stream`` files (fifos, character devices) ignore offsets and use
    read(2)/write(2) on the non-blocking descriptor; when no data is ready they
    wait in trio (``wait_readable``/``wait_writable``, so a flush cancels the
    wait) unless the client opened with O_NONBLOCK, which gets EAGAIN.  Reads
    of one open stream wait one at a time, in order (trio allows one waiter
    per descriptor and direction), and so do writes; directory listings of
    one open directory too (they share its offset).
    """

    def __init__(self, fs: LocalFS, parts: tuple[str, ...], fd: int, flags: int, *,
                 is_dir: bool = False, stream: bool = False):
        super().__init__(flags)
        self.fs = fs
        self.parts = parts
        self.fd: int | None = fd
        self.is_dir = is_dir
        self.stream = stream
        self._read_lock = trio.Lock()
        self._write_lock = trio.Lock()

    def _fd(self) -> int:
        if self.fd is None:
            raise FsError(errno.EBADF, "file already released")
        return self.fd

    async def read(self, offset: int, count: int) -> bytes:
        """pread(2): at most ``count`` bytes at ``offset``; EISDIR on a directory."""
        fd = self._fd()
        if self.is_dir:
            raise FsError(errno.EISDIR, "is a directory")
        if self.stream:
            async with self._read_lock:
                return await self._stream_io(os.read, trio.lowlevel.wait_readable, fd, count)
        if not 0 <= offset <= _MAX_OFF:
            raise FsError(errno.EINVAL, "offset out of range")
        with _errors():
            return await _maybe_thread(count, os.pread, fd, count, offset)

    async def write(self, offset: int, data: bytes) -> int:
        """pwrite(2); EBADF when opened read-only; never returns 0 for data."""
        fd = self._fd()
        if self.stream:
            async with self._write_lock:
                n = await self._stream_io(os.write, trio.lowlevel.wait_writable, fd, data)
        else:
            if not 0 <= offset <= _MAX_OFF:
                raise FsError(errno.EINVAL, "offset out of range")
            with _errors():
                n = await _maybe_thread(len(data), os.pwrite, fd, data, offset)
        if n == 0 and data:
            raise FsError(errno.ENOSPC, "no space left on device")
        return n

    async def _stream_io(self, op: Callable, wait: Callable, fd: int, arg):
        """``op(fd, arg)`` on a non-blocking descriptor, waiting until it is ready."""
        while True:
            if self.fd != fd:
                raise FsError(errno.EBADF, "file released")
            try:
                return op(fd, arg)
            except BlockingIOError:
                if self.nonblocking:
                    raise FsError(errno.EAGAIN, "no data ready") from None
            except OSError as e:
                raise _oserror(e) from None
            try:
                await wait(fd)
            except trio.ClosedResourceError:
                raise FsError(errno.EBADF, "file released while waiting") from None
            if self.fd != fd:
                raise FsError(errno.EBADF, "file released")

    async def readdir(self) -> Sequence[DirEntry]:
        """All entries but ``.``/``..``, each with its lstat qid and mode (in a thread)."""
        fd = self._fd()
        if not self.is_dir:
            raise FsError(errno.ENOTDIR, "not a directory")
        qid_for = self.fs.qid_for

        def listing() -> list[DirEntry]:
            os.lseek(fd, 0, os.SEEK_SET)
            out = []
            with os.scandir(fd) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    out.append(DirEntry(e.name, qid_for(st), st.st_mode))
            return out

        async with self._read_lock:
            with _errors():
                return await trio.to_thread.run_sync(listing)

    async def fsync(self) -> None:
        """fsync(2) in a thread."""
        fd = self._fd()
        with _errors():
            await trio.to_thread.run_sync(os.fsync, fd)

    async def release(self) -> None:
        """Close the descriptor (once; never raises)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            if self.stream:
                trio.lowlevel.notify_closing(fd)
            try:
                os.close(fd)
            except OSError:
                pass
