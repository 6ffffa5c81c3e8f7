"""The FUSE front end: any :class:`ninep.fs.FileSystem` as a kernel mount.

:class:`FuseAdapter` is a ``pyfuse3.Operations`` over one attached root
(``await fs.attach(uname, aname)``, done once, as the operator), and
:func:`mount` runs it with pyfuse3 on trio until cancelled, then unmounts.

What "FUSE done right for synthetic files" means here
-----------------------------------------------------
- Every open gets ``FileInfo(direct_io=True, keep_cache=False)``: no page
  cache, so no stale data and no reliance on the (unknown, usually 0) size;
  each ``read(2)``/``write(2)`` reaches :class:`ninep.fs.OpenFile` as one call
  (one ctl command per ``write(2)``, up to FUSE's max_write).
- ``echo x > file``: the kernel turns O_TRUNC into a setattr of size 0, which
  goes to :meth:`ninep.fs.Node.setattr` (synthetic files accept it).
- Errors: :class:`ninep.errors.FsError` becomes ``FUSEError(errno)``; FUSE
  cannot carry the message, so it is logged (DEBUG for the everyday ENOENT,
  EAGAIN, EINTR; INFO otherwise).  Any other exception is logged with its
  traceback and becomes EIO: only FUSEError escapes a handler (pyfuse3 stops
  its main loop on anything else).
- Blocking reads block only at offset 0 (:class:`ninep.fs.SnapshotFile`).
  ``poll``/``select``/``epoll`` report :meth:`ninep.fs.OpenFile.readable`;
  when not ready and the kernel gave a poll handle, a background task awaits
  ``OpenFile.wait_readable()`` (re-checking every :data:`READY_RECHECK` s a
  file whose ``readable()`` is still False after it) and notifies the handle.
- Dead readers: pyfuse3 has no FUSE_INTERRUPT support and a task blocked in a
  FUSE read stays in the kernel (state D) until the daemon answers, even after
  SIGINT/SIGKILL.  ``open()`` records ``ctx.pid``; a watcher looks at every
  blocked read each :data:`WATCH_INTERVAL` s (in a worker thread, reading
  ``/proc``) and cancels the read (→ EINTR, which removes the file's waiter,
  e.g. a Tflush through :mod:`ninep.remotefs`) when the opener has a fatal
  signal pending or an unblocked caught signal pending while in D state, or
  when the opener is dying or gone and no live, non-dying process still holds
  an fd on the file (fds inherited by children are found through
  ``/proc/*/fdinfo`` ``mnt_id``/``ino``).  ``ctx.pid`` is a thread id; /proc
  answers for thread ids too.  Why not pidfd_open: measured here (Linux
  6.18), a reader killed while its request is in the daemon stays in D state
  with SIGKILL pending until the daemon answers, so its pidfd never becomes
  readable; the pending-signal bits in ``/proc/<tid>/status`` are what show
  the death (or a caught signal, which gets EINTR so its handler can run).
- pyfuse3 runs at most ``max_tasks`` handlers at once and a blocked read holds
  one, so :func:`mount` defaults to 10000.
- Inodes: qid.path is the inode number when it is free (root is
  ``pyfuse3.ROOT_INODE``), else one is allocated; each inode keeps its latest
  :class:`ninep.fs.Node` (or, for entries the kernel learned from readdir,
  the parent inode and name to walk to it on first use) and its lookup count
  until ``forget``.  Entry and attribute timeouts are small (default 1 s; 0 for
  readdir entries) because other hosts change the tree.

Semantics follow the FUSE low-level protocol as pyfuse3 3.5 documents it
(``pyfuse3.Operations``) and the interface of :mod:`ninep.fs`.
pyfuse3 keeps global state: one mount per process.
"""

from __future__ import annotations

import errno
import functools
import gc
import itertools
import logging
import os
import pwd
import select
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pyfuse3
import trio

from ninep.errors import FsError
from ninep.fs import Attr, DirEntry, FileSystem, Node, OpenFile, SetAttr, SnapshotFile, StatFs
from ninep.qid import QTDIR

