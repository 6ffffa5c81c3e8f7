"""The bounds a 9P server keeps on what one client can make it hold.

A 9P client chooses how many fids it keeps (attach(5), walk(5)), how many tags
it has outstanding (intro(5): up to 65535 per connection), how much it asks to
read, how slowly it sends and whether it reads its replies at all.  A server
that cloudfs exposes to anonymous TCP clients and to untrusted guests must
bound each of these; :class:`Limits` holds the numbers and
:class:`ninep.server.Server` enforces them (see the "Limits" paragraph of
:mod:`ninep.server` for what happens at each bound and the worst case in
bytes per connection).

:class:`LogLimiter` keeps what a misbehaving peer can make the server log
bounded too: a client that triggers the same warning ten thousand times a
second gets a few lines and a count, not ten thousand lines.

No trio here: this module is imported by the sans-IO layer's users too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

__all__ = ["Limits", "LogLimiter", "MAX_ENAME", "READ_SIZE", "SMALL_REPLY", "shorten"]

#: The longest ``ename`` (bytes, UTF-8) of an Rerror the server sends; longer
#: messages of file code are cut (at a character boundary) and end in "...".
#: Plan 9's ERRMAX is 128; Linux's v9fs only maps the string to an errno.
MAX_ENAME = 512

#: The largest reply (bytes, whole frame) of every request whose reply size
#: does not depend on a count or on file code: Rerror with a cut ename
#: (7 + 2 + MAX_ENAME + 4 for 9P2000.u's errno), Rwalk with 16 qids (217),
#: Rgetattr (160), Rstatfs (67) …  Requests whose reply may be larger
#: (Tread, Treaddir, Tstat, Treadlink, Tgetlock) reserve their own bound.
SMALL_REPLY = max(256, 7 + 2 + MAX_ENAME + 4)

#: Bytes the server asks of each read(2) of a connection: a 64 KiB Twrite
#: with its header fits in one.  Much larger reads cost more than they save
#: (measured: a 68 KiB read of a small frame 2 µs, a 512 KiB one 16 µs, the
#: buffer then being mmap'd).
READ_SIZE = 68 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection and per-server bounds of :class:`ninep.server.Server`.

    ``Server(fs, limits=Limits(max_fids=1024))``.  Every field is a positive
    number; :class:`ValueError` at construction otherwise.  Counts are per
    connection unless the name says otherwise; times are seconds.
    """

    #: Fids (attach(5), walk(5) newfids, Txattrwalk's newfid) one connection may
    #: hold, including the ones being created by running requests.  A Tattach,
    #: Twalk or Txattrwalk whose newfid would be one more is answered
    #: EMFILE ("too many fids": Rlerror on 9P2000.L, Rerror elsewhere) and
    #: changes nothing.  4096 is far above what Linux's v9fs keeps for a busy
    #: mount (one fid per open file and per cached dentry being used) while
    #: keeping a fid table, and the open files behind it, small.
    max_fids: int = 4096

    #: Outstanding requests (tags) per connection, Tflush not counted.  A
    #: request that arrives while this many are outstanding is answered at
    #: once with EAGAIN ("too many outstanding requests"), without a task
    #: and without file code seeing it.  Tflush is always handled (flush(5):
    #: it must reach blocked reads); at most this many Tflush are outstanding
    #: at once, beyond that the server reads nothing more from the connection
    #: until one is answered (a Tflush only waits for a cancellation).  This
    #: also bounds blocked reads, worker tasks and the request bodies
    #: (Twrite data) held.  64 lets many processes of one client (a mounted
    #: guest) each keep a blocking read or two outstanding, which is what
    #: cloudfs's blocking files see; raise it for bigger guests.  Linux's
    #: net/9p does not retry: the errno of an Rlerror is what the system call
    #: of the guest's program returns (p9_check_errors in net/9p/client.c),
    #: so past this bound programs see EAGAIN.
    max_outstanding: int = 64

    #: Reply bytes per connection, in units of the negotiated msize (the
    #: "reply budget" B = max_queued_msizes × msize).  Replies queued and not
    #: yet taken by the peer, plus the reservations of running Tread/Treaddir/
    #: Tstat/Treadlink requests (each reserves the largest reply it may
    #: produce), stay within B: such a request starts only when its
    #: reservation fits (until then it waits, outstanding and flushable).
    #: While the queued bytes alone exceed B no request starts and no frame
    #: is read; reservations only hold requests back, frames are still read,
    #: so that a Tflush always reaches a blocked read.  8 lets a client stream
    #: reads of a full msize without stalling while the peer's socket
    #: buffers fill.  A file that blocks (a value not yet set) should set a
    #: small ``OpenFile.iounit``: its waiting reads then reserve that much,
    #: not msize (Linux's net/9p honours iounit in p9_client_read).
    max_queued_msizes: int = 8

    #: The largest frame accepted before a successful Tversion (bytes).  A
    #: Tversion is 13 bytes plus its version string, so 8 KiB refuses nothing
    #: real while an unversioned peer cannot make the server hold a
    #: half-received frame of the full msize.
    pre_version_frame: int = 8192

    #: Seconds a partly received frame may take to arrive completely (from the
    #: moment the server waits for its rest).  After that the connection is
    #: closed, with the reason logged (slowloris).  30 s is far beyond what a
    #: frame of msize bytes needs on any link a 9P client would use.
    frame_timeout: float = 30.0

    #: Seconds a connection may stay open without a successful Tattach.  After
    #: that it is closed, with the reason logged.  A real client sends
    #: Tversion and Tattach within milliseconds of connecting.
    attach_timeout: float = 60.0

    #: Connections the whole server serves at once.  One more is accepted
    #: and closed at once (logged, rate-limited); the others keep being
    #: served.  With the per-connection bounds this caps the server's memory
    #: and its file descriptors (each connection holds one socket plus the
    #: files its fids opened).
    max_connections: int = 1024

    #: Connections from one peer address (the IP address for TCP; unix-socket
    #: peers are not counted per peer) the server serves at once; one more is
    #: accepted and closed at once, logged and rate-limited.  Behind NAT or
    #: QEMU's user-mode networking many guests share one address: raise it
    #: there.
    max_connections_per_peer: int = 64

    #: Seconds between two tracebacks logged for exceptions of file code
    #: (other than FsError) on one server; the ones in between are counted and
    #: the count is logged with the next one.  Each such failure is still
    #: answered EIO and logged as one short line (rate-limited).
    traceback_interval: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_fids", "max_outstanding", "max_queued_msizes", "pre_version_frame",
                     "max_connections", "max_connections_per_peer"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, not {v!r}")
        if self.pre_version_frame < 64:
            raise ValueError("Limits.pre_version_frame must be at least 64 bytes (a Tversion)")
        for name in ("frame_timeout", "attach_timeout", "traceback_interval"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"Limits.{name} must be a positive number of seconds, not {v!r}")

    def reply_budget(self, msize: int) -> int:
        """B: the reply bytes (queued + reserved) a connection of ``msize`` may hold."""
        return self.max_queued_msizes * msize

    def worst_case_bytes(self, msize: int) -> int:
        """An upper bound of the bytes one connection of ``msize`` makes the
        server hold for 9P (not counting what file code keeps per open file):

        - replies queued or reserved: B + (max_outstanding + 1) × SMALL_REPLY
          (requests with small replies start while the queue is at most B,
          one error answered at dispatch may land on top) + max_outstanding
          × 7 (Rflush);
        - request bodies of outstanding requests: max_outstanding × msize
          (a Twrite carries up to msize − 23 bytes of data);
        - the frame being received: msize + READ_SIZE (68 KiB, one read of
          the socket).

        With the defaults: 73 × msize + 104,205 bytes, about 36.6 MiB at
        msize = 512 KiB + 24.
        """
        replies = self.reply_budget(msize) + (self.max_outstanding + 1) * SMALL_REPLY + self.max_outstanding * 7
        return replies + self.max_outstanding * msize + msize + READ_SIZE


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to at most ``limit`` characters (with a note of how many
    were left out), for log lines that quote what a peer sent."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class LogLimiter:
    """Lets at most ``burst`` log lines through per ``interval`` seconds and
    counts the rest; the next line that gets through reports the count.

    ``lim = LogLimiter(burst=10, interval=1.0)``;
    ``lim.log(logger, logging.WARNING, "9P %s: %s", peer, why)``.  Uses
    ``time.monotonic`` (not trio's clock), so it works outside trio too.
    """

    def __init__(self, burst: int = 10, interval: float = 1.0):
        self.burst = burst
        self.interval = interval
        self._window = float("-inf")
        self._used = 0
        #: Lines left out since the last one let through.
        self.suppressed = 0
        #: Lines left out in total.
        self.suppressed_total = 0

    def allow(self) -> int | None:
        """None if a line must be left out now (and count it); else the number
        of lines left out before it (to report), which is reset."""
        now = time.monotonic()
        if now - self._window >= self.interval:
            self._window = now
            self._used = 0
        if self._used >= self.burst:
            self.suppressed += 1
            self.suppressed_total += 1
            return None
        self._used += 1
        n, self.suppressed = self.suppressed, 0
        return n

    def log(self, logger: logging.Logger, level: int, msg: str, *args, **kw) -> bool:
        """Log ``msg % args`` unless over the rate; True if it was logged."""
        n = self.allow()
        if n is None:
            return False
        if n:
            msg += " (%d similar messages suppressed)"
            args = (*args, n)
        logger.log(level, msg, *args, **kw)
        return True
