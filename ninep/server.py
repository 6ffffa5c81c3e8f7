"""A 9P server on trio: 9P2000, 9P2000.u and 9P2000.L over any byte stream.

The server is a thin layer over the sans-IO codec (:mod:`ninep.codec`) and the
filesystem interface (:mod:`ninep.fs`).  Like plan9port's lib9p it checks fids,
open modes, offsets and counts before any file code runs, so a
:class:`ninep.fs.Node` only sees well-formed calls.

Per connection (:class:`Connection`):

- a pool of worker tasks in the leader/follower pattern: the leader reads
  frames, decodes them and does the synchronous checks; it then wakes an idle
  worker to lead next (or spawns one) and runs the request itself, under the
  request's own cancel scope.  So every request runs in a task of its own,
  a blocked request never holds up others, and no task is spawned per
  request (idle workers are reused; at most a few stay parked);
- replies are queued in order and sent by whichever task finds the stream
  idle (one writer at a time);
- a fid table; a table of outstanding tags.

Flush (flush(5)): Tflush cancels the request's scope and waits until its task
has finished; if that task produced a reply it is queued first, so a reply for
the old tag can precede Rflush but never follow it.  Rflush is always sent, also
for unknown tags.  A flushed request leaves no task, waiter or fid behind.

Requests on one fid may run at once (a client may clunk a fid while a walk
or an open of it waits in file code).  Tclunk and Tremove take effect when
they arrive; a walk onto the same fid or an open that finishes after that
fails with EBADF and releases what it opened, so a clunked fid never comes
back and no open file outlives its fid.  Of two opens of one fid the first
to finish wins.

Protocol violations (bad framing, unknown types, truncated strings, frames over
msize, fid or tag reuse, R-messages from a client) close only the offending
connection, with the reason logged.  Errors of file code (:class:`FsError`) are
translated exactly once here: Rlerror on 9P2000.L, Rerror with errno on
9P2000.u, Rerror on 9P2000.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque
import stat as st
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import messages as m
from .codec import FrameReader, decode, encode, pack_dirent, pack_stat
from .dial import listener_address, open_listeners
from .errors import FsError, ProtocolError
from .fs import Attr, FileSystem, Node, OpenFile, SetAttr
from .qid import QTDIR

log = logging.getLogger("ninep.server")
trace_log = logging.getLogger("ninep.trace")

Dialect = m.Dialect

#: The largest msize we offer; clients may ask for less.
DEFAULT_MSIZE = 512 * 1024 + m.IOHDRSZ

#: Idle workers a connection keeps parked for the next requests.
MAX_IDLE_WORKERS = 4
#: Seconds a file's release (Tclunk, teardown) may take before it is abandoned.
RELEASE_DEADLINE = 10.0
#: Replies (in units of msize) queued for a peer that does not read them
#: before the connection stops reading new requests from it.
MAX_QUEUED_MSIZES = 8

#: The open(2) flags of a Tlopen/Tlcreate (after :func:`ninep.messages.dotl_flags_to_os`)
#: that reach file code; the rest (O_SYNC, O_DSYNC, O_DIRECT, O_NOATIME,
#: O_NOFOLLOW, O_CLOEXEC ...) are masked.
DOTL_FLAGS_PASSED = (
    os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_NONBLOCK | os.O_DIRECTORY
)
#: 9P2000 open(5) access modes (OREAD, OWRITE, ORDWR, OEXEC) as open(2) flags.
_ACC_TO_OS = {m.OREAD: os.O_RDONLY, m.OWRITE: os.O_WRONLY, m.ORDWR: os.O_RDWR, m.OEXEC: os.O_RDONLY}
_NOCHANGE32 = 0xFFFFFFFF
_NOCHANGE64 = 0xFFFFFFFFFFFFFFFF


def open_mode_to_os(mode: int) -> int:
    """Linux open flags for a 9P2000 Topen/Tcreate ``mode`` (open(5))."""
    out = _ACC_TO_OS[mode & 3]
    if mode & m.OTRUNC:
        out |= os.O_TRUNC
    return out


def dm_mode(attr: Attr, dialect: Dialect) -> int:
    """The 9P2000 stat(5) mode word (DM* bits + permissions) for ``attr``."""
    mode = attr.mode & 0o777
    fmt = st.S_IFMT(attr.mode)
    if fmt == st.S_IFDIR:
        mode |= m.DMDIR
    elif dialect is Dialect.U:
        if fmt == st.S_IFLNK:
            mode |= m.DMSYMLINK
        elif fmt in (st.S_IFCHR, st.S_IFBLK):
            mode |= m.DMDEVICE
        elif fmt == st.S_IFIFO:
            mode |= m.DMNAMEDPIPE
        elif fmt == st.S_IFSOCK:
            mode |= m.DMSOCKET
        if attr.mode & st.S_ISUID:
            mode |= m.DMSETUID
        if attr.mode & st.S_ISGID:
            mode |= m.DMSETGID
    return mode


def _protocol(msg: str) -> ProtocolError:
    return ProtocolError(msg)


@dataclass(slots=True)
class Fid:
    """Server state of one fid: the node, the path walked to reach it (names and
    nodes from the attach root, for ``..`` and Tremove), and what Tlopen/Topen
    made of it."""

    node: Node
    path: tuple[tuple[str, Node], ...]  # ((name, node) …) below the root; root = ()
    root: Node
    uname: str
    n_uname: int
    file: OpenFile | None = None
    flags: int = 0  # os.O_* when open
    rclose: bool = False
    # directory reads: the listing snapshot taken at offset 0
    dir_entries: list | None = None
    dir_offset: int = 0  # 9P2000: next byte offset the client may ask for
    dir_index: int = 0  # 9P2000: next entry to send
    dir_pending: bytes = b""  # 9P2000: packed entry that did not fit last time

    @property
    def is_open(self) -> bool:
        return self.file is not None

    @property
    def name(self) -> str:
        return self.path[-1][0] if self.path else "/"

    def parent(self) -> Node:
        return self.path[-2][1] if len(self.path) >= 2 else self.root

    def readable(self) -> bool:
        return (self.flags & os.O_ACCMODE) in (os.O_RDONLY, os.O_RDWR)

    def writable(self) -> bool:
        return (self.flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)


@dataclass(slots=True)
class _Request:
    tag: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class _EOF(Exception):
    """The peer closed its end."""


class _Reserved:
    """Placeholder for a newfid claimed by a request still running."""


_RESERVED = _Reserved()


class Connection:
    """One 9P connection: its worker tasks, output queue, fid and tag tables.

    ``fs`` is the served FileSystem, ``stream`` a trio Stream, ``max_msize`` the
    largest msize offered (bytes).  :meth:`run` returns when the peer hangs up or
    breaks the protocol; all request tasks are cancelled and every open file is
    released before it returns.
    """

    def __init__(self, fs: FileSystem, stream: trio.abc.Stream, *, max_msize: int = DEFAULT_MSIZE,
                 trace: bool = False, peer: str = "?"):
        self.fs = fs
        self.stream = stream
        self.max_msize = max_msize
        self.msize = max_msize
        self.dialect: Dialect | None = None
        self.trace = trace
        self.peer = peer
        self.fids: dict[int, Fid | _Reserved] = {}
        self.pending: dict[int, _Request] = {}
        self._outq: deque[bytes] = deque()
        self._outq_bytes = 0  # bytes in _outq and in the send under way
        self._drained: trio.Event | None = None  # set when _outq_bytes falls to the limit
        self._sending = False
        # A socket's fd, for a first synchronous write of each reply (trio's
        # send_all yields even when the kernel takes everything at once).
        sock = getattr(stream, "socket", None)
        self._fd: int | None = sock.fileno() if sock is not None else None
        self._nursery: trio.Nursery | None = None
        self.closed_reason: str | None = None
        self._frames = FrameReader(max_msize)
        self._ready: deque[tuple[Callable, Any, _Request, int | None]] = deque()
        self._leading = False  # a worker is reading
        self._idle = trio.lowlevel.ParkingLot()  # parked workers

    # -- the loops --------------------------------------------------------

    async def run(self) -> None:
        """Serve until EOF or a protocol violation; never raises for either."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._worker)
        finally:
            with trio.CancelScope(shield=True):
                await self._clunk_all()
                try:
                    await self.stream.aclose()
                except Exception:
                    pass

    def _close(self, reason: str) -> None:
        self.closed_reason = self.closed_reason or reason
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _worker(self) -> None:
        # Whatever ends a read or a send ends the connection, and only it.
        try:
            await self._work()
        except _EOF:
            self._close("EOF")
        except ProtocolError as e:
            log.warning("9P connection %s closed: protocol error: %s", self.peer, e)
            self._close(f"protocol error: {e}")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._close(f"connection lost: {e!r}")
        except Exception:
            log.exception("9P connection %s closed: internal error", self.peer)
            self._close("internal error")

    async def _work(self) -> None:
        ready = self._ready
        idle = self._idle
        while True:
            if self._outq_bytes > self._outq_limit():
                # The peer does not read its replies: start and read no more
                # of its requests until the queue drains (its memory, not ours).
                if self._drained is None:
                    self._drained = trio.Event()
                await self._drained.wait()
            elif ready:
                await self._run_request(*ready.popleft())
            elif not self._leading:
                self._leading = True
                try:
                    await self._read()
                finally:
                    self._leading = False
            elif len(idle) >= MAX_IDLE_WORKERS:
                return
            else:
                await idle.park()

    def _outq_limit(self) -> int:
        return MAX_QUEUED_MSIZES * self.msize

    def _hand_off(self) -> None:
        """This worker is about to block (in a request or a send): make sure
        other workers read and run the remaining ready requests meanwhile --
        wake parked ones, spawn if none is left."""
        need = len(self._ready) + (0 if self._leading else 1)
        if need:
            woken = len(self._idle.unpark(count=need))
            for _ in range(need - woken):
                self._nursery.start_soon(self._worker)  # type: ignore[union-attr]

    async def _read(self) -> None:
        """Read what the peer sent and dispatch every whole frame in it."""
        fd = self._fd
        if fd is not None:
            # Wait first, then read: on a request/response stream the next
            # request is rarely there yet, and this saves a failed read.
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
        else:
            data = await self.stream.receive_some(65536)
        if not data:
            raise _EOF
        frames = self._frames
        frames.feed(data)
        for frame in frames.frames():
            msg = decode(frame, self.dialect or Dialect.P2000)
            if self.trace:
                trace_log.debug("%s <- %r", self.peer, msg)
            await self._dispatch(msg)

    def _queue(self, msg: Any) -> None:
        """Append a reply to the output queue (in order); :meth:`_transmit` sends it."""
        frame = self._encode(msg)
        self._outq.append(frame)
        self._outq_bytes += len(frame)

    async def _transmit(self) -> None:
        """Send everything queued.  One task at a time is the sender: a task
        that finds another one sending leaves its reply to it, so replies go
        out in queue order, coalesced, without a writer task hop per reply.
        Runs outside any request's cancel scope (a Tflush never cuts a reply in
        half); a broken stream ends the connection."""
        if self._sending:
            return
        self._sending = True
        try:
            q = self._outq
            while q:
                buf = q.popleft() if len(q) == 1 else b"".join([q.popleft() for _ in range(len(q))])
                self._outq_bytes -= len(buf)
                sent = 0
                if self._fd is not None:
                    try:
                        sent = os.write(self._fd, buf)
                    except BlockingIOError:
                        pass
                if sent < len(buf):
                    self._hand_off()
                    self._outq_bytes += len(buf) - sent  # still ours to send
                    await self.stream.send_all(memoryview(buf)[sent:])
                    self._outq_bytes -= len(buf) - sent
                if self._drained is not None and self._outq_bytes <= self._outq_limit():
                    self._drained.set()
                    self._drained = None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self.closed_reason = self.closed_reason or f"connection lost: {e!r}"
            self._outq.clear()
            self._outq_bytes = 0
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
        finally:
            self._sending = False

    # -- dispatch ---------------------------------------------------------

    async def _dispatch(self, msg: Any) -> None:
        tag = msg.tag
        if type(msg) is m.Tversion:
            await self._version(msg)
            await self._transmit()
            return
        name = type(msg).__name__
        if name[0] != "T":
            raise _protocol(f"{name} from a client")
        if tag in self.pending:
            raise _protocol(f"tag {tag} reused while outstanding")
        if self.dialect is None:
            self._queue(m.Rerror(tag=tag, ename="Tversion first", errno=errno.EPROTO))
            await self._transmit()
            return
        handler = _HANDLERS.get(type(msg))
        allowed = _DIALECT_OF.get(type(msg))
        if handler is None or (allowed is not None and self.dialect not in allowed):
            self._queue(self._error(tag, FsError(errno.EOPNOTSUPP, f"{name} not supported on {self.dialect.value}")))
            await self._transmit()
            return
        # Synchronous fid checks: a newfid must be free (or equal fid, for Twalk).
        newfid = _newfid_of(msg)
        if newfid is not None and newfid in self.fids and not (type(msg) is m.Twalk and newfid == msg.fid):
            raise _protocol(f"{name}: fid {newfid} already in use")
        if newfid is not None and newfid not in self.fids:
            self.fids[newfid] = _RESERVED
        req = _Request(tag)
        self.pending[tag] = req
        self._ready.append((handler, msg, req, newfid))

    async def _run_request(self, handler: Callable, msg: Any, req: _Request, newfid: int | None) -> None:
        frame = None
        try:
            if req.scope.cancel_called:  # flushed before it started: no reply
                return
            with req.scope:
                try:
                    # Eager start: run the handler's first step here.  Most
                    # requests finish without ever yielding to trio; only one
                    # that yields (may block) hands reading over to another
                    # worker.  The coroutine runs in this task throughout.
                    coro = handler(self, msg)
                    try:
                        trap = coro.send(None)
                    except StopIteration as done:
                        reply = done.value
                    else:
                        self._hand_off()
                        reply = await _resume(coro, trap)
                except FsError as e:
                    reply = self._error(msg.tag, e)
                except Exception as e:  # file code bug: answer EIO, keep serving
                    log.exception("9P %s: %r failed", self.peer, msg)
                    reply = self._error(msg.tag, FsError(errno.EIO, f"internal error: {type(e).__name__}"))
                frame = self._encode(reply)
        finally:
            if newfid is not None and self.fids.get(newfid) is _RESERVED:
                del self.fids[newfid]
            # Queue the reply (if any), then retire the tag, with no checkpoint in
            # between, so Tflush's Rflush can only be queued after it.
            if frame is not None:
                self._outq.append(frame)
                self._outq_bytes += len(frame)
            del self.pending[msg.tag]
            req.done.set()
        if frame is not None:
            await self._transmit()

    def _encode(self, reply: Any) -> bytes:
        """Encode a reply; one that cannot be encoded (file code returned an
        out-of-range value) or would exceed msize becomes an EIO error, logged."""
        if self.trace:
            trace_log.debug("%s -> %r", self.peer, reply)
        try:
            frame = encode(reply, self.dialect or Dialect.P2000)
        except (ValueError, TypeError, OverflowError) as e:
            log.error("9P %s: cannot encode %r: %s", self.peer, reply, e)
            return encode(self._error(reply.tag, FsError(errno.EIO, "reply not encodable")),
                          self.dialect or Dialect.P2000)
        if len(frame) > self.msize:  # Linux drops the whole connection on such a reply
            log.error("9P %s: %s of %d bytes exceeds msize %d", self.peer, type(reply).__name__, len(frame),
                      self.msize)
            return encode(self._error(reply.tag, FsError(errno.EIO, "reply larger than msize")),
                          self.dialect or Dialect.P2000)
        return frame

    def _error(self, tag: int, e: FsError) -> Any:
        if self.dialect is Dialect.L:
            return m.Rlerror(tag=tag, ecode=e.errno)
        if self.dialect is Dialect.U:
            return m.Rerror(tag=tag, ename=e.message, errno=e.errno)
        return m.Rerror(tag=tag, ename=e.message, errno=0)

    # -- session management -------------------------------------------------

    async def _version(self, msg: m.Tversion) -> None:
        # Tversion aborts all outstanding I/O and clunks every fid (version(5)).
        while self._ready:  # not started yet: retire them here, unanswered
            _, old, req, newfid = self._ready.popleft()
            if newfid is not None and self.fids.get(newfid) is _RESERVED:
                del self.fids[newfid]
            del self.pending[old.tag]
            req.done.set()
        for req in list(self.pending.values()):
            req.scope.cancel()
        for req in list(self.pending.values()):
            await req.done.wait()
        await self._clunk_all()
        version = msg.version
        if version.startswith("9P2000.L"):
            dialect = Dialect.L
        elif version.startswith("9P2000.u"):
            dialect = Dialect.U
        elif version.startswith("9P2000"):
            dialect = Dialect.P2000
        else:
            dialect = None
        msize = min(msg.msize, self.max_msize)
        if dialect is None or msize < m.MIN_MSIZE:
            self.dialect = None
            self._queue(m.Rversion(tag=msg.tag, msize=min(msg.msize, self.max_msize), version="unknown"))
            return
        self.dialect = dialect
        self.msize = msize
        self._frames.max_size = msize
        self._queue(m.Rversion(tag=msg.tag, msize=msize, version=dialect.value))

    async def _clunk_all(self) -> None:
        fids = [f for f in self.fids.values() if isinstance(f, Fid)]
        self.fids.clear()
        for f in fids:
            await _release(f)

    # -- helpers for handlers -------------------------------------------------

    def fid(self, fid: int) -> Fid:
        """The Fid for a number; EBADF if unknown (or still being created)."""
        f = self.fids.get(fid)
        if not isinstance(f, Fid):
            raise FsError(errno.EBADF, f"unknown fid {fid}")
        return f

    def iounit(self) -> int:
        return self.msize - m.IOHDRSZ


