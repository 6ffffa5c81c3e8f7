"""A trio 9P client: many requests in flight on one connection, flush on cancel.

Use it as an async context manager; it owns a nursery that runs the reader
task (and background clunks)::

    async with Client.connect("tcp!127.0.0.1!5640") as c:     # or open_client(...)
        root = await c.attach()
        async with await root.walk("etc", "motd") as f:
            await f.open(os.O_RDONLY)
            data = await f.read(0, 8192)
        text = await c.read_file("etc/motd")

Shapes
------
- :class:`Client` negotiates the dialect (version(5)): it asks for one of
  9P2000.L / 9P2000.u / 9P2000 and accepts any *older* dialect the server
  answers with; ``c.dialect`` and ``c.msize`` hold the outcome.
- Requests are matched to replies by tag (intro(5)); any number of tasks may
  call concurrently.  One lock serialises frame writes, one reader task
  dispatches replies.
- A caller cancelled while its request is on the wire sends Tflush and waits
  (shielded) for Rflush before the cancellation proceeds (flush(5)); a reply
  that arrives before the Rflush is consumed and dropped (fids it created are
  clunked in the background), and the tag is reused only after the Rflush.
- :class:`Fid` wraps one fid number; the client allocates and frees numbers.
- Errors: every failure is :class:`ninep.errors.FsError`.  Rlerror carries the
  Linux errno; Rerror's 9P2000.u errno is used when set, otherwise the ename
  is mapped (Plan 9 and Linux strerror texts) with EIO as fallback.  A lost or
  garbled connection fails all outstanding and later calls with EIO.

Flags and modes are Linux's (``os.O_*``, ``st_mode`` bits), as in
:mod:`ninep.fs`; they are converted to P9_DOTL_* open flags on 9P2000.L and to
Topen/Tcreate modes and DM* bits on 9P2000 and 9P2000.u.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import stat as statmod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import trio

from . import codec
from . import messages as m
from .errors import FsError, ProtocolError
from .fs import Attr, DirEntry, SetAttr, StatFs
from .messages import Dialect
from .qid import Qid

__all__ = ["Client", "Fid", "open_client", "errno_for_ename"]

log = logging.getLogger(__name__)

#: Tags usable by requests: every u16 except NOTAG (intro(5)).
MAX_TAGS = 0xFFFF
#: Fid numbers run from 1 up; NOFID is never handed out.
_FIRST_FID = 1

_DIALECT_ORDER = {Dialect.P2000: 0, Dialect.U: 1, Dialect.L: 2}

# --------------------------------------------------------------------------
# Error strings
# --------------------------------------------------------------------------

#: Plan 9 / lib9p / py9p error strings (lower case) and their Linux errno.
_PLAN9_ERRORS: dict[str, int] = {
    "file not found": errno.ENOENT,
    "file does not exist": errno.ENOENT,
    "does not exist": errno.ENOENT,
    "no such file": errno.ENOENT,
    "not found": errno.ENOENT,
    "permission denied": errno.EACCES,
    "file already exists": errno.EEXIST,
    "file exists": errno.EEXIST,
    "already exists": errno.EEXIST,
    "is a directory": errno.EISDIR,
    "not a directory": errno.ENOTDIR,
    "walk in non-directory": errno.ENOTDIR,
    "create in non-directory": errno.ENOTDIR,
    "directory not empty": errno.ENOTEMPTY,
    "unknown fid": errno.EBADF,
    "fid unknown or out of range": errno.EBADF,
    "duplicate fid": errno.EBADF,
    "fid already in use": errno.EBADF,
    "file not open": errno.EBADF,
    "read-only file server": errno.EROFS,
    "read-only file system": errno.EROFS,
    "create prohibited": errno.EPERM,
    "remove prohibited": errno.EPERM,
    "wstat prohibited": errno.EPERM,
    "stat prohibited": errno.EPERM,
    "operation not permitted": errno.EPERM,
    "bad offset": errno.EINVAL,
    "bad use of fid": errno.EBADF,
    "interrupted": errno.EINTR,
    "file in use": errno.EBUSY,
    "no space": errno.ENOSPC,
    "file name too long": errno.ENAMETOOLONG,
    "name too long": errno.ENAMETOOLONG,
    "authentication not required": errno.ENOENT,
    "too many fids": errno.EMFILE,  # ninep.server's limits
    "too many outstanding requests": errno.EAGAIN,
    "i/o error": errno.EIO,
    "not implemented": errno.ENOSYS,
    "function not implemented": errno.ENOSYS,
}

#: Linux strerror texts (lower case), e.g. what py9p forwards from OSError.
_STRERRORS: dict[str, int] = {}
for _code in sorted(errno.errorcode):
    _STRERRORS.setdefault(os.strerror(_code).lower(), _code)


def errno_for_ename(ename: str) -> int:
    """The Linux errno for a 9P2000 Rerror ``ename`` (error(5)); EIO if unknown.

    Exact matches against Linux strerror texts and the Plan 9 error strings of
    lib9p/py9p come first, then the longest known phrase contained in ename
    (servers often prefix a path: ``"'/x': file does not exist"``).
    """
    text = ename.strip().lower()
    if text in _STRERRORS:
        return _STRERRORS[text]
    if text in _PLAN9_ERRORS:
        return _PLAN9_ERRORS[text]
    best = ""
    for phrase in (*_STRERRORS, *_PLAN9_ERRORS):
        if len(phrase) > len(best) and phrase in text:
            best = phrase
    if best:
        return _STRERRORS.get(best) or _PLAN9_ERRORS[best]
    return errno.EIO


def _reply_error(reply: m.Message) -> FsError | None:
    """FsError for an Rerror/Rlerror reply, else None."""
    if isinstance(reply, m.Rlerror):
        code = reply.ecode if 0 < reply.ecode < 4096 else errno.EIO
        return FsError(code, os.strerror(code))
    if isinstance(reply, m.Rerror):
        code = reply.errno if 0 < reply.errno < 4096 else errno_for_ename(reply.ename)
        return FsError(code, reply.ename or None)
    return None


# --------------------------------------------------------------------------
# Mode conversions (stat(5), open(5) vs Linux)
# --------------------------------------------------------------------------


def _dotl_flags(flags: int) -> int:
    """Host O_* flags to Tlopen/Tlcreate P9_DOTL_* flags, without O_CLOEXEC
    (close-on-exec is a property of our own descriptors, not of the remote open)."""
    return m.dotl_flags_from_os(flags & ~os.O_CLOEXEC)


def _open_mode(flags: int) -> int:
    """Linux O_* flags to a 9P2000 Topen/Tcreate mode byte (open(5))."""
    acc = flags & os.O_ACCMODE
    mode = {os.O_RDONLY: m.OREAD, os.O_WRONLY: m.OWRITE, os.O_RDWR: m.ORDWR}.get(acc, m.OREAD)
    if flags & os.O_TRUNC:
        mode |= m.OTRUNC
    return mode


def _linux_mode(mode9: int, extension: str = "") -> int:
    """A 9P2000/.u stat(5) mode (DM* bits + permissions) as a Linux st_mode."""
    perms = mode9 & 0o777
    if mode9 & m.DMSETUID:
        perms |= statmod.S_ISUID
    if mode9 & m.DMSETGID:
        perms |= statmod.S_ISGID
    if mode9 & 0x00010000:  # DMSTICKY (9P2000.u)
        perms |= statmod.S_ISVTX
    if mode9 & m.DMDIR:
        kind = statmod.S_IFDIR
    elif mode9 & m.DMSYMLINK:
        kind = statmod.S_IFLNK
    elif mode9 & m.DMDEVICE:
        kind = statmod.S_IFBLK if extension.startswith("b") else statmod.S_IFCHR
    elif mode9 & m.DMNAMEDPIPE:
        kind = statmod.S_IFIFO
    elif mode9 & m.DMSOCKET:
        kind = statmod.S_IFSOCK
    else:
        kind = statmod.S_IFREG
    return kind | perms


def _attr_from_stat(st: m.Stat, dialect: Dialect) -> Attr:
    """An :class:`Attr` from a stat(5) record (seconds become nanoseconds)."""
    dotu = dialect is Dialect.U
    uid = st.n_uid if dotu and st.n_uid != m.NONUNAME else 0
    gid = st.n_gid if dotu and st.n_gid != m.NONUNAME else 0
    return Attr(
        qid=st.qid,
        mode=_linux_mode(st.mode, st.extension),
        size=st.length,
        uid=uid,
        gid=gid,
        blocks=(st.length + 511) // 512,
        atime_ns=st.atime * 1_000_000_000,
        mtime_ns=st.mtime * 1_000_000_000,
        ctime_ns=st.mtime * 1_000_000_000,
        uname=st.uid,
        gname=st.gid,
        muid=st.muid,
        extension=st.extension,
    )


def _attr_from_getattr(r: m.Rgetattr) -> Attr:
    """An :class:`Attr` from a 9P2000.L Rgetattr."""
    return Attr(
        qid=r.qid,
        mode=r.mode,
        size=r.size,
        uid=r.uid,
        gid=r.gid,
        nlink=r.nlink,
        rdev=r.rdev,
        blksize=r.blksize,
        blocks=r.blocks,
        atime_ns=r.atime_sec * 1_000_000_000 + r.atime_nsec,
        mtime_ns=r.mtime_sec * 1_000_000_000 + r.mtime_nsec,
        ctime_ns=r.ctime_sec * 1_000_000_000 + r.ctime_nsec,
        uname=str(r.uid),
        gname=str(r.gid),
    )


def _dontcare_stat() -> m.Stat:
    """A Twstat stat whose every field means "don't change" (stat(5))."""
    return m.Stat(
        type=0xFFFF,
        dev=0xFFFFFFFF,
        qid=Qid(0xFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF),
        mode=0xFFFFFFFF,
        atime=0xFFFFFFFF,
        mtime=0xFFFFFFFF,
        length=0xFFFFFFFFFFFFFFFF,
        name="",
        uid="",
        gid="",
        muid="",
        extension="",
        n_uid=m.NONUNAME,
        n_gid=m.NONUNAME,
        n_muid=m.NONUNAME,
    )


def split_path(path: str) -> list[str]:
    """``"/a//b/c/"`` → ``["a", "b", "c"]``; ``""`` and ``"/"`` → ``[]``."""
    return [p for p in path.split("/") if p and p != "."]


# --------------------------------------------------------------------------
# Allocators
# --------------------------------------------------------------------------


class _TagPool:
    """Tags 0..0xFFFE, lowest free first; waits when all are in flight."""

    def __init__(self) -> None:
        self._free = list(range(MAX_TAGS))  # already a heap
        self._sem = trio.Semaphore(MAX_TAGS)

    async def get(self) -> int:
        await self._sem.acquire()
        return heapq.heappop(self._free)

    def put(self, tag: int) -> None:
        heapq.heappush(self._free, tag)
        self._sem.release()


class _FidPool:
    """Fid numbers from 1 up, lowest free first (never NOFID)."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self._next = _FIRST_FID

    def get(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        if self._next >= m.NOFID:
            raise FsError(errno.EMFILE, "out of fid numbers")
        n = self._next
        self._next += 1
        return n

    def put(self, fid: int) -> None:
        heapq.heappush(self._free, fid)


@dataclass(eq=False)
class _Pending:
    """One request on the wire, waiting for its reply."""

    request: m.Message
    event: trio.Event = field(default_factory=trio.Event)
    reply: m.Message | None = None
    #: For a Tflush: the tag it flushes (dropped from the table on Rflush).
    flushes: int | None = None
    #: Set once the whole frame is on the wire.
    sent: bool = False


# --------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------


class Client:
    """One 9P connection.  Create it with :meth:`connect` / :func:`open_client`.

    Attributes: ``dialect`` (the negotiated :class:`Dialect`), ``msize`` (the
    negotiated maximum message size in bytes), ``flush_timeout`` (seconds a
    cancelled caller waits for Rflush before the connection is declared dead;
    ``None`` waits forever, as Plan 9 and Linux do).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        dialect: Dialect,
        msize: int,
        reader: codec.FrameReader,
        nursery: trio.Nursery,
        *,
        uname: str = "root",
        aname: str = "",
        n_uname: int = 0,
        flush_timeout: float | None = None,
    ):
        self.dialect = dialect
        self.msize = msize
        self.flush_timeout = flush_timeout
        self._stream = stream
        self._frames = reader
        self._nursery = nursery
        self._send_lock = trio.Lock()
        self._tags = _TagPool()
        self._fids = _FidPool()
        self._pending: dict[int, _Pending] = {}
        self._broken: FsError | None = None
        self._root: Fid | None = None
        self._root_lock = trio.Lock()
        self._attach_args = (uname, aname, n_uname)

    # ---- construction -----------------------------------------------------

    @staticmethod
    def connect(
        target: trio.abc.Stream | str,
        *,
        version: Dialect | str = Dialect.L,
        msize: int = 65560,
        uname: str = "root",
        aname: str = "",
        n_uname: int = 0,
        flush_timeout: float | None = None,
    ):
        """An async context manager yielding a connected :class:`Client`.

        ``target`` is a trio Stream or a dial string (``tcp!host!port``,
        ``unix!/path``, see :mod:`ninep.dial`).  ``version`` is the dialect to
        ask for; the server may answer with an older one (9P2000.L → .u →
        9P2000), which is accepted.  ``msize`` is the largest message in bytes
        we offer; the server's (smaller or equal) answer wins.  ``uname``,
        ``aname``, ``n_uname`` are used by the lazily attached root behind the
        path conveniences (:meth:`read_file` ...).

        Raises FsError(EREMOTEIO) when the server answers an unknown version,
        a larger msize or one below :data:`ninep.messages.MIN_MSIZE`, or
        something other than Rversion; EIO when the connection closes during
        the handshake; OSError/ValueError from dialling.  On exit the
        connection is closed (which clunks every fid on the server, version(5)).
        """
        return open_client(
            target,
            version=version,
            msize=msize,
            uname=uname,
            aname=aname,
            n_uname=n_uname,
            flush_timeout=flush_timeout,
        )

    @property
    def max_payload(self) -> int:
        """The most data bytes one Tread/Twrite may move: msize − IOHDRSZ."""
        return self.msize - m.IOHDRSZ

    @property
    def closed(self) -> bool:
        """True once the connection is closed or broken."""
        return self._broken is not None

    # ---- the wire -----------------------------------------------------------

    def _dead(self) -> FsError:
        """A fresh FsError saying why the connection is unusable."""
        b = self._broken
        return FsError(b.errno, b.message) if b is not None else FsError(errno.EIO, "9P connection closed")

    def _fail(self, err: FsError) -> None:
        """Declare the connection dead: wake every waiter; later calls raise ``err``."""
        if self._broken is None:
            self._broken = err
        for p in self._pending.values():
            p.event.set()
        self._pending.clear()

    async def _send(self, msg: m.Message, pending: _Pending | None = None) -> None:
        """Write one frame under the writer lock; marks ``pending.sent``."""
        frame = codec.encode(msg, self.dialect)
        if len(frame) > self.msize:
            raise FsError(errno.EMSGSIZE, f"{type(msg).__name__} of {len(frame)} bytes exceeds msize {self.msize}")
        async with self._send_lock:
            if self._broken is not None:
                raise self._dead()
            # A half-written frame would desynchronise the stream: finish it.
            with trio.CancelScope(shield=True):
                try:
                    await self._stream.send_all(frame)
                    if pending is not None:
                        pending.sent = True
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    err = FsError(errno.EIO, f"9P connection lost while sending: {e}")
                    self._fail(err)
                    raise err from e

    async def _reader(self) -> None:
        """Read frames and hand each reply to the task waiting on its tag."""
        try:
            while True:
                try:
                    data = await self._stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    self._fail(FsError(errno.EIO, f"9P connection lost: {e}"))
                    return
                if not data:
                    self._fail(FsError(errno.EIO, "9P connection closed by the server"))
                    return
                self._frames.feed(data)
                for frame in self._frames.frames():
                    self._dispatch(codec.decode(frame, self.dialect))
        except ProtocolError as e:
            log.warning("9P protocol error from server: %s", e)
            self._fail(FsError(errno.EIO, f"9P protocol error: {e}"))
        except FsError as e:
            self._fail(e)
        except Exception as e:  # never let the reader take the user's block down
            log.exception("9P client reader failed")
            self._fail(FsError(errno.EIO, f"9P client reader failed: {e!r}"))
        except BaseException:
            # cancelled: the client closes, or a scope around the whole
            # client was cancelled; no reply is read any more, so no one
            # may wait for one (a shielded Tflush would wait forever)
            self._fail(FsError(errno.EIO, "9P client stopped reading replies"))
            raise

    def _dispatch(self, reply: m.Message) -> None:
        p = self._pending.pop(reply.tag, None)
        if p is None:
            # Linux does the same: a reply for a tag not in flight (e.g. one
            # sent after Rflush) means the two sides disagree; give up.
            raise ProtocolError(f"{type(reply).__name__} for tag {reply.tag}, which is not in flight")
        p.reply = reply
        p.event.set()
        if p.flushes is not None and isinstance(reply, m.Rflush):
            # flush(5): nothing for the old tag may come after Rflush.
            old = self._pending.pop(p.flushes, None)
            if old is not None:
                old.event.set()

    async def rpc(self, msg: m.Message, *, abandon: Callable[[m.Message | None], None] | None = None) -> m.Message:
        """Send ``msg`` (its tag is replaced by a free one) and return the reply.

        Raises FsError for Rerror/Rlerror, EPROTO when the reply type does not
        match the request, EIO when the connection is lost.  On cancellation
        after the request went out, sends Tflush and waits for Rflush before
        re-raising (flush(5)); ``abandon`` is then called with the reply that
        arrived before the Rflush, or None (also when cancelled before
        sending), so callers can undo side effects such as a fid a Twalk made.
        """
        if self._broken is not None:
            raise self._dead()
        try:
            tag = await self._tags.get()
        except trio.Cancelled:
            if abandon is not None:
                abandon(None)
            raise
        msg = replace(msg, tag=tag)
        pending = _Pending(msg)
        self._pending[tag] = pending
        try:
            await self._send(msg, pending)
            await pending.event.wait()
        except trio.Cancelled:
            late = None
            if pending.sent:
                late = await self._flush(tag, pending)
            else:
                self._pending.pop(tag, None)
            self._tags.put(tag)
            if abandon is not None:
                abandon(late)
            raise
        except BaseException:
            self._pending.pop(tag, None)
            self._tags.put(tag)
            raise
        self._tags.put(tag)
        reply = pending.reply
        if reply is None:
            raise self._dead()
        err = _reply_error(reply)
        if err is not None:
            raise err
        want = "R" + type(msg).__name__[1:]
        if type(reply).__name__ != want:
            raise FsError(errno.EPROTO, f"server answered {type(msg).__name__} with {type(reply).__name__}")
        return reply

    async def _flush(self, oldtag: int, old: _Pending) -> m.Message | None:
        """Tflush ``oldtag`` and wait for Rflush (shielded); the reply that beat it, if any."""
        fl: _Pending | None = None  # stays None if the deadline passes while waiting for a tag
        with trio.CancelScope(shield=True) as scope:
            if self.flush_timeout is not None:
                scope.deadline = trio.current_time() + self.flush_timeout
            if old.event.is_set() or self._broken is not None:
                self._pending.pop(oldtag, None)
                return old.reply
            tag = await self._tags.get()
            fl = _Pending(m.Tflush(tag, oldtag), flushes=oldtag)
            self._pending[tag] = fl
            try:
                await self._send(fl.request)
                await fl.event.wait()
            except FsError:
                pass  # connection gone: nothing more can arrive for oldtag
            finally:
                self._pending.pop(tag, None)
                self._tags.put(tag)
        if scope.cancelled_caught:
            self._fail(FsError(errno.EIO, f"no Rflush for tag {oldtag} within {self.flush_timeout} s"))
        self._pending.pop(oldtag, None)
        if fl is not None and fl.reply is not None and not isinstance(fl.reply, m.Rflush):
            log.warning("server answered Tflush with %s", type(fl.reply).__name__)
        return old.reply

    # ---- fids ---------------------------------------------------------------

    def _release_fid(self, fid: int) -> None:
        self._fids.put(fid)

    def _clunk_soon(self, fid: int) -> None:
        """Clunk fid number ``fid`` in the background (used when a caller is cancelled)."""
        if self._broken is not None:
            return

        async def clunk() -> None:
            try:
                await self.rpc(m.Tclunk(0, fid))
            except FsError:
                pass
            finally:
                self._release_fid(fid)

        self._nursery.start_soon(clunk)

    def _abandon_newfid(self, newfid: int, nwnames: int) -> Callable[[m.Message | None], None]:
        """The ``abandon`` hook of a Twalk/Tattach that would create ``newfid``."""

        def abandon(late: m.Message | None) -> None:
            created = isinstance(late, m.Rattach) or (isinstance(late, m.Rwalk) and len(late.wqids) == nwnames)
            if created:
                self._clunk_soon(newfid)
            else:
                self._release_fid(newfid)

        return abandon

    def _abandon_clunk(self, fid: int) -> Callable[[m.Message | None], None]:
        """The ``abandon`` hook of a Tclunk/Tremove: without its reply the fid
        may still exist on the server, so clunk it again in the background."""

        def abandon(late: m.Message | None) -> None:
            if late is None and self._broken is None:
                self._clunk_soon(fid)
            else:
                self._release_fid(fid)

        return abandon

    async def attach(self, uname: str = "root", aname: str = "", n_uname: int = 0) -> Fid:
        """Tattach (attach(5)) without auth: a new :class:`Fid` for the root of ``aname``.

        ``n_uname`` (numeric uid) is sent on 9P2000.u/.L.  Raises FsError
        (EACCES/EPERM/… as the server says).
        """
        fid = self._fids.get()
        try:
            r = await self.rpc(
                m.Tattach(0, fid, m.NOFID, uname, aname, n_uname),
                abandon=self._abandon_newfid(fid, 0),
            )
        except trio.Cancelled:
            raise
        except BaseException:
            self._release_fid(fid)
            raise
        return Fid(self, fid, r.qid)

    async def root(self) -> Fid:
        """The root fid behind the path conveniences, attached on first use with
        the ``uname``/``aname``/``n_uname`` given to :meth:`connect`."""
        async with self._root_lock:
            if self._root is None or self._root.clunked:
                self._root = await self.attach(*self._attach_args)
            return self._root

    # ---- path conveniences ----------------------------------------------------

    async def walk(self, path: str) -> Fid:
        """A new fid for ``path`` (``/``-separated, relative to the root)."""
        return await (await self.root()).walk(*split_path(path))

    async def read_file(self, path: str) -> bytes:
        """The whole content of ``path``: Treads until one returns no bytes."""
        async with await self.walk(path) as f:
            await f.open(os.O_RDONLY)
            return await f.read_all()

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> int:
        """Replace the content of ``path`` with ``data`` (create it with
        permissions ``mode`` if missing); returns the bytes written."""
        names = split_path(path)
        if not names:
            raise FsError(errno.EISDIR, "cannot write the root directory")
        try:
            f = await self.walk(path)
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
            async with await (await self.root()).walk(*names[:-1]) as d:
                f = await d.create(names[-1], os.O_WRONLY | os.O_TRUNC, mode)
        else:
            try:
                await f.open(os.O_WRONLY | os.O_TRUNC)
            except BaseException:
                await f.aclose_on_error()
                raise
        async with f:
            return await f.write(0, data)

    async def listdir(self, path: str = "") -> list[str]:
        """The names in directory ``path`` (without ``.`` and ``..``), server order."""
        async with await self.walk(path) as d:
            await d.open(os.O_RDONLY | os.O_DIRECTORY)
            return [e.name for e in await d.readdir()]

    async def stat(self, path: str) -> Attr:
        """The attributes of ``path`` (Tgetattr on .L, Tstat otherwise)."""
        async with await self.walk(path) as f:
            return await f.getattr()

    async def mkdir(self, path: str, mode: int = 0o755) -> Qid:
        """Make directory ``path``; returns its qid."""
        names = split_path(path)
        if not names:
            raise FsError(errno.EEXIST, "the root exists")
        async with await (await self.root()).walk(*names[:-1]) as d:
            return await d.mkdir(names[-1], mode)

    async def remove(self, path: str) -> None:
        """Remove the file or empty directory ``path`` (Tremove)."""
        f = await self.walk(path)
        await f.remove()


@asynccontextmanager
async def open_client(
    target: trio.abc.Stream | str,
    *,
    version: Dialect | str = Dialect.L,
    msize: int = 65560,
    uname: str = "root",
    aname: str = "",
    n_uname: int = 0,
    flush_timeout: float | None = None,
) -> AsyncIterator[Client]:
    """Connect, negotiate the version and yield a :class:`Client`; see :meth:`Client.connect`."""
    version = Dialect(version)
    if isinstance(target, str):
        from .dial import dial

        stream = await dial(target)
    else:
        stream = target
    body_exc: BaseException | None = None
    try:
        dialect, agreed, reader = await _handshake(stream, version, msize)
        async with trio.open_nursery() as nursery:
            client = Client(
                stream,
                dialect,
                agreed,
                reader,
                nursery,
                uname=uname,
                aname=aname,
                n_uname=n_uname,
                flush_timeout=flush_timeout,
            )
            nursery.start_soon(client._reader)
            try:
                yield client
            except BaseException as e:
                # Re-raised below, outside the nursery, so callers see the
                # exception itself rather than an ExceptionGroup.
                body_exc = e
            finally:
                client._fail(FsError(errno.EIO, "9P client closed"))
                nursery.cancel_scope.cancel()
        if body_exc is not None:
            raise body_exc
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _handshake(stream: trio.abc.Stream, version: Dialect, msize: int) -> tuple[Dialect, int, codec.FrameReader]:
    """Tversion/Rversion (version(5)); returns (dialect, msize, frame reader)."""
    reader = codec.FrameReader(msize)
    await stream.send_all(codec.encode(m.Tversion(m.NOTAG, msize, version.value), version))
    while True:
        frame = next(iter(reader.frames()), None)
        if frame is not None:
            break
        data = await stream.receive_some(65536)
        if not data:
            raise FsError(errno.EIO, "9P connection closed during version negotiation")
        reader.feed(data)
    try:
        reply = codec.decode(frame, version)
    except ProtocolError as e:
        raise FsError(errno.EREMOTEIO, f"bad Rversion: {e}") from e
    err = _reply_error(reply)
    if err is not None:
        raise FsError(err.errno, f"server refused Tversion: {err.message}")
    if not isinstance(reply, m.Rversion):
        raise FsError(errno.EREMOTEIO, f"server answered Tversion with {type(reply).__name__}")
    try:
        dialect = Dialect(reply.version)
    except ValueError:
        raise FsError(
            errno.EREMOTEIO, f"server speaks no version we know: asked {version.value!r}, got {reply.version!r}"
        ) from None
    if _DIALECT_ORDER[dialect] > _DIALECT_ORDER[version]:
        raise FsError(errno.EREMOTEIO, f"asked for {version.value}, server answered the newer {dialect.value}")
    if not m.MIN_MSIZE <= reply.msize <= msize:
        raise FsError(errno.EREMOTEIO, f"server msize {reply.msize} not in [{m.MIN_MSIZE}, {msize}]")
    reader.max_size = reply.msize
    return dialect, reply.msize, reader


# --------------------------------------------------------------------------
# Fid
# --------------------------------------------------------------------------


class Fid:
    """One fid of a :class:`Client`: a file or directory on the server.

    ``fid`` is the number, ``qid`` the file's qid (from the walk/attach, and
    updated by open/create), ``iounit`` the server's iounit after open (0 until
    then).  Use ``async with fid:`` to clunk it at the end (in the background if
    the block is left by an exception or cancellation).
    """

    def __init__(self, client: Client, fid: int, qid: Qid):
        self.client = client
        self.fid = fid
        self.qid = qid
        self.iounit = 0
        self.opened = False
        self.clunked = False

    def __repr__(self) -> str:
        return f"<Fid {self.fid} qid={self.qid}>"

    async def __aenter__(self) -> Fid:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.clunk()
        else:
            await self.aclose_on_error()

    async def aclose_on_error(self) -> None:
        """Clunk in the background, never raising (for error and cancel paths)."""
        if not self.clunked:
            self.clunked = True
            self.client._clunk_soon(self.fid)

    def _check(self) -> None:
        if self.clunked:
            raise FsError(errno.EBADF, f"fid {self.fid} was clunked")

    @property
    def _dialect(self) -> Dialect:
        return self.client.dialect

    def _chunk(self) -> int:
        """Bytes per Tread/Twrite: the iounit, capped by msize − IOHDRSZ."""
        cap = self.client.max_payload
        return min(self.iounit, cap) if self.iounit else cap

    # ---- walk ---------------------------------------------------------------

    async def walk(self, *names: str) -> Fid:
        """A new fid for the file reached through ``names`` (walk(5)).

        No names clones this fid.  More than MAXWELEM (16) names are walked in
        several Twalks.  Raises the server's FsError for the first element that
        could not be walked (asked again alone when a Twalk stopped short,
        see :meth:`_partial_walk_error`), naming it; ENOENT when the server
        gives no reason.
        """
        self._check()
        for n in names:
            if not n or "/" in n:
                raise FsError(errno.EINVAL, f"bad path element {n!r}")
        c = self.client
        qid = self.qid
        src = self.fid
        done = 0
        steps = [names[i : i + m.MAXWELEM] for i in range(0, len(names), m.MAXWELEM)] or [()]
        for step in steps:
            newfid = c._fids.get()
            try:
                r = await c.rpc(m.Twalk(0, src, newfid, tuple(step)), abandon=c._abandon_newfid(newfid, len(step)))
            except trio.Cancelled:
                if src != self.fid:
                    c._clunk_soon(src)
                raise
            except BaseException as e:
                c._release_fid(newfid)
                if src != self.fid:
                    c._clunk_soon(src)
                if isinstance(e, FsError) and e.errno == errno.ENOENT and step:
                    raise FsError(errno.ENOENT, f"{'/'.join(names[: done + 1])}: {e.message}") from None
                raise
            if len(r.wqids) < len(step):
                # walk(5): a partial walk creates no newfid.
                c._release_fid(newfid)
                bad = "/".join(names[: done + len(r.wqids) + 1])
                try:
                    err = await self._partial_walk_error(src, step, len(r.wqids), bad)
                finally:
                    if src != self.fid:
                        c._clunk_soon(src)
                raise err
            if src != self.fid:
                c._clunk_soon(src)
            src = newfid
            done += len(step)
            if r.wqids:
                qid = r.wqids[-1]
        return Fid(c, src, qid)

    async def _partial_walk_error(self, src: int, step: tuple[str, ...], good: int, bad: str) -> FsError:
        """Why a walk from fid ``src`` stopped after ``good`` of ``step``'s names.

        walk(5) answers a walk that fails after its first name with a short
        Rwalk that carries no error, so "it does not exist" and "the server
        cannot tell now" (EAGAIN, EIO) or "not allowed" (EACCES) look alike.
        Walk again to the last name that walked, then the failing name alone:
        a walk failing on its first name brings the server's own error back.
        The second walk's own error when it fails on the way to that name
        (ENOENT only if that error is ENOENT), the reason for an earlier name
        when the way there stops short now (asked the same way: a process
        that ended meanwhile is ENOENT); EAGAIN when the name walks now (what
        stopped the first walk has passed, or the file was just made)."""
        c = self.client
        enoent = FsError(errno.ENOENT, f"{bad}: file not found")
        mid = c._fids.get()
        try:
            r = await c.rpc(m.Twalk(0, src, mid, tuple(step[:good])), abandon=c._abandon_newfid(mid, good))
        except trio.Cancelled:
            raise
        except BaseException as e:
            c._release_fid(mid)
            if isinstance(e, FsError):  # the way there fails now: its reason (say EAGAIN), unless it is gone
                return enoent if e.errno == errno.ENOENT else FsError(e.errno, f"{bad}: {e.message}")
            raise
        if len(r.wqids) < good:  # the way there stops short now: ask why for the name it stops at
            c._release_fid(mid)
            shorter = "/".join(bad.split("/")[: len(bad.split("/")) - (good - len(r.wqids))])
            return await self._partial_walk_error(src, step[:good], len(r.wqids), shorter)
        try:
            probe = c._fids.get()
            try:
                r = await c.rpc(m.Twalk(0, mid, probe, (step[good],)), abandon=c._abandon_newfid(probe, 1))
            except trio.Cancelled:
                raise
            except BaseException as e:
                c._release_fid(probe)
                if isinstance(e, FsError):
                    return FsError(e.errno, f"{bad}: {e.message}")
                raise
            if r.wqids:  # it walks now: what stopped the first walk has passed
                c._clunk_soon(probe)
                return FsError(errno.EAGAIN, f"{bad}: the walk stopped short, then went through; try again")
            c._release_fid(probe)
            return enoent
        finally:
            c._clunk_soon(mid)

    # ---- open / create ------------------------------------------------------

    async def open(self, flags: int = os.O_RDONLY) -> Qid:
        """Open with Linux ``os.O_*`` flags: Tlopen (P9_DOTL_* flags, see
        :func:`ninep.messages.dotl_flags_from_os`; O_CLOEXEC is not sent) on
        9P2000.L, Topen (open(5) mode: access bits and OTRUNC) on the others.  Returns the qid and sets
        ``iounit``.  Raises FsError (EACCES, EISDIR …)."""
        self._check()
        if self._dialect is Dialect.L:
            r = await self.client.rpc(m.Tlopen(0, self.fid, _dotl_flags(flags)))
        else:
            r = await self.client.rpc(m.Topen(0, self.fid, _open_mode(flags)))
        self.qid, self.iounit, self.opened = r.qid, r.iounit, True
        return r.qid

    async def create(self, name: str, flags: int = os.O_RDWR, mode: int = 0o644, gid: int = 0) -> Fid:
        """Create regular file ``name`` in this directory and open it with ``flags``.

        Returns a new opened :class:`Fid` for the file; this fid stays the
        directory (a clone is created, since Tlcreate/Tcreate turn the fid
        into the new file).  ``mode`` holds the permission bits.  On 9P2000.L
        it is Tlcreate (mode sent as S_IFREG | perms, as Linux does), else
        Tcreate (open(5)).  Raises FsError(EEXIST …).
        """
        f = await self.walk()
        try:
            if self._dialect is Dialect.L:
                r = await self.client.rpc(
                    m.Tlcreate(0, f.fid, name, _dotl_flags(flags), statmod.S_IFREG | (mode & 0o7777), gid)
                )
            else:
                r = await self.client.rpc(m.Tcreate(0, f.fid, name, mode & 0o777, _open_mode(flags), ""))
        except BaseException:
            await f.aclose_on_error()
            raise
        f.qid, f.iounit, f.opened = r.qid, r.iounit, True
        return f

    async def mkdir(self, name: str, mode: int = 0o755, gid: int = 0) -> Qid:
        """Make directory ``name`` here; returns its qid.  Tmkdir on 9P2000.L,
        else Tcreate with DMDIR on a clone that is then clunked."""
        self._check()
        if self._dialect is Dialect.L:
            r = await self.client.rpc(m.Tmkdir(0, self.fid, name, mode & 0o7777, gid))
            return r.qid
        async with await self.walk() as f:
            r = await self.client.rpc(m.Tcreate(0, f.fid, name, m.DMDIR | (mode & 0o777), m.OREAD, ""))
            return r.qid

    # ---- I/O ----------------------------------------------------------------

    async def read(self, offset: int, count: int) -> bytes:
        """At most ``count`` bytes at byte ``offset`` (read(5)).

        Sends Treads of at most iounit bytes while they come back full; a
        shorter answer (end of file, or a synthetic file's whole answer) ends
        the read.  ``b""`` means end of file.
        """
        self._check()
        chunk = self._chunk()
        out = bytearray()
        while len(out) < count:
            want = min(chunk, count - len(out))
            r = await self.client.rpc(m.Tread(0, self.fid, offset + len(out), want))
            if len(r.data) > want:
                raise FsError(errno.EPROTO, f"server returned {len(r.data)} bytes for a {want}-byte read")
            out += r.data
            if len(r.data) < want:
                break
        return bytes(out)

    async def read_all(self) -> bytes:
        """Everything from offset 0: Treads until one returns no bytes."""
        self._check()
        chunk = self._chunk()
        out = bytearray()
        while True:
            r = await self.client.rpc(m.Tread(0, self.fid, len(out), chunk))
            if not r.data:
                return bytes(out)
            out += r.data

    async def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at byte ``offset`` in Twrites of at most iounit bytes.

        Returns the byte count (== len(data)); empty data sends nothing.  A server answering a non-empty
        Twrite with count 0 raises FsError(EIO) rather than looping.
        """
        self._check()
        chunk = self._chunk()
        view = memoryview(data)
        done = 0
        while done < len(data):
            piece = bytes(view[done : done + chunk])
            r = await self.client.rpc(m.Twrite(0, self.fid, offset + done, piece))
            if r.count == 0 or r.count > len(piece):
                raise FsError(errno.EIO, f"server took {r.count} of {len(piece)} bytes")
            done += r.count
        return done

    async def readdir(self) -> list[DirEntry]:
        """The directory's entries without ``.`` and ``..``, in server order.

        9P2000.L: Treaddir from cookie 0 until an empty reply (mode holds only
        the type bits, from d_type).  9P2000/.u: Treads of whole stat(5)
        records until an empty reply (mode converted from DM* bits).  An
        unopened fid is cloned, opened for reading and the clone clunked.
        """
        self._check()
        if not self.opened:
            async with await self.walk() as d:
                await d.open(os.O_RDONLY | os.O_DIRECTORY)
                return await d.readdir()
        c = self.client
        chunk = self._chunk()
        out: list[DirEntry] = []
        offset = 0
        while True:
            if self._dialect is Dialect.L:
                r = await c.rpc(m.Treaddir(0, self.fid, offset, chunk))
                if not r.data:
                    return out
                ents = codec.unpack_dirents(r.data)
                for qid, off, dtype, name in ents:
                    if name not in (".", ".."):
                        out.append(DirEntry(name, qid, (dtype & 0xF) << 12))
                offset = ents[-1][1]
            else:
                r = await c.rpc(m.Tread(0, self.fid, offset, chunk))
                if not r.data:
                    return out
                for st in codec.unpack_stats(r.data, self._dialect):
                    if st.name not in (".", ".."):
                        out.append(DirEntry(st.name, st.qid, _linux_mode(st.mode, st.extension)))
                offset += len(r.data)

    # ---- attributes ---------------------------------------------------------

    async def getattr(self) -> Attr:
        """The file's attributes: Tgetattr (P9_GETATTR_BASIC) on 9P2000.L, Tstat otherwise."""
        self._check()
        if self._dialect is Dialect.L:
            r = await self.client.rpc(m.Tgetattr(0, self.fid, m.P9_GETATTR_BASIC))
            return _attr_from_getattr(r)
        r = await self.client.rpc(m.Tstat(0, self.fid))
        return _attr_from_stat(r.stat, self._dialect)

    async def setattr(self, change: SetAttr) -> None:
        """Apply ``change``: Tsetattr on 9P2000.L, Twstat (stat(5), "don't
        touch" fields elsewhere) otherwise.  9P2000 cannot set numeric
        uid/gid (FsError EINVAL); times are truncated to seconds there."""
        self._check()
        if self._dialect is Dialect.L:
            valid = 0
            if change.mode is not None:
                valid |= m.P9_SETATTR_MODE
            if change.uid is not None:
                valid |= m.P9_SETATTR_UID
            if change.gid is not None:
                valid |= m.P9_SETATTR_GID
            if change.size is not None:
                valid |= m.P9_SETATTR_SIZE
            if change.atime_ns is not None:
                valid |= m.P9_SETATTR_ATIME | m.P9_SETATTR_ATIME_SET
            if change.mtime_ns is not None:
                valid |= m.P9_SETATTR_MTIME | m.P9_SETATTR_MTIME_SET
            at, mt = change.atime_ns or 0, change.mtime_ns or 0
            await self.client.rpc(
                m.Tsetattr(
                    0,
                    self.fid,
                    valid,
                    (change.mode or 0) & 0o7777,
                    change.uid or 0,
                    change.gid or 0,
                    change.size or 0,
                    at // 1_000_000_000,
                    at % 1_000_000_000,
                    mt // 1_000_000_000,
                    mt % 1_000_000_000,
                )
            )
            return
        st = _dontcare_stat()
        fields: dict = {}
        if change.mode is not None:
            fields["mode"] = (change.mode & 0o777) | (m.DMDIR if self.qid.is_dir else 0)
        if change.size is not None:
            fields["length"] = change.size
        if change.atime_ns is not None:
            fields["atime"] = change.atime_ns // 1_000_000_000
        if change.mtime_ns is not None:
            fields["mtime"] = change.mtime_ns // 1_000_000_000
        if change.uid is not None or change.gid is not None:
            if self._dialect is not Dialect.U:
                raise FsError(errno.EINVAL, "9P2000 cannot change numeric uid/gid")
            if change.uid is not None:
                fields["n_uid"] = change.uid
            if change.gid is not None:
                fields["n_gid"] = change.gid
        await self.client.rpc(m.Twstat(0, self.fid, replace(st, **fields)))

    async def statfs(self) -> StatFs:
        """statfs(2) numbers (Tstatfs, 9P2000.L only; ENOSYS on other dialects)."""
        self._check()
        if self._dialect is not Dialect.L:
            raise FsError(errno.ENOSYS, f"statfs needs 9P2000.L, connection speaks {self._dialect.value}")
        r = await self.client.rpc(m.Tstatfs(0, self.fid))
        return StatFs(r.type, r.bsize, r.blocks, r.bfree, r.bavail, r.files, r.ffree, r.fsid, r.namelen)

    async def readlink(self) -> str:
        """The target of a symbolic link: Treadlink on 9P2000.L, the stat
        extension on 9P2000.u; FsError(EINVAL) if not a link."""
        self._check()
        if self._dialect is Dialect.L:
            return (await self.client.rpc(m.Treadlink(0, self.fid))).target
        attr = await self.getattr()
        if not statmod.S_ISLNK(attr.mode):
            raise FsError(errno.EINVAL, "not a symbolic link")
        return attr.extension

    async def fsync(self) -> None:
        """Tfsync on 9P2000.L; a no-op elsewhere (9P2000 has no fsync)."""
        self._check()
        if self._dialect is Dialect.L:
            await self.client.rpc(m.Tfsync(0, self.fid, 0))

    # ---- removal / clunk ----------------------------------------------------

    async def remove(self) -> None:
        """Remove the file (remove(5)); the fid is clunked whether or not it succeeds."""
        self._check()
        self.clunked = True
        try:
            await self.client.rpc(m.Tremove(0, self.fid), abandon=self.client._abandon_clunk(self.fid))
        except trio.Cancelled:
            raise
        except BaseException:
            self.client._release_fid(self.fid)
            raise
        self.client._release_fid(self.fid)

    async def unlinkat(self, name: str, flags: int = 0) -> None:
        """Remove entry ``name`` of this directory (``flags``
        :data:`ninep.messages.AT_REMOVEDIR` for a directory): Tunlinkat on
        9P2000.L, walk + Tremove elsewhere."""
        self._check()
        if self._dialect is Dialect.L:
            await self.client.rpc(m.Tunlinkat(0, self.fid, name, flags))
            return
        f = await self.walk(name)
        await f.remove()

    async def renameat(self, oldname: str, newdir: Fid, newname: str) -> None:
        """Move entry ``oldname`` of this directory to ``newdir``/``newname``.

        9P2000.L: Trenameat (renameat(2) semantics: an existing target is
        replaced).  9P2000/.u: a Twstat changing only the name (stat(5)), which
        renames within one directory only: FsError(EXDEV) when ``newdir`` is
        another directory.  Other errors are the server's (ENOENT, EEXIST …).
        """
        self._check()
        newdir._check()
        for n in (oldname, newname):
            if not n or "/" in n or n in (".", ".."):
                raise FsError(errno.EINVAL, f"bad name {n!r}")
        if self._dialect is Dialect.L:
            await self.client.rpc(m.Trenameat(0, self.fid, oldname, newdir.fid, newname))
            return
        if newdir.qid.path != self.qid.path:
            raise FsError(errno.EXDEV, f"{self._dialect.value} renames only within a directory")
        async with await self.walk(oldname) as f:
            await self.client.rpc(m.Twstat(0, f.fid, replace(_dontcare_stat(), name=newname)))

    async def clunk(self) -> None:
        """Tclunk (clunk(5)); the number is freed even if the server complains.
        Clunking twice is a no-op."""
        if self.clunked:
            return
        self.clunked = True
        c = self.client
        try:
            await c.rpc(m.Tclunk(0, self.fid), abandon=c._abandon_clunk(self.fid))
        except trio.Cancelled:
            raise
        except FsError:
            c._release_fid(self.fid)
            if c.closed:
                return
            raise
        c._release_fid(self.fid)
