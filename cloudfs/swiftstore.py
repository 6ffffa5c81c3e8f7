"""The Swift backend of ``/files``: one container per deployment in an
OpenStack object store, reached through openstacksdk's object-store proxy
(Swift API v1).

Layout, as the swift and s3 FUSE filesystems keep it (so the container also
reads well with the ``swift`` client): a file ``a/b/c`` is the object
``a/b/c``; a directory ``a/b`` is the pseudo-folder ``a/b/``, marked by a
zero-byte object ``a/b/`` of type ``application/directory`` (a prefix with
objects under it and no marker reads as a directory too).  Each object made
here carries ``X-Object-Meta-Cloudfs-Owner`` (the pid that made it) and
``X-Object-Meta-Mtime`` (ns).

Consistency: close-to-open, as NFS gives it.  A file opened for writing is
spooled to a local file (``spool``, in the daemon's state dir) and stored
with one PUT at its last close (or fsync(2)), as RACK's ``fopen``/``close``
do; a reader that opens it after that close, on any daemon, reads the new
bytes whole (one object PUT is atomic in Swift).  Readers fetch with ranged
GETs, :data:`READ_WINDOW` bytes at a time (the window is all an open keeps
in memory); a file is read from the object as it was when the window was
fetched.  A file made with O_CREAT is stored empty at once, so it is listed
on every daemon right away.  A ``mv`` is a server-side COPY and a DELETE of
each object (at most :data:`MAX_MOVE` objects, EXDEV beyond: ``mv`` then
copies); listings come from the container, whose updates Swift may make
visible a little after the object write under load (eventual consistency of
container listings; a HEAD of the object by name is exact).

Errors: FsError; HTTP 404 → ENOENT, 401/403 → EACCES, 413 → EFBIG, 507 →
ENOSPC, any other failure → EIO with the store's message, a store that
cannot be reached → EIO ("cannot reach the object store").  Every call runs
in a worker thread (at most ``threads`` at once) with the connection's
timeout (``api_timeout``, 60 s).
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import time
import urllib.parse
from pathlib import Path

import trio

from ninep.errors import FsError

from .filestore import FileInfo, FileStore, Handle, parent_of

log = logging.getLogger(__name__)

#: Bytes a reader fetches per ranged GET (its read-ahead window).
READ_WINDOW = 1 << 20
#: Most bytes all read windows of one daemon keep at once; beyond, a read
#: fetches just what it asks for (so many opens cannot pile up memory).
WINDOW_BUDGET = 64 << 20
#: Most objects one ``mv`` of a directory copies (EXDEV beyond).
MAX_MOVE = 10000
OWNER = "X-Object-Meta-Cloudfs-Owner"
MTIME = "X-Object-Meta-Mtime"
DIR_TYPE = "application/directory"


def _status_error(resp, what: str) -> FsError:
    code = resp.status_code
    lines = (resp.text or "").strip().splitlines()
    text = lines[0][:200] if lines else (resp.reason or "")
    e = {404: errno.ENOENT, 401: errno.EACCES, 403: errno.EACCES, 413: errno.EFBIG, 507: errno.ENOSPC,
         409: errno.EBUSY}.get(code, errno.EIO)
    return FsError(e, f"object store: {what}: HTTP {code} {text}")


class SwiftStore(FileStore):
    """/files in container ``container`` of ``conn`` (an openstacksdk
    Connection), spooling writes in directory ``spool``."""

    def __init__(self, conn, container: str, spool: Path, threads: int = 8):
        self.conn = conn
        self.container = container
        self.spool = Path(spool)
        self.description = f"Swift container {container}"
        self.stores_at_close = True
        self._limiter = trio.CapacityLimiter(threads)
        self._ready = False
        self._window_bytes = 0  # held by the read windows of all opens

    @classmethod
    def from_cloud(cls, cloud: str | None, container: str, spool: Path) -> "SwiftStore":
        """Connect to ``cloud`` of clouds.yaml (None: OS_CLOUD / OS_*
        variables).  Blocking (reads files): call from a thread."""
        import openstack

        conn = openstack.connect(cloud=cloud, api_timeout=60) if cloud else openstack.connect(api_timeout=60)
        return cls(conn, container, spool)

    # -- plumbing ---------------------------------------------------------

    def _url(self, name: str = "") -> str:
        return f"{urllib.parse.quote(self.container, safe='')}/{urllib.parse.quote(name, safe='/')}" if name \
            else urllib.parse.quote(self.container, safe="")

    async def _run(self, fn, *args):
        if not self._ready:
            await trio.to_thread.run_sync(self._prepare, limiter=self._limiter)
        return await self._call(fn, *args)

    async def _call(self, fn, *args):
        import openstack.exceptions
        import requests
        from keystoneauth1 import exceptions as ksa

        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except FsError:
            raise
        except (ksa.ClientException, requests.RequestException, openstack.exceptions.SDKException) as e:
            raise FsError(errno.EIO, f"cannot reach the object store: {type(e).__name__}: {e}"[:300]) from None
        except OSError as e:
            raise FsError(e.errno or errno.EIO, f"spool: {e.strerror or e}") from None
        except ValueError as e:  # a reply that is not what the Swift API says
            raise FsError(errno.EIO, f"object store: bad reply: {e}"[:300]) from None

    def _prepare(self) -> None:
        if self._ready:
            return
        self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        r = self.conn.object_store.put(self._url(), headers={"Content-Length": "0"})
        if r.status_code not in (201, 202, 204):
            raise _status_error(r, f"make container {self.container}")
        self._ready = True

    def _req(self, method: str, name: str = "", ok=(200, 201, 202, 204), what: str = "", **kw):
        r = getattr(self.conn.object_store, method)(self._url(name), **kw)
        if r.status_code not in ok:
            raise _status_error(r, what or f"{method.upper()} {name or self.container}")
        return r

    @staticmethod
    def _meta(r) -> tuple[int, int]:
        h = r.headers
        try:
            owner = int(h.get(OWNER, "0"))
        except ValueError:
            owner = 0
        try:
            mtime = int(h[MTIME]) if MTIME in h else int(float(h.get("X-Timestamp", "0")) * 1e9)
        except ValueError:
            mtime = 0
        return max(0, owner), max(0, mtime)

    def _head(self, name: str):
        r = self.conn.object_store.head(self._url(name))
        if r.status_code == 404:
            return None
        if r.status_code not in (200, 204):
            raise _status_error(r, f"HEAD {name}")
        return r

    def _listing(self, prefix: str, delimiter: str | None, limit: int | None = None) -> list[dict]:
        out: list[dict] = []
        marker = ""
        while True:
            params = {"format": "json", "prefix": prefix, "marker": marker,
                      "limit": str(min(limit - len(out), 10000) if limit else 10000)}
            if delimiter:
                params["delimiter"] = delimiter
            r = self._req("get", params=params, ok=(200, 204), what=f"list {prefix or '/'}")
            page = r.json() if r.status_code == 200 and r.content else []
            if not isinstance(page, list):
                raise FsError(errno.EIO, "object store: a listing that is not a list")
            out += [e for e in page if isinstance(e, dict)]
            if not page or (limit and len(out) >= limit):
                return out
            last = page[-1]
            marker = last.get("name") or last.get("subdir") or ""
            if not marker:
                return out

    def _info(self, path: str) -> FileInfo:
        if not path:
            return FileInfo(True, 0, 0, 0)
        r = self._head(path)
        if r is not None:
            owner, mtime = self._meta(r)
            return FileInfo(False, int(r.headers.get("Content-Length", "0")), mtime, owner)
        r = self._head(path + "/")
        if r is not None:
            owner, mtime = self._meta(r)
            return FileInfo(True, 0, mtime, owner)
        if self._listing(path + "/", None, limit=1):
            return FileInfo(True, 0, 0, 0)
        raise FsError(errno.ENOENT, f"/files/{path}: no such file or directory")

    def _need_dir(self, path: str) -> None:
        if not self._info(path).is_dir:
            raise FsError(errno.ENOTDIR, f"/files/{path} is not a directory")

    def _need_new(self, path: str) -> None:
        """Its directory exists (ENOENT, ENOTDIR) and nothing is at ``path`` (EEXIST)."""
        self._need_dir(parent_of(path))
        try:
            self._info(path)
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
        else:
            raise FsError(errno.EEXIST, f"/files/{path} exists")

    def _headers(self, owner: int, mtime_ns: int | None = None, **extra) -> dict[str, str]:
        return {OWNER: str(owner), MTIME: str(mtime_ns if mtime_ns is not None else time.time_ns()), **extra}

    # -- the interface ----------------------------------------------------

    async def info(self, path: str) -> FileInfo:
        return await self._run(self._info, path)

    async def list(self, path: str) -> list[tuple[str, FileInfo]]:
        def do() -> list[tuple[str, FileInfo]]:
            if path:
                self._need_dir(path)
            prefix = path + "/" if path else ""
            out: dict[str, FileInfo] = {}
            for e in self._listing(prefix, "/"):
                if "subdir" in e:
                    name = str(e["subdir"])[len(prefix):].rstrip("/")
                    if name and "/" not in name:
                        out[name] = FileInfo(True, 0, 0, 0)
                    continue
                full = str(e.get("name", ""))
                name = full[len(prefix):]
                if not name or "/" in name:
                    continue  # the directory's own marker
                try:
                    size = int(e.get("bytes", 0))
                except (TypeError, ValueError):
                    size = 0
                out.setdefault(name, FileInfo(False, max(0, size), 0, 0))
            return sorted(out.items())
        return await self._run(do)

    async def mkdir(self, path: str, owner: int) -> None:
        def do() -> None:
            self._need_new(path)
            self._req("put", path + "/", data=b"", headers=self._headers(owner, **{"Content-Type": DIR_TYPE}))
        await self._run(do)

    async def rmdir(self, path: str) -> None:
        def do() -> None:
            if not self._info(path).is_dir:
                raise FsError(errno.ENOTDIR, f"/files/{path} is not a directory")
            if any(e.get("name") != path + "/" for e in self._listing(path + "/", None, limit=2)):
                raise FsError(errno.ENOTEMPTY, f"/files/{path} is not empty")
            self._req("delete", path + "/", ok=(204, 404))
        await self._run(do)

    async def unlink(self, path: str) -> None:
        def do() -> None:
            if self._info(path).is_dir:
                raise FsError(errno.EISDIR, f"/files/{path} is a directory")
            self._req("delete", path, ok=(204,))
        await self._run(do)

    async def rename(self, src: str, dst: str) -> None:
        def copy(a: str, b: str) -> None:
            self._req("put", b, data=b"", what=f"copy {a} to {b}",
                      headers={"X-Copy-From": f"/{self._url(a)}", "Content-Length": "0"})

        def do() -> None:
            what = self._info(src)
            self._need_dir(parent_of(dst))
            try:
                old = self._info(dst)
            except FsError as e:
                if e.errno != errno.ENOENT:
                    raise
                old = None
            if not what.is_dir:
                if old is not None and old.is_dir:
                    raise FsError(errno.EISDIR, f"/files/{dst} is a directory")
                copy(src, dst)
                self._req("delete", src, ok=(204, 404))
                return
            if old is not None:
                if not old.is_dir:
                    raise FsError(errno.ENOTDIR, f"/files/{dst} is not a directory")
                if any(e.get("name") != dst + "/" for e in self._listing(dst + "/", None, limit=2)):
                    raise FsError(errno.ENOTEMPTY, f"/files/{dst} is not empty")
            names = [str(e["name"]) for e in self._listing(src + "/", None, limit=MAX_MOVE + 1) if "name" in e]
            if len(names) > MAX_MOVE:
                raise FsError(errno.EXDEV, f"/files/{src} holds more than {MAX_MOVE} objects: copy it instead")
            if src + "/" not in names:  # a directory without a marker gets one where it goes
                self._req("put", dst + "/", data=b"", headers=self._headers(what.owner, **{"Content-Type": DIR_TYPE}))
            for n in names:
                copy(n, dst + n[len(src):])
            for n in names:
                self._req("delete", n, ok=(204, 404))
        await self._run(do)

    async def open(self, path: str, *, create: bool = False, owner: int = 0, truncate: bool = False,
                   write: bool = False) -> Handle:
        def do() -> Handle:
            if create:
                self._need_new(path)
                self._req("put", path, data=b"", headers=self._headers(owner))
                return _SwiftHandle(self, path, owner, 0, spool=self._spool_file(), dirty=False)
            r = self._head(path)
            if r is None:
                if self._head(path + "/") is not None or self._listing(path + "/", None, limit=1):
                    raise FsError(errno.EISDIR, f"/files/{path} is a directory")
                raise FsError(errno.ENOENT, f"/files/{path}: no such file")
            size = int(r.headers.get("Content-Length", "0"))
            file_owner, _ = self._meta(r)
            if not (write or truncate):
                return _SwiftHandle(self, path, file_owner, size)
            f = self._spool_file()
            try:
                if not truncate and size:
                    g = self._req("get", path, ok=(200,), stream=True)
                    try:
                        for chunk in g.iter_content(1 << 20):
                            f.write(chunk)
                    finally:
                        g.close()
                    f.flush()
            except BaseException:
                f.close()
                raise
            return _SwiftHandle(self, path, file_owner, 0 if truncate else size, spool=f, dirty=truncate)
        return await self._run(do)

    def _spool_file(self):
        return tempfile.TemporaryFile(dir=self.spool)

    async def set_mtime(self, path: str, mtime_ns: int) -> None:
        def do() -> None:
            info = self._info(path)
            name = path + "/" if info.is_dir else path
            if info.is_dir and self._head(name) is None:
                return  # a directory without a marker keeps no time
            self._req("post", name, headers=self._headers(info.owner, mtime_ns))
        await self._run(do)

    async def close(self) -> None:
        pass


class _SwiftHandle(Handle):
    """An open object: ranged GETs through a window when only read; a
    spool file (stored at close when written) otherwise."""

    def __init__(self, store: SwiftStore, path: str, owner: int, size: int, spool=None, dirty: bool = False):
        self.store = store
        self.path = path
        self.owner = owner
        self._size = size
        self.spool = spool
        self.dirty = dirty
        self._window = (0, b"")
        self._discarded = False

    async def read(self, offset: int, count: int) -> bytes:
        if self.spool is not None:
            return await self.store._call(os.pread, self.spool.fileno(), count, offset)
        start, data = self._window
        if start <= offset and offset + count <= start + len(data):
            return data[offset - start:offset - start + count]
        if offset >= self._size:
            return b""
        store = self.store
        window = store._window_bytes - len(data) + READ_WINDOW <= WINDOW_BUDGET
        end = min(self._size, offset + (max(count, READ_WINDOW) if window else count)) - 1

        def get() -> bytes:
            r = store._req("get", self.path, ok=(200, 206, 416), headers={"Range": f"bytes={offset}-{end}"})
            return b"" if r.status_code == 416 else r.content
        got = await store._call(get)
        # Swapped with no checkpoint in between (reads of one open may run
        # at once): the budget counts exactly the window kept.
        if window and len(got) > count and not self._discarded:
            self._drop_window()
            self._window = (offset, got)
            store._window_bytes += len(got)
        return got[:count]

    def _drop_window(self) -> None:
        self.store._window_bytes -= len(self._window[1])
        self._window = (0, b"")

    async def write(self, offset: int, data: bytes) -> int:
        if self.spool is None:
            raise FsError(errno.EBADF, "not open for writing")

        def do() -> int:
            done, view = 0, memoryview(data)
            while done < len(view):
                done += os.pwrite(self.spool.fileno(), view[done:], offset + done)
            return done
        n = await self.store._call(do)
        self.dirty = True
        self._size = max(self._size, offset + n)
        return n

    async def truncate(self, size: int) -> None:
        if self.spool is None:
            raise FsError(errno.EBADF, "not open for writing")
        await self.store._call(os.ftruncate, self.spool.fileno(), size)
        self.dirty = True
        self._size = size

    async def size(self) -> int:
        if self.spool is not None:
            return (await self.store._call(os.fstat, self.spool.fileno())).st_size
        return self._size

    async def sync(self) -> None:
        if self.spool is None or not self.dirty:
            return

        def put() -> None:
            f = self.spool
            n = os.fstat(f.fileno()).st_size
            self.store._req("put", self.path, data=_Exactly(f.fileno(), n), what=f"store {self.path}",
                            headers=self.store._headers(self.owner, **{"Content-Length": str(n)}))
        await self.store._call(put)
        self.dirty = False

    async def flush(self) -> None:
        await self.sync()

    async def close(self) -> None:
        try:
            await self.sync()
        finally:
            await self.discard()

    async def discard(self) -> None:
        self._discarded = True
        self._drop_window()
        spool, self.spool = self.spool, None
        if spool is not None:
            with trio.CancelScope(shield=True):  # freeing a big spool's blocks takes a while
                await trio.to_thread.run_sync(spool.close)

    def moved(self, path: str) -> None:
        self.path = path


class _Exactly:
    """The first ``n`` bytes of file descriptor ``fd``, as a body for
    requests (it reads with pread: no shared file position; ``len`` is
    ``n`` whatever the file's size becomes, so the body is always the
    Content-Length it declares)."""

    def __init__(self, fd: int, n: int):
        self.fd = fd
        self.n = n
        self.pos = 0

    def __len__(self) -> int:
        return self.n - self.pos

    def read(self, size: int = -1) -> bytes:
        want = self.n - self.pos if size is None or size < 0 else min(size, self.n - self.pos)
        if want <= 0:
            return b""
        data = os.pread(self.fd, want, self.pos)
        if not data:
            data = bytes(want)  # the file shrank meanwhile: keep the length declared
        self.pos += len(data)
        return data
