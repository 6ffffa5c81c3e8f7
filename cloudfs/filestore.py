"""Where the bytes of ``/files`` live: the backend interface and the local one.

``/files`` is one ordinary file tree per deployment (cloudfs.sharedfiles
adds who may change what and the quotas).  A backend stores directories and
regular files by path and remembers, for each entry, the pid of the process
that made it (its *owner*; 0 for the operator).  Two backends:

- :class:`LocalStore` (the default, one host): a directory in the state dir,
  ``STATE/files/data``; owners in a SQLite table beside it
  (``STATE/files/owners.db``).  Reads and writes go straight to the file at
  their offsets (pread/pwrite in worker threads), so a reader on the same
  host sees every write at once, and memory stays bounded whatever the
  file's size.
- :class:`cloudfs.swiftstore.SwiftStore` (several hosts): objects in an
  OpenStack object store (Swift).

Paths are ``/``-joined names relative to the top of ``/files`` (``""`` is the
top), each name checked by :func:`check_name`; a path is at most
:data:`PATH_MAX` bytes (Swift's object name limit).  Errors are FsError with
the errno Linux gives (ENOENT, EEXIST, ENOTDIR, EISDIR, ENOTEMPTY, ENOSPC …).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import trio

from ninep.errors import FsError

#: Longest name of one entry, in bytes (NAME_MAX).
NAME_MAX = 255
#: Longest path below /files, in bytes (Swift's object names are at most 1024).
PATH_MAX = 1024


@dataclass(frozen=True)
class FileInfo:
    """One entry: a directory or a regular file of ``size`` bytes, last
    modified at ``mtime_ns`` (ns since the epoch), made by process ``owner``
    (0: the operator, or unknown)."""

    is_dir: bool
    size: int
    mtime_ns: int
    owner: int = 0


def check_name(name: str) -> None:
    """A name of /files: 1–255 bytes of UTF-8, no ``/``, NUL or control
    characters, not ``.`` or ``..``.  FsError(EINVAL) or (ENAMETOOLONG)."""
    if not name or name in (".", ".."):
        raise FsError(errno.EINVAL, f"bad file name {name!r}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise FsError(errno.EINVAL, "file names under /files are UTF-8") from None
    if size > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, f"a file name is at most {NAME_MAX} bytes")
    if any(c == "/" or ord(c) < 0x20 or c == "\x7f" for c in name):
        raise FsError(errno.EINVAL, f"bad file name {name[:64]!r}")


def join(path: str, name: str) -> str:
    """``path/name`` (``name`` checked); FsError(ENAMETOOLONG) beyond PATH_MAX."""
    check_name(name)
    out = f"{path}/{name}" if path else name
    if len(out.encode("utf-8")) > PATH_MAX:
        raise FsError(errno.ENAMETOOLONG, f"a path under /files is at most {PATH_MAX} bytes")
    return out


def parent_of(path: str) -> str:
    """The directory holding ``path`` (``""`` for a top-level name)."""
    return path.rpartition("/")[0]


def below(path: str, top: str) -> bool:
    """True when ``path`` is ``top`` or inside it."""
    return path == top or path.startswith(top + "/")


class Handle:
    """One open file of a backend: reads and writes at offsets, its size.
    Subclasses implement every method."""

    async def read(self, offset: int, count: int) -> bytes:
        """Up to ``count`` bytes at ``offset`` (fewer at the end, b"" past it)."""
        raise NotImplementedError

    async def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` (a hole before it reads as zeros); bytes written."""
        raise NotImplementedError

    async def truncate(self, size: int) -> None:
        """Cut or extend (with zeros) to ``size`` bytes."""
        raise NotImplementedError

    async def size(self) -> int:
        """The file's size as this open sees it (bytes)."""
        raise NotImplementedError

    async def sync(self) -> None:
        """Make what was written durable and visible to other hosts (fsync(2))."""

    async def flush(self) -> None:
        """A close(2) of a descriptor: store what a backend that stores at
        close holds (Swift); nothing to do for a local file."""

    async def close(self) -> None:
        """Release the open; a backend that stores at close (Swift) stores here."""

    async def discard(self) -> None:
        """Release the open without storing anything (the file was removed)."""
        await self.close()

    def moved(self, path: str) -> None:
        """The file was renamed to ``path`` while open (a backend that stores
        at close stores there)."""