async def _release(f: Fid) -> None:
    """Release a fid's open file (and remove it if opened ORCLOSE).  Never
    raises but Cancelled; shielded with a deadline, so a flush or a teardown
    cannot leave the file half released and a hung file cannot hang them."""
    if f.file is None:
        return
    file, f.file = f.file, None
    with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_DEADLINE):
        try:
            await file.release()
        except Exception:
            log.exception("release of %s failed", f.name)
        if f.rclose:
            try:
                await f.parent().unlink(f.name, f.node.qid().type & QTDIR != 0)
            except FsError:
                pass
            except Exception:
                log.exception("remove-on-clunk of %s failed", f.name)


@types.coroutine
def _resume(coro, trap):
    """Go on running a coroutine whose first step yielded ``trap``, in the
    calling task: ``yield from`` for a coroutine already started (every
    value and exception the event loop sends travels through unchanged)."""
    while True:
        try:
            value = yield trap
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                trap = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                trap = coro.send(value)
            except StopIteration as done:
                return done.value


def _newfid_of(msg: Any) -> int | None:
    t = type(msg)
    if t is m.Twalk or t is m.Txattrwalk:
        return msg.newfid
    if t is m.Tattach:
        return msg.fid
    return None


# -- handlers ------------------------------------------------------------------