__all__ = [
    "FuseAdapter",
    "mount",
    "clean_stale_mount",
    "is_stale_mount",
    "default_uname",
    "DEFAULT_MAX_TASKS",
    "WATCH_INTERVAL",
]

log = logging.getLogger(__name__)

#: Default limit of concurrently running FUSE handlers (blocked reads hold one each).
DEFAULT_MAX_TASKS = 10000
#: Seconds between checks of the processes behind blocked reads.
WATCH_INTERVAL = 0.25
#: Seconds between readiness re-checks for files whose ``wait_readable`` returns early.
READY_RECHECK = 0.2
#: How long ``poll`` waits for a readiness probe before answering "not ready".
POLL_GRACE = 0.05
#: Seconds the unmount path spends releasing files that were still open.
RELEASE_GRACE = 2.0
#: Open flags passed on to :meth:`Node.open` (others, e.g. O_LARGEFILE, are dropped).
_OPEN_FLAGS = (
    os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_TRUNC | os.O_DIRECTORY
    | os.O_SYNC | os.O_DSYNC | os.O_NOFOLLOW | os.O_EXCL | os.O_CREAT
)
_QUIET_ERRNOS = frozenset({errno.ENOENT, errno.EAGAIN, errno.EINTR})
_SIGKILL_BIT = 1 << (9 - 1)


