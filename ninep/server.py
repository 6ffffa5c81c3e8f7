"""A 9P server on trio: 9P2000, 9P2000.u and 9P2000.L over any byte stream.

The server is a thin layer over the sans-IO codec (:mod:`ninep.codec`) and the
filesystem interface (:mod:`ninep.fs`).  Like plan9port's lib9p it checks fids,
open modes, offsets and counts before any file code runs, so a
:class:`ninep.fs.Node` only sees well-formed calls.

Per connection (:class:`Connection`):

- a pool of worker tasks in the leader/follower pattern: the leader reads
  frames, decodes them and does the synchronous checks, then runs the
  request itself; only when the request suspends (may block) does it wake an
  idle worker to lead next (or spawn one).  So a blocked request never holds
  up others, and no task is spawned per request (idle workers are reused; at
  most a few stay parked);
- each worker runs inside a cancel scope of its own, and a request that
  suspends keeps its worker to itself until it finishes: that scope is the
  request's, for Tflush to cancel.  A worker whose scope was cancelled
  leaves it and goes on in a new one.  (One scope per request cost ~4 µs of
  a ~45 µs getattr; a scope entered only once a request suspended would not
  nest with scopes the file code opened before suspending.)
- replies are queued in order and sent by whichever task finds the stream
  idle (one writer at a time);
- a fid table; a table of outstanding tags.

Flush (flush(5)): Tflush cancels the request's scope and waits until it
has finished; if that task produced a reply it is queued first, so a reply for
the old tag can precede Rflush but never follow it.  Rflush is always sent, also
for unknown tags.  A flushed request leaves no task, waiter or fid behind.

Requests on one fid may run at once (a client may clunk a fid while a walk
or an open of it waits in file code).  Tclunk and Tremove take effect when
they arrive; a walk onto the same fid or an open that finishes after that
fails with EBADF and releases what it opened, so a clunked fid never comes
back and no open file outlives its fid.  Of two opens of one fid the first
to finish wins.

Protocol violations (bad framing, unknown types, truncated strings, strings
containing NUL, frames over msize, fid or tag reuse, R-messages from a client)
close only the offending connection, with the reason logged (rate-limited).
Errors of file code (:class:`FsError`) are translated exactly once here:
Rlerror on 9P2000.L, Rerror with errno on 9P2000.u, Rerror on 9P2000; an
Rerror's ename is cut to :data:`ninep.limits.MAX_ENAME` bytes.  Any other
exception of file code is answered EIO and logged as one short line (message
type, tag, fid, exception type and message, never the request); its traceback
at most once per ``Limits.traceback_interval`` seconds per server, with a count
of the ones left out.

Numbers are checked before they reach file code where the protocol defines
their range: read/write offsets below 2^63 (Linux's loff_t), Tsetattr/Twstat
sizes below 2^63, Tsetattr nanoseconds below 10^9 (the seconds are a signed
time_t, as Linux's v9fs sends them), Tmknod major < 2^12 and minor < 2^20
(what fits Linux's dev_t; glibc answers EINVAL otherwise) and mode bits within
``S_IFMT | 0o7777``; each violation is EINVAL, as mknod(2), truncate(2) and
utimensat(2) answer.

Limits
------
Everything a client can make the server hold is bounded by a
:class:`ninep.limits.Limits` (``Server(fs, limits=Limits(...))``); defaults
in brackets:

- fids per connection (``max_fids`` [4096]): a Tattach, Twalk or Txattrwalk
  whose newfid would exceed it gets EMFILE ("too many fids") and changes
  nothing.  (Tauth keeps no afid; Tlcreate/Tcreate reuse their fid.)
- outstanding requests per connection (``max_outstanding`` [64], Tflush not
  counted): one more is answered at once with EAGAIN ("too many outstanding
  requests"), with no task and no file code.  Tflush is always handled; at
  most ``max_outstanding`` of them are outstanding at once, beyond that no
  frame is read until one is answered.  Tasks per connection are at most
  ``max_outstanding`` × 2 + MAX_IDLE_WORKERS + 3 (requests and Tflush
  running, idle workers, the reader, the sender, the Tattach watchdog).
- reply bytes per connection (``max_queued_msizes`` [8], B = 8 × msize):
  a request whose reply may be large reserves the largest reply it can get
  (Tread and Treaddir: 11 + min(count, iounit); Tstat: msize; Treadlink:
  65544, a string's largest; Tgetlock: its own size) and starts only while
  the replies queued for the peer plus all reservations fit in B; until then
  it waits, outstanding (so a Tflush drops it at once) but not started, and
  frames are still read so that a Tflush reaches blocked requests.  Every
  other reply is at most ``SMALL_REPLY`` [525] bytes and its request starts
  while the queue is within B.  While the queued bytes exceed B no request
  starts and no frame is read: a peer that does not read its replies stops
  being read.  So at most ``max_outstanding`` requests produce replies, and
  the replies queued and reserved stay within B + (max_outstanding + 1) ×
  SMALL_REPLY + 7 × max_outstanding bytes (``Connection.reply_bytes_held``).
  With the request bodies held (up to max_outstanding Twrites of msize) and
  the frame being received (msize + 68 KiB), one connection holds at most
  ``Limits.worst_case_bytes(msize)`` = 73 × msize + 104,205 bytes with the
  defaults: about 36.6 MiB at the default msize of 512 KiB + 24, 9.2 MiB at
  msize 128 KiB; per server, ``max_connections`` times that.  (What file
  code keeps per open file, such as a directory listing snapshot, comes on
  top.)
- frames: at most ``pre_version_frame`` [8 KiB] bytes before a successful
  Tversion (version(5): Tversion is tiny), msize after; a frame that has
  started to arrive must be complete within ``frame_timeout`` [30 s]; a
  connection must complete a Tattach within ``attach_timeout`` [60 s].
  Otherwise the connection is closed, the reason logged (rate-limited).
- per server: ``max_connections`` [1024] in total and
  ``max_connections_per_peer`` [64] per TCP peer address; a connection over
  either is accepted and closed at once (logged, rate-limited).  When
  accept(2) fails (EMFILE: no descriptors left) the listener backs off for
  0.1 s and tries again, logging at most once per 10 s; the connections
  already open keep being served.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections import deque
import stat as st
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from . import messages as m
from .codec import FrameReader, decode, encode, encoders, pack_dirent, pack_stat
from .dial import listener_address, open_listeners
from .errors import FsError, ProtocolError
from .fs import Attr, FileSystem, Node, OpenFile, SetAttr
from .limits import MAX_ENAME, READ_SIZE, SMALL_REPLY, Limits, LogLimiter, shorten
from .qid import QTDIR

log = logging.getLogger("ninep.server")
trace_log = logging.getLogger("ninep.trace")

Dialect = m.Dialect

#: The largest msize we offer; clients may ask for less.
DEFAULT_MSIZE = 512 * 1024 + m.IOHDRSZ

#: Frames dispatched or reads done by one connection without waiting for its
#: socket before it yields to the event loop: a peer that keeps its socket
#: full never has to wait, and must not hold the loop (other connections,
#: timeouts, shutdown) for longer than this many steps.
STEPS_BEFORE_YIELD = 64

#: Idle workers a connection keeps parked for the next requests.
MAX_IDLE_WORKERS = 4
#: Seconds a file's release (Tclunk, teardown) may take before it is abandoned.
RELEASE_DEADLINE = 10.0
#: The default of :attr:`Limits.max_queued_msizes`: replies (in units of
#: msize) queued for a peer that does not read them before the connection
#: stops reading new requests from it.
MAX_QUEUED_MSIZES = Limits().max_queued_msizes
#: Seconds the accept loop sleeps after accept(2) failed (EMFILE, ENFILE, ENOMEM …).
ACCEPT_BACKOFF = 0.1

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
_MAX_OFF = (1 << 63) - 1  # Linux's loff_t


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
    """One outstanding tag: ``reserve`` is the largest reply (bytes) it may
    produce, counted against the reply budget while it runs when it is above
    SMALL_REPLY; ``started`` once a worker runs it; ``flush`` for a Tflush."""

    tag: int
    reserve: int = SMALL_REPLY
    flush: bool = False
    started: bool = False
    #: a Tflush or Tversion cancelled it
    cancel_called: bool = False
    finished: bool = False
    #: the scope of the worker running it (set when it starts)
    scope: trio.CancelScope | None = None
    # Made only when someone waits for the request: most requests finish
    # without (an Event costs ~1 µs to make).
    done: trio.Event | None = None

    def cancel(self) -> None:
        """Cancel the request: it gets no reply (unless it already has one).
        Only called while it waits to start or is suspended, so the scope of
        its worker is its own."""
        self.cancel_called = True
        if self.scope is not None:
            self.scope.cancel()

    def finish(self) -> None:
        """The request is answered or dropped, its tag retired."""
        self.finished = True
        if self.done is not None:
            self.done.set()

    async def wait_finished(self) -> None:
        """Wait until :meth:`finish` (a checkpoint only if it had to wait)."""
        if not self.finished:
            if self.done is None:
                self.done = trio.Event()
            await self.done.wait()


class _EOF(Exception):
    """The peer closed its end."""


class _Timeout(Exception):
    """The peer took too long (a partial frame, a missing Tattach)."""


class _Reserved:
    """Placeholder for a newfid claimed by a request still running."""


_RESERVED = _Reserved()


class _ServerLogs:
    """The rate limiters one server shares between its connections, so that
    no client (and no number of clients) can flood the log."""

    def __init__(self, limits: Limits):
        #: connections closed or refused for cause (protocol errors, timeouts, caps)
        self.warn = LogLimiter(burst=10, interval=1.0)
        #: one line per exception of file code
        self.failure = LogLimiter(burst=10, interval=1.0)
        #: the tracebacks of those exceptions
        self.traceback = LogLimiter(burst=1, interval=limits.traceback_interval)
        #: accept(2) failures
        self.accept = LogLimiter(burst=1, interval=10.0)


class Connection:
    """One 9P connection: its worker tasks, output queue, fid and tag tables.

    ``fs`` is the served FileSystem, ``stream`` a trio Stream, ``max_msize`` the
    largest msize offered (bytes), ``limits`` the bounds (see the module doc).
    :meth:`run` returns when the peer hangs up, breaks the protocol or times
    out; all request tasks are cancelled and every open file is released
    before it returns.

    For tests and monitoring: :attr:`fids` (``len(conn.fids)`` counts fids
    held, including newfids of running requests), :attr:`outstanding`,
    :attr:`running`, :attr:`reply_bytes_held`, :attr:`requests_seen`,
    :attr:`closed_reason`.
    """

    def __init__(self, fs: FileSystem, stream: trio.abc.Stream, *, max_msize: int = DEFAULT_MSIZE,
                 trace: bool = False, peer: str = "?", limits: Limits | None = None,
                 logs: _ServerLogs | None = None):
        self.fs = fs
        self.stream = stream
        self.max_msize = max_msize
        self.msize = max_msize
        self.dialect: Dialect | None = None
        self._encoders = encoders(Dialect.P2000)  # those of the dialect in force
        self.trace = trace
        self.peer = peer
        self.limits = limits if limits is not None else Limits()
        self._logs = logs if logs is not None else _ServerLogs(self.limits)
        self._budget = self.limits.reply_budget(max_msize)  # B, for the msize in force
        self.fids: dict[int, Fid | _Reserved] = {}
        #: outstanding tags (Tflush included), started or waiting to start
        self.pending: dict[int, _Request] = {}
        #: requests being run by a worker now (in file code or about to be)
        self.running = 0
        #: T-messages decoded so far
        self.requests_seen = 0
        self._flushes = 0  # Tflush among pending
        self._reserved = 0  # reply bytes reserved by running requests (above SMALL_REPLY)
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
        self._frames = FrameReader(self.limits.pre_version_frame)
        self._steps = 0  # frames dispatched and reads done since the last wait (STEPS_BEFORE_YIELD)
        self._partial_since: float | None = None  # when we began waiting for the rest of a frame
        self._attached = trio.Event()  # set by the first successful Tattach
        self._ready: deque[tuple[Callable, Any, _Request, int | None]] = deque()
        self._leading = False  # a worker is reading
        self._idle = trio.lowlevel.ParkingLot()  # parked workers

    @property
    def outstanding(self) -> int:
        """Outstanding requests, Tflush not counted (bounded by ``max_outstanding``)."""
        return len(self.pending) - self._flushes

    @property
    def reply_bytes_held(self) -> int:
        """Reply bytes queued or being sent plus the reservations of running
        requests (bounded, see the module doc)."""
        return self._outq_bytes + self._reserved

    # -- the loops --------------------------------------------------------

    async def run(self) -> None:
        """Serve until EOF, a protocol violation or a timeout; never raises for those."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._worker)
                nursery.start_soon(self._attach_watchdog)
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

    def _close_logged(self, reason: str, level: int = logging.WARNING) -> None:
        self._logs.warn.log(log, level, "9P connection %s closed: %s", self.peer, reason)
        self._close(reason)

    async def _attach_watchdog(self) -> None:
        with trio.move_on_after(self.limits.attach_timeout):
            await self._attached.wait()
            return
        self._close_logged(f"no successful Tattach within {self.limits.attach_timeout:g} s")

    async def _worker(self) -> None:
        # Whatever ends a read or a send ends the connection, and only it.
        try:
            while True:
                scope = trio.CancelScope()
                with scope:
                    if await self._work(scope):
                        return
                # A Tflush cancelled the request this worker ran: send what it
                # may have queued outside the spent scope (a reply is never cut
                # in half), then go on in a new one.
                await self._transmit()
        except _EOF:
            self._close("EOF")
        except ProtocolError as e:
            self._close_logged(f"protocol error: {shorten(str(e))}")
        except _Timeout as e:
            self._close_logged(str(e))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._close(f"connection lost: {e!r}")
        except Exception as e:
            n = self._logs.traceback.allow()
            if n is not None:
                log.exception("9P connection %s closed: internal error (%d tracebacks suppressed before)",
                              self.peer, n)
            else:
                self._logs.failure.log(log, logging.ERROR, "9P connection %s closed: internal error %s",
                                       self.peer, type(e).__name__)
            self._close("internal error")

    async def _work(self, scope: trio.CancelScope) -> bool:
        """Lead, run requests and park until there is too much idle (True)
        or a request run in ``scope`` was cancelled (False)."""
        ready = self._ready
        idle = self._idle
        while True:
            if self._outq_bytes > self._budget:
                # The peer does not read its replies: start and read no more
                # of its requests until the queue drains (its memory, not ours).
                if self._drained is None:
                    self._drained = trio.Event()
                await self._drained.wait()
                self._partial_since = None  # our pause does not count against the peer
            elif ready and (job := self._take_ready()) is not None:
                if await self._run_request(*job, scope):
                    return False
            elif not self._leading and self._flushes < self.limits.max_outstanding:
                self._leading = True
                try:
                    job = await self._lead()
                finally:
                    self._leading = False
                if job is not None:
                    if await self._run_request(*job, scope):
                        return False
                elif not self._write_now():
                    await self._transmit()
            elif len(idle) >= MAX_IDLE_WORKERS:
                return True
            else:
                await idle.park()

    def _take_ready(self) -> tuple[Callable, Any, _Request, int | None] | None:
        """The first ready request that may start now (removed from the ready
        queue): one with a small reply, one already flushed, or one whose
        reservation fits in the reply budget; None if there is none."""
        room = self._budget - self._outq_bytes - self._reserved
        ready = self._ready
        for i, job in enumerate(ready):
            req = job[2]
            if req.reserve <= SMALL_REPLY or req.reserve <= room or req.cancel_called:
                del ready[i]
                return job
        return None

    def _hand_off(self) -> None:
        """This worker is about to block (in a request or a send): make sure
        other workers read and run the remaining ready requests meanwhile --
        wake parked ones, spawn if none is left."""
        need = (1 if self._ready else 0) + (0 if self._leading else 1)
        if need:
            woken = len(self._idle.unpark(count=need))
            for _ in range(need - woken):
                self._nursery.start_soon(self._worker)  # type: ignore[union-attr]

    async def _lead(self) -> tuple[Callable, Any, _Request, int | None] | None:
        """Dispatch the next whole frame buffered (reading more first when
        there is none).  Returns the request to run at once, when it is the
        only one ready and may start (the common case: no ready-queue round
        trip on the way from read to reply); None otherwise."""
        self._steps += 1
        if self._steps >= STEPS_BEFORE_YIELD:
            self._steps = 0
            await trio.lowlevel.checkpoint()
        frames = self._frames
        frame = frames.next_frame()
        if frame is None:
            if len(frames):
                await self._receive_rest()
            else:
                # Between frames: no deadline, and no cancel scope to enter and
                # leave (measured: two scopes cost ~8 µs of a ~50 µs getattr).
                self._partial_since = None
                await self._read_some()
            frame = frames.next_frame()
            if frame is None:
                return None
        self._partial_since = None
        msg = decode(frame, self.dialect or Dialect.P2000)
        self.requests_seen += 1
        if self.trace:
            trace_log.debug("%s <- %r", self.peer, redacted(msg))
        # A reply queued here is sent by the caller once it no longer leads:
        # a leader blocked in a send to a peer that does not read would stop
        # every other worker reading (the reply budget bounds what we queue).
        if type(msg) is m.Tversion:
            await self._version(msg)
            return None
        if self._dispatch(msg, len(frame)):  # answered at once (refused)
            return None
        ready = self._ready
        if len(ready) == 1 and self._outq_bytes <= self._budget:
            return self._take_ready()
        return None

    async def _receive_rest(self) -> None:
        """Read more of a frame begun: it must be complete within
        ``frame_timeout`` seconds of its first bytes (_Timeout otherwise)."""
        if self._partial_since is None:
            self._partial_since = trio.current_time()
        fd = self._fd
        if fd is not None:
            # The rest of a large frame is usually there already: read it
            # without an event loop round trip.
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                pass
            else:
                if not data:
                    raise _EOF
                self._frames.feed(data)
                return
        with trio.move_on_at(self._partial_since + self.limits.frame_timeout):
            await self._read_some()
            return
        raise _Timeout(f"partial frame ({len(self._frames)} bytes) not completed within "
                       f"{self.limits.frame_timeout:g} s")

    async def _read_some(self) -> None:
        """Wait for the peer's next bytes and feed them to the frame reader (_EOF at EOF)."""
        fd = self._fd
        if fd is not None:
            # Wait first, then read: on a request/response stream the next
            # request is rarely there yet, and this saves a failed read.
            await trio.lowlevel.wait_readable(fd)
            self._steps = 0
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
        else:
            data = await self.stream.receive_some(READ_SIZE)
        if not data:
            raise _EOF
        self._frames.feed(data)

    def _queue(self, msg: Any) -> None:
        """Append a reply to the output queue (in order); :meth:`_transmit` sends it."""
        frame = self._encode(msg)
        self._outq.append(frame)
        self._outq_bytes += len(frame)

    def _write_now(self) -> bool:
        """Write everything queued with one write(2) that does not wait: True
        when nothing is left for this task to send (all written, nothing
        queued, or another task is the sender), False when the caller must
        ``await self._transmit()`` for the rest.  (The common case, a reply
        the kernel takes at once, then costs no coroutine.)"""
        q = self._outq
        if self._sending or not q:
            return True
        fd = self._fd
        if fd is None:
            return False
        buf = q.popleft() if len(q) == 1 else b"".join([q.popleft() for _ in range(len(q))])
        try:
            sent = os.write(fd, buf)
        except OSError:  # EAGAIN, or a broken stream :meth:`_transmit` reports
            sent = 0
        self._outq_bytes -= sent
        if sent < len(buf):
            q.appendleft(buf[sent:] if sent else buf)
            return False
        if self._drained is not None and self._outq_bytes <= self._budget:
            self._drained.set()
            self._drained = None
        return True

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
                if self._drained is not None and self._outq_bytes <= self._budget:
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

    def _refuse(self, tag: int, e: FsError) -> bool:
        """Answer a request at once with an error, without running it
        (True: a reply is queued)."""
        self._queue(self._error(tag, e))
        return True

    def _dispatch(self, msg: Any, size: int) -> bool:
        """Check a request (any T-message but Tversion) and put it in the
        ready queue, or answer it at once: True when a reply was queued
        (the caller sends it).  ProtocolError for what ends the connection."""
        tag = msg.tag
        t = type(msg)
        name = t.__name__
        if name[0] != "T":
            raise _protocol(f"{name} from a client")
        if tag in self.pending:
            raise _protocol(f"tag {tag} reused while outstanding")
        if self.dialect is None:
            self._queue(m.Rerror(tag=tag, ename="Tversion first", errno=errno.EPROTO))
            return True
        handler = _HANDLERS.get(t)
        allowed = _DIALECT_OF.get(t)
        if handler is None or (allowed is not None and self.dialect not in allowed):
            return self._refuse(tag, FsError(errno.EOPNOTSUPP, f"{name} not supported on {self.dialect.value}"))
        # Synchronous fid checks: a newfid must be free (or equal fid, for Twalk).
        newfid = _newfid_of(msg)
        new = newfid is not None and newfid not in self.fids
        if newfid is not None and not new and not (t is m.Twalk and newfid == msg.fid):
            raise _protocol(f"{name}: fid {newfid} already in use")
        flush = t is m.Tflush
        if not flush:
            if len(self.pending) - self._flushes >= self.limits.max_outstanding:
                return self._refuse(tag, FsError(errno.EAGAIN, "too many outstanding requests"))
            if new and len(self.fids) >= self.limits.max_fids:
                return self._refuse(tag, FsError(errno.EMFILE, "too many fids"))
        if new:
            self.fids[newfid] = _RESERVED
        req = _Request(tag, self._reply_bound(msg, size), flush)
        self.pending[tag] = req
        if flush:
            self._flushes += 1
        self._ready.append((handler, msg, req, newfid))
        return False

    def _reply_bound(self, msg: Any, size: int) -> int:
        """The largest reply frame (bytes) ``msg`` (a frame of ``size`` bytes) may get."""
        t = type(msg)
        if t is m.Tread or t is m.Treaddir:
            n = 11 + min(msg.count, self._read_cap(msg.fid))  # size[4] type[1] tag[2] count[4] data
        elif t is m.Tstat:
            n = self.msize
        elif t is m.Treadlink:
            n = min(self.msize, 9 + 0xFFFF)  # size[4] type[1] tag[2] target[s]
        elif t is m.Tgetlock:
            n = size  # Rgetlock echoes client_id and is 4 bytes shorter than Tgetlock
        else:
            return SMALL_REPLY
        return n if n > SMALL_REPLY else SMALL_REPLY

    def _read_cap(self, fid: int) -> int:
        """The most a Tread/Treaddir of ``fid`` returns: the iounit of its open
        file (when file code set one) or msize − IOHDRSZ."""
        cap = self.msize - m.IOHDRSZ
        f = self.fids.get(fid)
        if isinstance(f, Fid) and f.file is not None and 0 < f.file.iounit < cap:
            cap = f.file.iounit
        return cap

    def _retire_unstarted(self, req: _Request) -> None:
        """Drop a request that no worker has started (Tflush, Tversion): it
        gets no reply and leaves no fid behind."""
        for i, job in enumerate(self._ready):
            if job[2] is req:
                del self._ready[i]
                newfid = job[3]
                if newfid is not None and self.fids.get(newfid) is _RESERVED:
                    del self.fids[newfid]
                break
        req.started = True
        if self.pending.get(req.tag) is req:
            del self.pending[req.tag]
            if req.flush:
                self._flushes -= 1
        req.finish()

    async def _run_request(self, handler: Callable, msg: Any, req: _Request, newfid: int | None,
                           scope: trio.CancelScope) -> bool:
        """Run one request in the calling worker, whose cancel ``scope``
        becomes the request's; queue its reply, retire its tag, and send.
        True when a Tflush or Tversion cancelled it while it ran: ``scope``
        is spent, and the worker sends the queue after leaving it.  (Our
        flag, not ``scope.cancel_called``, which reads the clock each time:
        the worker scopes have no deadline.)"""
        frame = None
        req.started = True
        req.scope = scope
        reserve = req.reserve if req.reserve > SMALL_REPLY else 0
        self._reserved += reserve
        self.running += 1
        try:
            if req.cancel_called:  # flushed before it started: no reply, scope intact
                return False
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
                self._log_failure(msg, e)
                reply = self._error(msg.tag, FsError(errno.EIO, f"internal error: {type(e).__name__}"))
            # (A request its Tflush cancelled gets here only if its file code
            # finished anyway; Cancelled otherwise skips the reply.)
            frame = self._encode(reply, req.reserve)
        finally:
            self.running -= 1
            self._reserved -= reserve
            if newfid is not None and self.fids.get(newfid) is _RESERVED:
                del self.fids[newfid]
            # Queue the reply (if any), then retire the tag, with no checkpoint in
            # between, so Tflush's Rflush can only be queued after it.
            if frame is not None:
                self._outq.append(frame)
                self._outq_bytes += len(frame)
            del self.pending[msg.tag]
            if req.flush:
                self._flushes -= 1
            req.finish()
        if req.cancel_called:
            return True
        if frame is not None and not self._write_now():
            await self._transmit()
        return False

    def _log_failure(self, msg: Any, e: Exception) -> None:
        """Log an exception of file code: one short line (message type, tag,
        fid, exception), never the request itself; the traceback at most once
        per ``traceback_interval`` seconds per server."""
        what = (type(msg).__name__, msg.tag, _fid_text(msg), type(e).__name__, shorten(str(e)))
        logs = self._logs
        n = logs.traceback.allow()
        if n is None:
            logs.failure.log(log, logging.ERROR, "9P %s: %s tag %d fid %s failed in file code: %s: %s "
                             "(answered EIO)", self.peer, *what)
            return
        tb = "".join(traceback.format_tb(e.__traceback__, limit=-30))
        log.error("9P %s: %s tag %d fid %s failed in file code: %s: %s (answered EIO; %d tracebacks "
                  "left out before this one)\nTraceback (most recent call last):\n%s%s",
                  self.peer, *what, n, tb, what[3])

    def _encode(self, reply: Any, bound: int | None = None) -> bytes:
        """Encode a reply; one that cannot be encoded (file code returned an
        out-of-range value) or would exceed msize (or ``bound``, the bytes its
        request reserved) becomes an EIO error, logged."""
        if self.trace:
            trace_log.debug("%s -> %r", self.peer, reply)
        dialect = self.dialect or Dialect.P2000
        try:
            enc = self._encoders.get(type(reply))
            if enc is None:
                raise TypeError(f"not a 9P message: {type(reply).__name__}")
            frame = enc(reply)
        except (ValueError, TypeError, OverflowError) as e:
            self._logs.failure.log(log, logging.ERROR, "9P %s: cannot encode %s tag %s: %s", self.peer,
                                   type(reply).__name__, getattr(reply, "tag", "?"), shorten(str(e)))
            return encode(self._error(reply.tag, FsError(errno.EIO, "reply not encodable")), dialect)
        limit = self.msize if bound is None else min(bound, self.msize)
        if len(frame) > limit:  # Linux drops the whole connection on a reply over msize
            self._logs.failure.log(log, logging.ERROR, "9P %s: %s of %d bytes exceeds %s %d", self.peer,
                                   type(reply).__name__, len(frame), "msize" if bound is None else "its bound",
                                   limit)
            return encode(self._error(reply.tag, FsError(errno.EIO, "reply too large")), dialect)
        return frame

    def _error(self, tag: int, e: FsError) -> Any:
        if self.dialect is Dialect.L:
            return m.Rlerror(tag=tag, ecode=e.errno)
        ename = _cut_ename(e.message)
        if self.dialect is Dialect.U:
            return m.Rerror(tag=tag, ename=ename, errno=e.errno)
        return m.Rerror(tag=tag, ename=ename, errno=0)

    # -- session management -------------------------------------------------

    async def _version(self, msg: m.Tversion) -> None:
        # Tversion aborts all outstanding I/O and clunks every fid (version(5)).
        for job in list(self._ready):  # not started yet: retire them here, unanswered
            self._retire_unstarted(job[2])
        for req in list(self.pending.values()):
            req.cancel()
        for req in list(self.pending.values()):
            await req.wait_finished()
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
            self._encoders = encoders(Dialect.P2000)
            self._frames.max_size = self.limits.pre_version_frame
            self._queue(m.Rversion(tag=msg.tag, msize=min(msg.msize, self.max_msize), version="unknown"))
            return
        self.dialect = dialect
        self._encoders = encoders(dialect)
        self.msize = msize
        self._budget = self.limits.reply_budget(msize)
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