_HANDLERS: dict[type, Callable] = {}
_DIALECT_OF: dict[type, tuple[Dialect, ...]] = {}
_ALL = (Dialect.P2000, Dialect.U, Dialect.L)
_LEGACY = (Dialect.P2000, Dialect.U)
_DOTL = (Dialect.L,)


def _handles(msgtype: type, dialects: tuple[Dialect, ...] = _ALL):
    def deco(fn):
        _HANDLERS[msgtype] = fn
        _DIALECT_OF[msgtype] = dialects
        return fn

    return deco


@_handles(m.Tauth)
async def _auth(c: Connection, msg: m.Tauth):
    # No authentication: Rlerror ENOENT on .L is what diod and Linux expect.
    raise FsError(errno.ENOENT, "no authentication required")


@_handles(m.Tattach)
async def _attach(c: Connection, msg: m.Tattach):
    if msg.afid != m.NOFID:
        raise FsError(errno.EINVAL, "no authentication required: afid must be NOFID")
    n_uname = msg.n_uname if c.dialect is not Dialect.P2000 else m.NONUNAME
    root = await c.fs.attach(msg.uname, msg.aname, None if n_uname == m.NONUNAME else n_uname)
    c.fids[msg.fid] = Fid(node=root, path=(), root=root, uname=msg.uname, n_uname=n_uname)
    return m.Rattach(tag=msg.tag, qid=root.qid())