def _handler(fn: Callable) -> Callable:
    """Wrap a pyfuse3 handler: FsError → FUSEError(errno) (message logged),
    other exceptions → traceback logged + FUSEError(EIO).  Cancellation and
    FUSEError pass through."""

    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            level = logging.DEBUG if e.errno in _QUIET_ERRNOS else logging.INFO
            log.log(level, "%s%r: %s", fn.__name__, _short(args), e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("%s%r failed", fn.__name__, _short(args))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _short(args: tuple) -> tuple:
    """Handler arguments for log lines (contexts and tokens left out)."""
    return tuple(a for a in args if isinstance(a, (int, str, bytes)))


@dataclass(eq=False)
class _Inode:
    """One inode the kernel knows: its node (or how to walk to it) and lookup count."""

    ino: int
    qid_path: int
    node: Node | None
    parent: int
    name: str
    nlookup: int = 0


@dataclass(eq=False)
class _Handle:
    """One FUSE file handle: an open file and who opened it."""

    file: OpenFile
    ino: int
    pid: int
    flags: int
    entries: list[DirEntry] | None = None
    poll_handle: object | None = None
    notifier: trio.CancelScope | None = None
    ready: trio.Event | None = None


@dataclass(eq=False)
class _Watch:
    """One blocked read under watch: the opener pid, inode and the read's scope."""

    pid: int
    ino: int
    scope: trio.CancelScope
    holders_checked: float = 0.0


class FuseAdapter(pyfuse3.Operations):
    """pyfuse3 operations over a :class:`ninep.fs.FileSystem`.

    ``FuseAdapter(fs, uname=None, aname="", timeout=1.0, owner=None)``:
    ``uname`` is the name given to ``fs.attach`` (default: the effective
    user's name, with ``n_uname`` its uid); ``timeout`` is the
    entry/attribute cache time in seconds told to the kernel; ``owner`` a
    (uid, gid) shown for files the tree says root owns (uid 0, gid 0), so
    a tree served by a non-root daemon, whose files are all "root's",
    belongs to that daemon's user under ``default_permissions``.  Call :meth:`start` (attach + watcher task)
    before ``pyfuse3.init``; :func:`mount` does all of that.
    """

    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: FileSystem, *, uname: str | None = None, aname: str = "", timeout: float = 1.0,
                 owner: tuple[int, int] | None = None):
        super().__init__()
        self.fs = fs
        self.owner = owner
        self.uname = uname if uname is not None else default_uname()
        self.aname = aname
        self.timeout = timeout
        self.mountpoint: str | None = None
        self._inodes: dict[int, _Inode] = {}
        self._by_path: dict[int, int] = {}
        self._next_ino = itertools.count(1 << 62)
        self._handles: dict[int, _Handle] = {}
        self._fhs = itertools.count(1)
        self._watches: dict[int, _Watch] = {}
        self._watch_ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._mnt_id: int | None = None

    # ---- lifecycle ------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Attach to the filesystem (FsError on refusal) and start the
        dead-reader watcher in ``nursery``."""
        root = await self.fs.attach(self.uname, self.aname, os.geteuid())
        qp = root.qid().path
        self._inodes[pyfuse3.ROOT_INODE] = _Inode(pyfuse3.ROOT_INODE, qp, root, pyfuse3.ROOT_INODE, "", 1)
        self._by_path[qp] = pyfuse3.ROOT_INODE
        self._nursery = nursery
        nursery.start_soon(self._watch_loop)

    @property
    def blocked_reads(self) -> int:
        """Reads currently blocked in the filesystem (under the dead-reader watch)."""
        return len(self._watches)

    @property
    def open_handles(self) -> int:
        """File and directory handles currently open."""
        return len(self._handles)

    # ---- inode table ----------------------------------------------------------

    def _ino_for(self, qid_path: int) -> int:
        """The inode number for ``qid_path``: the known one, else qid.path if
        free, else a fresh one from 2**62 up."""
        ino = self._by_path.get(qid_path)
        if ino is not None:
            return ino
        if qid_path > pyfuse3.ROOT_INODE and qid_path < (1 << 62) and qid_path not in self._inodes:
            return qid_path
        while (ino := next(self._next_ino)) in self._inodes:
            pass
        return ino

    def _remember(self, node: Node | None, qid_path: int, parent: int, name: str) -> int:
        """Count one lookup of the inode for ``qid_path`` (creating it); returns it."""
        ino = self._ino_for(qid_path)
        e = self._inodes.get(ino)
        if e is None:
            e = self._inodes[ino] = _Inode(ino, qid_path, node, parent, name)
            self._by_path[qid_path] = ino
        elif node is not None:
            e.node = node
        if ino != pyfuse3.ROOT_INODE:
            e.parent, e.name = parent, name
        e.nlookup += 1
        return ino

    async def _node(self, ino: int) -> Node:
        """The node of inode ``ino``, walking to it if only its name is known.
        FUSEError(ESTALE) when the kernel names an inode we forgot or that
        now is another file."""
        e = self._inodes.get(ino)
        if e is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        if e.node is None:
            parent = await self._node(e.parent)
            node = await parent.walk(e.name)
            if node.qid().path != e.qid_path:
                raise FsError(errno.ESTALE, f"{e.name} was replaced")
            e.node = node
        return e.node

    def _entry(self, ino: int, a: Attr, timeout: float | None = None) -> pyfuse3.EntryAttributes:
        """EntryAttributes for inode ``ino`` from an :class:`Attr`."""
        t = self.timeout if timeout is None else timeout
        e = pyfuse3.EntryAttributes()
        mode = a.mode
        if not stat.S_IFMT(mode):
            mode |= stat.S_IFDIR if a.qid.type & QTDIR else stat.S_IFREG
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = t
        e.attr_timeout = t
        e.st_mode = mode
        e.st_nlink = max(1, a.nlink)
        e.st_uid = a.uid
        e.st_gid = a.gid
        if self.owner is not None:
            e.st_uid = self.owner[0] if a.uid == 0 else a.uid
            e.st_gid = self.owner[1] if a.gid == 0 else a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = a.blksize or 4096
        e.st_blocks = a.blocks
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    async def _lookup_entry(self, parent: int, node: Node, name: str) -> pyfuse3.EntryAttributes:
        attr = await node.getattr()
        ino = self._remember(node, node.qid().path, parent, name)
        return self._entry(ino, attr)

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    def _new_handle(self, file: OpenFile, ino: int, pid: int, flags: int) -> int:
        fh = next(self._fhs)
        self._handles[fh] = _Handle(file, ino, pid, flags)
        return fh

    # ---- lookups and attributes ----------------------------------------------

    @_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        """walk(name) + getattr; counts one lookup (FUSE_LOOKUP)."""
        n = os.fsdecode(name)
        if n in (".", ".."):
            e = self._inodes.get(parent_inode)
            if e is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            if n == "..":
                e = self._inodes.get(e.parent) or e
            return await self._lookup_entry(e.parent, await self._node(e.ino), e.name)
        node = await (await self._node(parent_inode)).walk(n)
        return await self._lookup_entry(parent_inode, node, n)

    @_handler
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Drop ``nlookup`` references per inode; forgotten inodes release their node."""
        for ino, n in inode_list:
            self._forget_one(ino, n)

    def _forget_one(self, ino: int, n: int) -> None:
        e = self._inodes.get(ino)
        if e is None or ino == pyfuse3.ROOT_INODE:
            return
        e.nlookup -= n
        if e.nlookup <= 0:
            del self._inodes[ino]
            if self._by_path.get(e.qid_path) == ino:
                del self._by_path[e.qid_path]

    @_handler
    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        """Node.getattr (stat(2))."""
        e = self._inodes.get(inode)
        node = e.node if e is not None and e.node is not None else await self._node(inode)
        return self._entry(inode, await node.getattr())

    @_handler
    async def setattr(self, inode, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        """Node.setattr with the changed fields (truncate from O_TRUNC included), then getattr."""
        change = SetAttr(
            mode=attr.st_mode & 0o7777 if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        node = await self._node(inode)
        if change != SetAttr():
            await node.setattr(change)
        return self._entry(inode, await node.getattr())

    @_handler
    async def readlink(self, inode: int, ctx) -> bytes:
        """Node.readlink."""
        return os.fsencode(await (await self._node(inode)).readlink())

    @_handler
    async def statfs(self, ctx) -> pyfuse3.StatvfsData:
        """Root Node.statfs; ENOSYS gives zeros with 4 KiB blocks and 255-byte names."""
        try:
            s = await self._inodes[pyfuse3.ROOT_INODE].node.statfs()  # type: ignore[union-attr]
        except FsError as e:
            if e.errno != errno.ENOSYS:
                raise
            s = StatFs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = s.bsize or 4096
        out.f_blocks, out.f_bfree, out.f_bavail = s.blocks, s.bfree, s.bavail
        out.f_files, out.f_ffree, out.f_favail = s.files, s.ffree, s.ffree
        out.f_namemax = s.namelen or 255
        return out

    # ---- namespace changes ----------------------------------------------------

    @_handler
    async def mkdir(self, parent_inode, name, mode, ctx) -> pyfuse3.EntryAttributes:
        """Node.mkdir (S_IFDIR | permission bits, caller's uid/gid)."""
        n = os.fsdecode(name)
        node = await (await self._node(parent_inode)).mkdir(n, stat.S_IFDIR | (mode & 0o7777), ctx.uid, ctx.gid)
        return await self._lookup_entry(parent_inode, node, n)

    @_handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx) -> pyfuse3.EntryAttributes:
        """Node.mknod."""
        n = os.fsdecode(name)
        node = await (await self._node(parent_inode)).mknod(n, mode, rdev, ctx.uid, ctx.gid)
        return await self._lookup_entry(parent_inode, node, n)

    @_handler
    async def symlink(self, parent_inode, name, target, ctx) -> pyfuse3.EntryAttributes:
        """Node.symlink."""
        n = os.fsdecode(name)
        node = await (await self._node(parent_inode)).symlink(n, os.fsdecode(target), ctx.uid, ctx.gid)
        return await self._lookup_entry(parent_inode, node, n)

    @_handler
    async def link(self, inode, new_parent_inode, new_name, ctx) -> pyfuse3.EntryAttributes:
        """Node.link of ``inode`` as ``new_name``."""
        n = os.fsdecode(new_name)
        target = await self._node(inode)
        await (await self._node(new_parent_inode)).link(n, target)
        return await self._lookup_entry(new_parent_inode, target, n)

    @_handler
    async def unlink(self, parent_inode, name, ctx) -> None:
        """Node.unlink(name, is_dir=False)."""
        await (await self._node(parent_inode)).unlink(os.fsdecode(name), False)

    @_handler
    async def rmdir(self, parent_inode, name, ctx) -> None:
        """Node.unlink(name, is_dir=True)."""
        await (await self._node(parent_inode)).unlink(os.fsdecode(name), True)

    @_handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx) -> None:
        """Node.rename.  RENAME_NOREPLACE is checked with a walk first (not
        atomic across hosts); RENAME_EXCHANGE is EINVAL."""
        old = await self._node(parent_inode_old)
        new = await self._node(parent_inode_new)
        nn = os.fsdecode(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        if flags & pyfuse3.RENAME_NOREPLACE:
            try:
                await new.walk(nn)
            except FsError as e:
                if e.errno != errno.ENOENT:
                    raise
            else:
                raise FsError(errno.EEXIST, f"{nn} exists")
        no = os.fsdecode(name_old)
        await old.rename(no, new, nn)
        for e in self._inodes.values():  # entries reached by name follow the move
            if e.parent == parent_inode_old and e.name == no:
                e.parent, e.name = parent_inode_new, nn

    # ---- files ----------------------------------------------------------------

    @_handler
    async def open(self, inode, flags, ctx) -> pyfuse3.FileInfo:
        """Node.open; direct I/O, no kept cache; remembers the opener's pid."""
        flags &= _OPEN_FLAGS
        file = await (await self._node(inode)).open(flags)
        fh = self._new_handle(file, inode, ctx.pid, flags)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @_handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        """Node.create + getattr; returns (FileInfo, EntryAttributes)."""
        n = os.fsdecode(name)
        flags &= _OPEN_FLAGS
        node, file = await (await self._node(parent_inode)).create(n, mode, flags, ctx.uid, ctx.gid)
        try:
            entry = await self._lookup_entry(parent_inode, node, n)
        except BaseException:
            await file.release()
            raise
        fh = self._new_handle(file, entry.st_ino, ctx.pid, flags)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False), entry

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        """OpenFile.read(off, size) under the dead-reader watch: EINTR when
        the reading process died while the read was blocked."""
        h = self._handle(fh)
        f = h.file
        if off > 0 and isinstance(f, SnapshotFile) and f.snapshot is not None:
            return await f.read(off, size)  # served from the snapshot: cannot block
        return await self._watched(h, f.read(off, size))

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """OpenFile.write(off, buf): one call per FUSE write (one ctl command)."""
        h = self._handle(fh)
        return await self._watched(h, h.file.write(off, bytes(buf)))

    async def _watched(self, h: _Handle, op):
        """Await ``op`` while the watcher may cancel it (→ FUSEError(EINTR))."""
        with trio.CancelScope() as scope:
            wid = next(self._watch_ids)
            if h.pid > 0:
                self._watches[wid] = _Watch(h.pid, h.ino, scope)
            try:
                return await op
            finally:
                self._watches.pop(wid, None)
        log.debug("pid %d died during a blocked call on inode %d: answered EINTR", h.pid, h.ino)
        raise pyfuse3.FUSEError(errno.EINTR)

    @_handler
    async def flush(self, fh: int) -> None:
        """OpenFile.flush (each close(2) of a descriptor; its errno is
        close's).  ENOSYS once when the tree has no file that stores at close
        (FileSystem.needs_flush): the kernel then sends no more flushes."""
        if not self.fs.needs_flush:
            raise FsError(errno.ENOSYS, "no flush")
        h = self._handles.get(fh)
        if h is not None:
            await h.file.flush()

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        """OpenFile.fsync."""
        await self._handle(fh).file.fsync()

    @_handler
    async def release(self, fh: int) -> None:
        """Last close: stop readiness waits, OpenFile.release."""
        await self._release(fh)

    async def _release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        if h.notifier is not None:
            h.notifier.cancel()
        h.poll_handle = None
        try:
            await h.file.release()
        except Exception:
            log.exception("release of inode %d failed", h.ino)

    @_handler
    async def poll(self, inode: int, fh: int, poll_handle, ctx) -> int:
        """Readiness for poll/select/epoll: POLLIN when OpenFile.readable()
        (or its readiness probe finishes within POLL_GRACE s), POLLOUT when
        opened for writing.  When not readable and the kernel gave a handle,
        it is notified as soon as the file becomes readable."""
        h = self._handle(fh)
        acc = h.flags & os.O_ACCMODE
        mask = 0
        if acc != os.O_RDONLY:
            mask |= select.POLLOUT | select.POLLWRNORM
        if acc == os.O_WRONLY:
            return mask
        if not h.file.readable() and poll_handle is not None:
            h.poll_handle = poll_handle  # a fresh handle replaces the older one
            if h.notifier is None:
                self._start_notifier(h)
            if h.ready is not None:
                with trio.move_on_after(POLL_GRACE):
                    await h.ready.wait()
        if h.file.readable():
            mask |= select.POLLIN | select.POLLRDNORM
        return mask

    def _start_notifier(self, h: _Handle) -> None:
        h.notifier = trio.CancelScope()
        h.ready = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._notify_when_readable, h, h.notifier, h.ready)

    async def _notify_when_readable(self, h: _Handle, scope: trio.CancelScope, ready: trio.Event) -> None:
        """Wait until ``h.file`` is readable, then notify the latest poll handle."""
        try:
            with scope:
                await h.file.wait_readable()
                while not h.file.readable():  # a file that cannot wait: re-check
                    await trio.sleep(READY_RECHECK)
                    await h.file.wait_readable()
        except FsError:
            pass
        except Exception:
            log.exception("readiness wait on inode %d failed", h.ino)
        finally:
            if h.notifier is scope:
                h.notifier = None
        ready.set()
        if scope.cancelled_caught:
            return
        ph, h.poll_handle = h.poll_handle, None
        if ph is not None:
            try:
                ph.notify()
            except OSError as e:
                log.debug("poll notify for inode %d: %s", h.ino, e)

    # ---- directories ------------------------------------------------------------

    @_handler
    async def opendir(self, inode: int, ctx) -> int:
        """Node.open(O_RDONLY | O_DIRECTORY)."""
        file = await (await self._node(inode)).open(os.O_RDONLY | os.O_DIRECTORY)
        return self._new_handle(file, inode, ctx.pid, os.O_RDONLY | os.O_DIRECTORY)

    @_handler
    async def readdir(self, fh: int, start_id: int, token) -> None:
        """Entries from the snapshot taken at start_id 0: ``.``, ``..``, then
        OpenFile.readdir()'s, with "next" ids 1, 2, …; each reported entry
        (not the dots) counts one lookup, as readdirplus requires."""
        h = self._handle(fh)
        if start_id == 0 or h.entries is None:
            h.entries = list(await h.file.readdir())
        me = self._inodes.get(h.ino)
        dots = [(".", h.ino), ("..", me.parent if me else h.ino)]
        total = len(h.entries) + 2
        for i in range(start_id, total):
            if i < 2:
                name, ino = dots[i]
                a = pyfuse3.EntryAttributes()
                a.st_ino, a.st_mode = ino, stat.S_IFDIR | 0o755
                a.entry_timeout = a.attr_timeout = 0
                if not pyfuse3.readdir_reply(token, os.fsencode(name), a, i + 1):
                    return
                continue
            d = h.entries[i - 2]
            ino = self._remember(None, d.qid.path, h.ino, d.name)
            a = pyfuse3.EntryAttributes()
            a.st_ino = ino
            a.st_mode = d.mode if stat.S_IFMT(d.mode) else d.mode | (stat.S_IFDIR if d.qid.is_dir else stat.S_IFREG)
            a.st_nlink = 1
            a.entry_timeout = a.attr_timeout = 0
            if not pyfuse3.readdir_reply(token, os.fsencode(d.name), a, i + 1):
                self._forget_one(ino, 1)  # not reported: no lookup counted
                return

    @_handler
    async def releasedir(self, fh: int) -> None:
        """OpenFile.release of the directory."""
        await self._release(fh)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Nothing to flush."""

    # ---- the dead-reader watch --------------------------------------------------

    async def _watch_loop(self) -> None:
        """Every WATCH_INTERVAL s, judge the openers of blocked reads in a
        worker thread and cancel the reads whose readers are gone."""
        while True:
            await trio.sleep(WATCH_INTERVAL)
            if not self._watches:
                continue
            watches = list(self._watches.values())
            now = trio.current_time()
            if self._mnt_id is None and self.mountpoint is not None:
                self._mnt_id = await trio.to_thread.run_sync(_mount_id, self.mountpoint)
            try:
                doomed = await trio.to_thread.run_sync(_judge, watches, self._mnt_id, now)
            except Exception:
                log.exception("dead-reader check failed")
                continue
            for w in doomed:
                w.scope.cancel()


# --------------------------------------------------------------------------
# /proc inspection (runs in worker threads)
# --------------------------------------------------------------------------


def default_uname() -> str:
    """The effective user's login name (its uid as text if it has none): the
    ``uname`` the operator attaches with by default."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _proc_status(pid: int) -> dict[str, str] | None:
    """/proc/<pid>/status as a dict, None if the task is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _state(pid: int) -> str:
    """``"gone"`` (no such task, or a zombie), ``"dying"`` (SIGKILL pending:
    a fatal signal was delivered), ``"interrupted"`` (in D state with an
    unblocked caught signal pending: the read must return EINTR so the
    handler can run), or ``"alive"``."""
    st = _proc_status(pid)
    if st is None or st.get("State", "X")[:1] in ("Z", "X"):
        return "gone"
    try:
        pending = int(st.get("SigPnd", "0"), 16) | int(st.get("ShdPnd", "0"), 16)
        blocked = int(st.get("SigBlk", "0"), 16)
        caught = int(st.get("SigCgt", "0"), 16)
    except ValueError:
        return "alive"
    if pending & _SIGKILL_BIT:
        return "dying"
    if st.get("State", "")[:1] == "D" and pending & ~blocked & caught:
        return "interrupted"
    return "alive"


def _mount_id(mountpoint: str) -> int | None:
    """The mnt_id of the FUSE mount at ``mountpoint`` (/proc/self/mountinfo)."""
    best = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                mp = parts[4].encode().decode("unicode_escape")
                fstype = parts[parts.index("-") + 1]
                if mp == mountpoint and fstype.startswith("fuse"):
                    best = int(parts[0])
    except (OSError, ValueError, IndexError):
        return None
    return best


def _holders(mnt_id: int, inos: set[int]) -> dict[int, set[int]]:
    """inode → pids (thread group ids) holding an fd on it in mount ``mnt_id``."""
    out: dict[int, set[int]] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        d = f"/proc/{p}/fdinfo"
        try:
            fds = os.listdir(d)
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"{d}/{fd}") as f:
                    info = f.read(256)
            except OSError:
                continue
            mnt = ino = None
            for line in info.splitlines():
                if line.startswith("mnt_id:"):
                    mnt = int(line[7:])
                elif line.startswith("ino:"):
                    ino = int(line[4:])
            if mnt == mnt_id and ino in inos:
                out.setdefault(ino, set()).add(int(p))
    return out


def _judge(watches: Iterable[_Watch], mnt_id: int | None, now: float) -> list[_Watch]:
    """The watches whose reads must be cancelled (see the module docstring)."""
    doomed: list[_Watch] = []
    suspects: list[_Watch] = []
    for w in watches:
        s = _state(w.pid)
        if s == "alive":
            continue
        if s == "interrupted":
            doomed.append(w)
            continue
        if mnt_id is None:
            doomed.append(w)  # cannot look for inheritors: trust the opener
            continue
        if now - w.holders_checked < 1.0 and s == "gone":
            continue  # an inheritor was alive a moment ago
        suspects.append(w)
    if suspects:
        holders = _holders(mnt_id, {w.ino for w in suspects})
        verdicts: dict[int, str] = {}
        for w in suspects:
            live = [p for p in holders.get(w.ino, ()) if verdicts.setdefault(p, _state(p)) == "alive"]
            if live:
                w.holders_checked = now
            else:
                doomed.append(w)
    return doomed


# --------------------------------------------------------------------------
# Mounting
# --------------------------------------------------------------------------


def is_stale_mount(mountpoint: str) -> bool:
    """True when ``mountpoint`` is a FUSE mount whose daemon is gone
    (statvfs gives ENOTCONN; statfs is never answered from the kernel's
    attribute cache, unlike stat).  Blocking: call through ``trio.to_thread``."""
    try:
        os.statvfs(mountpoint)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


async def clean_stale_mount(mountpoint: str) -> bool:
    """Lazily unmount a dead FUSE mount at ``mountpoint``
    (``fusermount3 -u -z``, falling back to ``umount -l``); returns True if
    one was removed.  Raises OSError when it stays stale."""
    if not await trio.to_thread.run_sync(is_stale_mount, mountpoint):
        return False
    log.warning("%s is a stale FUSE mount: unmounting it", mountpoint)
    for cmd in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        try:
            await trio.run_process(cmd, check=False, capture_stdout=True, capture_stderr=True)
        except OSError:
            continue
        if not await trio.to_thread.run_sync(is_stale_mount, mountpoint):
            return True
    raise OSError(errno.ENOTCONN, f"cannot unmount the stale mount at {mountpoint}")


async def mount(
    fs: FileSystem,
    mountpoint: str,
    *,
    fsname: str = "cloudfs",
    debug: bool = False,
    max_tasks: int = DEFAULT_MAX_TASKS,
    uname: str | None = None,
    aname: str = "",
    timeout: float = 1.0,
    allow_other: bool = False,
    owner: tuple[int, int] | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``fs`` at ``mountpoint`` through the kernel's FUSE until cancelled
    or unmounted from outside; always unmounts on the way out.

    Cleans a stale mount at ``mountpoint`` first, attaches ``fs`` as
    ``uname``/``aname`` (FsError if refused), mounts with ``fsname`` (shown
    by mount(8)) and ``default_permissions``, and
    runs pyfuse3 with up to ``max_tasks`` concurrent handlers.  The mount
    carries the rights of whoever attached (for ``cloudfs up``, the
    operator's), so only the mounting user may use it unless ``allow_other``
    (FUSE's option of that name; needs root) opens it to every local user.
    ``owner`` as for :class:`FuseAdapter` (``cloudfs up`` passes its own
    uid and gid: the mount is the user's who runs the daemon).  ``debug``
    turns on libfuse's request trace.  ``task_status.started(adapter)`` is
    called once mounted.  One mount per process (pyfuse3 is global).
    Raises RuntimeError from pyfuse3 when mounting fails.
    """
    mountpoint = os.path.abspath(mountpoint)
    await clean_stale_mount(mountpoint)
    adapter = FuseAdapter(fs, uname=uname, aname=aname, timeout=timeout, owner=owner)
    adapter.mountpoint = mountpoint
    options = set(pyfuse3.default_options)
    options.add(f"fsname={fsname}")
    options.add("subtype=cloudfs")
    if allow_other:
        options.add("allow_other")
    if debug:
        options.add("debug")
    async with trio.open_nursery() as nursery:
        await adapter.start(nursery)
        pyfuse3.init(adapter, mountpoint, options)
        try:
            log.info("mounted %s at %s", fsname, mountpoint)
            task_status.started(adapter)
            gc.freeze()  # a long-lived daemon: keep start-up objects out of every collection
            await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
        finally:
            nursery.cancel_scope.cancel()
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", mountpoint)
            # Files still open when the mount went away: release them, but
            # never hang the exit on a filesystem that does not answer.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + RELEASE_GRACE):
                for fh in list(adapter._handles):
                    await adapter._release(fh)