def _cut_ename(text: str) -> str:
    """``text`` cut to at most MAX_ENAME bytes of UTF-8, at a character boundary."""
    b = text.encode("utf-8", "surrogateescape")
    if len(b) <= MAX_ENAME:
        return text
    k = MAX_ENAME - 3
    while k > 0 and (b[k] & 0xC0) == 0x80:
        k -= 1
    return b[:k].decode("utf-8", "surrogateescape") + "..."


def _fid_text(msg: Any) -> str:
    for name in ("fid", "dfid", "dirfid", "olddirfid"):
        v = getattr(msg, name, None)
        if v is not None:
            return str(v)
    return "-"


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
    c._attached.set()
    return m.Rattach(tag=msg.tag, qid=root.qid())


@_handles(m.Tflush)
async def _flush(c: Connection, msg: m.Tflush):
    # flush(5): the old request is answered before Rflush or not at all.  One
    # still waiting for reply budget is dropped at once; a running one is
    # cancelled and waited for (a cancellation, so this does not block).
    old = c.pending.get(msg.oldtag)
    if old is not None and msg.oldtag != msg.tag:
        if not old.started:
            c._retire_unstarted(old)
        else:
            old.cancel()
            with trio.CancelScope(shield=True):
                await old.wait_finished()
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
    count = min(msg.count, c._read_cap(msg.fid))
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
    count = min(msg.count, c._read_cap(msg.fid))
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
    if s.length != _NOCHANGE64 and s.length > _MAX_OFF:
        raise FsError(errno.EINVAL, "length out of range")
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
    atime = divmod(a.atime_ns, 1_000_000_000)
    mtime = divmod(a.mtime_ns, 1_000_000_000)
    ctime = divmod(a.ctime_ns, 1_000_000_000)
    # Positional, in Rgetattr's field order: half the cost of 21 keywords
    # (0.7 against 1.4 µs) on the path of the commonest request.
    return m.Rgetattr(
        msg.tag, m.P9_GETATTR_BASIC, a.qid, a.mode, a.uid, a.gid, a.nlink, a.rdev, a.size, a.blksize,
        a.blocks, *atime, *mtime, *ctime,
        0, 0, 0, 0,  # btime_sec, btime_nsec, gen, data_version
    )


