"""Wait records: what ``/proc/<pid>/wait`` hands out, one ended child per
read, oldest first (znodes ``proc/<pid>/wait/w-<seq>``, written by
cloudfs.exits when a child ends).

Errors are FsError: ENOENT (no such process), EAGAIN (nonblocking and no
record), EIO (a corrupt record, or the store's EIO).
"""

from __future__ import annotations

import errno

import trio

from ninep.errors import FsError

from .process import WaitRecord
from .records import no_process
from .store import BadVersionError, NoNodeError, Store
from .znodes import Layout


class Waits:
    """Consuming the wait records of the deployment's processes."""

    def __init__(self, store: Store, layout: Layout):
        self.store = store
        self.layout = layout

    async def next(self, pid: int, nonblocking: bool) -> WaitRecord:
        """Consume the oldest wait record of ``pid``, blocking until one exists.

        Cancelling (a Tflush, an interrupted read) while it waits consumes
        nothing; once the delete is sent it is finished shielded and the
        record returned with no checkpoint after, so the caller's reply goes
        out (before Rflush, as flush(5) allows): never consumed and dropped.
        A corrupt record is consumed and that read fails with EIO; names this
        code does not write are left alone (EIO if there is nothing else)."""
        L = self.layout
        while True:
            names = await self.ready(pid, nonblocking)
            for n in sorted(names):
                if not L.is_wait_name(n):
                    continue
                path = L.wait_record(pid, n)
                got = await self.store.get(path)
                if got is None:
                    continue
                try:
                    with trio.CancelScope(shield=True):  # bounded by the store's op_timeout
                        await self.store.delete(path, got[1].version)
                except (NoNodeError, BadVersionError):
                    continue
                return WaitRecord.from_json(got[0])
            if not any(L.is_wait_name(n) for n in names):
                # only names this code does not write: nothing will ever be consumed
                raise FsError(errno.EIO, f"process {pid}'s wait records are corrupt")

    async def ready(self, pid: int, nonblocking: bool = False) -> list[str]:
        """The names under ``pid``'s wait znode once there is at least one
        (a child watch), consuming nothing.  ENOENT if no such process;
        EAGAIN when ``nonblocking`` and there is none."""
        try:
            return await self.store.wait_children(self.layout.wait(pid), nonblocking)
        except FsError as e:
            if e.errno == errno.ENOENT:
                raise no_process(pid) from None
            if e.errno == errno.EAGAIN and nonblocking:
                raise FsError(errno.EAGAIN, f"no child of process {pid} has ended") from None
            raise
