"""The least a trio 9P server can do: canned replies, no checks (an anchor).

One trio task per connection waits for its socket (``wait_readable``: trio's
epoll), reads up to READ_SIZE bytes as our server does, cuts frames,
answers each with a reply built from the request alone (Rversion, Rlerror
to Tauth, Rattach, Rwalk, Rlopen, Rgetattr of a fixed file, Rread of zeros,
Rwrite of the count, Rclunk) and writes all the replies of one read with
one write(2) (trio's send_all only for what the kernel did not take).  No
fids, no tags, no cancel scopes, no file code: what it costs per request is
the event loop, its epoll calls, one read(2) and one write(2), and the
codec.  bench/ninep_bench.py serves diodload with it, beside diod and
``python -m ninep serve``, to tell the cost of trio from the cost of our
server.  Speaks 9P2000.L only and trusts its peer (a malformed frame ends
the process): a benchmark's anchor, nothing more.

    python bench/ninep_trio_floor.py PORT
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ninep import messages as m  # noqa: E402
from ninep.codec import encode  # noqa: E402
from ninep.limits import READ_SIZE  # noqa: E402
from ninep.qid import Qid  # noqa: E402

L = m.Dialect.L
QID = Qid(0, 0, 1)
ZEROS = bytes(1 << 20)
MSIZE = 65536 + m.IOHDRSZ


def reply(typ: int, tag: int, frame: bytes) -> bytes:
    """The canned reply to a request of type ``typ``."""
    if typ == m.Tgetattr.TYPE:
        return encode(m.Rgetattr(tag, m.P9_GETATTR_BASIC, QID, 0o100644, 0, 0, 1, 0, 0, 4096, 0,
                                 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), L)
    if typ == m.Tread.TYPE:
        (count,) = struct.unpack_from("<I", frame, 19)  # fid[4] offset[8] count[4]
        return encode(m.Rread(tag=tag, data=ZEROS[:min(count, MSIZE - m.IOHDRSZ)]), L)
    if typ == m.Twrite.TYPE:
        (count,) = struct.unpack_from("<I", frame, 19)
        return encode(m.Rwrite(tag=tag, count=count), L)
    if typ == m.Tclunk.TYPE:
        return encode(m.Rclunk(tag=tag), L)
    if typ == m.Twalk.TYPE:
        (nwname,) = struct.unpack_from("<H", frame, 15)  # fid[4] newfid[4] nwname[2]
        return encode(m.Rwalk(tag=tag, wqids=(QID,) * nwname), L)
    if typ == m.Tlopen.TYPE:
        return encode(m.Rlopen(tag=tag, qid=QID, iounit=0), L)
    if typ == m.Tattach.TYPE:
        return encode(m.Rattach(tag=tag, qid=QID), L)
    if typ == m.Tauth.TYPE:  # no authentication: ENOENT, as diod answers
        return encode(m.Rlerror(tag=tag, ecode=errno.ENOENT), L)
    if typ == m.Tversion.TYPE:
        (msize,) = struct.unpack_from("<I", frame, 7)
        return encode(m.Rversion(tag=tag, msize=min(msize, MSIZE), version="9P2000.L"), L)
    return encode(m.Rlerror(tag=tag, ecode=errno.EOPNOTSUPP), L)


async def connection(stream: trio.SocketStream) -> None:
    fd = stream.socket.fileno()
    buf = bytearray()
    while True:
        await trio.lowlevel.wait_readable(fd)
        data = os.read(fd, READ_SIZE)
        if not data:
            return
        buf += data
        out = []
        at = 0
        while len(buf) - at >= 7:
            (size,) = struct.unpack_from("<I", buf, at)
            if len(buf) - at < size:
                break
            typ, tag = struct.unpack_from("<BH", buf, at + 4)
            out.append(reply(typ, tag, bytes(buf[at:at + size])))
            at += size
        del buf[:at]
        if out:
            data = b"".join(out)
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                await stream.send_all(data[sent:])


async def main() -> None:
    await trio.serve_tcp(connection, int(sys.argv[1]), host="127.0.0.1")


if __name__ == "__main__":
    trio.run(main)
