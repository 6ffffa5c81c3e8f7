"""``cloudfs ctl PID COMMAND…`` and ``cloudfs kill PID…``: ctl writes with
the daemon's words on failure.

Over FUSE a failed ``echo frok > /mnt/cloud/proc/7/ctl`` only says "Invalid
argument": FUSE carries an errno, the message goes to the daemon's log.
These commands write to ``/proc/<pid>/ctl`` over 9P2000.u, whose Rerror
carries the message too (by default on the operator socket of the state
dir), print what the write returns (a fork's new pid) and, on failure, the
daemon's message, exiting non-zero.
"""

from __future__ import annotations

import os

from ninep.client import open_client
from ninep.errors import FsError


async def ctl(server: str, pid: str, command: str) -> str:
    """Write ``command`` to ``/proc/<pid>/ctl`` on the 9P server ``server``
    and return what a read of the same open gives back (for ``fork`` the new
    pid).  Raises FsError with the daemon's errno and message, OSError when
    the server cannot be reached."""
    async with open_client(server, version="9P2000.u") as c:
        # one name per walk: a walk that fails on its first name brings the
        # daemon's own error back (a later name only ends the walk short)
        async with await c.walk("proc") as proc, await proc.walk(pid) as p, await p.walk("ctl") as f:
            await f.open(os.O_RDWR)
            await f.write(0, command.encode() + b"\n")
            return (await f.read_all()).decode(errors="replace")


async def kill(server: str, pids: list[str]) -> list[tuple[str, Exception | None]]:
    """``kill`` written to each pid's ctl; (pid, FsError/OSError or None) in order."""
    out: list[tuple[str, Exception | None]] = []
    for pid in pids:
        try:
            await ctl(server, pid, "kill")
            out.append((pid, None))
        except (FsError, OSError) as e:
            out.append((pid, e))
    return out