@_handles(m.Tflush)
async def _flush(c: Connection, msg: m.Tflush):
    old = c.pending.get(msg.oldtag)
    if old is not None and msg.oldtag != msg.tag:
        old.scope.cancel()
        with trio.CancelScope(shield=True):
            await old.done.wait()
    return m.Rflush(tag=msg.tag)


@_handles(m.Twalk)
async def _walk(c: Connection, msg: m.Twalk):
    f = c.fid(msg.fid)
    names = msg.wnames
    if f.is_open and msg.newfid == msg.fid:
        # walk(5) forbids walking open fids; like diod (and diodls -l) we allow
        # it into a new fid, which starts unopened.
        raise FsError(errno.EBADF, "cannot walk an open fid onto itself")
    if len(names) > m.MAXWELEM:
        raise FsError(errno.EINVAL, f"too many names in walk ({len(names)} > {m.MAXWELEM})")
    node, path = f.node, f.path
    qids = []
    for i, name in enumerate(names):
        if not (node.qid().type & QTDIR):
            if i == 0:
                raise FsError(errno.ENOTDIR, "walk in a non-directory")
            break
        try:
            if name == "..":
                path = path[:-1]
                node = path[-1][1] if path else f.root
            elif name == "." or name == "":
                pass
            elif "/" in name:
                raise FsError(errno.EINVAL, f"bad name {name!r} in walk")
            else:
                node = await node.walk(name)
                path = path + ((name, node),)
        except FsError:
            if i == 0:
                raise
            break
        qids.append(node.qid())
    if len(qids) == len(names):
        newf = Fid(node=node, path=path, root=f.root, uname=f.uname, n_uname=f.n_uname)
        if msg.newfid == msg.fid:
            if c.fids.get(msg.fid) is not f or f.is_open:  # clunked, replaced or opened while we walked
                raise FsError(errno.EBADF, f"fid {msg.fid} was clunked or opened during the walk")
            c.fids[msg.fid] = newf
        else:
            c.fids[msg.newfid] = newf
    return m.Rwalk(tag=msg.tag, wqids=tuple(qids))