@_handles(m.Tsetattr, _DOTL)
async def _setattr(c: Connection, msg: m.Tsetattr):
    f = c.fid(msg.fid)
    v = msg.valid
    now = time.time_ns()
    if v & m.P9_SETATTR_SIZE and msg.size > _MAX_OFF:
        raise FsError(errno.EINVAL, "size out of range")

    def when(bit: int, setbit: int, sec: int, nsec: int) -> int | None:
        # Linux's v9fs sends a time_t (signed) as u64; utimensat(2) wants nsec < 10^9.
        if not v & bit:
            return None
        if not v & setbit:
            return now
        if nsec >= 1_000_000_000:
            raise FsError(errno.EINVAL, "nanoseconds out of range")
        if sec >= 1 << 63:
            sec -= 1 << 64
        return sec * 1_000_000_000 + nsec

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
    # glibc's mknod answers EINVAL for a dev_t that does not fit the kernel's
    # 32-bit one (major < 2^12, minor < 2^20); mode is a umode_t.
    if msg.major > 0xFFF or msg.minor > 0xFFFFF:
        raise FsError(errno.EINVAL, "device number out of range")
    if msg.mode & ~(st.S_IFMT(0xFFFF) | 0o7777):
        raise FsError(errno.EINVAL, "mode out of range")
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
    (the ``--debug-9p`` switch); ``limits`` bounds what clients can make the
    server hold (:class:`ninep.limits.Limits`, defaults when None; see the
    module doc).  Connections are independent: one that breaks the protocol
    or a limit is closed and logged, the others keep being served.
    """

    def __init__(self, fs: FileSystem, *, msize: int = DEFAULT_MSIZE, trace: bool = False,
                 limits: Limits | None = None):
        if msize < m.MIN_MSIZE:
            raise ValueError(f"msize {msize} below the minimum {m.MIN_MSIZE}")
        self.fs = fs
        self.msize = msize
        self.trace = trace
        self.limits = limits if limits is not None else Limits()
        self.connections: set[Connection] = set()
        self._logs = _ServerLogs(self.limits)
        self._admitted = 0  # connections counted against max_connections
        self._per_peer: dict[str, int] = {}  # TCP peer address -> connections

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
                except OSError as e:  # EMFILE etc.: log (rarely) and back off briefly
                    self._logs.accept.log(log, logging.WARNING, "9P accept failed: %s (retrying every %g s; "
                                          "open connections are still served)", e, ACCEPT_BACKOFF)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                peer, key = _peer_of(stream)
                if not self._admit(peer, key):
                    await _shut(stream)
                    continue
                nursery.start_soon(self._serve_admitted, stream, peer, key)

    async def handle_stream(self, stream: trio.abc.Stream, peer: str | None = None) -> None:
        """Serve one already-connected stream until it closes (or close it at
        once when it is over ``max_connections`` or ``max_connections_per_peer``)."""
        name, key = _peer_of(stream)
        peer = peer if peer is not None else name
        if not self._admit(peer, key):
            await _shut(stream)
            return
        await self._serve_admitted(stream, peer, key)

    def _admit(self, peer: str, key: str | None) -> bool:
        """Count a new connection against the caps; False (logged) if over one."""
        lim = self.limits
        if self._admitted >= lim.max_connections:
            why = f"max_connections ({lim.max_connections}) reached"
        elif key is not None and self._per_peer.get(key, 0) >= lim.max_connections_per_peer:
            why = f"max_connections_per_peer ({lim.max_connections_per_peer}) reached for {key}"
        else:
            self._admitted += 1
            if key is not None:
                self._per_peer[key] = self._per_peer.get(key, 0) + 1
            return True
        self._logs.warn.log(log, logging.WARNING, "9P connection from %s refused: %s", peer, why)
        return False

    async def _serve_admitted(self, stream: trio.abc.Stream, peer: str, key: str | None) -> None:
        try:
            conn = Connection(self.fs, stream, max_msize=self.msize, trace=self.trace, peer=peer,
                              limits=self.limits, logs=self._logs)
            self.connections.add(conn)
            log.debug("9P connection from %s", peer)
            try:
                await conn.run()
            finally:
                self.connections.discard(conn)
                log.debug("9P connection %s closed (%s)", peer, conn.closed_reason)
        finally:
            self._admitted -= 1
            if key is not None:
                left = self._per_peer[key] - 1
                if left:
                    self._per_peer[key] = left
                else:
                    del self._per_peer[key]


async def _shut(stream: trio.abc.Stream) -> None:
    """Close a stream we will not serve."""
    with trio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except Exception:
            pass


def redacted(msg: Any) -> Any:
    """``msg`` fit for a log: a Tattach's or Tauth's ``aname`` keeps its
    first two path elements (``proc/7/…``) and ``uname`` is hidden, as
    either may carry a credential (cloudfs's ``proc/<pid>/<secret>``)."""
    if type(msg) in (m.Tattach, m.Tauth):
        parts = msg.aname.split("/")
        aname = "/".join(parts[:2]) + ("/…" if len(parts) > 2 else "")
        return dataclasses.replace(msg, aname=aname, uname="…" if msg.uname else "")
    return msg


def _peer_of(stream: trio.abc.Stream) -> tuple[str, str | None]:
    """The peer's dial string and the key it is counted under per peer: the
    IP address for TCP, None (not counted) for unix sockets and other streams."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "?", None
    try:
        name = sock.getpeername()
    except OSError:
        return "?", None
    if isinstance(name, tuple):
        return f"tcp!{name[0]}!{name[1]}", name[0]
    return f"unix!{name or '?'}", None
