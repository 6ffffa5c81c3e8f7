"""The one error type of cloudfs and ninep, and the 9P protocol error.

:class:`FsError` carries a Linux errno and a human message. File code raises it;
each edge translates it exactly once: the 9P server into Rlerror (9P2000.L,
errno only), Rerror (9P2000, message only) or Rerror with errno (9P2000.u);
the FUSE adapter into ``pyfuse3.FUSEError(errno)`` after logging the message.

:class:`ProtocolError` means a peer sent bytes that are not a valid 9P message
(bad size field, unknown type, truncated string, message over msize).  A server
closes only the offending connection when it sees one.
"""

from __future__ import annotations

import errno as _errno
import os


class FsError(Exception):
    """A file operation failed with a Linux errno and a message.

    ``FsError(errno.EINVAL, "unknown ctl command 'frok'")``.  ``errno`` is a
    positive Linux errno (``errno.ENOENT`` …); ``message`` is a short sentence
    for the user (9P2000 carries it in Rerror's ename; FUSE can only log it).
    With no message, ``os.strerror(errno)`` is used.
    """

    def __init__(self, errno: int, message: str | None = None):
        if not isinstance(errno, int) or errno <= 0:
            raise ValueError(f"FsError needs a positive errno, got {errno!r}")
        self.errno = errno
        self.message = message or os.strerror(errno)
        super().__init__(errno, self.message)

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{name}: {self.message}"


class ProtocolError(Exception):
    """Bytes from a peer that are not a valid 9P message (intro(5) framing).

    Raised by the sans-IO decoder; the connection that sent them cannot be
    trusted to stay in sync and is closed.
    """