async def _attach_file(c: Connection, fid: int, f: Fid, file: OpenFile) -> None:
    """After file code opened or created ``file`` for ``f``: keep it only
    if ``f`` is still fid ``fid`` and still unopened.  A Tclunk/Tremove (or
    a second Topen) of the same fid that ran meanwhile wins: the file is
    released at once and the open fails with EBADF, so no open file
    outlives its fid."""
    if c.fids.get(fid) is f and f.file is None:
        return
    await _release(Fid(node=f.node, path=f.path, root=f.root, uname=f.uname, n_uname=f.n_uname, file=file))
    raise FsError(errno.EBADF, f"fid {fid} was clunked or opened meanwhile")


async def _open_common(c: Connection, fid: int, f: Fid, flags: int) -> int:
    if f.is_open:
        raise FsError(errno.EBADF, "fid already open")
    is_dir = bool(f.node.qid().type & QTDIR)
    if is_dir and (flags & os.O_ACCMODE) != os.O_RDONLY:
        raise FsError(errno.EISDIR, "directories open read-only")
    file = await f.node.open(flags)
    await _attach_file(c, fid, f, file)
    f.file = file
    f.flags = flags
    f.dir_entries = None
    return f.file.iounit or c.iounit()


@_handles(m.Tlopen, _DOTL)
async def _lopen(c: Connection, msg: m.Tlopen):
    f = c.fid(msg.fid)
    flags = m.dotl_flags_to_os(msg.flags) & DOTL_FLAGS_PASSED & ~(os.O_CREAT | os.O_EXCL)
    iounit = await _open_common(c, msg.fid, f, flags)
    return m.Rlopen(tag=msg.tag, qid=f.node.qid(), iounit=iounit)


@_handles(m.Topen, _LEGACY)
async def _open(c: Connection, msg: m.Topen):
    f = c.fid(msg.fid)
    flags = open_mode_to_os(msg.mode)
    if msg.mode & m.ORCLOSE and not f.path:
        raise FsError(errno.EPERM, "cannot remove the root on clunk")
    iounit = await _open_common(c, msg.fid, f, flags)
    f.rclose = bool(msg.mode & m.ORCLOSE)
    return m.Ropen(tag=msg.tag, qid=f.node.qid(), iounit=iounit)


def _dir_fid_for_create(c: Connection, fid: int) -> Fid:
    f = c.fid(fid)
    if f.is_open:
        raise FsError(errno.EBADF, "fid already open")
    if not (f.node.qid().type & QTDIR):
        raise FsError(errno.ENOTDIR, "not a directory")
    return f


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name:
        raise FsError(errno.EINVAL, f"bad file name {name!r}")


def _uid(f: Fid) -> int:
    return 0 if f.n_uname == m.NONUNAME else f.n_uname


@_handles(m.Tlcreate, _DOTL)
async def _lcreate(c: Connection, msg: m.Tlcreate):
    f = _dir_fid_for_create(c, msg.fid)
    _check_name(msg.name)
    flags = (m.dotl_flags_to_os(msg.flags) & DOTL_FLAGS_PASSED) | os.O_CREAT
    node, file = await f.node.create(msg.name, st.S_IFREG | (msg.mode & 0o7777), flags, _uid(f), msg.gid)
    await _attach_file(c, msg.fid, f, file)
    f.node, f.path, f.file, f.flags = node, f.path + ((msg.name, node),), file, flags
    return m.Rlcreate(tag=msg.tag, qid=node.qid(), iounit=file.iounit or c.iounit())


@_handles(m.Tcreate, _LEGACY)
async def _create(c: Connection, msg: m.Tcreate):
    f = _dir_fid_for_create(c, msg.fid)
    _check_name(msg.name)
    perm = msg.perm
    flags = open_mode_to_os(msg.mode)
    if perm & m.DMDIR:
        node = await f.node.mkdir(msg.name, st.S_IFDIR | (perm & 0o777), _uid(f), 0)
        file = await node.open(os.O_RDONLY)
        flags = os.O_RDONLY
    elif c.dialect is Dialect.U and perm & m.DMSYMLINK:
        node = await f.node.symlink(msg.name, msg.extension, _uid(f), 0)
        file = OpenFile(os.O_RDONLY)
    elif c.dialect is Dialect.U and perm & (m.DMNAMEDPIPE | m.DMDEVICE | m.DMSOCKET):
        raise FsError(errno.EOPNOTSUPP, "device, pipe and socket creation not supported")
    else:
        node, file = await f.node.create(msg.name, st.S_IFREG | (perm & 0o777), flags | os.O_CREAT, _uid(f), 0)
    await _attach_file(c, msg.fid, f, file)
    f.node, f.path, f.file, f.flags = node, f.path + ((msg.name, node),), file, flags
    f.rclose = bool(msg.mode & m.ORCLOSE)
    return m.Rcreate(tag=msg.tag, qid=node.qid(), iounit=file.iounit or c.iounit())