class FileStore:
    """The backend interface (see the module doc).  Every method is async
    and raises FsError."""

    #: where the data lives, for logs and docs
    description = ""
    #: files are stored at close (FUSE must pass on each close(2))
    stores_at_close = False

    async def info(self, path: str) -> FileInfo:
        """The entry at ``path`` (``""``: the top, a directory)."""
        raise NotImplementedError

    async def list(self, path: str) -> list[tuple[str, FileInfo]]:
        """The entries of directory ``path``, sorted by name."""
        raise NotImplementedError

    async def mkdir(self, path: str, owner: int) -> None:
        """Make directory ``path`` (EEXIST if something is there)."""
        raise NotImplementedError

    async def rmdir(self, path: str) -> None:
        """Remove the empty directory ``path`` (ENOTEMPTY otherwise)."""
        raise NotImplementedError

    async def unlink(self, path: str) -> None:
        """Remove the file ``path`` (EISDIR for a directory)."""
        raise NotImplementedError

    async def rename(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst`` as rename(2): a file at ``dst`` is
        replaced, an empty directory at ``dst`` is replaced by a directory."""
        raise NotImplementedError

    async def open(self, path: str, *, create: bool = False, owner: int = 0, truncate: bool = False,
                   write: bool = False) -> Handle:
        """Open the file ``path``; ``create``: make it first (EEXIST if it
        exists), owned by ``owner``; ``truncate``: to 0 bytes."""
        raise NotImplementedError

    async def set_mtime(self, path: str, mtime_ns: int) -> None:
        """Set the modification time (touch); backends that cannot ignore it."""

    async def close(self) -> None:
        """Release what the backend holds."""


class LocalStore(FileStore):
    """The files in a local directory: ``root/data`` for the tree,
    ``root/owners.db`` for the owners (both made on first use, mode 0700).

    Confinement: every path is made of checked names (no ``..``, no ``/``)
    and the tree holds only what this class makes (directories and regular
    files), and every open uses O_NOFOLLOW, so nothing outside ``root/data``
    is reached.  Blocking calls run in worker threads, at most ``threads``
    at once."""

    def __init__(self, root: Path, threads: int = 8):
        self.root = Path(root)
        self.data = self.root / "data"
        self.description = f"local directory {self.data}"
        self._limiter = trio.CapacityLimiter(threads)
        self._db: sqlite3.Connection | None = None
        # Held across each change that adds or moves owners' rows together
        # with its change of the tree (mkdir, create, rename; in the worker
        # thread), so a rename and a create in the moved directory cannot
        # interleave between the two.  Not across unlink or truncate: freeing
        # a big file's blocks must not stall every lookup.
        self._db_lock = threading.RLock()
        self._started = False

    # -- plumbing ---------------------------------------------------------

    async def _run(self, fn, *args):
        if not self._started:
            await trio.to_thread.run_sync(self._start, limiter=self._limiter)
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except OSError as e:
            raise FsError(e.errno or errno.EIO, e.strerror or str(e)) from None
        except sqlite3.Error as e:
            raise FsError(errno.EIO, f"owners table: {e}") from None

    def _start(self) -> None:
        with self._db_lock:
            if self._started:
                return
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.data.mkdir(mode=0o700, exist_ok=True)
            db = sqlite3.connect(self.root / "owners.db", check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS owners (path TEXT PRIMARY KEY, parent TEXT NOT NULL, "
                       "owner INTEGER NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS owners_parent ON owners (parent)")
            self._db = db
            self._started = True

    def _full(self, path: str) -> str:
        return os.path.join(self.data, path) if path else str(self.data)

    def _sql(self, query: str, args: tuple = ()) -> list[tuple]:
        with self._db_lock:
            return self._db.execute(query, args).fetchall()  # type: ignore[union-attr]

    def _owner(self, path: str) -> int:
        rows = self._sql("SELECT owner FROM owners WHERE path = ?", (path,))
        return rows[0][0] if rows else 0

    def _set_owner(self, path: str, owner: int) -> None:
        self._sql("INSERT OR REPLACE INTO owners (path, parent, owner) VALUES (?, ?, ?)",
                  (path, parent_of(path), owner))

    def _forget(self, path: str) -> None:
        self._sql("DELETE FROM owners WHERE path = ?", (path,))

    @staticmethod
    def _info(st: os.stat_result, owner: int) -> FileInfo:
        if stat.S_ISDIR(st.st_mode):
            return FileInfo(True, 0, st.st_mtime_ns, owner)
        if stat.S_ISREG(st.st_mode):
            return FileInfo(False, st.st_size, st.st_mtime_ns, owner)
        raise FsError(errno.ENOENT, "not a file or directory")

    # -- the interface ----------------------------------------------------

    async def info(self, path: str) -> FileInfo:
        def do() -> FileInfo:
            st = os.stat(self._full(path), follow_symlinks=False)
            return self._info(st, self._owner(path) if path else 0)
        return await self._run(do)

    async def list(self, path: str) -> list[tuple[str, FileInfo]]:
        def do() -> list[tuple[str, FileInfo]]:
            owners = dict(self._sql("SELECT path, owner FROM owners WHERE parent = ?", (path,)))
            out = []
            with os.scandir(self._full(path)) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                        child = f"{path}/{e.name}" if path else e.name
                        out.append((e.name, self._info(st, owners.get(child, 0))))
                    except (OSError, FsError):
                        continue  # gone meanwhile, or not ours to show
            out.sort()
            return out
        return await self._run(do)

    async def mkdir(self, path: str, owner: int) -> None:
        def do() -> None:
            with self._db_lock:
                os.mkdir(self._full(path), 0o755)
                self._set_owner(path, owner)
        await self._run(do)

    async def rmdir(self, path: str) -> None:
        def do() -> None:
            os.rmdir(self._full(path))
            self._forget(path)
        await self._run(do)

    async def unlink(self, path: str) -> None:
        def do() -> None:
            full = self._full(path)
            if stat.S_ISDIR(os.stat(full, follow_symlinks=False).st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            os.unlink(full)
            self._forget(path)
        await self._run(do)

    async def rename(self, src: str, dst: str) -> None:
        def do() -> None:
            n = len(src)
            with self._db_lock:
                os.rename(self._full(src), self._full(dst))
                db = self._db
                db.execute("BEGIN")  # type: ignore[union-attr]
                try:
                    db.execute("DELETE FROM owners WHERE path = ?", (dst,))  # type: ignore[union-attr]
                    db.execute("UPDATE owners SET path = ?, parent = ? WHERE path = ?",  # type: ignore[union-attr]
                               (dst, parent_of(dst), src))
                    # everything below a moved directory: both columns start with src + "/"
                    db.execute("UPDATE owners SET path = ? || substr(path, ?), parent = ? || substr(parent, ?) "
                               "WHERE substr(path, 1, ?) = ?",  # type: ignore[union-attr]
                               (dst, n + 1, dst, n + 1, n + 1, src + "/"))
                    db.execute("COMMIT")  # type: ignore[union-attr]
                except BaseException:
                    db.execute("ROLLBACK")  # type: ignore[union-attr]
                    raise
        await self._run(do)

    async def open(self, path: str, *, create: bool = False, owner: int = 0, truncate: bool = False,
                   write: bool = False) -> Handle:
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_RDWR if write or create or truncate else os.O_RDONLY)
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        if truncate:
            flags |= os.O_TRUNC

        def do() -> int:
            with self._db_lock if create else contextlib.nullcontext():
                fd = os.open(self._full(path), flags, 0o644)
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise IsADirectoryError(errno.EISDIR, "is a directory")
                    if create:
                        self._set_owner(path, owner)
                except BaseException:
                    os.close(fd)
                    raise
            return fd
        return _LocalHandle(self, await self._run(do))

    async def set_mtime(self, path: str, mtime_ns: int) -> None:
        await self._run(lambda: os.utime(self._full(path), ns=(mtime_ns, mtime_ns), follow_symlinks=False))

    async def close(self) -> None:
        def do() -> None:
            with self._db_lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None
                    self._started = False
        await trio.to_thread.run_sync(do)


class _LocalHandle(Handle):
    """An open file descriptor.  Operations run in worker threads; a close
    while some are under way only marks it, and the last of them closes
    the descriptor, so its number is never reused under a running read."""

    def __init__(self, store: LocalStore, fd: int):
        self.store = store
        self.fd = fd
        self._busy = 0
        self._closing = False

    async def _op(self, fn, *args):
        if self._closing:
            raise FsError(errno.EBADF, "closed")
        self._busy += 1
        try:
            return await self.store._run(fn, self.fd, *args)
        finally:
            self._busy -= 1
            if self._closing and self._busy == 0:
                await self._close_fd()

    async def read(self, offset: int, count: int) -> bytes:
        return await self._op(os.pread, count, offset)

    async def write(self, offset: int, data: bytes) -> int:
        def do(fd: int) -> int:
            done, view = 0, memoryview(data)
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
            return done
        return await self._op(do)

    async def truncate(self, size: int) -> None:
        await self._op(os.ftruncate, size)

    async def size(self) -> int:
        return (await self._op(os.fstat)).st_size

    async def sync(self) -> None:
        await self._op(os.fsync)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._busy == 0:
            await self._close_fd()

    async def _close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with trio.CancelScope(shield=True):  # freeing a big unlinked file's blocks takes a while
                await trio.to_thread.run_sync(os.close, fd)
