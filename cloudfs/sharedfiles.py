"""``/files``: the deployment's shared file tree, over a backend
(cloudfs.filestore), with who may change what and the quotas.

Who may do what (a :class:`cloudfs.nodes.View`):

- the operator: everything;
- a process: read everything; make files and directories anywhere; change
  (write, truncate, remove, rename, touch) only the entries that it or one
  of its descendants made.  So a VM can publish a result for everyone to
  read, and nobody but its own ancestry (and the operator) can change or
  remove it: the sticky bit of ``/tmp``, with a process tree for the uid.
  The entries of a process that has ended are the operator's to change.
- the read-only view: read only.

Anything not allowed is EACCES and changes nothing.

Quotas (EDQUOT beyond any of them):

- per process, ``files`` and ``file-bytes`` of cloudfs.quotas: an entry and
  its bytes are charged to the process that made it (its *owner*), whoever
  writes them;
- per deployment, the same two names in the znode ``<root>/files``
  (:data:`DEFAULT_DEPLOYMENT_LIMITS`, ``cloudfs up --files-limit``), charged
  for every entry whoever made it.

A write that makes a file longer charges the growth before it is written,
in steps of :data:`CHARGE_STEP` bytes (one ZooKeeper multi per step); the
unused rest of the last step is given back at the last close on this
daemon, when the file's true size is known.  Charges are shielded from
cancellation.  Charges are exact when one daemon at a time writes a file;
two daemons growing one file at once may charge its growth twice until both
have closed it.

Concurrency on one daemon: every check and the change it guards hold the
per-path locks of the names involved (:class:`_PathLocks`) and the tree
lock shared; a move holds the tree lock alone (:class:`_TreeLock`), so no
open or change runs while paths move.  Every open of a file for writing
shares one backend handle and its lock (:class:`_Growth`), so writes,
truncates and stores of one file are ordered, and a move waits for a store
under way.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import trio

from ninep.errors import FsError

from .filestore import FileInfo, FileStore, Handle, below
from .quotas import FILE_BYTES, FILES, Quotas, limit_max
from .records import Records
from .store import BadVersionError, NodeExistsError, NoNodeError, Store
from .znodes import Layout

log = logging.getLogger(__name__)

#: The deployment's limits unless ``cloudfs up --files-limit`` says others.
DEFAULT_DEPLOYMENT_LIMITS: Mapping[str, int] = {FILES: 65536, FILE_BYTES: 64 << 30}
#: Bytes charged at once when a write makes a file longer (fewer multis).
CHARGE_STEP = 8 << 20


@dataclass
class Usage:
    """The deployment's /files limits and counts (``files``, ``file-bytes``)."""

    limits: dict[str, int]
    used: dict[str, int]

    def to_json(self) -> bytes:
        return json.dumps({"limits": self.limits, "used": self.used}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Usage":
        """FsError(EIO) unless it is what :meth:`to_json` writes."""
        try:
            raw = json.loads(data)
            out = cls({}, {})
            for part in ("limits", "used"):
                for n in (FILES, FILE_BYTES):
                    v = raw[part][n]
                    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= limit_max(n):
                        raise ValueError(f"{part}.{n} is {v!r}")
                    getattr(out, part)[n] = v
            return out
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
            raise FsError(errno.EIO, f"the deployment's files usage znode is corrupt ({e})") from None


class _PathLocks:
    """One trio.Lock per path in use (made on demand, dropped when free):
    the check and the change of one operation on a path happen with no other
    operation of this daemon on that path in between."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, *paths: str):
        """Hold the locks of ``paths`` (in sorted order: no deadlock)."""
        order = sorted(set(paths))
        for p in order:
            lock, n = self._locks.get(p, (None, 0))
            self._locks[p] = (lock or trio.Lock(), n + 1)
        held = []
        try:
            for p in order:
                await self._locks[p][0].acquire()
                held.append(p)
            yield
        finally:
            for p in reversed(order):
                lock, n = self._locks[p]
                if p in held:
                    lock.release()
                if n == 1:
                    del self._locks[p]
                else:
                    self._locks[p] = (lock, n - 1)


class _TreeLock:
    """Shared/exclusive lock of the whole tree, preferring the exclusive
    side: a move (``mv``) holds it exclusively, every other change and open
    holds it shared (once, never nested), so nothing opens or changes a
    path while a move may be carrying it elsewhere."""

    def __init__(self) -> None:
        self._cond = trio.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0  # exclusive holders waiting: new shared ones wait behind them

    @asynccontextmanager
    async def shared(self):
        async with self._cond:
            while self._writer or self._waiting:
                await self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                async with self._cond:
                    self._readers -= 1
                    self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self):
        async with self._cond:
            self._waiting += 1
            try:
                while self._writer or self._readers:
                    await self._cond.wait()
            finally:
                self._waiting -= 1
                self._cond.notify_all()
            self._writer = True
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                async with self._cond:
                    self._writer = False
                    self._cond.notify_all()


@dataclass
class _Growth:
    """A file open for writing on this daemon: one backend handle shared by
    every open of it here (so all of them see one file, and Swift stores one
    spool at the last close), the bytes charged for it so far (its size when
    first opened, plus steps), how many opens share it.  ``lock`` orders its
    reads, writes, stores and charges."""

    path: str
    owner: int
    charged: int
    handle: Handle
    opens: int = 0
    gone: bool = False  # removed while open: its charge was given back then
    closed: bool = False  # its last close is done: whoever waited on its lock looks again
    lock: trio.Lock = field(default_factory=trio.Lock)

    def current(self, path: str) -> bool:
        """Still the live growth of ``path`` (checked after waiting on ``lock``)."""
        return not self.closed and self.path == path


class SharedFiles:
    """The /files service of one CloudFS: ``backend`` holds the bytes,
    ``store``/``layout`` the usage znode, ``quotas``/``records`` the
    processes' quotas and ancestry; ``limits`` the deployment's limits
    (written to the usage znode by :meth:`prepare`)."""

    def __init__(self, backend: FileStore, store: Store, layout: Layout, quotas: Quotas, records: Records,
                 limits: Mapping[str, int] | None = None):
        self.backend = backend
        self.store = store
        self.layout = layout
        self.quotas = quotas
        self.records = records
        self.limits = {**DEFAULT_DEPLOYMENT_LIMITS, **(limits or {})}
        self._growth: dict[str, _Growth] = {}
        self._locks = _PathLocks()
        self._tree = _TreeLock()

    @asynccontextmanager
    async def _hold(self, *paths: str):
        """The tree shared (no move under way) and the locks of ``paths``."""
        async with self._tree.shared(), self._locks.hold(*paths):
            yield

    # -- the usage znode ---------------------------------------------------

    async def prepare(self) -> None:
        """Make the usage znode, or set its limits to this daemon's."""
        path = self.layout.files_usage
        while True:
            got = await self.store.get(path)
            if got is None:
                try:
                    await self.store.create(path, Usage(dict(self.limits), {FILES: 0, FILE_BYTES: 0}).to_json())
                    return
                except NodeExistsError:
                    continue
            usage = Usage.from_json(got[0])
            if usage.limits == self.limits:
                return
            usage.limits = dict(self.limits)
            try:
                await self.store.set(path, usage.to_json(), got[1].version)
                return
            except BadVersionError:
                continue

    async def usage(self) -> Usage:
        """The deployment's limits and counts now."""
        got = await self.store.get(self.layout.files_usage)
        if got is None:
            raise FsError(errno.EIO, "the deployment has no files usage znode")
        return Usage.from_json(got[0])

    async def charge(self, owner: int, files: int = 0, nbytes: int = 0) -> None:
        """Count ``files`` entries and ``nbytes`` bytes (negative: give
        back) for the deployment and for process ``owner`` (0, or a process
        that ended: the deployment only), in one multi.  FsError(EDQUOT)
        when an increase passes a limit; a decrease never fails (counts
        stop at 0)."""
        if not files and not nbytes:
            return
        L = self.layout
        while True:
            got = await self.store.get(L.files_usage)
            if got is None:
                raise FsError(errno.EIO, "the deployment has no files usage znode")
            usage = Usage.from_json(got[0])
            quota = await self.quotas.get(owner) if owner else None
            new_used = {FILES: max(0, usage.used[FILES] + files), FILE_BYTES: max(0, usage.used[FILE_BYTES] + nbytes)}
            for n, delta in ((FILES, files), (FILE_BYTES, nbytes)):
                if delta > 0 and new_used[n] > usage.limits[n]:
                    raise FsError(errno.EDQUOT, f"the deployment's /files may hold at most {usage.limits[n]} "
                                                f"{'entries' if n == FILES else 'bytes'} ({n}; {usage.used[n]} "
                                                "in use)")
                if delta > 0 and quota is not None and quota.value.used[n] + delta > quota.value.limits[n]:
                    raise FsError(errno.EDQUOT, f"process {owner} may own at most {quota.value.limits[n]} "
                                                f"{'entries' if n == FILES else 'bytes'} of /files (limit {n}; "
                                                f"{quota.value.used[n]} in use)")
            t = self.store.transaction()
            t.set_data(L.files_usage, Usage(usage.limits, new_used).to_json(), got[1].version)
            if quota is not None:
                t.set_data(L.quota(owner), quota.value.using(files=files, file_bytes=nbytes).to_json(),
                           quota.version)
            try:
                await self.store.commit(t)
                return
            except (BadVersionError, NoNodeError):
                continue  # raced, or the owner ended meanwhile: read again

    # -- rights ------------------------------------------------------------

    async def may_change(self, view, path: str, info: FileInfo) -> None:
        """FsError(EACCES) unless ``view`` may change the entry at ``path``."""
        from .nodes import OPERATOR, PROCESS  # nodes imports this module's users

        if view.rights == OPERATOR:
            return
        if view.rights == PROCESS and view.self_pid is not None:
            if info.owner and await self.records.is_descendant(info.owner, view.self_pid):
                return
            raise FsError(errno.EACCES, f"/files/{path} was made by "
                                        f"{'process ' + str(info.owner) if info.owner else 'the operator'}: "
                                        f"process {view.self_pid} may only change what it or its descendants "
                                        "made")
        raise FsError(errno.EACCES, "read-only view: attach with a process credential or as the operator")

    @staticmethod
    def may_make(view) -> int:
        """The owner of what ``view`` makes (its pid; 0 for the operator);
        FsError(EACCES) for the read-only view."""
        from .nodes import OPERATOR, PROCESS

        if view.rights == OPERATOR:
            return 0
        if view.rights == PROCESS and view.self_pid is not None:
            return view.self_pid
        raise FsError(errno.EACCES, "read-only view: attach with a process credential or as the operator")

    # -- changes -----------------------------------------------------------

    async def _charge_shielded(self, owner: int, files: int = 0, nbytes: int = 0) -> None:
        # A charge must not be cut by a cancellation: ZooKeeper may apply a
        # multi whose answer never arrives, and the count would then drift.
        with trio.CancelScope(shield=True):
            await self.charge(owner, files=files, nbytes=nbytes)

    async def mkdir(self, view, path: str) -> None:
        """Make directory ``path`` for ``view`` (one ``files`` charged)."""
        owner = self.may_make(view)
        async with self._hold(path):
            await self._charge_shielded(owner, files=1)
            try:
                await self.backend.mkdir(path, owner)
            except BaseException:
                await self._give_back(owner, 1, 0)
                raise

    async def remove(self, view, path: str, is_dir: bool) -> None:
        """rm / rmdir ``path`` (EISDIR, ENOTDIR, ENOTEMPTY as unlink(2),
        rmdir(2)); gives its charge back to its owner and the deployment."""
        async with self._hold(path):
            info = await self.backend.info(path)
            if is_dir and not info.is_dir:
                raise FsError(errno.ENOTDIR, f"/files/{path} is not a directory")
            if not is_dir and info.is_dir:
                raise FsError(errno.EISDIR, f"/files/{path} is a directory")
            await self.may_change(view, path, info)
            if is_dir:
                await self.backend.rmdir(path)
                await self._give_back(info.owner, 1, 0)
                return
            while True:
                g = self._growth.get(path)
                if g is None:
                    await self.backend.unlink(path)
                    await self._give_back(info.owner, 1, info.size)
                    return
                async with g.lock:  # no store of it under way
                    if not g.current(path):
                        info = await self.backend.info(path)  # its last close stored it meanwhile
                        continue
                    await self.backend.unlink(path)
                    del self._growth[path]
                    size, g.gone, g.charged = g.charged, True, 0  # what was charged goes back now
                await self._give_back(info.owner, 1, size)
                return

    async def rename(self, view, src: str, dst: str) -> None:
        """mv ``src`` to ``dst`` (both below /files): ``view`` must be
        allowed to change ``src`` and, if it exists, ``dst``.  EINVAL for a
        directory moved into itself; as rename(2) otherwise."""
        async with self._tree.exclusive():  # no open, change or other move meanwhile
            info = await self.backend.info(src)
            await self.may_change(view, src, info)
            if src == dst:
                return
            if info.is_dir and below(dst, src):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
            try:
                old = await self.backend.info(dst)
            except FsError as e:
                if e.errno != errno.ENOENT:
                    raise
                old = None
            if old is not None:
                await self.may_change(view, dst, old)
            # No open can add a growth now (the tree is ours); a close may end
            # one while we wait for its lock, and then it is skipped.
            moving = [g for p, g in sorted(self._growth.items()) if below(p, src) or p == dst]
            async with AsyncExitStack() as stack:
                for g in moving:  # no store of a moving file under way
                    await stack.enter_async_context(g.lock)
                if old is not None and not old.is_dir and self._growth.get(dst) is None:
                    old = await self.backend.info(dst)  # as stored by a close we may have waited for
                await self.backend.rename(src, dst)
                size = 0
                if old is not None:
                    size = 0 if old.is_dir else old.size
                    g = self._growth.get(dst)
                    if g is not None:
                        del self._growth[dst]
                        size, g.gone, g.charged = g.charged, True, 0
                for g in moving:
                    if g.gone or g.closed or not below(g.path, src):
                        continue
                    del self._growth[g.path]
                    g.path = dst + g.path[len(src):]
                    g.handle.moved(g.path)
                    self._growth[g.path] = g
            if old is not None:
                await self._give_back(old.owner, 1, size)

    async def _give_back(self, owner: int, files: int, nbytes: int) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.charge(owner, files=-files, nbytes=-nbytes)
            except FsError as e:  # the change is done; a count that drifts is logged, not an error
                log.warning("/files: could not give back %d entries, %d bytes to process %d: %s",
                            files, nbytes, owner, e)

    async def touch(self, view, path: str, mtime_ns: int) -> None:
        """Set the modification time of ``path`` (if the backend keeps it)."""
        async with self._hold(path):
            info = await self.backend.info(path)
            await self.may_change(view, path, info)
            await self.backend.set_mtime(path, mtime_ns)

    # -- opens -------------------------------------------------------------

    async def open(self, view, path: str, *, write: bool, truncate: bool = False, create: bool = False,
                   exclusive: bool = False) -> "SharedHandle":
        """Open file ``path``.  ``create``: make it if missing (EEXIST if it
        exists and ``exclusive``); ``write`` and ``truncate`` need the right
        to change it.  EISDIR for a directory.  Opens for writing on this
        daemon share one backend handle (see _Growth)."""
        async with self._hold(path):
            return await self._open(view, path, write, truncate, create, exclusive)

    async def _open(self, view, path: str, write: bool, truncate: bool, create: bool,
                    exclusive: bool) -> "SharedHandle":
        while True:  # again when the growth it joined closed meanwhile
            h = await self._open_once(view, path, write, truncate, create, exclusive)
            if h is not None:
                return h

    async def _open_once(self, view, path: str, write: bool, truncate: bool, create: bool,
                         exclusive: bool) -> "SharedHandle | None":
        if create:
            owner = self.may_make(view)
            try:
                info = await self.backend.info(path)
            except FsError as e:
                if e.errno != errno.ENOENT:
                    raise
                await self._charge_shielded(owner, files=1)
                try:
                    h = await self.backend.open(path, create=True, owner=owner, write=True)
                except BaseException:
                    await self._give_back(owner, 1, 0)
                    raise
                g = self._growth[path] = _Growth(path, owner, 0, h, opens=1)
                return SharedHandle(self, g, info=FileInfo(False, 0, time.time_ns(), owner))
            if exclusive:
                raise FsError(errno.EEXIST, f"/files/{path} exists")
            write = True
        else:
            info = await self.backend.info(path)
        if info.is_dir:
            raise FsError(errno.EISDIR, f"/files/{path} is a directory")
        if not (write or truncate):
            return SharedHandle(self, None, await self.backend.open(path), info=info)
        await self.may_change(view, path, info)
        g = self._growth.get(path)
        if g is not None:
            async with g.lock:
                if not g.current(path):
                    return None  # its last close finished (or it moved) meanwhile: look again
                if truncate:
                    await g.handle.truncate(0)  # the charge is settled at the last close
                g.opens += 1
            return SharedHandle(self, g, info=info)
        h = await self.backend.open(path, write=True, truncate=truncate)
        g = self._growth[path] = _Growth(path, info.owner, info.size, h, opens=1)
        return SharedHandle(self, g, info=info)

    async def truncate(self, view, path: str, size: int) -> None:
        """truncate(2) ``path`` to ``size`` bytes (growth charged first); an
        open of it for writing here sees it at once (one shared handle)."""
        async with self._hold(path):
            # to 0 and not open here: opened truncated, so Swift fetches nothing that goes anyway
            h = await self._open(view, path, True, size == 0 and path not in self._growth, False, False)
        try:
            await h.truncate(size)
        finally:
            await h.close()

    async def _grow(self, g: _Growth, end: int) -> None:
        """Charge what a write up to byte ``end`` adds beyond ``g.charged``
        (``g.lock`` held)."""
        need = end - g.charged
        if need <= 0:
            return
        step = max(need, CHARGE_STEP)
        with trio.CancelScope(shield=True):  # the charge and its note go together
            try:
                await self.charge(g.owner, nbytes=step)
            except FsError as e:
                if e.errno != errno.EDQUOT or step == need:
                    raise
                await self.charge(g.owner, nbytes=need)
                step = need
            g.charged += step

    async def _close(self, g: _Growth) -> None:
        """One open of ``g`` closed; the last one stores the file (Swift)
        and gives back what was charged beyond its true size."""
        # The growth stays in _growth until its store is done: whoever finds
        # it meanwhile waits on its lock and then sees it closed.
        with trio.CancelScope(shield=True):
            async with g.lock:
                g.opens -= 1
                if g.opens > 0:
                    return
                extra = g.charged
                try:
                    if g.gone:  # removed while open: store nothing (Swift would make it again)
                        await g.handle.discard()
                    else:
                        try:
                            extra = g.charged - await g.handle.size()
                        except FsError:
                            extra = 0
                        try:
                            await g.handle.close()
                        except FsError as e:
                            log.warning("/files/%s: not stored at close: %s", g.path, e)
                            raise
                finally:
                    g.closed = True
                    if self._growth.get(g.path) is g:
                        del self._growth[g.path]
                    if extra > 0:
                        await self._give_back(g.owner, 0, extra)
                    elif extra < 0:
                        log.warning("/files/%s: %d bytes were written without a charge", g.path, -extra)


class SharedHandle:
    """One open of a /files file: reads, writes (charged), truncate, and a
    close that settles the charge.  Opens for writing share their file's
    _Growth (one backend handle, one lock); a read-only open has a backend
    handle of its own.  ``async with`` closes it."""

    def __init__(self, files: SharedFiles, growth: _Growth | None, handle: Handle | None = None,
                 info: FileInfo | None = None):
        self.files = files
        self.growth = growth
        #: the file as it was when opened (for the node a create returns)
        self.info = info
        self.handle = handle if growth is None else growth.handle
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise FsError(errno.EBADF, "closed")

    async def read(self, offset: int, count: int) -> bytes:
        self._check()
        g = self.growth
        if g is None:
            return await self.handle.read(offset, count)
        async with g.lock:
            return await g.handle.read(offset, count)

    async def write(self, offset: int, data: bytes) -> int:
        self._check()
        g = self.growth
        if g is None:
            raise FsError(errno.EBADF, "not open for writing")
        async with g.lock:
            await self.files._grow(g, offset + len(data))
            return await g.handle.write(offset, data)

    async def truncate(self, size: int) -> None:
        self._check()
        g = self.growth
        if g is None:
            raise FsError(errno.EBADF, "not open for writing")
        async with g.lock:
            await self.files._grow(g, size)
            await g.handle.truncate(size)

    async def size(self) -> int:
        return await self.handle.size()

    async def sync(self) -> None:
        """fsync(2): durable, and stored where other hosts read it (Swift)."""
        self._check()
        g = self.growth
        if g is not None:
            async with g.lock:
                if not g.gone:
                    with trio.CancelScope(shield=True):  # a store is not cut in half
                        await g.handle.sync()

    async def flush(self) -> None:
        """close(2) of a descriptor: a backend that stores at close stores now."""
        g = self.growth
        if g is not None and not self._closed:
            async with g.lock:
                if not g.gone:
                    with trio.CancelScope(shield=True):
                        await g.handle.flush()

    async def close(self) -> None:
        """Release this open (the last open of a written file stores it and settles)."""
        if self._closed:
            return
        self._closed = True
        if self.growth is None:
            with trio.CancelScope(shield=True):
                await self.handle.close()
            return
        await self.files._close(self.growth)

    async def __aenter__(self) -> "SharedHandle":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