@_handles(m.Tread)
async def _read(c: Connection, msg: m.Tread):
    f = c.fid(msg.fid)
    if f.file is None:
        raise FsError(errno.EBADF, "fid not open")
    if msg.offset >= 1 << 63:
        raise FsError(errno.EINVAL, "offset out of range")
    count = min(msg.count, c.iounit())
    if f.node.qid().type & QTDIR:
        if c.dialect is Dialect.L:
            raise FsError(errno.EISDIR, "use Treaddir on 9P2000.L")
        data = await _read_dir_stats(c, f, msg.offset, count)
    else:
        if not f.readable():
            raise FsError(errno.EBADF, "fid not open for reading")
        data = await f.file.read(msg.offset, count)
        if len(data) > count:
            data = data[:count]
    return m.Rread(tag=msg.tag, data=bytes(data))


async def _stat_of(c: Connection, node: Node, name: str) -> m.Stat:
    a = await node.getattr()
    dialect = c.dialect or Dialect.P2000
    u = dialect is Dialect.U
    return m.Stat(
        type=0, dev=0, qid=a.qid, mode=dm_mode(a, dialect),
        atime=(a.atime_ns // 1_000_000_000) & _NOCHANGE32, mtime=(a.mtime_ns // 1_000_000_000) & _NOCHANGE32,
        length=0 if st.S_ISDIR(a.mode) else a.size, name=name, uid=a.uname, gid=a.gname, muid=a.muid,
        extension=a.extension if u else "",
        n_uid=a.uid if u else m.NONUNAME, n_gid=a.gid if u else m.NONUNAME, n_muid=m.NONUNAME,
    )


async def _read_dir_stats(c: Connection, f: Fid, offset: int, count: int) -> bytes:
    # 9P2000 directory reads (read(5)): whole stat entries only; the offset
    # must be 0 (start over) or where the previous read ended.
    assert f.file is not None
    if offset == 0:
        f.dir_entries = list(await f.file.readdir())
        f.dir_index, f.dir_offset, f.dir_pending = 0, 0, b""
    elif f.dir_entries is None or offset != f.dir_offset:
        raise FsError(errno.EINVAL, "bad offset in directory read")
    entries = f.dir_entries
    out: list[bytes] = []
    used = 0
    while True:
        if f.dir_pending:
            rec = f.dir_pending
        else:
            if f.dir_index >= len(entries):
                break
            ent = entries[f.dir_index]
            f.dir_index += 1
            try:
                child = await f.node.walk(ent.name)
                rec = pack_stat(await _stat_of(c, child, ent.name), c.dialect)
            except FsError:
                continue  # vanished since the listing: skip it
        if used + len(rec) > count:
            f.dir_pending = rec
            if not out:
                raise FsError(errno.EINVAL, "read count too small for a directory entry")
            break
        f.dir_pending = b""
        out.append(rec)
        used += len(rec)
    f.dir_offset += used
    return b"".join(out)


@_handles(m.Treaddir, _DOTL)
async def _readdir(c: Connection, msg: m.Treaddir):
    # 9P2000.L readdir: offsets are opaque cookies; ours are index+1 into the
    # snapshot taken at offset 0, so 0 always means "from the start".
    f = c.fid(msg.fid)
    if f.file is None:
        raise FsError(errno.EBADF, "fid not open")
    if not (f.node.qid().type & QTDIR):
        raise FsError(errno.ENOTDIR, "not a directory")
    if msg.offset == 0 or f.dir_entries is None:
        f.dir_entries = list(await f.file.readdir())
    entries = f.dir_entries
    count = min(msg.count, c.iounit())
    start = msg.offset
    out: list[bytes] = []
    used = 0
    for i in range(start, len(entries)):
        ent = entries[i]
        rec = pack_dirent(ent.qid, i + 1, ent.dtype, ent.name)
        if used + len(rec) > count:
            if not out:
                raise FsError(errno.EINVAL, "readdir count too small for an entry")
            break
        out.append(rec)
        used += len(rec)
    return m.Rreaddir(tag=msg.tag, data=b"".join(out))


@_handles(m.Twrite)
async def _write(c: Connection, msg: m.Twrite):
    f = c.fid(msg.fid)
    if f.file is None:
        raise FsError(errno.EBADF, "fid not open")
    if not f.writable():
        raise FsError(errno.EBADF, "fid not open for writing")
    if msg.offset >= 1 << 63:
        raise FsError(errno.EINVAL, "offset out of range")
    if not msg.data:
        return m.Rwrite(tag=msg.tag, count=0)
    n = await f.file.write(msg.offset, msg.data)
    if not 0 < n <= len(msg.data):
        # A zero count makes some clients retry forever: report an error instead.
        raise FsError(errno.EIO, f"short write ({n} of {len(msg.data)} bytes)")
    return m.Rwrite(tag=msg.tag, count=n)


@_handles(m.Tclunk)
async def _clunk(c: Connection, msg: m.Tclunk):
    f = c.fid(msg.fid)
    del c.fids[msg.fid]
    await _release(f)
    return m.Rclunk(tag=msg.tag)


@_handles(m.Tremove, _ALL)
async def _remove(c: Connection, msg: m.Tremove):
    # remove(5): the fid is clunked even if the remove fails.
    f = c.fid(msg.fid)
    del c.fids[msg.fid]
    f.rclose = False
    await _release(f)
    if not f.path:
        raise FsError(errno.EBUSY, "cannot remove the root")
    await f.parent().unlink(f.name, bool(f.node.qid().type & QTDIR))
    return m.Rremove(tag=msg.tag)


@_handles(m.Tstat, _LEGACY)
async def _stat(c: Connection, msg: m.Tstat):
    f = c.fid(msg.fid)
    return m.Rstat(tag=msg.tag, stat=await _stat_of(c, f.node, f.name))


@_handles(m.Twstat, _LEGACY)
async def _wstat(c: Connection, msg: m.Twstat):
    # wstat(5): ~0 / "" fields mean "don't touch"; all-don't-touch is a sync.
    f = c.fid(msg.fid)
    s = msg.stat
    change = SetAttr(
        mode=None if s.mode == _NOCHANGE32 else (s.mode & 0o7777),
        size=None if s.length == _NOCHANGE64 else s.length,
        mtime_ns=None if s.mtime == _NOCHANGE32 else s.mtime * 1_000_000_000,
        atime_ns=None if s.atime == _NOCHANGE32 else s.atime * 1_000_000_000,
    )
    if s.mode != _NOCHANGE32 and bool(s.mode & m.DMDIR) != bool(f.node.qid().type & QTDIR):
        raise FsError(errno.EINVAL, "cannot change a file's directory bit")
    if change != SetAttr():
        await f.node.setattr(change)
    elif not s.name and f.file is not None:
        await f.file.fsync()
    if s.name and s.name != f.name:
        _check_name(s.name)
        if not f.path:
            raise FsError(errno.EPERM, "cannot rename the root")
        parent = f.parent()
        await parent.rename(f.name, parent, s.name)
        f.path = f.path[:-1] + ((s.name, f.node),)
    return m.Rwstat(tag=msg.tag)


@_handles(m.Tgetattr, _DOTL)
async def _getattr(c: Connection, msg: m.Tgetattr):
    f = c.fid(msg.fid)
    a = await f.node.getattr()
    return m.Rgetattr(
        tag=msg.tag, valid=m.P9_GETATTR_BASIC, qid=a.qid, mode=a.mode, uid=a.uid, gid=a.gid,
        nlink=a.nlink, rdev=a.rdev, size=a.size, blksize=a.blksize, blocks=a.blocks,
        atime_sec=a.atime_ns // 1_000_000_000, atime_nsec=a.atime_ns % 1_000_000_000,
        mtime_sec=a.mtime_ns // 1_000_000_000, mtime_nsec=a.mtime_ns % 1_000_000_000,
        ctime_sec=a.ctime_ns // 1_000_000_000, ctime_nsec=a.ctime_ns % 1_000_000_000,
        btime_sec=0, btime_nsec=0, gen=0, data_version=0,
    )


@_handles(m.Tsetattr, _DOTL)
async def _setattr(c: Connection, msg: m.Tsetattr):
    f = c.fid(msg.fid)
    v = msg.valid
    now = time.time_ns()

    def when(bit: int, setbit: int, sec: int, nsec: int) -> int | None:
        if not v & bit:
            return None
        return sec * 1_000_000_000 + nsec if v & setbit else now

    change = SetAttr(
        mode=msg.mode & 0o7777 if v & m.P9_SETATTR_MODE else None,
        uid=msg.uid if v & m.P9_SETATTR_UID else None,
        gid=msg.gid if v & m.P9_SETATTR_GID else None,
        size=msg.size if v & m.P9_SETATTR_SIZE else None,
        atime_ns=when(m.P9_SETATTR_ATIME, m.P9_SETATTR_ATIME_SET, msg.atime_sec, msg.atime_nsec),
        mtime_ns=when(m.P9_SETATTR_MTIME, m.P9_SETATTR_MTIME_SET, msg.mtime_sec, msg.mtime_nsec),
    )
    if change != SetAttr():
        await f.node.setattr(change)
    return m.Rsetattr(tag=msg.tag)


@_handles(m.Tstatfs, _DOTL)
async def _statfs(c: Connection, msg: m.Tstatfs):
    f = c.fid(msg.fid)
    s = await f.node.statfs()
    return m.Rstatfs(tag=msg.tag, type=s.type, bsize=s.bsize, blocks=s.blocks, bfree=s.bfree,
                     bavail=s.bavail, files=s.files, ffree=s.ffree, fsid=s.fsid, namelen=s.namelen)


@_handles(m.Tmkdir, _DOTL)
async def _mkdir(c: Connection, msg: m.Tmkdir):
    f = _dir_fid_for_create(c, msg.dfid)
    _check_name(msg.name)
    node = await f.node.mkdir(msg.name, st.S_IFDIR | (msg.mode & 0o7777), _uid(f), msg.gid)
    return m.Rmkdir(tag=msg.tag, qid=node.qid())


@_handles(m.Tsymlink, _DOTL)
async def _symlink(c: Connection, msg: m.Tsymlink):
    f = _dir_fid_for_create(c, msg.fid)
    _check_name(msg.name)
    node = await f.node.symlink(msg.name, msg.symtgt, _uid(f), msg.gid)
    return m.Rsymlink(tag=msg.tag, qid=node.qid())


@_handles(m.Tmknod, _DOTL)
async def _mknod(c: Connection, msg: m.Tmknod):
    f = _dir_fid_for_create(c, msg.dfid)
    _check_name(msg.name)
    node = await f.node.mknod(msg.name, msg.mode, os.makedev(msg.major, msg.minor), _uid(f), msg.gid)
    return m.Rmknod(tag=msg.tag, qid=node.qid())


@_handles(m.Treadlink, _DOTL)
async def _readlink(c: Connection, msg: m.Treadlink):
    f = c.fid(msg.fid)
    return m.Rreadlink(tag=msg.tag, target=await f.node.readlink())


@_handles(m.Tlink, _DOTL)
async def _link(c: Connection, msg: m.Tlink):
    d = _dir_fid_for_create(c, msg.dfid)
    f = c.fid(msg.fid)
    _check_name(msg.name)
    await d.node.link(msg.name, f.node)
    return m.Rlink(tag=msg.tag)


@_handles(m.Trename, _DOTL)
async def _rename(c: Connection, msg: m.Trename):
    f = c.fid(msg.fid)
    d = c.fid(msg.dfid)
    if not f.path:
        raise FsError(errno.EBUSY, "cannot rename the root")
    if not (d.node.qid().type & QTDIR):
        raise FsError(errno.ENOTDIR, "target is not a directory")
    _check_name(msg.name)
    await f.parent().rename(f.name, d.node, msg.name)
    f.path = d.path + ((msg.name, f.node),)
    return m.Rrename(tag=msg.tag)


@_handles(m.Trenameat, _DOTL)
async def _renameat(c: Connection, msg: m.Trenameat):
    old = c.fid(msg.olddirfid)
    new = c.fid(msg.newdirfid)
    for d in (old, new):
        if not (d.node.qid().type & QTDIR):
            raise FsError(errno.ENOTDIR, "not a directory")
    _check_name(msg.oldname)
    _check_name(msg.newname)
    await old.node.rename(msg.oldname, new.node, msg.newname)
    return m.Rrenameat(tag=msg.tag)


@_handles(m.Tunlinkat, _DOTL)
async def _unlinkat(c: Connection, msg: m.Tunlinkat):
    d = c.fid(msg.dirfid)
    if not (d.node.qid().type & QTDIR):
        raise FsError(errno.ENOTDIR, "not a directory")
    _check_name(msg.name)
    await d.node.unlink(msg.name, bool(msg.flags & m.AT_REMOVEDIR))
    return m.Runlinkat(tag=msg.tag)


@_handles(m.Tfsync, _DOTL)
async def _fsync(c: Connection, msg: m.Tfsync):
    f = c.fid(msg.fid)
    if f.file is None:
        raise FsError(errno.EBADF, "fid not open")
    await f.file.fsync()
    return m.Rfsync(tag=msg.tag)


@_handles(m.Txattrwalk, _DOTL)
async def _xattrwalk(c: Connection, msg: m.Txattrwalk):
    c.fid(msg.fid)
    # No extended attributes: listing is unsupported, any name is absent.
    if not msg.name:
        raise FsError(errno.EOPNOTSUPP, "extended attributes not supported")
    raise FsError(errno.ENODATA, f"no extended attribute {msg.name!r}")


@_handles(m.Txattrcreate, _DOTL)
async def _xattrcreate(c: Connection, msg: m.Txattrcreate):
    c.fid(msg.fid)
    raise FsError(errno.EOPNOTSUPP, "extended attributes not supported")


@_handles(m.Tlock, _DOTL)
async def _lock(c: Connection, msg: m.Tlock):
    # Advisory locks are local to each client; the simple answer is success.
    c.fid(msg.fid)
    return m.Rlock(tag=msg.tag, status=m.P9_LOCK_SUCCESS)


@_handles(m.Tgetlock, _DOTL)
async def _getlock(c: Connection, msg: m.Tgetlock):
    c.fid(msg.fid)
    return m.Rgetlock(tag=msg.tag, type=m.P9_LOCK_TYPE_UNLCK, start=msg.start, length=msg.length,
                      proc_id=msg.proc_id, client_id=msg.client_id)


# -- the server ----------------------------------------------------------------


class Server:
    """Serves a :class:`ninep.fs.FileSystem` to every connection of its listeners.

    ``msize`` is the largest message size offered (bytes, ≥ 4096); ``trace``
    logs every T- and R-message to the ``ninep.trace`` logger at DEBUG level
    (the ``--debug-9p`` switch).  Connections are independent: one that breaks
    the protocol is closed and logged, the others keep being served.
    """

    def __init__(self, fs: FileSystem, *, msize: int = DEFAULT_MSIZE, trace: bool = False):
        if msize < m.MIN_MSIZE:
            raise ValueError(f"msize {msize} below the minimum {m.MIN_MSIZE}")
        self.fs = fs
        self.msize = msize
        self.trace = trace
        self.connections: set[Connection] = set()

    async def serve(self, listen: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the dial string ``listen`` and serve until cancelled.

        ``task_status.started()`` receives the list of bound dial strings (useful
        with port 0).  Raises ValueError for a bad dial string, OSError if the
        address cannot be bound.
        """
        listeners = await open_listeners(listen)
        addrs = [listener_address(l) for l in listeners]
        for a in addrs:
            log.info("9P listening on %s", a)
        await self.serve_listeners(listeners, task_status=task_status, started=addrs)

    async def serve_listeners(self, listeners, *, task_status=trio.TASK_STATUS_IGNORED, started=None) -> None:
        """Serve the given trio Listeners until cancelled."""
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started(started if started is not None else listeners)

    async def _accept_loop(self, listener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as e:  # EMFILE etc.: log and back off briefly
                    log.warning("accept failed: %s", e)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self.handle_stream, stream)

    async def handle_stream(self, stream: trio.abc.Stream, peer: str | None = None) -> None:
        """Serve one already-connected stream until it closes."""
        if peer is None:
            peer = _peer_name(stream)
        conn = Connection(self.fs, stream, max_msize=self.msize, trace=self.trace, peer=peer)
        self.connections.add(conn)
        log.debug("9P connection from %s", peer)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            log.debug("9P connection %s closed (%s)", peer, conn.closed_reason)


def _peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "?"
    try:
        name = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        return f"tcp!{name[0]}!{name[1]}"
    return f"unix!{name or '?'}"
